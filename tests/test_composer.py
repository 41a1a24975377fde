"""The composer on the shipped models: a real ONNX composer writing notes for a real ONNX instrument.

Renders run the engine's own code path (`streaming.engine.compose`); the live test runs `wavecast serve`
with an aiortc client on 127.0.0.1 and checks it plays the same notes as the render.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import Server
from wavecast.daemon.client import Listener
from wavecast.models.quality import count_clicks
from wavecast.models.store import SHIPPED
from wavecast.streaming.analysis import estimate_f0
from wavecast.streaming.composer import (
    ComposerModel,
    ControlError,
    Note,
    compose_notes,
    describe_controls,
    validate_controls,
)
from wavecast.streaming.engine import Engine, Stream, compose
from wavecast.streaming.model import FrameModel
from wavecast.streaming.notes import Scale
from wavecast.streaming.ring import Reader
from wavecast.streaming.snapshot import SnapshotError, decode, encode

SR, HOP = 48_000, 480
COMPOSER_DIR = Path(os.environ.get("WAVECAST_TEST_COMPOSER", SHIPPED / "folk"))


@pytest.fixture(scope="module")
def composer() -> ComposerModel:
    return ComposerModel(COMPOSER_DIR)


def key(notes: list[Note]) -> list[tuple]:
    return [(n.frame, n.frames, n.midi, n.quarters) for n in notes]


def frame_db(audio: np.ndarray) -> np.ndarray:
    frames = audio[: len(audio) // HOP * HOP].reshape(-1, HOP).astype(np.float64)
    return 10 * np.log10(np.maximum(np.mean(frames**2, axis=1), 1e-12))


def onsets(audio: np.ndarray, volume: float) -> int:
    """Note onsets heard in the audio: the frame level rising through 12 dB below the playing volume."""
    loud = frame_db(audio) > volume - 12.0
    return int(np.sum(loud[1:] & ~loud[:-1]))


def entropy_bits(values: list) -> float:
    counts = np.array(list(Counter(values).values()), float)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def test_same_seed_same_piece_other_seed_another(violin: FrameModel, composer: ComposerModel) -> None:
    controls = {"tempo": 120, "scale": "D dorian"}
    audio, notes = compose(violin, 6.0, 7, controls, composer=composer)
    again, notes_again = compose(violin, 6.0, 7, controls, composer=composer)
    other, other_notes = compose(violin, 6.0, 8, controls, composer=composer)
    assert len(notes) >= 8 and np.array_equal(audio, again) and key(notes) == key(notes_again)
    assert key(other_notes) != key(notes) and not np.array_equal(audio, other)
    assert frame_db(audio).max() > -30  # it plays


def test_tempo_sets_the_onset_rate_heard(violin: FrameModel, composer: ComposerModel) -> None:
    controls = {"legato": 0.0, "volume": -20.0, "scale": "G major", "top_k": 4}
    slow, slow_notes = compose(violin, 16.0, 3, controls | {"tempo": 60}, composer=composer)
    fast, fast_notes = compose(violin, 16.0, 3, controls | {"tempo": 180}, composer=composer)
    heard_slow, heard_fast = onsets(slow, -20.0), onsets(fast, -20.0)
    assert heard_slow >= 5, heard_slow
    assert 2.5 < heard_fast / heard_slow < 3.5, (heard_slow, heard_fast)
    sounding = sum(n.midi is not None for n in fast_notes)
    assert abs(heard_fast - sounding) <= max(2, 0.1 * sounding)  # every note is heard, once


def test_scale_constrains_notes_and_the_audio_agrees(violin: FrameModel, composer: ComposerModel) -> None:
    scale = Scale.parse("E minor")
    audio, notes = compose(violin, 12.0, 11, {"scale": "E minor", "tempo": 80, "vibrato": 0.0, "legato": 0.8},
                           composer=composer)
    pitched = [n for n in notes if n.midi is not None]
    assert len(pitched) >= 8
    assert sum(n.midi % 12 in scale.pitch_classes for n in pitched) >= 0.95 * len(pitched)
    checked = 0
    for n in pitched:
        if n.frames < 20:
            continue
        start = (n.frame + 6) * HOP  # past the attack and any glide
        heard = estimate_f0(audio[start : start + 8 * HOP], SR, fmin=150.0)
        expected = 440.0 * 2 ** ((n.midi - 69) / 12)
        assert math.isfinite(heard) and abs(1200 * math.log2(heard / expected)) < 25, (n, heard)
        checked += 1
    assert checked >= 3


def test_temperature_changes_note_entropy(violin: FrameModel, composer: ComposerModel) -> None:
    base = {"top_k": 62, "tempo": 240, "scale": "C major", "form": "free"}  # every note sampled, none replayed
    _, cold = compose(violin, 20.0, 5, base | {"temperature": 0.2}, composer=composer)
    _, hot = compose(violin, 20.0, 5, base | {"temperature": 1.5}, composer=composer)
    cold_bits = entropy_bits([(n.midi, n.quarters) for n in cold])
    hot_bits = entropy_bits([(n.midi, n.quarters) for n in hot])
    assert hot_bits > cold_bits + 0.5, (cold_bits, hot_bits)


def test_density_and_register_steer_the_notes(violin: FrameModel, composer: ComposerModel) -> None:
    def figures(controls: dict) -> tuple[float, float]:
        _, notes = compose(violin, 10.0, 2, {"tempo": 120} | controls, composer=composer)
        return (len(notes) / sum(n.quarters for n in notes),
                float(np.median([n.midi for n in notes if n.midi is not None])))

    sparse, busy = figures({"density": 0.0})[0], figures({"density": 1.0})[0]
    low, high = figures({"register": "low"})[1], figures({"register": "high"})[1]
    assert busy > 1.5 * sparse, (sparse, busy)
    assert high > low + 7, (low, high)


def test_a_change_mid_stream_affects_only_the_following_notes(violin: FrameModel, composer: ComposerModel) -> None:
    controls = {"scale": "D major", "tempo": 150}
    audio, notes = compose(violin, 8.0, 21, controls, composer=composer)
    changed, changed_notes = compose(violin, 8.0, 21, controls, [(4.0, {"scale": "Eb major"})], composer=composer)
    cut = 400  # frame of the change
    before = [n for n in notes if n.frame < cut]
    assert key([n for n in changed_notes if n.frame < cut]) == key(before) and len(before) >= 4
    assert np.array_equal(audio[: cut * HOP], changed[: cut * HOP])
    after = [n for n in changed_notes if n.frame >= cut and n.midi is not None]
    assert after and all(n.midi % 12 in Scale.parse("Eb major").pitch_classes for n in after)
    assert key(after) != key([n for n in notes if n.frame >= cut and n.midi is not None])


def test_pause_play_and_reset(violin: FrameModel, composer: ComposerModel) -> None:
    controls = {"tempo": 120, "legato": 0.7}
    audio, notes = compose(violin, 9.0, 4, controls, [(2.0, {"action": "pause"}), (4.0, {"action": "play"}),
                                                      (6.0, {"action": "reset"})], composer=composer)
    level = frame_db(audio)
    assert level[205:395].max() < -60  # paused: silent within STOP_SECONDS (50 ms), whatever the instrument
    assert not [n for n in notes if 200 < n.frame < 400]
    assert level[420:580].max() > -35  # playing again
    first = [n.midi for n in notes if n.frame < 200][:4]
    restarted = [n.midi for n in notes if n.frame >= 600][:4]
    assert restarted == first  # reset begins the piece again from the seed
    assert count_clicks(audio) == 0  # no clicks at pause, play or reset


async def live_matches_render(server: Server) -> None:
    body = {"model": "violin", "composer": "folk", "seed": 7,
            "controls": {"tempo": 150, "scale": "A mixolydian", "register": "high"}}
    status, created = server.request("POST", "/v1/streams", body)
    assert status == 201 and created["composer"] == "folk", created
    sid = created["id"]
    listener = await Listener.connect(server.url, sid)
    try:
        audio = await listener.collect(3.0)
        assert frame_db(audio).max() > -35
        assert listener.now_playing and listener.now_playing[-1]["key"] == "A mixolydian"
        reply = await listener.send({"action": "pause"})
        assert reply["type"] == "controls" and reply["controls"]["scale"] == "A mixolydian"
        await listener.collect(0.5)
        info = server.request("GET", f"/v1/streams/{sid}")[1]
        assert info["now_playing"]["state"] == "paused"
        quiet = await listener.collect(0.5)
        assert frame_db(quiet).max() < -60
        reply = await listener.send({"controls": {"scale": "Q lydian"}})
        assert reply["type"] == "error" and reply["error"]["code"] == "invalid_control"
    finally:
        await listener.close()
    metrics = server.text("/metrics")
    assert 'wavecast_model_loaded{name="folk"' in metrics
    notes_total = float(next(line.split()[1] for line in metrics.splitlines()
                             if line.startswith("wavecast_composer_notes_total")))
    played = server.request("GET", f"/v1/streams/{sid}/notes")[1]
    assert notes_total >= played["count"] >= 5
    live = [(n["frame"], n["midi"], n["quarters"]) for n in played["notes"]]
    _, rendered = compose(FrameModel(SHIPPED / "violin", device="cpu"), 3.0, 7, body["controls"],
                          composer=ComposerModel(COMPOSER_DIR))
    expected = [(n.frame, n.midi, n.quarters) for n in rendered]
    assert len(live) >= 5 and live[: len(expected) - 1] == expected[: len(live)][: len(expected) - 1]


def test_live_composed_stream_plays_the_rendered_notes(server: Server) -> None:
    asyncio.run(live_matches_render(server))


def test_composer_api_errors(server: Server) -> None:
    cases = [
        ({"model": "violin", "composer": "nope"}, 404, "unknown_model"),
        ({"model": "folk"}, 422, "wrong_model_kind"),
        ({"model": "violin", "composer": "violin"}, 422, "wrong_model_kind"),
        ({"model": "violin", "composer": "folk", "controls": {"scale": "H major"}}, 422, "invalid_control"),
        ({"model": "violin", "composer": "folk", "controls": {"top_k": 2.5}}, 422, "invalid_control"),
        ({"model": "violin", "composer": "folk", "controls": {"tempo": float("inf")}}, 400, "malformed_json"),
        ({"model": "violin", "composer": "folk", "controls": {"f0": 440}}, 422, "invalid_control"),
        ({"model": "violin", "composer": "folk", "controls": {"form": "rondo"}}, 422, "invalid_control"),
    ]
    for body, status, code in cases:
        got, reply = server.request("POST", "/v1/streams", body)
        assert (got, reply["error"]["code"]) == (status, code), (body, reply)
    plain = server.request("POST", "/v1/streams", {"model": "violin"})[1]["id"]
    status, reply = server.request("PATCH", f"/v1/streams/{plain}", {"action": "pause"})
    assert status == 422 and reply["error"]["code"] == "invalid_action"
    composed = server.request("POST", "/v1/streams", {"model": "violin", "composer": "folk"})[1]["id"]
    status, reply = server.request("PATCH", f"/v1/streams/{composed}", {"action": "rewind"})
    assert status == 422 and reply["error"]["code"] == "invalid_request" and "'action'" in reply["error"]["message"]
    status, reply = server.request("PATCH", f"/v1/streams/{composed}", {"controls": {"tempo": 70}, "action": "reset"})
    assert status == 200 and reply["controls"]["tempo"] == 70
    status, models = server.request("GET", "/v1/models")
    folk = next(m for m in models["models"] if m["name"] == "folk")
    assert folk["kind"] == "composer" and {"tempo", "scale", "top_k"} <= {c["name"] for c in folk["controls"]}
    assert folk["verification"]["quality"]["nll"] < folk["verification"]["quality"]["markov3_nll"]


def test_the_midi_file_is_in_the_piece_s_time_with_its_tempo_metre_and_key(violin: FrameModel, composer: ComposerModel,
                                                                           tmp_path: Path) -> None:
    """Read back with mido: notes at their positions in quarter notes, at the velocities the performer played them
    (downbeat accents and phrase swells) and as long as it held them (detached ones released before the next
    start, slurred ones held to it), a tempo, time and key signature at the start and at each change, and the
    file's length the piece's (a pause kept as time)."""
    mido = pytest.importorskip("mido")
    from wavecast.daemon.midi import TICKS_PER_QUARTER, write_midi

    timeline = [(6.0, {"tempo": 90.0, "scale": "E dorian", "metre": "6/8"}), (9.0, {"action": "pause"}),
                (10.0, {"action": "play"})]
    _, notes = compose(violin, 14.0, 5, {"tempo": 120.0, "scale": "A minor", "metre": "3/4"}, timeline,
                       composer=composer)
    write_midi(tmp_path / "piece.mid", notes, violin.manifest.frame_seconds)
    song = mido.MidiFile(tmp_path / "piece.mid")
    assert song.ticks_per_beat == TICKS_PER_QUARTER
    meta = [(m.type, m) for m in song.tracks[0] if m.is_meta]
    assert [round(mido.tempo2bpm(m.tempo)) for t, m in meta if t == "set_tempo"] == [120, 90]
    assert [(m.numerator, m.denominator) for t, m in meta if t == "time_signature"] == [(3, 4), (6, 8)]
    assert [m.key for t, m in meta if t == "key_signature"] == ["Am", "D"]  # E dorian has D major's notes
    at, starts, velocities, lengths = 0, [], [], []
    for m in song.tracks[0]:
        at += m.time
        if m.type == "note_on":
            starts.append(at)
            velocities.append(m.velocity)
        elif m.type == "note_off":
            lengths.append(at - starts[len(lengths)])
    played = [n for n in notes if n.midi is not None]
    assert velocities == [n.velocity for n in played] and len(set(velocities)) > 3
    written = [round(n.quarters * TICKS_PER_QUARTER) for n in played]
    detached = [i for i, n in enumerate(played) if n.sounding < n.frames]
    assert detached and len(detached) < len(played)  # legato 0.6: some of each
    assert all(lengths[i] < written[i] for i in detached)
    assert all(lengths[i] == written[i] for i in range(len(played)) if i not in detached)
    before_change = [n for n in notes if n.tempo == 120.0 and n.midi is not None]
    positions = np.cumsum([0.0] + [n.quarters for n in notes])[[i for i, n in enumerate(notes) if n.midi is not None]]
    assert starts[: len(before_change)] == [round(p * TICKS_PER_QUARTER) for p in positions[: len(before_change)]]
    last = notes[-1]
    end = last.frame + (last.frames if last.sounding is None else last.sounding)
    assert abs(song.length - end * violin.manifest.frame_seconds) < 0.1  # the pause kept


# -- form and responsive controls: notes only (`compose_notes` plays what a render plays, checked first) --------
def bar_notes(notes: list[Note]) -> dict[int, list[tuple]]:
    bars: dict[int, list[tuple]] = {}
    for n in notes:
        bars.setdefault(n.bar, []).append((round(n.beat, 4), round(n.quarters, 4), n.midi))
    return bars


def repeated_bars(notes: list[Note], scale: Scale) -> float:
    """The share of bars whose rhythm and rests are an earlier bar's and whose pitches are the same or all one
    scale step away."""
    degrees = {m: i for i, m in enumerate(m for m in range(128) if m % 12 in scale.pitch_classes)}
    bars = list(bar_notes(notes).values())

    def steps(bar: list[tuple], other: list[tuple]) -> set[int | None]:
        return {None if m is None else degrees.get(m, 999) - degrees.get(o, -999) for (_, _, m), (_, _, o)
                in zip(bar, other, strict=True)}

    def repeats(bar: list[tuple], other: list[tuple]) -> bool:
        if [(b, q, m is None) for b, q, m in bar] != [(b, q, m is None) for b, q, m in other]:
            return False
        moved = steps(bar, other) - {None}
        return not moved or moved in ({0}, {1}, {-1})

    return sum(any(repeats(b, a) for a in bars[:i]) for i, b in enumerate(bars)) / len(bars)


def phrase_endings(notes: list[Note]) -> list[int]:
    """The last pitched note of each complete 4-bar phrase (bars 1-4, 5-8, ...)."""
    bars = bar_notes(notes)
    ends = []
    for first in range(1, max(bars) - 3, 4):
        pitched = [m for b in range(first, first + 4) for _, _, m in bars.get(b, []) if m is not None]
        ends.append(pitched[-1])
    return ends


def test_the_notes_only_loop_plays_what_a_render_plays(violin: FrameModel, composer: ComposerModel) -> None:
    controls, timeline = {"tempo": 150, "scale": "G major"}, [(3.0, {"density": 0.9, "register": "high"})]
    _, rendered = compose(violin, 6.0, 5, controls, timeline, composer=composer)
    f0 = violin.manifest.control("f0")
    alone = compose_notes(composer, 6.0, 5, controls, timeline, (f0.min, f0.max), violin.manifest.frame_seconds)
    assert len(rendered) >= 10 and key(alone) == key(rendered)


def test_the_default_form_repeats_bars_and_cadences(violin: FrameModel, composer: ComposerModel) -> None:
    f0 = violin.manifest.control("f0")
    scale = Scale.parse("D dorian")
    for seed in (1, 2):
        controls = {"tempo": 120, "scale": "D dorian"}
        formed = compose_notes(composer, 60.0, seed, controls, f0_range=(f0.min, f0.max))
        free = compose_notes(composer, 60.0, seed, controls | {"form": "free"}, f0_range=(f0.min, f0.max))
        assert repeated_bars(formed, scale) >= 0.2 > repeated_bars(free, scale), seed
        ends = phrase_endings(formed)
        assert len(ends) == 7
        assert sum(m % 12 == scale.tonic for m in ends) >= 0.25 * len(ends)
        assert all(m % 12 == scale.tonic for m in ends[1::2])  # every answer phrase ends on the tonic
        assert repeated_bars([n for n in formed if n.bar in (1, 3)], scale) == 0.5  # bars 3-4 replay bars 1-2


def test_every_form_repeats_its_motifs(composer: ComposerModel) -> None:
    """Bars 5-8 of an 'abab' period replay bars 1-4 (the last note may change to cadence); 'aaba' bars 3-4
    and 7-8 replay bars 1-2; 'abac' bars 5-6 replay bars 1-2. Moved by a step or not, the rhythm is the same."""
    for form, pairs in (("abab", ((5, 1), (6, 2), (7, 3))), ("aaba", ((3, 1), (4, 2), (7, 1))),
                        ("abac", ((5, 1), (6, 2)))):
        bars = bar_notes(compose_notes(composer, 20.0, 4, {"tempo": 120, "form": form}))
        for later, earlier in pairs:
            assert [(b, q) for b, q, _ in bars[later]] == [(b, q) for b, q, _ in bars[earlier]], (form, later)


def test_density_and_register_act_within_two_bars(composer: ComposerModel) -> None:
    """A change at 20.5 s (tempo 120: half a bar into bar 11) shows in the notes of the next 2 bars."""
    def window(controls: dict, change: dict) -> tuple[float, float]:
        notes = compose_notes(composer, 24.5, 3, {"tempo": 120} | controls, [(20.5, change)])
        inside = [n for n in notes if n.frame >= 2050]
        return (len(inside) / sum(n.quarters for n in inside),
                float(np.median([n.midi for n in inside if n.midi is not None])))

    sparse, busy = window({"density": 1.0}, {"density": 0.0})[0], window({"density": 0.0}, {"density": 1.0})[0]
    assert busy > 3 * sparse, (sparse, busy)
    low, high = window({"register": "high"}, {"register": "low"})[1], window({"register": "low"},
                                                                             {"register": "high"})[1]
    assert high > low + 12, (low, high)


def test_density_plays_the_note_rate_asked(composer: ComposerModel) -> None:
    for density, asked in ((0.0, 0.5), (0.5, 2**0.5), (1.0, 4.0)):
        notes = compose_notes(composer, 60.0, 6, {"tempo": 120, "density": density})
        rate = len(notes) / sum(n.quarters for n in notes)
        assert abs(rate / asked - 1) < 0.3, (density, rate)


def test_a_stream_snapshot_taken_mid_replay_resumes_on_the_same_notes(violin: FrameModel,
                                                                      composer: ComposerModel) -> None:
    """Through the engine and the snapshot's bytes: the bar memory and the replay under way travel with it, and
    a snapshot whose memory is not a bar is refused in words."""
    def started(seed: int) -> tuple[Engine, Stream]:
        e = Engine(buffer_frames=1, max_streams=2, budget=None, watermark=None)
        stream = e.create_stream(e.add_model(violin), seed, {"tempo": 150, "form": "abab"}, e.add_composer(composer))
        return e, stream

    def play(e: Engine, reader: Reader, frames: int) -> None:
        out = np.zeros(HOP, np.float32)
        for _ in range(frames):
            e.tick()
            reader.read(out)

    ref_engine, ref = started(9)
    play(ref_engine, ref.listen(), 2000)
    a, stream = started(9)
    reader = stream.listen()
    while not (stream.voice.replay and len(stream.voice.notes) > 12):
        play(a, reader, 1)
    future = a.snapshot(stream)
    a.tick()
    snap = future.result(timeout=0)
    assert snap.voice["replay"] and any(snap.voice["bars"])
    b = Engine(buffer_frames=1, max_streams=2, budget=None, watermark=None)
    group, composers = b.add_model(violin), b.add_composer(composer)
    resumed = b.resume(group, decode(encode(snap)), composers)
    play(b, resumed.listen(), 2000 - snap.frames)
    assert len(resumed.voice.notes) > 20
    assert key(resumed.voice.notes) == key([n for n in ref.voice.notes if n.frame >= snap.frames])
    bad = dataclasses.replace(snap, voice={**snap.voice, "bars": [{"events": [[3, 99]]}] * 8})
    with pytest.raises(SnapshotError, match="'voice.bars\\[0\\]' must be an object of events, density and register"):
        decode(encode(bad))


def test_the_form_control_is_checked() -> None:
    assert validate_controls({"form": "aabb"}) == {"form": "aabb"}
    for bad in ("rondo", 3, None):
        with pytest.raises(ControlError, match="'form' must be one of aabb, abac, abab, aaba, free"):
            validate_controls({"form": bad})
    assert next(c for c in describe_controls() if c["name"] == "form") == {
        "name": "form", "default": "aabb", "choices": ["aabb", "abac", "abab", "aaba", "free"]}
