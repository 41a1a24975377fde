"""models.data against the real FluidSynth CLI and GM SoundFont (no mocks)."""

import shutil
from dataclasses import replace

import mido
import numpy as np
import pytest

from wavecast.models import corpus, data

if shutil.which("fluidsynth") is None or not data.SOUNDFONT.exists():
    pytest.skip("needs the fluidsynth binary and /usr/share/sounds/sf2/FluidR3_GM.sf2 "
                "(Debian: apt-get install fluidsynth fluid-soundfont-gm)", allow_module_level=True)

TINY = data.Recipe(performances=2, seconds=3.0, heldout=1, melodies=2)
FRAMES = 300


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data-cache")


@pytest.fixture(scope="module")
def tiny(cache) -> data.Dataset:
    return data.build(TINY, cache)


def _pitch(window: np.ndarray, expected: float) -> float:
    """Fundamental by autocorrelation, searching periods within 3 semitones of `expected` (no octave
    errors), refined by parabolic interpolation."""
    x = window - window.mean()
    n = len(x)
    r = np.fft.irfft(np.abs(np.fft.rfft(x, 2 * n)) ** 2)[:n] / (n - np.arange(n))
    lo = int(data.SAMPLE_RATE / (expected * 2 ** (3 / 12)))
    hi = int(np.ceil(data.SAMPLE_RATE / (expected * 2 ** (-3 / 12))))
    k = lo + int(np.argmax(r[lo : hi + 1]))
    a, b, c = r[k - 1], r[k], r[k + 1]
    return data.SAMPLE_RATE / (k + 0.5 * (a - c) / (a - 2 * b + c))


def _steady_pitch_errors(p: data.Performance) -> np.ndarray:
    """Relative pitch error of ~100 ms windows centred on frames whose note has sounded >= 150 ms with no
    bend (f0 unchanged and on the equal-tempered grid) and loudness > -45 dB; windows don't overlap."""
    errors, i = [], 15
    half = 5 * data.HOP  # 100 ms window
    while i < len(p.f0) - 6:
        f = float(p.f0[i])
        steady = np.all(p.f0[i - 15 : i + 6] == p.f0[i]) and np.all(p.loudness[i - 5 : i + 6] > -45)
        on_grid = abs(12 * np.log2(f / 440) - round(12 * np.log2(f / 440))) < 1e-3
        if steady and on_grid:
            centre = i * data.HOP + data.HOP // 2
            errors.append(_pitch(p.audio[centre - half : centre + half].astype(np.float64), f) / f - 1)
            i += 10
        else:
            i += 1
    return np.array(errors)


def test_shapes_and_dtypes(tiny):
    assert tiny.recipe == TINY
    assert len(tiny.train) == 1 and len(tiny.heldout) == 1
    lowest = 440 * 2 ** ((TINY.low_note - 2 - 69) / 12)
    highest = 440 * 2 ** ((TINY.high_note + 2 - 69) / 12)
    for p in tiny.train + tiny.heldout:
        assert p.f0.shape == (FRAMES,) and p.f0.dtype == np.float32
        assert p.loudness.shape == (FRAMES,) and p.loudness.dtype == np.float32
        assert p.audio.shape == (FRAMES * data.HOP,) and p.audio.dtype == np.float32
        assert np.all((p.f0 >= lowest * 0.999) & (p.f0 <= highest * 1.001))
        np.testing.assert_array_equal(p.loudness, data.loudness_db(p.audio))


def test_audio_has_energy_and_does_not_clip(tiny):
    for p in tiny.train + tiny.heldout:
        assert np.sqrt(np.mean(p.audio.astype(np.float64) ** 2)) > 1e-3
        assert np.abs(p.audio).max() < 0.95
        assert np.mean(p.loudness > -45) > 0.3


def test_loudness_db_reference_levels():
    t = np.arange(data.SAMPLE_RATE) / data.SAMPLE_RATE
    sine = np.sin(2 * np.pi * 1000 * t).astype(np.float32)
    np.testing.assert_allclose(data.loudness_db(sine), -3.01, atol=0.05)
    np.testing.assert_array_equal(data.loudness_db(np.zeros(4800, np.float32)), data.LOUDNESS_FLOOR_DB)
    assert data.loudness_db(np.zeros(1000, np.float32)).shape == (2,)


def test_event_timing_is_sample_exact():
    """A note at t ms sounds from sample 48 * t + one 64-sample FluidSynth block, as data._f0 assumes."""
    for ms in (0, 1000, 1236):
        events = [(ms, mido.Message("note_on", note=69, velocity=127)),
                  (ms + 200, mido.Message("note_off", note=69))]
        audio = data._render(data._midi(events, 80, ms + 300), (ms + 300) * 48, gain=0.5)
        onset = int(np.flatnonzero(np.abs(audio) > 1e-6)[0])
        assert data._effect_sample(ms) <= onset <= data._effect_sample(ms) + 2


def test_f0_follows_notes_and_bends():
    """Before the first note: the first note; then the latest note-on and bend, held through rests."""
    events = [(40, mido.Message("note_on", note=69)), (100, mido.Message("note_on", note=81)),
              (104, mido.Message("note_off", note=69)), (200, data._pitchwheel(1.0)),
              (300, mido.Message("note_off", note=81))]
    f0 = data._f0(events, 40)
    first_81 = (data._effect_sample(100) - data.HOP // 2) // data.HOP + 1  # first frame centred after it
    first_bent = (data._effect_sample(200) - data.HOP // 2) // data.HOP + 1
    np.testing.assert_allclose(f0[:first_81], 440, rtol=1e-6)
    np.testing.assert_allclose(f0[first_81:first_bent], 880, rtol=1e-6)
    np.testing.assert_allclose(f0[first_bent:], 880 * 2 ** (1 / 12), rtol=1e-6)
    assert data.Recipe(seconds=20).key() == data.Recipe(seconds=20.0).key() != data.Recipe(seed=1).key()


def test_rendered_pitch_matches_f0(tiny):
    errors = np.concatenate([_steady_pitch_errors(p) for p in tiny.train + tiny.heldout])
    assert len(errors) >= 5, f"only {len(errors)} steady windows to check"
    assert np.mean(np.abs(errors) < 0.015) >= 0.9, np.round(errors * 100, 2)


def test_second_build_loads_cache(tiny, cache):
    assert (cache / f"{TINY.key()}.npz").exists()
    lines: list[str] = []
    again = data.build(TINY, cache, progress=lines.append)
    assert lines == []
    for a, b in zip(tiny.train + tiny.heldout, again.train + again.heldout, strict=True):
        for field in ("f0", "loudness", "audio"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


def test_progress_and_seed(tiny, cache):
    other = data.Recipe(performances=1, seconds=3.0, heldout=0, seed=1, melodies=2)  # corpus cached by `tiny`
    lines: list[str] = []
    built = data.build(other, cache, progress=lines.append)
    assert lines == ["rendered 1/1"]
    assert other.key() != TINY.key()
    assert not np.array_equal(built.train[0].audio, tiny.train[0].audio)


def test_tune_fragments_keep_their_shape_rests_and_rhythm():
    events = [(62, 1.0), (66, 0.5), (69, 0.5), (None, 1.0), (74, 2.0), (73, 0.25), (71, 0.75)] * 3
    tune = corpus.Tune("t#1", "miscFolk", "D major", "4/4", 4.0, 0.0, events)
    rng = np.random.default_rng(0)
    fragments = 0
    for _ in range(60):
        pitches, beats, held = data._phrase_pitches(rng, TINY, [tune])
        if beats is None:
            continue
        fragments += 1
        n = len(pitches)
        first = next(i for i in range(len(events)) if [q for _, q in events[i : i + n]] == beats)
        source = events[first : first + n]
        assert [p is None for p in pitches] == [m is None for m, _ in source] and not held
        heard = [p for p in pitches if p is not None]
        written = np.array([m for m, _ in source if m is not None])
        # One transposition, folded back into the range at its edges: the melody's shape is kept.
        assert any(data._fold(written + shift, TINY).tolist() == heard for shift in range(-60, 61))
        assert all(TINY.low_note <= p <= TINY.high_note for p in heard)
    assert fragments >= 5


def test_brightness_is_the_velocity_each_note_was_played_at(cache):
    """Each frame's brightness is its note's velocity over the data's 40..127: in range, new where a note
    starts, and louder where it is higher (velocity sets the note's level before the CC11 expression does); the
    unseen performances carry it, and a cached build gives what a fresh render of the same score does."""
    [perf] = data.unseen(TINY, cache)
    bright = perf.brightness
    assert bright.shape == perf.f0.shape and 0.0 <= bright.min() < bright.max() <= 1.0
    assert np.allclose(bright * 87 + 40, np.round(bright * 87 + 40), atol=1e-4)  # whole velocities
    changes = np.flatnonzero(np.diff(bright)) + 1
    assert len(changes) >= 5 and np.all(perf.f0[changes] != perf.f0[changes - 1])  # each at a new note's first frame
    voiced = perf.loudness > -60
    assert np.corrcoef(bright[voiced], perf.loudness[voiced])[0, 1] > 0.4
    built = data.build(TINY, cache)  # the second build reads the cache, which stores no brightness
    assert np.array_equal(data.build(TINY, cache).train[0].brightness, built.train[0].brightness)
    assert np.array_equal(built.train[0].brightness, data.render_one(TINY, 0, cache).brightness)


def test_a_level_raises_the_rendered_audio_and_its_loudness(tiny, cache):
    """The trumpet's data is rendered LEVEL_DB louder than the common peak; recipes without a level keep their
    keys, so their caches and manifests stay valid."""
    louder = replace(TINY, level_db=6.0)
    assert louder.key() != TINY.key() and replace(louder, level_db=0.0).key() == TINY.key()
    plain, raised = tiny.train[0], data.render_one(louder, 0, cache)
    np.testing.assert_allclose(raised.audio, plain.audio * 10 ** (6 / 20), rtol=1e-5, atol=1e-7)
    voiced = plain.loudness > -60
    np.testing.assert_allclose(raised.loudness[voiced], plain.loudness[voiced] + 6.0, atol=0.01)
    np.testing.assert_array_equal(raised.f0, plain.f0)
