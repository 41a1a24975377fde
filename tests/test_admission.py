"""Admission control: the engine refuses the stream that would break real time, and the admitted ones keep
playing without an underrun. The cost it predicts is measured on this machine when the model loads."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import start_server, stop_server
from wavecast.streaming.engine import Engine, EngineSaturated
from wavecast.streaming.model import FrameModel

PACKET = 960  # what a WebRTC sender takes every 20 ms


def test_refuses_past_the_budget_and_keeps_the_admitted_in_real_time(default_model: FrameModel) -> None:
    engine = Engine(budget=0.25, buffer_frames=6)  # 60 ms of fill: a shared CI core may pause a thread for 20 ms
    group = engine.add_model(default_model)
    assert group.stream_seconds > 0 and group.fixed_seconds >= 0  # measured at load
    streams = []
    with pytest.raises(EngineSaturated, match="real-time budget") as refused:
        for seed in range(1000):
            streams.append(engine.create_stream(group, seed, {"f0": 110.0 + seed, "loudness": -20.0}))
    assert refused.value.retry_after > 0 and engine.stats.refused == 1
    assert 1 <= len(streams) < 1000
    budget = 0.25 * default_model.manifest.frame_seconds
    assert engine.predicted_seconds() <= budget < engine.predicted_seconds(extra=group)

    readers = [s.listen() for s in streams]
    engine.start()
    try:
        time.sleep(0.3)  # every stream fills its buffer before its listener starts
        buf, start, packets = np.zeros(PACKET, np.float32), time.monotonic(), 150  # 3 s of real time
        for k in range(packets):
            time.sleep(max(0.0, start + k * 0.02 - time.monotonic()))
            for r in readers:
                r.read(buf)
            engine.notify()
        with pytest.raises(EngineSaturated):  # still full: refused again, nothing lost
            engine.create_stream(group, 5000, {})
    finally:
        engine.stop()
    assert sum(r.underruns for r in readers) == 0
    assert all(s.frames >= 2 * packets for s in streams)


def post(url: str, body: dict) -> tuple[int, dict, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def test_http_answers_503_with_retry_after(tmp_path: Path) -> None:
    server = start_server(tmp_path, args=("--tick-budget", "0.2", "--stream-rate", "1000", "--stream-burst", "1000"))
    # 2 ms of tick: room for one stream on a slow CI core, dozens on an idle one (the rate limit stays out of it)
    try:
        created = []
        for seed in range(500):
            status, body, headers = post(server.url + "/v1/streams", {"seed": seed})
            if status != 201:
                break
            created.append(body["id"])
        assert status == 503 and body["error"]["code"] == "engine_saturated", body
        assert int(headers["Retry-After"]) > 0 and "delete a stream or retry later" in body["error"]["message"]
        assert 1 <= len(created) < 500
        _, health = server.request("GET", "/v1/health")
        assert health["admission"]["budget_ms"] == 2.0
        assert health["admission"]["predicted_tick_ms"] <= 2.0
        server.request("DELETE", f"/v1/streams/{created[0]}")
        status, body, _ = post(server.url + "/v1/streams", {"seed": 1})  # room again after a delete
        assert status == 201, body
        assert "wavecast_streams_refused_total 1" in server.text("/metrics")
    finally:
        stop_server(server)
