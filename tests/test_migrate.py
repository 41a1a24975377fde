"""Moving live streams between two real daemons (daemon/migrate.py): POST /v1/streams/{id}/move hands a stream
published into a real Janus to the other daemon at an agreed packet, and a listener through Janus stays on the same
peer connection and hears the stream go on; failures leave the stream playing; `wavecast drain` moves them all.

Both daemons run unmarked (--watermark off): the audio after the move is compared with a render of the same seed.
Janus and its listeners need the interface tests/conftest.py adds (root and `ip`, as in .ci/run).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from aiortc.mediastreams import MediaStreamError
from scipy.signal import correlate

from tests.conftest import (
    JanusServer,
    Server,
    Watcher,
    free_port,
    mountpoint_info,
    start_server,
    stop_server,
    wavecast_command,
)
from wavecast.daemon.client import Listener
from wavecast.daemon.peers import ENCODER_DELAY_SAMPLES, PACKET_SAMPLES
from wavecast.models.store import SHIPPED, ModelStore
from wavecast.streaming.composer import ComposerModel
from wavecast.streaming.engine import render
from wavecast.streaming.model import FrameModel

SR = 48_000
CONTROLS = {"f0": 330.0, "loudness": -20}
STREAM = {"model": "default@1", "seed": 11, "controls": CONTROLS}  # version 1: both daemons have it
# The stream the listener follows through a move plays a melody: its notes make each second unlike any other, so a
# second of the listener's audio aligns with a render at one place only (a steady tone repeats every period: a
# second of it fits equally well whole periods away, and the alignment would prove nothing)
MELODY = {"model": "default@1", "composer": "folk", "seed": 11, "controls": {"tempo": 160}}
UNMARKED = ("--watermark", "off")


@dataclass
class Pair:
    janus: JanusServer
    a: Server  # the daemon streams leave; its store also has 'default' version 2, which b lacks
    b: Server


@pytest.fixture(scope="module")
def pair(interface: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    janus = JanusServer(tmp_path_factory.mktemp("janus"))
    janus.start()
    a_dir = tmp_path_factory.mktemp("a")
    ModelStore(a_dir / "store").publish(SHIPPED / "default")
    a = start_server(a_dir, args=UNMARKED)
    b = start_server(tmp_path_factory.mktemp("b"), args=UNMARKED)
    try:
        yield Pair(janus, a, b)
    finally:
        stop_server(a)
        stop_server(b)
        janus.kill()


def published_stream(pair: Pair, body: dict = STREAM) -> tuple[str, int]:
    """A new stream on daemon a, published into Janus: (its id, the mountpoint)."""
    status, created = pair.a.request("POST", "/v1/streams", body)
    assert status == 201, created
    status, published = pair.a.request("POST", f"/v1/streams/{created['id']}/publish", {"janus": pair.janus.url})
    assert status == 201, published
    return created["id"], published["mountpoint"]


def best_match(segment: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Where in `reference` `segment` fits best, to a fraction of a sample (a parabola through the peak: Opus moves
    the phase by a fraction of a sample, which makes the best whole sample one either way), and the normalised
    correlation there."""
    products = correlate(reference, segment, mode="valid", method="fft")
    sums = np.concatenate([[0.0], np.cumsum(reference.astype(np.float64) ** 2)])
    energy = np.sqrt((sums[len(segment):] - sums[: -len(segment)]) * np.sum(segment**2))
    scores = products / np.maximum(energy, 1e-12)
    at = int(np.argmax(scores))
    left, peak, right = scores[at - 1 : at + 2] if 0 < at < len(scores) - 1 else (0.0, scores[at], 0.0)
    return at + 0.5 * (left - right) / (left - 2 * peak + right), float(peak)


# -- a move with a listener through Janus -----------------------------------------------------------------------
async def listen_through_move(pair: Pair, sid: str, mountpoint: int) -> tuple[dict, dict, Watcher, tuple]:
    """A WebRTC listener of the stream on a, then one through Janus; the move to b half way through the Janus
    listener's 4 s. Returns the move's answer, the direct listener's last message, the watcher and its audio."""
    direct = await Listener.connect(pair.a.url, sid)
    async with aiohttp.ClientSession() as http:
        watcher = await Watcher.watch(http, pair.janus.url, mountpoint)
        try:
            await watcher.collect(0.5)  # past the start
            heard = asyncio.ensure_future(watcher.collect(4.0))
            await asyncio.sleep(1.5)
            moving = asyncio.ensure_future(asyncio.to_thread(pair.a.request, "POST", f"/v1/streams/{sid}/move",
                                                             {"to": pair.b.url}))
            await asyncio.sleep(0.1)  # the move takes LEAD_S (300 ms) and more: a change now would part a from b
            status, refused = await asyncio.to_thread(pair.a.request, "PATCH", f"/v1/streams/{sid}",
                                                      {"controls": {"tempo": 100}})
            assert status == 409 and refused["error"]["code"] == "stream_moving", refused
            assert pair.b.url in refused["error"]["message"], refused
            status, moved = await moving
            assert status == 200, moved
            said = await asyncio.wait_for(direct.replies.get(), 5)
            with pytest.raises(MediaStreamError):  # its track ends: it must reconnect to b
                while True:
                    await asyncio.wait_for(direct.track.recv(), 5)
            audio = await heard
            assert watcher.pc.connectionState == "connected"  # the same peer connection all along
            return moved, said, watcher, audio
        finally:
            await watcher.close()
            await direct.close()


def test_a_published_stream_moves_and_its_janus_listener_hears_no_gap(pair: Pair, default_model: FrameModel) -> None:
    sid, mountpoint = published_stream(pair, MELODY)
    moved, said, watcher, (audio, stamps, arrivals) = asyncio.run(listen_through_move(pair, sid, mountpoint))

    # the stream is on b now, published to the same mountpoint, which b owns; a has nothing left of it
    janus = moved["janus"]
    assert moved["to"] == pair.b.url and moved["url"] == f"{pair.b.url}/v1/streams/{moved['id']}", moved
    assert janus["mountpoint"] == mountpoint and janus["cut_frame"] > moved["snapshot_frame"], moved
    assert pair.a.request("GET", f"/v1/streams/{sid}")[0] == 404
    status, on_b = pair.b.request("GET", f"/v1/streams/{moved['id']}/publish")
    assert status == 200 and on_b["state"] == "publishing" and on_b["created"], on_b
    assert on_b["mountpoint"] == mountpoint and on_b["handover"]["late_ms"] == janus["late_ms"], on_b
    assert janus["late_ms"] is not None and janus["late_ms"] < 50, janus  # b sent its first packet on time
    assert said == {"type": "moved", "to": moved["url"], "message": said["message"]}, said

    # one RTP stream through the cut: every packet, in order, and none long late
    assert {(b - a) % 2**32 for a, b in zip(stamps, stamps[1:], strict=False)} == {PACKET_SAMPLES}, stamps
    cut = janus["at"] - time.time() + time.monotonic()
    near = [t for t in arrivals if abs(t - cut) < 0.5]
    assert near[0] < cut - 0.3 and near[-1] > cut + 0.3, (near, cut)  # the listener heard both sides of the cut
    assert max(np.diff(near)) < 0.05, max(np.diff(near))

    # the audio goes on: aligned with a render of the same seed before the move, it stays aligned after the cut, at
    # the very same place (nothing skipped, nothing repeated), through the cut too
    reference = render(default_model, (janus["cut_sample"] + 2 * SR) / SR, MELODY["seed"], MELODY["controls"],
                       composer=ComposerModel(SHIPPED / "folk"))
    offset, score = best_match(audio[:SR], reference)  # audio[i] is the stream's sample offset + i
    assert score > 0.9, score
    for start, least in ((janus["cut_sample"] + SR // 20, 0.9),  # a second from b alone
                         (janus["cut_sample"] - ENCODER_DELAY_SAMPLES - SR // 2, 0.8)):  # a second across the cut
        at = start - round(offset)
        segment = audio[at : at + SR]
        assert len(segment) == SR, (start, offset, len(audio))
        place, fit = best_match(segment, reference)
        assert abs(place - (at + offset)) < 1 and fit > least, (start, place - at, offset, fit)

    # b owns the mountpoint now: deleting the stream there destroys it
    assert pair.b.request("DELETE", f"/v1/streams/{moved['id']}")[0] == 200
    assert asyncio.run(mountpoint_info(pair.janus.url, mountpoint)) is None


# -- failures leave the stream playing ------------------------------------------------------------------------------
def assert_plays_on(pair: Pair, sid: str) -> None:
    first = pair.a.request("GET", f"/v1/streams/{sid}")[1]
    packets = pair.a.request("GET", f"/v1/streams/{sid}/publish")[1]["packets"]
    time.sleep(0.5)
    info = pair.a.request("GET", f"/v1/streams/{sid}")[1]
    published = pair.a.request("GET", f"/v1/streams/{sid}/publish")[1]
    assert info["frames"] > first["frames"] + 30 and info["state"] == "playing", info
    assert published["state"] == "publishing" and published["packets"] > packets + 15, published
    status, patched = pair.a.request("PATCH", f"/v1/streams/{sid}", {"controls": {"loudness": -22}})
    assert status == 200, patched  # no longer moving: it takes changes again


def test_a_failed_move_leaves_the_stream_playing(pair: Pair) -> None:
    sid, mountpoint = published_stream(pair)
    on_b = len(pair.b.request("GET", "/v1/streams")[1]["streams"])

    nowhere = f"http://127.0.0.1:{free_port()}"
    status, body = pair.a.request("POST", f"/v1/streams/{sid}/move", {"to": nowhere})
    assert status == 502 and body["error"]["code"] == "move_target_unreachable", body
    assert nowhere in body["error"]["message"] and "plays on here" in body["error"]["message"], body
    assert_plays_on(pair, sid)

    # a stream of a model version b does not have ('default' by name is version 2 on a)
    status, created = pair.a.request("POST", "/v1/streams", {"seed": 3, "controls": CONTROLS})
    assert status == 201 and created["version"] == 2, created
    lacking = created["id"]
    assert pair.a.request("POST", f"/v1/streams/{lacking}/publish", {"janus": pair.janus.url})[0] == 201
    status, body = pair.a.request("POST", f"/v1/streams/{lacking}/move", {"to": pair.b.url})
    assert status == 502 and body["error"]["code"] == "move_refused", body
    message = body["error"]["message"]
    assert pair.b.url in message and "'default' version 2" in message and "unknown_version" in message, message
    assert_plays_on(pair, lacking)
    assert len(pair.b.request("GET", "/v1/streams")[1]["streams"]) == on_b  # nothing half-made is left on b

    for stream in (sid, lacking):
        assert pair.a.request("DELETE", f"/v1/streams/{stream}")[0] == 200
    assert asyncio.run(mountpoint_info(pair.janus.url, mountpoint)) is None


# -- wavecast drain (last: it leaves daemon a draining) ---------------------------------------------------------------
def drain(pair: Pair, to: str) -> subprocess.CompletedProcess:
    return subprocess.run([*wavecast_command(), "drain", "--daemon", pair.a.url, "--to", to], capture_output=True,
                          text=True, timeout=120)


def test_drain_moves_every_stream(pair: Pair, tmp_path: Path) -> None:
    published, mountpoint = published_stream(pair, STREAM | {"name": "one"})
    status, plain = pair.a.request("POST", "/v1/streams", STREAM | {"name": "two", "seed": 12})
    assert status == 201, plain

    nowhere = f"http://127.0.0.1:{free_port()}"
    done = drain(pair, nowhere)  # refused before it starts: a serves on, both streams play on here
    assert done.returncode == 2 and nowhere in done.stderr and "cannot reach" in done.stderr, done
    assert len(pair.a.request("GET", "/v1/streams")[1]["streams"]) == 2
    assert pair.a.request("GET", "/v1/health")[1]["draining"] is None

    done = drain(pair, pair.b.url)
    assert done.returncode == 0, done
    lines = done.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("moved ") and pair.b.url in line for line in lines), lines
    assert "Janus handover" in done.stdout and "stop it" in done.stderr, done

    assert pair.a.request("GET", "/v1/streams")[1]["streams"] == []
    assert pair.a.request("GET", "/v1/health")[1]["draining"] == {"to": pair.b.url}
    request = urllib.request.Request(f"{pair.a.url}/v1/streams", data=json.dumps(STREAM).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    body = json.loads(refused.value.read())
    assert refused.value.code == 503 and body["error"]["code"] == "draining", body
    assert pair.b.url in body["error"]["message"] and int(refused.value.headers["Retry-After"]) > 0, body
    names = {s["name"]: s for s in pair.b.request("GET", "/v1/streams")[1]["streams"]}
    assert {"one", "two"} <= set(names), names
    status, on_b = pair.b.request("GET", f"/v1/streams/{names['one']['id']}/publish")
    assert status == 200 and on_b["mountpoint"] == mountpoint and on_b["state"] == "publishing", on_b
    assert json.loads((asyncio.run(mountpoint_info(pair.janus.url, mountpoint)))["metadata"])["ai_generated"]
    for s in names.values():
        pair.b.request("DELETE", f"/v1/streams/{s['id']}")
