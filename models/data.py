"""Training data for the neural instrument: MIDI performances rendered with FluidSynth.

Each performance is a monophonic line of phrases: folk-tune fragments from the music21 corpus, scale runs,
arpeggios, leaps and held notes; legato and staccato; velocity, expression ramps (CC11), vibrato and glides
as pitch bend. f0 comes from the notes and bends themselves, so it is exact; loudness is measured from the
rendered audio; brightness is each note's velocity (see `brightness_of`). Imports numpy + mido + stdlib
(and music21 through models.corpus, the shared vocabulary of streaming.notes) only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import subprocess
import tempfile
import wave
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mido
import numpy as np

from wavecast.models import corpus
from wavecast.streaming.notes import VELOCITIES

SAMPLE_RATE = 48_000  # Hz
HOP = 480  # samples per frame (10 ms)
SOUNDFONT = Path("/usr/share/sounds/sf2/FluidR3_GM.sf2")
LOUDNESS_FLOOR_DB = -80.0
DATA_VERSION = 2  # bump whenever generation or rendering changes, so old caches are not reused

# Tempo 960000 us/beat at 960 ticks/beat makes 1 tick = 1 ms. FluidSynth renders 64-sample blocks, reads the
# MIDI player's clock in whole ms at the start of each block and applies an event one block after the block
# that dispatched it. On a 4 ms grid (= 3 blocks at 48 kHz) every event lands on a block start, so an event
# at t ms sounds from sample exactly 48 * t + 64 (measured; tests/test_data.py checks it).
_TICKS_PER_BEAT = 960
_TEMPO = 960_000
_GRID_MS = 4
_SYNTH_BLOCK = 64
_PROBE_GAIN = 0.5  # no GM program clips at this master gain
_PEAK = 0.8  # target peak for a program's loudest playing (see _gain)
_BEND_RANGE = 2  # semitones, set with RPN 0
_BEND_STEP_MS = 8
_EXPRESSION_STEP_MS = 20
_SCALES = ((0, 2, 4, 5, 7, 9, 11), (0, 2, 3, 5, 7, 8, 10))
_CHORDS = ((0, 4, 7), (0, 3, 7), (0, 4, 7, 10), (0, 3, 6, 9))
_ORDER = {"note_off": 0, "control_change": 1, "pitchwheel": 1, "note_on": 2}  # within one ms

Event = tuple[int, mido.Message]  # (time in ms, message)
# Sustained GM instruments: program (0-based) and the MIDI note range the real instrument plays (sounding
# pitch), which is each one's training range and f0 control range.
INSTRUMENTS = {
    "violin": (40, 55, 96), "cello": (42, 36, 81), "trumpet": (56, 52, 84),
    "clarinet": (71, 50, 91), "flute": (73, 60, 96),
}
# dB added to an instrument's rendered data after _gain's peak normalisation. FluidSynth's trumpet is 6-9 dB
# quieter in RMS than the other programs at one peak: at the common peak its data's loudest 1 % lay under
# -22.5 dB (the others' under -12.7 to -15.9 dB), below what a composed stream at the default volume asks for.
# +7 dB puts its level percentiles among the others' and keeps its loudest performance under full scale (0.98).
LEVEL_DB = {"trumpet": 7.0}


UNSEEN_SEED = 1000  # the quality gate's performances come from the recipe's seed + this
UNSEEN_TUNES = 50  # their melodies from this many tunes of each collection after the recipe's own


@dataclass(frozen=True)
class Recipe:
    program: int = 73  # GM program number, 0-based (73 = flute)
    performances: int = 24  # how many performances to render
    seconds: float = 20.0  # length of each performance
    low_note: int = 24  # MIDI note range; 24..95 covers f0 ~32..1976 Hz
    high_note: int = 95
    seed: int = 0
    heldout: int = 2  # performances kept out of training (the last ones)
    melodies: int = 50  # tunes taken from each shippable music21 folk collection for melody phrases
    level_db: float = 0.0  # added to the rendered audio (LEVEL_DB)

    def __post_init__(self) -> None:
        if not (0 <= self.low_note <= self.high_note <= 127 and 0 <= self.program <= 127):
            raise ValueError(f"bad note range or program in {self}")
        if not (self.seconds >= 1.0 and 0 <= self.heldout <= self.performances):
            raise ValueError(f"need seconds >= 1 and 0 <= heldout <= performances in {self}")

    def key(self) -> str:
        fields = dataclasses.asdict(self) | {"seconds": float(self.seconds), "level_db": float(self.level_db)}
        if not self.level_db:  # a field added later: recipes without it keep their keys (and caches)
            del fields["level_db"]
        text = f"{json.dumps(fields, sort_keys=True)}|{DATA_VERSION}|{SOUNDFONT.name}|{SOUNDFONT.stat().st_size}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Performance:
    f0: np.ndarray  # [frames] float32, Hz, exact from notes + pitch bend, at each frame's centre
    loudness: np.ndarray  # [frames] float32, dB: loudness_db() of the rendered audio
    audio: np.ndarray  # [frames * HOP] float32 mono
    brightness: np.ndarray  # [frames] float32, 0..1: the sounding note's velocity (`brightness_of`)


@dataclass
class Dataset:
    recipe: Recipe
    train: list[Performance]
    heldout: list[Performance]


def loudness_db(audio: np.ndarray, hop: int = HOP) -> np.ndarray:
    """RMS level of each hop-long frame in dBFS (full-scale sine = -3 dB), floored at LOUDNESS_FLOOR_DB.

    Not A-weighted, on purpose: the loudness control sets the synthesiser's level, and an A-weighted
    -20 dB at 55 Hz would ask for +10 dBFS of raw signal; a control whose usable range moves with pitch
    is a poor control for the people and composers who set it."""
    frames = len(audio) // hop
    x = np.asarray(audio[: frames * hop], np.float64)
    power = np.square(x.reshape(frames, hop)).mean(axis=1)
    db = 10.0 * np.log10(np.maximum(power, 1e-20))
    return np.maximum(db, LOUDNESS_FLOOR_DB).astype(np.float32)


def brightness_of(velocity: np.ndarray) -> np.ndarray:
    """MIDI velocity -> brightness 0..1 over VELOCITIES. The level of a note is measured apart (loudness, which
    CC11 expression also moves); what velocity adds is timbre: SoundFont 2's default modulators lower the
    filter cutoff as velocity falls, so a harder note is brighter at the same level."""
    low, high = VELOCITIES
    return ((np.asarray(velocity, np.float64) - low) / (high - low)).astype(np.float32)


def build(recipe: Recipe, cache_dir: Path, progress: Callable[[str], None] | None = None) -> Dataset:
    """Render (or load from cache_dir/<recipe.key()>.npz) the dataset. progress gets one short line per
    performance rendered, e.g. 'rendered 3/24'."""
    if not SOUNDFONT.exists():
        raise FileNotFoundError(f"{SOUNDFONT} is missing (Debian package fluid-soundfont-gm)")
    path = Path(cache_dir) / f"{recipe.key()}.npz"
    tunes = corpus.load(corpus.SHIPPABLE, recipe.melodies, cache_dir, progress) if recipe.melodies else []
    if path.exists():
        with np.load(path) as npz:
            f0, loudness, audio = npz["f0"], npz["loudness"], npz["audio"]
    else:
        gain, rendered = _gain(recipe), []
        for index in range(recipe.performances):
            rendered.append(_performance(recipe, index, gain, tunes))
            if progress is not None:
                progress(f"rendered {index + 1}/{recipe.performances}")
        f0 = np.stack([p.f0 for p in rendered])
        loudness = np.stack([p.loudness for p in rendered])
        audio = np.stack([p.audio for p in rendered])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, f0=f0, loudness=loudness, audio=audio)
        os.replace(tmp, path)
    # brightness comes from the score alone (no rendering), so caches without it stay valid
    performances = [Performance(f0[i], loudness[i], audio[i], _brightness(*_score(recipe, i, tunes)[:2]))
                    for i in range(recipe.performances)]
    split = recipe.performances - recipe.heldout
    return Dataset(recipe, performances[:split], performances[split:])


def render_one(recipe: Recipe, index: int, cache_dir: Path, tunes: list[corpus.Tune] | None = None) -> Performance:
    """Performance `index` of the recipe alone, exactly as `build` renders it (not cached); with `tunes`, its
    melody phrases come from those tunes instead of the recipe's (held-out performances)."""
    if tunes is None:
        tunes = corpus.load(corpus.SHIPPABLE, recipe.melodies, cache_dir) if recipe.melodies else []
    return _performance(recipe, index, _gain(recipe), tunes)


def unseen(recipe: Recipe, cache_dir: Path, count: int | None = None) -> list[Performance]:
    """`count` (default the recipe's `heldout`) performances training never saw, for the quality gate: rendered
    as the recipe's, but from seed + UNSEEN_SEED (other phrases, dynamics and bends) and, when the recipe
    draws melodies, from the UNSEEN_TUNES tunes of each collection after the recipe's own, less any of the
    same family as one of the recipe's (the same tune in another key, edition or collection: see
    `corpus.families`), so that no performance replays a melody training heard."""
    tunes: list[corpus.Tune] = []
    if recipe.melodies:
        loaded = corpus.load(corpus.SHIPPABLE, recipe.melodies + UNSEEN_TUNES, cache_dir)
        taken: dict[str, int] = {}
        seen = []  # the recipe's melodies: the first `melodies` tunes of each collection, as `build` loads them
        for t in loaded:
            taken[t.collection] = taken.get(t.collection, 0) + 1
            seen.append(taken[t.collection] <= recipe.melodies)
        family = corpus.families(loaded)
        touched = {f for f, s in zip(family, seen, strict=True) if s}
        tunes = [t for t, f in zip(loaded, family, strict=True) if f not in touched]
    other = dataclasses.replace(recipe, seed=recipe.seed + UNSEEN_SEED)
    return [_performance(other, index, _gain(other), tunes)
            for index in range(recipe.heldout if count is None else count)]


def render_midi_file(path: Path, samples: int, gain: float = _PROBE_GAIN) -> np.ndarray:
    """A MIDI file rendered as the training data is (FluidSynth, dry, mono float32, `samples` long)."""
    return _render(mido.MidiFile(path), samples, gain)


def _gain(recipe: Recipe) -> float:
    """FluidSynth master gain that puts the program's loudest playing (velocity and expression 127, legato
    over the whole note range) at a peak of _PEAK; GM programs differ by 12 dB at one gain."""
    events: list[Event] = []
    for i, note in enumerate(range(recipe.low_note, recipe.high_note + 1)):
        events += [(200 * i, mido.Message("note_on", note=note, velocity=127)),
                   (200 * i + 208, mido.Message("note_off", note=note))]
    end = 200 * (recipe.high_note - recipe.low_note + 1) + 300
    events.sort(key=lambda e: (e[0], _ORDER[e[1].type]))
    probe = _render(_midi(events, recipe.program, end), end * SAMPLE_RATE // 1000, _PROBE_GAIN)
    return _PROBE_GAIN * _PEAK / float(np.abs(probe).max())


def _score(recipe: Recipe, index: int, tunes: list[corpus.Tune]) -> tuple[list[Event], int, int]:
    """Performance `index`'s MIDI events and its length in frames and in ms."""
    frames = round(recipe.seconds * SAMPLE_RATE / HOP)
    total_ms = frames * HOP * 1000 // SAMPLE_RATE
    return _events(np.random.default_rng([recipe.seed, index]), recipe, total_ms, tunes), frames, total_ms


def _performance(recipe: Recipe, index: int, gain: float, tunes: list[corpus.Tune]) -> Performance:
    events, frames, total_ms = _score(recipe, index, tunes)
    audio = _render(_midi(events, recipe.program, total_ms + 100), frames * HOP, gain)
    audio *= np.float32(10 ** (recipe.level_db / 20))
    return Performance(_f0(events, frames), loudness_db(audio), audio, _brightness(events, frames))


def _q(ms: float) -> int:
    """Snap a time to the event grid."""
    return _GRID_MS * round(ms / _GRID_MS)


def _pitchwheel(semitones: float) -> mido.Message:
    value = round(semitones / _BEND_RANGE * 8192)
    return mido.Message("pitchwheel", pitch=min(max(value, -8192), 8191))


def _events(rng: np.random.Generator, recipe: Recipe, total_ms: int, tunes: list[corpus.Tune]) -> list[Event]:
    """A performance: phrases separated by optional rests, sorted by time."""
    events: list[Event] = []
    t = _q(rng.uniform(0, 300))
    while t < total_ms - 200:
        phrase, t = _phrase(rng, recipe, t, total_ms, tunes)
        events += phrase
        if rng.random() < 0.7:
            t += _q(rng.uniform(40, 700))
    # Notes still on at the end are released there (a held note would keep FluidSynth rendering forever).
    events = [(min(t, total_ms), m) for t, m in events if t < total_ms or m.type == "note_off"]
    # Sorting is stable, so of two bends at one ms the one generated later (the next note's) wins.
    return sorted(events, key=lambda e: (e[0], _ORDER[e[1].type]))


def _phrase_pitches(rng: np.random.Generator, recipe: Recipe, tunes: list[corpus.Tune]
                    ) -> tuple[list[int | None], list[float] | None, bool]:
    """One phrase around a register centre drawn uniformly from the range: its pitches (None = rest), their
    lengths in beats when the phrase brings its own rhythm (a tune fragment), and whether notes are held."""
    centre = int(rng.integers(recipe.low_note, recipe.high_note + 1))
    style = rng.integers(5) if tunes else rng.integers(4)
    if style == 4:  # a fragment of a folk tune, its rhythm kept, moved to the register centre
        tune = tunes[rng.integers(len(tunes))]
        length = int(rng.integers(6, 17))
        first = int(rng.integers(0, max(1, len(tune.events) - length)))
        fragment = tune.events[first : first + length]
        sounding = [m for m, _ in fragment if m is not None]
        shift = centre - int(np.median(sounding)) if sounding else 0
        folded = _fold(np.array([m + shift if m is not None else 0 for m, _ in fragment]), recipe)
        pitches = [int(p) if m is not None else None for p, (m, _) in zip(folded, fragment, strict=True)]
        return pitches, [q for _, q in fragment], False
    if style == 0:  # one or two long held notes
        pitches = centre + rng.integers(-2, 3, int(rng.integers(1, 3)))
    elif style == 1:  # random leaps
        pitches = centre + rng.integers(-12, 13, int(rng.integers(3, 13)))
    else:  # stepwise scale run or arpeggio, mostly in one direction
        degrees = _SCALES[rng.integers(2)] if style == 2 else _CHORDS[rng.integers(len(_CHORDS))]
        direction = rng.choice([-1, 1])
        steps = np.where(rng.random(int(rng.integers(3, 13))) < 0.8, direction, -direction)
        walk = np.concatenate([[0], np.cumsum(steps[1:])])
        pitches = np.array([centre + 12 * (d // len(degrees)) + degrees[d % len(degrees)] for d in walk])
    return _fold(pitches, recipe).tolist(), None, style == 0


def _fold(pitches: np.ndarray, recipe: Recipe) -> np.ndarray:
    """Fold pitches that leave the range back into it (clipping would pile notes up at the edges)."""
    low, span = recipe.low_note, recipe.high_note - recipe.low_note
    return low + span - np.abs((pitches - low) % (2 * span) - span) if span else np.full_like(pitches, low)


def _phrase(rng: np.random.Generator, recipe: Recipe, start: int, end: int, tunes: list[corpus.Tune]
            ) -> tuple[list[Event], int]:
    """Events of one phrase starting at `start` ms (no note starts at `end` or later), and the time the
    next note may start."""
    pitches, beats, held = _phrase_pitches(rng, recipe, tunes)
    legato = held or rng.random() < 0.5
    beat = rng.uniform(120, 450) if legato else rng.uniform(90, 300)
    base_velocity = int(rng.integers(40, 128))
    events: list[Event] = []
    t, previous = start, None
    if beats is not None:  # a tune's own rhythm: `beat` is then a quarter note
        beat = rng.uniform(400, 900)
    for k, pitch in enumerate(pitches):
        if t >= end:
            break
        if beats is not None:
            dur = max(_GRID_MS * 20, _q(beat * beats[k]))
        else:
            dur = _q(rng.uniform(700, 2500) if held else beat * rng.choice([0.5, 1, 1, 1, 1.5, 2]))
        if pitch is None:  # a rest in the tune
            t, previous = t + dur, None
            continue
        if not legato:
            length = max(40, _q(dur * rng.uniform(0.3, 0.6)))
        else:  # the next note starts at this note's off, or just before when it is another pitch
            overlap = k + 1 < len(pitches) and pitches[k + 1] != pitch
            length = dur + (_GRID_MS * int(rng.integers(0, 3)) if overlap else 0)
        velocity = int(np.clip(base_velocity + rng.integers(-12, 13), 40, 127))
        events += [(t, mido.Message("note_on", note=pitch, velocity=velocity)),
                   (t + length, mido.Message("note_off", note=pitch))]
        step = 0 if previous is None else previous - pitch
        glide = step if legato and 0 < abs(step) <= _BEND_RANGE and rng.random() < 0.5 else 0
        events += _bends(rng, t, min(length, dur), glide)
        t, previous = t + dur, pitch
    first, last = rng.integers(40, 128, 2)  # expression ramp: crescendo or diminuendo
    for s in range(start, t, _EXPRESSION_STEP_MS):
        value = round(first + (last - first) * (s - start) / (t - start))
        events.append((s, mido.Message("control_change", control=11, value=value)))
    return events, t


def _bends(rng: np.random.Generator, start: int, length: int, glide: float) -> list[Event]:
    """Pitch bend for a note sounding `length` ms from `start`: a glide in from `glide` semitones away,
    sometimes vibrato (5-6 Hz, 20-50 cents) on long notes, else none; back to 0 at the end."""
    events = [(start, _pitchwheel(glide))]
    if glide:
        ramp = _q(rng.uniform(40, 160))
        for s in range(start + _BEND_STEP_MS, start + min(ramp, length), _BEND_STEP_MS):
            events.append((s, _pitchwheel(glide * (1 - (s - start) / ramp))))
    elif length >= 250 and rng.random() < 0.5:
        rate, cents, onset = rng.uniform(5, 6), rng.uniform(20, 50), start + _q(rng.uniform(40, 200))
        for s in range(onset, start + length, _BEND_STEP_MS):
            events.append((s, _pitchwheel(cents / 100 * math.sin(2 * math.pi * rate * (s - onset) / 1000))))
    return events + [(start + length, _pitchwheel(0))]


def _midi(events: list[Event], program: int, end_ms: int) -> mido.MidiFile:
    """One track, channel 0: program, pitch-bend range (RPN 0), volume 100, then the events."""
    setup = [(101, 0), (100, 0), (6, _BEND_RANGE), (38, 0), (7, 100)]
    track = mido.MidiTrack([mido.MetaMessage("set_tempo", tempo=_TEMPO),
                            mido.Message("program_change", program=program),
                            *(mido.Message("control_change", control=c, value=v) for c, v in setup)])
    now = 0
    for t, message in events:
        track.append(message.copy(time=t - now))
        now = t
    track.append(mido.MetaMessage("end_of_track", time=end_ms - now))
    return mido.MidiFile(type=0, ticks_per_beat=_TICKS_PER_BEAT, tracks=[track])


def _render(midi: mido.MidiFile, samples: int, gain: float) -> np.ndarray:
    """Render dry (no reverb/chorus) to mono float32, trimmed or zero-padded to `samples`."""
    with tempfile.TemporaryDirectory(prefix="wavecast-") as tmp:
        mid_path, wav_path = Path(tmp) / "in.mid", Path(tmp) / "out.wav"
        midi.save(mid_path)
        command = ["fluidsynth", "-ni", "-q", "-R", "0", "-C", "0", "-g", f"{gain:.6f}", "-r", str(SAMPLE_RATE),
                   "-T", "wav", "-O", "s32", "-F", str(wav_path), str(SOUNDFONT), str(mid_path)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60 + samples / SAMPLE_RATE)
        if result.returncode != 0 or not wav_path.exists():
            raise RuntimeError(f"fluidsynth failed ({result.returncode}): {result.stderr.strip()}")
        with wave.open(str(wav_path), "rb") as w:
            channels, width, rate = w.getnchannels(), w.getsampwidth(), w.getframerate()
            raw = w.readframes(w.getnframes())
    if (width, rate) != (4, SAMPLE_RATE):
        raise RuntimeError(f"fluidsynth wrote {width * 8}-bit {rate} Hz, expected 32-bit {SAMPLE_RATE} Hz")
    mono = np.frombuffer(raw, "<i4").reshape(-1, channels).mean(axis=1) / 2.0**31
    if len(mono) and np.abs(mono).max() > 0.99:
        raise RuntimeError(f"rendered audio clips at gain {gain:.3f}")
    audio = np.zeros(samples, np.float32)
    audio[: min(samples, len(mono))] = mono[:samples]
    return audio


def _f0(events: list[Event], frames: int) -> np.ndarray:
    """f0 at each frame centre from the sounding note (the latest note-on; before the first, the first)
    and the latest bend, each from the sample at which FluidSynth applies it."""
    bends = [(_effect_sample(t), m.pitch) for t, m in events if m.type == "pitchwheel"]
    note = _note_on_values(events, frames, "note")
    bend = _latest([(-1, 0), *bends], np.arange(frames) * HOP + HOP // 2)
    return (440.0 * 2.0 ** ((note - 69 + bend * _BEND_RANGE / 8192) / 12)).astype(np.float32)


def _brightness(events: list[Event], frames: int) -> np.ndarray:
    """Each frame's brightness: the velocity of the sounding note (the latest note-on, as `_f0` takes its note)."""
    return brightness_of(_note_on_values(events, frames, "velocity"))


def _note_on_values(events: list[Event], frames: int, field: str) -> np.ndarray:
    """`field` ("note" or "velocity") of the sounding note at each frame centre: the latest note-on's (before
    the first, the first's), from the sample at which FluidSynth applies it."""
    notes = [(_effect_sample(t), getattr(m, field)) for t, m in events if m.type == "note_on" and m.velocity > 0]
    return _latest([(-1, notes[0][1]), *notes], np.arange(frames) * HOP + HOP // 2)


def _latest(changes: list[tuple[int, int]], samples: np.ndarray) -> np.ndarray:
    """The value of the latest change at or before each sample (changes sorted by sample)."""
    times, values = (np.array(column) for column in zip(*changes, strict=True))
    return values[np.searchsorted(times, samples, side="right") - 1].astype(np.float64)


def _effect_sample(ms: int) -> int:
    return ms * SAMPLE_RATE // 1000 + _SYNTH_BLOCK
