"""Fault isolation: a model that raises or returns NaN fails only its own streams; the others play on.

The faulty models are real ONNX graphs run by real sessions (tests/faulty.py); the healthy one is the
shipped default.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import start_server, stop_server
from tests.faulty import write_faulty_model
from wavecast.daemon.client import Listener
from wavecast.streaming.analysis import estimate_f0, rms_db
from wavecast.streaming.engine import Engine, Group, ModelFailed
from wavecast.streaming.model import FrameModel

SR, HOP = 48_000, 480


def faulty(tmp_path: Path, fault: str) -> FrameModel:
    return FrameModel(write_faulty_model(tmp_path / fault, "faulty", fault), device="cpu")


def run_ticks(engine: Engine, readers: dict, ticks: int, out: dict[str, list]) -> None:
    """Tick and let every reader take each frame, keeping what they heard."""
    buf = np.zeros(HOP, np.float32)
    for _ in range(ticks):
        engine.tick()
        for name, r in readers.items():
            r.read(buf)
            out.setdefault(name, []).append(buf.copy())


def test_a_raising_model_fails_only_its_own_streams(default_model: FrameModel, tmp_path: Path) -> None:
    engine = Engine(buffer_frames=1, budget=None)
    healthy = engine.create_stream(engine.add_model(default_model), 1, {"f0": 440.0, "loudness": -20.0})
    bad_group = engine.add_model(faulty(tmp_path, "raise"))
    marked, neighbour = (engine.create_stream(bad_group, s, {"f0": 330.0}) for s in (2, 3))
    readers = {"healthy": healthy.listen(), "marked": marked.listen(), "neighbour": neighbour.listen()}
    heard: dict[str, list] = {}
    run_ticks(engine, readers, 20, heard)
    assert rms_db(np.concatenate(heard["neighbour"])) > -30  # the faulty model plays until its input is marked
    marked.set_controls({"loudness": 0.0})
    run_ticks(engine, readers, 100, heard)

    assert marked.state == neighbour.state == "failed"
    assert "model 'faulty' v1 failed and was stopped" in marked.failure and "Reshape" in marked.failure
    assert healthy.state == "playing" and healthy.failure is None
    audio = np.concatenate(heard["healthy"])
    assert readers["healthy"].underruns == 0 and healthy.frames == 120  # a frame every tick, fault or not
    frame_db = [rms_db(f) for f in heard["healthy"][5:]]
    assert min(frame_db) > -35  # continuous: no silent frame after the fault
    assert abs(estimate_f0(audio[-SR // 2 :], SR) / 440 - 1) < 0.01
    assert not np.concatenate(heard["marked"][25:]).any()  # a failed stream is silent, not stale

    health = engine.health()
    assert health["status"] == "degraded"
    assert [f["model"] for f in health["failed_models"]] == ["faulty"]
    assert {s["id"] for s in health["failed_streams"]} == {marked.id, neighbour.id}
    with pytest.raises(ModelFailed, match="faulty"):
        engine.create_stream(bad_group, 4, {})


def test_non_finite_output_never_reaches_a_reader(tmp_path: Path) -> None:
    engine = Engine(buffer_frames=1, budget=None)
    group = engine.add_model(faulty(tmp_path, "nan"))
    poisoned, clean = (engine.create_stream(group, s, {"f0": 220.0}) for s in (1, 2))
    readers = {"poisoned": poisoned.listen(), "clean": clean.listen()}
    heard: dict[str, list] = {}
    run_ticks(engine, readers, 5, heard)
    poisoned.set_controls({"loudness": 0.0})
    run_ticks(engine, readers, 20, heard)
    everything = np.concatenate([np.concatenate(v) for v in heard.values()])
    assert np.isfinite(everything).all()
    assert poisoned.state == "failed" and "non-finite" in poisoned.failure
    assert clean.failure is None and clean.frames == 25 and min(rms_db(f) for f in heard["clean"]) > -30
    assert engine.stats.nonfinite_frames == 1 and engine.stats.stream_failures == 1
    assert not np.concatenate(heard["poisoned"][5:]).any()


def test_guard_clips_out_of_range_samples(tmp_path: Path) -> None:
    group = Group(faulty(tmp_path, "nan"), 4, 1, 1, (0.0, 0.0))
    audio = np.full((4, HOP), 0.5, np.float32)
    audio[1, :2] = [1.5, -3.0]
    audio[2, 7] = np.inf
    audio[3, 9] = np.nan
    bad = group.guard(audio)
    assert list(bad) == [2, 3] and np.isfinite(audio).all() and np.abs(audio).max() <= 1.0
    assert (audio[0] == 0.5).all() and audio[1, :3].tolist() == [1.0, -1.0, 0.5]
    assert not audio[2:].any() and group.guarded_frames == 3


async def isolation_over_webrtc(tmp_path: Path) -> None:
    store = tmp_path / "store"
    write_faulty_model(store / "faulty" / "000001", "faulty", "raise")
    server = start_server(tmp_path, args=("--store", str(store), "--buffer-frames", "6"))  # margin for a busy CI
    listeners = []
    try:
        _, healthy = server.request("POST", "/v1/streams", {"seed": 1, "controls": {"f0": 440, "loudness": -20}})
        _, bad = server.request("POST", "/v1/streams", {"model": "faulty", "controls": {"f0": 330}})
        good_ear = await Listener.connect(server.url, healthy["id"])
        bad_ear = await Listener.connect(server.url, bad["id"])
        listeners += [good_ear, bad_ear]
        await good_ear.collect(0.5)
        listening = asyncio.ensure_future(good_ear.collect(3.0))
        await asyncio.sleep(0.5)
        status, _ = server.request("PATCH", f"/v1/streams/{bad['id']}", {"controls": {"loudness": 0}})
        assert status == 200
        audio = await listening
        frames = audio[: len(audio) // 960 * 960].reshape(-1, 960)
        assert min(rms_db(f) for f in frames[5:]) > -35  # the healthy stream never went silent
        assert abs(estimate_f0(audio[-SR:], SR) / 440 - 1) < 0.02

        _, info = server.request("GET", f"/v1/streams/{bad['id']}")
        assert info["state"] == "failed" and "failed and was stopped" in info["failure"]
        failed = await asyncio.wait_for(bad_ear.failure, 5)  # the listener is told over the data channel
        assert failed["reason"] == info["failure"]
        _, info = server.request("GET", f"/v1/streams/{healthy['id']}")
        assert info["state"] == "playing" and info["underruns"] == 0
        status, health = server.request("GET", "/v1/health")
        assert status == 200 and health["status"] == "degraded"
        assert health["failed_models"][0]["model"] == "faulty"
        status, body = server.request("POST", "/v1/streams", {"model": "faulty"})
        assert status == 503 and body["error"]["code"] == "model_failed"
        assert "wavecast_models_failed 1" in server.text("/metrics")
        log = server.log.read_text()
        assert log.count("quarantined") == 1 and "Traceback" not in log
    finally:
        for ear in listeners:
            await ear.close()
        stop_server(server)


def test_daemon_isolates_a_failing_model(tmp_path: Path) -> None:
    asyncio.run(isolation_over_webrtc(tmp_path))
