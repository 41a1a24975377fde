"""The engine on the shipped model through a real ONNX Runtime session: state, seeds, batching, controls."""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import pytest

from streaming.analysis import estimate_f0, rms_db
from streaming.controls import ControlError, Smoother, validate
from streaming.engine import Engine, render
from streaming.model import FrameModel
from streaming.ring import RingBuffer

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
    engine = Engine()
    group = engine.add_model(default_model)
    a = engine.create_stream(group, 1, {})
    engine.tick()
    slot = a.slot
    engine.delete_stream(a.id)
    b = engine.create_stream(group, 2, {})
    engine.tick()
    assert b.slot == slot and a.id not in engine.streams


def test_controls_are_validated(default_model: FrameModel) -> None:
    m = default_model.manifest
    assert validate(m, {"f0": 440, "loudness": -10.5}) == {"f0": 440.0, "loudness": -10.5}
    for bad, words in [({"f0": 5000}, r"outside \[32.7, 1975.53\] Hz"), ({"f0": math.nan}, "finite"),
                       ({"f0": math.inf}, "finite"), ({"pitch": 1}, "unknown control 'pitch'"),
                       ({"f0": "high"}, "must be a number"), ({"f0": True}, "must be a number"), ([1], "object")]:
        with pytest.raises(ControlError, match=words):
            validate(m, bad)


def test_smoother_glides_without_steps(default_model: FrameModel) -> None:
    m = default_model.manifest
    smoother = Smoother(m, {"f0": 220.0})
    out = np.zeros(len(m.controls), np.float32)
    smoother.set({"f0": 880.0})
    seen = []
    for _ in range(40):
        smoother.step(out)
        seen.append(out[0])
    steps = np.diff([220.0, *seen])
    assert np.all(steps > 0) and steps.max() < 0.5 * (880 - 220)  # monotone glide, no jump
    assert abs(seen[-1] - 880.0) < 5.0  # arrives within a few time constants


def test_ring_fans_out_and_skips_ahead() -> None:
    ring = RingBuffer(1000)
    fast, slow = ring.reader(), ring.reader()
    out = np.zeros(400, np.float32)
    ring.write(np.full(400, 0, np.float32))
    assert fast.read(out) == 400
    ring.write(np.full(400, 1, np.float32))
    ring.write(np.full(400, 2, np.float32))
    assert ring.min_buffered() == 800  # the fast reader has 800 left
    assert slow.read(out) == 400 and slow.overruns == 1  # fell 1200 behind a 1000 ring: skipped ahead
    assert out[0] == 0.0 and out[-1] == 1.0  # ... to the oldest sample still held (200 into block 0)


def test_ring_is_safe_across_threads() -> None:
    ring = RingBuffer(4096)
    reader = ring.reader()
    got: list[np.ndarray] = []

    def consume() -> None:
        buf = np.zeros(256, np.float32)
        while sum(len(g) for g in got) < 20 * 480:
            n = reader.read(buf)
            got.append(buf[:n].copy())

    t = threading.Thread(target=consume)
    t.start()
    for i in range(20):
        while ring.min_buffered() > 2048:
            time.sleep(0.001)
        ring.write(np.arange(i * 480, (i + 1) * 480, dtype=np.float32))
    t.join(10)
    assert np.array_equal(np.concatenate(got), np.arange(20 * 480, dtype=np.float32))


def test_control_curves_bypass_the_smoother(default_model: FrameModel) -> None:
    frames = 100
    curves = np.tile(np.array([[440.0, -20.0]], np.float32), (frames, 1))
    curves[50:, 0] = 660.0
    audio = render(default_model, 1.0, 3, {}, curves=curves)
    assert abs(pitch(audio[30 * 480 : 50 * 480]) / 440 - 1) < 0.01
    assert abs(pitch(audio[52 * 480 :]) / 660 - 1) < 0.01  # two frames after the jump: no glide
