"""The engine on the shipped model through a real ONNX Runtime session: state, seeds, batching, controls."""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import pytest

from wavecast.streaming.analysis import estimate_f0, rms_db
from wavecast.streaming.controls import ControlError, Controls, validate
from wavecast.streaming.engine import Engine, EngineSaturated, render
from wavecast.streaming.model import FrameModel
from wavecast.streaming.noise import NoiseTable, stream_key
from wavecast.streaming.ring import RELAX_FRAMES, Rings

SR = 48_000


def pitch(audio: np.ndarray) -> float:
    return estimate_f0(audio, SR)


def test_state_carries_across_frames(default_model: FrameModel) -> None:
    """Ten one-frame calls carrying state equal one ten-frame call; dropping the state changes the audio."""
    m = default_model.manifest
    rng = np.random.default_rng(0)
    control = np.tile(np.array([[[330.0, -18.0]]], np.float32), (2, 10, 1))
    control[1, :, 0] = np.linspace(200, 600, 10)
    noise = rng.random((2, 10, m.noise), dtype=np.float32)
    whole, _ = default_model.run(control, noise, default_model.zero_states(2))
    states, parts = default_model.zero_states(2), []
    for f in range(10):
        audio, states = default_model.run(control[:, f : f + 1], noise[:, f : f + 1], states)
        parts.append(audio)
    assert np.abs(np.concatenate(parts, axis=1) - whole).max() < 1e-5
    fresh, _ = default_model.run(control[:, 9:10], noise[:, 9:10], default_model.zero_states(2))
    assert np.abs(fresh - whole[:, -m.hop :]).max() > 1e-3


def test_render_follows_pitch_and_level(default_model: FrameModel) -> None:
    for f0 in (110.0, 440.0, 880.0):
        audio = render(default_model, 1.0, seed=1, controls={"f0": f0, "loudness": -20.0})
        assert abs(pitch(audio[SR // 2 :]) / f0 - 1) < 0.01, f0
    loud = rms_db(render(default_model, 1.0, 1, {"f0": 440.0, "loudness": -12.0})[SR // 2 :])
    quiet = rms_db(render(default_model, 1.0, 1, {"f0": 440.0, "loudness": -40.0})[SR // 2 :])
    assert loud - quiet > 15


def test_render_is_bit_reproducible_per_seed(default_model: FrameModel) -> None:
    controls = {"f0": 440.0, "loudness": -20.0}
    a = render(default_model, 0.5, 7, controls)
    b = render(default_model, 0.5, 7, controls)
    c = render(default_model, 0.5, 8, controls)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_timeline_changes_pitch_mid_stream(default_model: FrameModel) -> None:
    audio = render(default_model, 2.0, 3, {"f0": 440.0, "loudness": -20.0}, timeline=[(1.0, {"f0": 660.0})])
    assert abs(pitch(audio[SR // 2 : SR]) / 440 - 1) < 0.01
    assert abs(pitch(audio[3 * SR // 2 :]) / 660 - 1) < 0.01


def test_live_batched_streams_match_render(default_model: FrameModel) -> None:
    """Three streams batched by the engine thread; the seeded one equals its clockless render."""
    engine = Engine(buffer_frames=4)
    group = engine.add_model(default_model)
    streams = [engine.create_stream(group, 7, {"f0": 440.0, "loudness": -20.0})]
    streams += [engine.create_stream(group, s, {"f0": 200.0 + 100 * s, "loudness": -30.0}) for s in range(2)]
    readers = [s.listen() for s in streams]
    engine.start()
    try:
        out, chunk = np.zeros(SR // 2, np.float32), np.zeros(960, np.float32)
        time.sleep(0.3)  # let the engine fill every buffer before the first read
        for i in range(len(out) // len(chunk)):
            for j, r in enumerate(readers):
                r.read(chunk)
                if j == 0:
                    out[i * len(chunk) : (i + 1) * len(chunk)] = chunk
            engine.notify()
            time.sleep(0.01)
    finally:
        engine.stop()
    expected = render(default_model, 0.5, 7, {"f0": 440.0, "loudness": -20.0})
    assert np.abs(out - expected).max() < 1e-4  # batching may change the last bits only
    assert engine.stats.last_batch >= 1 and engine.stats.frames >= 3 * 50


def test_underrun_plays_silence_and_counts(default_model: FrameModel) -> None:
    engine = Engine()
    stream = engine.create_stream(engine.add_model(default_model), 1, {})
    reader = stream.listen()
    out = np.ones(960, np.float32)
    assert reader.read(out) == 0  # nothing generated yet: no thread runs
    assert not out.any() and reader.underruns == 1
    engine.tick()
    assert reader.read(out) == 480 and reader.underruns == 2 and np.abs(out[:480]).max() > 0


def test_stream_nobody_listens_to_costs_nothing(default_model: FrameModel) -> None:
    engine = Engine()
    stream = engine.create_stream(engine.add_model(default_model), 1, {})
    assert engine.tick() == 0 and stream.frames == 0
    stream.listen()
    made = sum(engine.tick() for _ in range(10))
    assert made == engine.buffer_frames  # fills to the target, then waits for the listener


def test_deleted_stream_frees_its_slot(default_model: FrameModel) -> None:
    engine = Engine(max_streams=2, budget=None)
    group = engine.add_model(default_model)
    a = engine.create_stream(group, 1, {})
    reader = a.listen()
    engine.tick()
    engine.delete_stream(a.id)
    engine.create_stream(group, 2, {})  # the slot is released only after the next tick: takes the other
    with pytest.raises(EngineSaturated, match="slots in use"):
        engine.create_stream(group, 3, {})
    engine.tick()
    c = engine.create_stream(group, 3, {})
    assert c.slot == a.slot and a.id not in engine.streams
    out = np.ones(960, np.float32)
    assert reader.read(out) == 0 and not out.any() and reader.underruns == 0  # the old listener hears nothing


def test_controls_are_validated(default_model: FrameModel) -> None:
    m = default_model.manifest
    assert validate(m, {"f0": 440, "loudness": -10.5}) == {"f0": 440.0, "loudness": -10.5}
    for bad, words in [({"f0": 5000}, r"outside \[32.7, 1975.53\] Hz"), ({"f0": math.nan}, "finite"),
                       ({"f0": math.inf}, "finite"), ({"pitch": 1}, "unknown control 'pitch'"),
                       ({"f0": "high"}, "must be a number"), ({"f0": True}, "must be a number"), ([1], "object")]:
        with pytest.raises(ControlError, match=words):
            validate(m, bad)


def test_smoothing_glides_without_steps(default_model: FrameModel) -> None:
    m = default_model.manifest
    controls = Controls(m, 4)
    controls.reset(2, {"f0": 220.0})
    controls.set(2, {"f0": 880.0})
    out = np.zeros((1, len(m.controls)), np.float32)
    seen = []
    for _ in range(40):
        controls.step(np.array([2]), out)
        seen.append(out[0, 0])
    steps = np.diff([220.0, *seen])
    tau_frames = m.control("f0").smoothing / m.frame_seconds
    first = 1 - math.exp(-1 / tau_frames)  # a one-pole filter's first step, as a share of the way
    assert np.all(steps >= 0) and np.all(steps[:5] > 0) and abs(steps[0] / (880 - 220) - first) < 1e-3  # a glide
    assert abs(seen[int(5 * tau_frames)] - 880.0) < 5.0  # arrives within five time constants


def test_ring_fans_out_and_skips_ahead() -> None:
    rings = Rings(slots=2, frames=4, hop=100, ahead=1, max_ahead=1)
    fast, slow = rings.reader(1), rings.reader(1)
    other = rings.reader(0)
    out = np.zeros(100, np.float32)
    for value in range(5):
        if value == 1:
            assert fast.read(out) == 100 and out[0] == 0.0
        rings.write(np.array([1]), np.full((1, 100), value, np.float32))
    assert rings.buffered(1) == 400  # the hungriest reader (the fast one) has four frames left
    assert slow.read(out) == 100 and slow.overruns == 1  # five frames behind a four-frame ring: skipped ahead
    assert out[0] == 2.0  # ... to the oldest frame the writer cannot be overwriting (frame 2)
    assert other.read(out) == 0 and other.underruns == 1  # slot 0 was never written


def test_ring_is_safe_across_threads() -> None:
    rings = Rings(slots=1, frames=8, hop=480, ahead=4, max_ahead=4)
    reader = rings.reader(0)
    got: list[np.ndarray] = []

    def consume() -> None:
        buf = np.zeros(256, np.float32)
        while sum(len(g) for g in got) < 200 * 480:
            n = reader.read(buf)
            got.append(buf[:n].copy())

    t = threading.Thread(target=consume)
    t.start()
    slot = np.array([0])
    for i in range(200):
        while rings.buffered(0) > 4 * 480:
            time.sleep(0.0001)
        rings.write(slot, np.arange(i * 480, (i + 1) * 480, dtype=np.float32)[None])
    t.join(10)
    assert np.array_equal(np.concatenate(got), np.arange(200 * 480, dtype=np.float32))
    assert reader.overruns == 0


def test_underrun_after_audio_grows_the_fill(default_model: FrameModel) -> None:
    engine = Engine(buffer_frames=2, max_buffer_frames=4, budget=None)
    stream = engine.create_stream(engine.add_model(default_model), 1, {})
    reader = stream.listen()
    out = np.zeros(960, np.float32)
    reader.read(out)  # starting up: nothing yet, no growth
    assert stream.latency()["buffer"] == 20.0
    while engine.tick():
        pass
    assert reader.read(out) == 960
    for expected in (30.0, 40.0, 40.0):
        reader.read(out)  # nothing buffered: an underrun of a listener that had audio
        assert stream.latency()["buffer"] == expected


def test_a_grown_fill_relaxes_after_a_calm_spell_down_to_what_the_listener_needs() -> None:
    """A hiccup's extra fill goes again after RELAX_FRAMES without an underrun; an underrun right after a step
    down marks the fill the listener needs, and it stays there."""
    rings = Rings(slots=1, frames=32, hop=10, ahead=2, max_ahead=8)
    reader, out, slot = rings.reader(0), np.zeros(10, np.float32), np.array([0])

    def frames(n: int, starve: bool = False) -> None:
        for _ in range(n):
            if not starve:
                rings.write(slot, np.ones((1, 10), np.float32))
            reader.read(out)

    frames(1)
    frames(3, starve=True)  # a hiccup after audio: 2 -> 5
    assert rings.ahead[0] == 5 and reader.underruns == 3
    frames(RELAX_FRAMES - 1)
    assert rings.ahead[0] == 5
    frames(3 * RELAX_FRAMES + 1)
    assert rings.ahead[0] == 2  # back where it started, one frame per calm spell
    frames(1, starve=True)  # the listener underruns right after a step down: 3 is what it needs
    assert rings.ahead[0] == 3 and rings.floor[0] == 3
    frames(5 * RELAX_FRAMES)
    assert rings.ahead[0] == 3 and reader.underruns == 4


def test_batched_tick_equals_a_plain_per_stream_loop(default_model: FrameModel) -> None:
    """Batch smoothing, batch noise and batch ring writes give each stream exactly what a plain loop over
    that one stream gives: one-pole smoothing in Python, its own noise, a B=1 call, appended audio."""
    m = default_model.manifest
    seeds, f0s, frames = [5, 9, 11], [220.0, 330.0, 495.0], 30
    engine = Engine(buffer_frames=1, budget=None)
    group = engine.add_model(default_model)
    streams = [engine.create_stream(group, s, {"f0": f, "loudness": -24.0}) for s, f in zip(seeds, f0s, strict=True)]
    readers = [s.listen() for s in streams]
    batched = np.zeros((3, frames * m.hop), np.float32)
    for i in range(frames):
        if i == 10:
            streams[1].set_controls({"f0": 660.0, "loudness": -12.0})
        assert engine.tick() == 3
        for j, r in enumerate(readers):
            r.read(batched[j, i * m.hop : (i + 1) * m.hop])
    table = NoiseTable(m.noise)
    alpha = [1 - math.exp(-m.frame_seconds / c.smoothing) for c in m.controls]
    for j, (seed, f0) in enumerate(zip(seeds, f0s, strict=True)):
        states, current, target = default_model.zero_states(1), [f0, -24.0], [f0, -24.0]
        noise = np.zeros((1, 1, m.noise), np.float32)
        for i in range(frames):
            if i == 10 and j == 1:
                target = [660.0, -12.0]
            current = [np.float32(c + np.float32(a) * (np.float32(t) - c))
                       for c, t, a in zip(current, target, alpha, strict=True)]
            table.fill(np.array([stream_key(seed)]), np.array([i]), noise[:, 0])
            audio, states = default_model.run(np.array([[current]], np.float32), noise, states)
            assert np.abs(audio[0] - batched[j, i * m.hop : (i + 1) * m.hop]).max() < 1e-4, (j, i)


def test_noise_is_a_function_of_seed_and_frame() -> None:
    table = NoiseTable(968)
    keys = np.array([stream_key(s) for s in (1, 2, 1)])
    out = np.zeros((3, 968), np.float32)
    table.fill(keys, np.array([7, 7, 7]), out)
    assert np.array_equal(out[0], out[2]) and not np.array_equal(out[0], out[1])
    alone = np.zeros((1, 968), np.float32)
    table.fill(keys[1:2], np.array([7]), alone)
    assert np.array_equal(alone[0], out[1])  # the same whatever else is in the batch
    many = np.zeros((4096, 968), np.float32)
    table.fill(np.full(4096, stream_key(3)), np.arange(4096), many)
    assert abs(many.mean() - 0.5) < 0.01 and abs(many.var() - 1 / 12) < 0.005  # uniform [0, 1)
    lag = np.corrcoef(many[:-1, 0], many[1:, 0])[0, 1]
    assert abs(lag) < 0.05  # frame to frame: no correlation


def test_control_curves_bypass_the_smoother(default_model: FrameModel) -> None:
    frames = 100
    curves = np.tile(np.array([[440.0, -20.0]], np.float32), (frames, 1))
    curves[50:, 0] = 660.0
    audio = render(default_model, 1.0, 3, {}, curves=curves)
    assert abs(pitch(audio[30 * 480 : 50 * 480]) / 440 - 1) < 0.01
    assert abs(pitch(audio[52 * 480 :]) / 660 - 1) < 0.01  # two frames after the jump: no glide


def test_padded_batches_give_the_same_audio(default_model: FrameModel) -> None:
    """A CUDA group pads each call to a bucket size; the padding rows must not touch the real ones."""
    heard = []
    for padded in (False, True):
        engine = Engine(buffer_frames=1, max_streams=64, budget=None)
        group = engine.add_model(default_model)
        group.buckets = padded  # what a CUDA session turns on; the arithmetic is the provider's
        streams = [engine.create_stream(group, s, {"f0": 200.0 + 50 * s, "loudness": -20.0}) for s in range(3)]
        readers = [s.listen() for s in streams]
        out = np.zeros((3, 20 * 480), np.float32)
        for i in range(20):
            engine.tick()
            for j, r in enumerate(readers):
                r.read(out[j, i * 480 : (i + 1) * 480])
        heard.append(out)
    assert group.bucket(3) == 64 and np.abs(heard[0]).max() > 0.01
    assert np.abs(heard[0] - heard[1]).max() < 1e-4


def test_a_stream_left_out_of_a_tick_keeps_its_state(default_model: FrameModel) -> None:
    """Ticks where only the leading slots are due swap the state pools; a stream further up that was not
    due (its listener paused) must come back with its own state, i.e. exactly its render."""
    engine = Engine(buffer_frames=1, budget=None, max_streams=8)
    group = engine.add_model(default_model)
    streams = [engine.create_stream(group, s, {"f0": 220.0 * (1 + s), "loudness": -20.0}) for s in range(3)]
    readers = [s.listen() for s in streams]
    heard, buf = np.zeros(30 * 480, np.float32), np.zeros(480, np.float32)
    k = 0
    for i in range(60):
        engine.tick()
        for r in readers[:2]:
            r.read(buf)
        if i % 2 == 0 and k < 30:  # the third listener takes a frame every other tick: half the ticks skip it
            readers[2].read(heard[k * 480 : (k + 1) * 480])
            k += 1
    assert streams[2].frames < streams[0].frames
    expected = render(default_model, 0.3, 2, {"f0": 660.0, "loudness": -20.0})
    assert np.abs(heard - expected).max() < 1e-4


def test_every_listener_is_fed_not_only_the_first(default_model: FrameModel) -> None:
    """The engine fills for the hungriest listener of a stream: a listener that stalls (a paused device, a
    peer gone quiet) must not starve the others, and one that joins late underruns only on its first read."""
    engine = Engine(buffer_frames=3, budget=None)
    stream = engine.create_stream(engine.add_model(default_model), 1, {})
    first, stalled, late = stream.listen(), stream.listen(), None
    buf = np.zeros(960, np.float32)  # a 20 ms packet; one step below is 10 ms
    for step in range(80):
        while engine.tick():
            pass
        if step == 7:
            late = stream.listen()
        if step % 2 == 0:
            first.read(buf)
            if step < 10:
                stalled.read(buf)  # then it stops reading
        elif late is not None:
            late.read(buf)
    assert first.underruns == 0 and late.underruns == 1 and late.heard
    assert stalled.underruns == 0 and stream.frames >= 78
