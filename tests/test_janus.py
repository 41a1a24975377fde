"""Publishing into a real Janus (daemon/janus.py, daemon/routes/publish.py): `wavecast serve` sends a stream's
Opus packets as RTP to a Janus Streaming mountpoint, and aiortc listeners subscribe through Janus alone.

Janus (Debian's janus, the HTTP transport and the Streaming plugin only: tests/janus/) runs as a subprocess.
Its ICE leaves loopback out, so the tests add an interface with a TEST-NET-1 address (192.0.2.1) for Janus and
the listeners: they need root and `ip`, and run in the network namespace .ci/run makes.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import aiohttp
import numpy as np

from tests.conftest import (
    JanusSetup,
    Server,
    Watcher,
    free_port,
    janus_request,
    mountpoint_info,
    start_server,
    stop_server,
)
from wavecast.daemon.peers import PACKET_SAMPLES
from wavecast.streaming.analysis import estimate_f0

SR = 48_000
TONE = {"seed": 7, "controls": {"f0": 440, "loudness": -20}}


def publish(daemon: Server, sid: str, body: dict) -> tuple[int, dict]:
    return daemon.request("POST", f"/v1/streams/{sid}/publish", body)


def assert_hears(audio: np.ndarray, stamps: list[int], arrivals: list[float], f0: float = 440.0) -> None:
    heard = estimate_f0(audio[-SR:], SR)
    assert abs(heard / f0 - 1) < 0.03, heard
    # every packet, in order, none long late: Janus relays the daemon's RTP as it comes
    assert {(b - a) % 2**32 for a, b in zip(stamps, stamps[1:], strict=False)} == {PACKET_SAMPLES}, stamps
    assert max(np.diff(arrivals)) < 0.25, max(np.diff(arrivals))


def wait_for_state(daemon: Server, sid: str, state: str, seconds: float) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        status, body = daemon.request("GET", f"/v1/streams/{sid}/publish")
        if status == 200 and body["state"] == state:
            return body
        assert status == 200, body
        time.sleep(0.1)
    raise AssertionError(f"the publisher did not reach {state}: {body}")


# -- a listener through Janus ---------------------------------------------------------------------------------
async def listen_once(url: str, mountpoint: int, seconds: float = 3.0) -> tuple[np.ndarray, list[int], list[float]]:
    async with aiohttp.ClientSession() as http:
        watcher = await Watcher.watch(http, url, mountpoint)
        try:
            await watcher.collect(0.5)  # past the start
            return await watcher.collect(seconds)
        finally:
            await watcher.close()


def test_a_listener_hears_the_stream_through_janus(janus_setup: JanusSetup) -> None:
    daemon, janus = janus_setup.daemon, janus_setup.janus
    sid = daemon.request("POST", "/v1/streams", TONE)[1]["id"]
    status, body = publish(daemon, sid, {"janus": janus.url})
    assert status == 201, body
    assert body["state"] == "publishing" and body["created"] and isinstance(body["mountpoint"], int), body
    mountpoint = body["mountpoint"]
    assert daemon.request("GET", f"/v1/streams/{sid}/publish")[1]["mountpoint"] == mountpoint

    info = asyncio.run(mountpoint_info(janus.url, mountpoint))
    assert sid in info["description"] and "AI-generated" in info["description"], info
    assert "'default'" in info["description"] and json.loads(info["metadata"])["ai_generated"] is True
    assert info["media"][0]["codec"] == "opus" and info["media"][0]["rtpmap"] == "opus/48000/2", info

    assert_hears(*asyncio.run(listen_once(janus.url, mountpoint)))
    assert daemon.request("GET", f"/v1/streams/{sid}/publish")[1]["packets"] > 150  # 3.5 s and more of RTP

    status, body = daemon.request("DELETE", f"/v1/streams/{sid}/publish")
    assert status == 200 and body["mountpoint_destroyed"], body
    assert asyncio.run(mountpoint_info(janus.url, mountpoint)) is None
    assert daemon.request("GET", f"/v1/streams/{sid}/publish")[0] == 404
    info = daemon.request("GET", f"/v1/streams/{sid}")[1]
    assert info["state"] == "idle" and info["encoders"] == 0, info  # the encoder went with its last sink
    daemon.request("DELETE", f"/v1/streams/{sid}")


# -- what goes wrong, said clearly ----------------------------------------------------------------------------
def test_janus_errors_are_clear(janus_setup: JanusSetup) -> None:
    daemon, janus = janus_setup.daemon, janus_setup.janus
    sid = daemon.request("POST", "/v1/streams", TONE)[1]["id"]
    nowhere = f"http://127.0.0.1:{free_port()}/janus"
    started = time.monotonic()
    status, body = publish(daemon, sid, {"janus": nowhere})
    assert time.monotonic() - started < 3
    assert status == 502 and body["error"]["code"] == "janus_unreachable", body
    assert nowhere in body["error"]["message"] and "check that Janus runs" in body["error"]["message"]

    status, body = publish(daemon, sid, {"janus": janus.url.replace("/janus", "/not-janus")})
    assert status == 502 and body["error"]["code"] == "janus_error", body
    assert "not as Janus's HTTP API" in body["error"]["message"], body

    status, body = publish(daemon, sid, {"janus": f"{janus.url}/123"})  # a session path: Janus's own error
    assert status == 502 and body["error"]["code"] == "janus_error", body
    assert "No such session 123 (Janus error 458)" in body["error"]["message"], body

    # a mountpoint that exists but takes video: not reused, not replaced
    video = asyncio.run(janus_request(janus.url, {"request": "create", "type": "rtp", "media": [
        {"type": "video", "mid": "v", "port": 0, "pt": 100, "codec": "vp8"}]}))["stream"]["id"]
    status, body = publish(daemon, sid, {"janus": janus.url, "mountpoint": video})
    assert status == 409 and body["error"]["code"] == "mountpoint_unusable", body
    assert f"mountpoint {video} exists" in body["error"]["message"]
    assert asyncio.run(mountpoint_info(janus.url, video))["media"][0]["type"] == "video"

    for bad, field in (({"janus": "ftp://host/janus"}, "'janus'"), ({"janus": janus.url, "mountpoint": 0},
                                                                    "'mountpoint'"), ({}, "'janus'")):
        status, body = publish(daemon, sid, bad)
        assert status == 422 and field in body["error"]["message"], (bad, body)
    assert daemon.request("GET", f"/v1/streams/{sid}/publish")[0] == 404  # none of them left a publisher

    # an Opus RTP mountpoint that exists is used as it is, and left in place
    audio = asyncio.run(janus_request(janus.url, {"request": "create", "type": "rtp", "id": 777, "media": [
        {"type": "audio", "mid": "a", "port": 0, "pt": 111, "codec": "opus"}]}))["stream"]["id"]
    status, body = publish(daemon, sid, {"janus": janus.url, "mountpoint": audio})
    assert status == 201 and body["mountpoint"] == audio and not body["created"], body
    heard = estimate_f0(asyncio.run(listen_once(janus.url, audio, 1.0))[0], SR)
    assert abs(heard / 440 - 1) < 0.03, heard
    status, body = daemon.request("DELETE", f"/v1/streams/{sid}/publish")
    assert status == 200 and not body["mountpoint_destroyed"], body
    assert asyncio.run(mountpoint_info(janus.url, audio)) is not None

    # a mountpoint id of our choosing is made; a second publish is refused; deleting the stream destroys it
    status, body = publish(daemon, sid, {"janus": janus.url, "mountpoint": 4242})
    assert status == 201 and body["mountpoint"] == 4242 and body["created"], body
    status, body = publish(daemon, sid, {"janus": janus.url})
    assert status == 409 and body["error"]["code"] == "already_publishing", body
    assert daemon.request("DELETE", f"/v1/streams/{sid}")[0] == 200
    assert asyncio.run(mountpoint_info(janus.url, 4242)) is None
    assert "Janus publisher" not in (daemon.log.read_text())  # no retrying, nothing failed


# -- the daemon's cost does not grow with the audience ----------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


async def audience(janus_setup: JanusSetup, mountpoint: int, window: float = 4.0) -> tuple[float, float, list[int]]:
    pid = janus_setup.daemon.process.pid
    async with aiohttp.ClientSession() as http:
        watchers = [await Watcher.watch(http, janus_setup.janus.url, mountpoint)]
        drains = [asyncio.ensure_future(watchers[0].drain())]
        try:
            await asyncio.sleep(1.0)
            before = cpu_seconds(pid)
            await asyncio.sleep(window)
            one = cpu_seconds(pid) - before
            for _ in range(19):
                watchers.append(await Watcher.watch(http, janus_setup.janus.url, mountpoint))
                drains.append(asyncio.ensure_future(watchers[-1].drain()))
            await asyncio.sleep(1.0)
            counted = [w.frames for w in watchers]
            before = cpu_seconds(pid)
            await asyncio.sleep(window)
            twenty = cpu_seconds(pid) - before
            viewers = (await mountpoint_info(janus_setup.janus.url, mountpoint))["viewers"]
            assert viewers == 20, viewers
            return one, twenty, [w.frames - c for w, c in zip(watchers, counted, strict=True)]
        finally:
            for task in drains:
                task.cancel()
            for watcher in watchers:
                await watcher.close()


def test_twenty_listeners_cost_the_daemon_no_more_than_one(janus_setup: JanusSetup) -> None:
    daemon = janus_setup.daemon
    sid = daemon.request("POST", "/v1/streams", TONE)[1]["id"]
    status, body = publish(daemon, sid, {"janus": janus_setup.janus.url})
    assert status == 201, body
    window = 4.0
    one, twenty, frames = asyncio.run(audience(janus_setup, body["mountpoint"], window))
    assert min(frames) > 0.8 * window * SR / PACKET_SAMPLES, frames  # every listener really received
    assert twenty < 1.5 * one + 0.05 * window, (one, twenty)  # one RTP stream whatever the audience
    daemon.request("DELETE", f"/v1/streams/{sid}")


# -- Janus restarts -----------------------------------------------------------------------------------------------
def test_the_publisher_survives_a_janus_restart(janus_setup: JanusSetup) -> None:
    daemon, janus = janus_setup.daemon, janus_setup.janus
    sid = daemon.request("POST", "/v1/streams", TONE)[1]["id"]
    status, body = publish(daemon, sid, {"janus": janus.url})
    assert status == 201, body
    mountpoint = body["mountpoint"]
    janus.kill()
    down = wait_for_state(daemon, sid, "retrying", 5)  # the long poll broke at once
    assert janus.url in down["error"], down
    frames, packets = daemon.request("GET", f"/v1/streams/{sid}")[1]["frames"], down["packets"]
    time.sleep(2)
    janus.start()
    up = wait_for_state(daemon, sid, "publishing", 20)  # backoff: at most 10 s between tries
    assert up["mountpoint"] == mountpoint and up["created"] and up["retries"] >= 1 and up["error"] is None, up
    assert up["packets"] > packets + 2 * SR // PACKET_SAMPLES  # RTP kept going while Janus was away
    info = daemon.request("GET", f"/v1/streams/{sid}")[1]
    assert info["state"] == "playing" and "failure" not in info and info["frames"] > frames + 200, info
    assert_hears(*asyncio.run(listen_once(janus.url, mountpoint)))
    daemon.request("DELETE", f"/v1/streams/{sid}")


def test_serve_janus_publishes_every_new_stream(janus_setup: JanusSetup, tmp_path: Path) -> None:
    daemon = start_server(tmp_path, args=("--janus", janus_setup.janus.url))
    try:
        sid = daemon.request("POST", "/v1/streams", TONE)[1]["id"]
        body = wait_for_state(daemon, sid, "publishing", 5)
        info = asyncio.run(mountpoint_info(janus_setup.janus.url, body["mountpoint"]))
        assert sid in info["description"], info
        assert_hears(*asyncio.run(listen_once(janus_setup.janus.url, body["mountpoint"], 2.0)))
        assert daemon.request("DELETE", f"/v1/streams/{sid}")[0] == 200
        assert asyncio.run(mountpoint_info(janus_setup.janus.url, body["mountpoint"])) is None
    finally:
        stop_server(daemon)
