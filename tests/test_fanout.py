"""One Opus encoding per stream, its packets fanned out to every WebRTC peer (daemon/peers.py).

End to end: `wavecast serve` as a subprocess, three aiortc clients on one stream on 127.0.0.1. In process: the
daemon's own encoder and peer tracks, to compare the packets peers get, late joining, failure and deletion.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import aiohttp
import av
import numpy as np
import pytest
from aiohttp.test_utils import TestServer
from aiortc import RTCConfiguration, RTCPeerConnection
from aiortc.mediastreams import MediaStreamError

from tests.conftest import Server, start_server, stop_server
from wavecast.daemon.app import make_app
from wavecast.daemon.client import Listener
from wavecast.daemon.peers import PACKET_SAMPLES, PacketTrack, StreamEncoder, use_ice_host
from wavecast.daemon.service import Daemon
from wavecast.models.store import ModelStore
from wavecast.streaming.analysis import estimate_f0

SR = 48_000


@pytest.fixture(scope="module")
def fanout_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(tmp_path_factory.mktemp("fanout"))
    yield s
    stop_server(s)


def metric(server: Server, name: str) -> float:
    m = re.search(rf"^{name} (\S+)$", server.text("/metrics"), re.M)
    assert m, name
    return float(m.group(1))


async def receive(listener: Listener, seconds: float) -> tuple[np.ndarray, list[int]]:
    """`seconds` of audio (left channel) and the RTP timestamp (frame pts) of every frame received."""
    chunks, stamps, need = [], [], int(seconds * SR)
    while sum(map(len, chunks)) < need:
        frame = await asyncio.wait_for(listener.track.recv(), 10)
        stamps.append(frame.pts)
        chunks.append(frame.to_ndarray().reshape(-1, len(frame.layout.channels))[:, 0].astype(np.float32) / 32768)
    return np.concatenate(chunks)[:need], stamps


async def three_listeners(server: Server) -> None:
    sid = server.request("POST", "/v1/streams", {"seed": 3, "controls": {"f0": 440, "loudness": -20}})[1]["id"]
    listeners = []
    try:
        for _ in range(3):  # one after another: the second and third join a running encoder
            listeners.append(await Listener.connect(server.url, sid))
            await listeners[0].collect(0.2)
        loop = asyncio.get_running_loop()
        receiving = asyncio.gather(*(receive(x, 2.5) for x in listeners))
        await asyncio.sleep(0.3)
        before = await loop.run_in_executor(None, metric, server, "wavecast_packets_encoded_total")
        t0 = time.monotonic()
        await asyncio.sleep(1.5)
        after = await loop.run_in_executor(None, metric, server, "wavecast_packets_encoded_total")
        rate = (after - before) / (time.monotonic() - t0)
        info = (await loop.run_in_executor(None, server.request, "GET", f"/v1/streams/{sid}"))[1]
        encoders = await loop.run_in_executor(None, metric, server, "wavecast_encoders")
        received = await receiving
    finally:
        for x in listeners:
            await x.close()
    assert info["peers"] == 3 and info["encoders"] == 1 and encoders == 1, (info, encoders)
    assert 40 <= rate <= 60, rate  # one packet per 20 ms for the stream, not one per peer (150/s)
    for audio, stamps in received:
        f0 = estimate_f0(audio[-SR:], SR)
        assert math.isfinite(f0) and abs(f0 / 440 - 1) < 0.02, f0
        # RTP timestamps (the received frames' pts) advance by one packet each, for late joiners too
        assert {(b - a) % 2**32 for a, b in zip(stamps, stamps[1:], strict=False)} == {PACKET_SAMPLES}
    # the last peer gone, the encoder stops and its reader is released
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        info = server.request("GET", f"/v1/streams/{sid}")[1]
        if info["encoders"] == 0 and info["peers"] == 0:
            break
        await asyncio.sleep(0.2)
    assert info["encoders"] == 0 and info["peers"] == 0 and info["listeners"] == 0, info
    assert metric(server, "wavecast_encoders") == 0
    server.request("DELETE", f"/v1/streams/{sid}")


def test_three_peers_share_one_encoder(fanout_server: Server) -> None:
    asyncio.run(three_listeners(fanout_server))


async def offer(url: str, sid: str) -> tuple[int, dict]:
    use_ice_host("127.0.0.1")
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        pc.addTransceiver("audio", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{url}/v1/streams/{sid}/webrtc",
                                 json={"sdp": pc.localDescription.sdp, "type": "offer"}) as resp:
                return resp.status, await resp.json()
    finally:
        await pc.close()


async def capped(server: Server) -> None:
    sid = server.request("POST", "/v1/streams", {"seed": 4})[1]["id"]
    listeners = [await Listener.connect(server.url, sid) for _ in range(2)]
    try:
        status, body = await offer(server.url, sid)
        assert status == 429 and body["error"]["code"] == "too_many_peers", (status, body)
        assert "at most 2" in body["error"]["message"]
    finally:
        for x in listeners:
            await x.close()


def test_max_peers_per_stream_flag(tmp_path: Path) -> None:
    server = start_server(tmp_path, args=("--max-peers-per-stream", "2"))
    try:
        asyncio.run(capped(server))
    finally:
        stop_server(server)


async def saturated(server: Server) -> None:
    busy = server.request("POST", "/v1/streams", {"seed": 5})[1]["id"]
    other = server.request("POST", "/v1/streams", {"seed": 6})[1]["id"]
    first = await Listener.connect(server.url, busy)
    listeners = [first]
    try:
        await first.collect(1.2)  # the encoding thread has measured a load by now
        load = float(re.search(r"^wavecast_encoding_load (\S+)$", server.text("/metrics"), re.M).group(1))
        assert load > 0.0001
        status, body = await offer(server.url, other)  # it would need a second encoder
        assert status == 503 and body["error"]["code"] == "encoder_saturated", (status, body)
        assert "join a stream that already has listeners" in body["error"]["message"]
        listeners.append(await Listener.connect(server.url, busy))  # joining the running encoder is fine
        heard = estimate_f0((await listeners[1].collect(1.0))[-24_000:], 48_000)
        assert abs(heard / 220.0 - 1) < 0.02, heard  # the default model's default f0
        _, info = server.request("GET", f"/v1/streams/{busy}")
        assert info["peers"] == 2 and info["encoders"] == 1
        assert server.request("GET", f"/v1/streams/{other}")[1]["encoders"] == 0
    finally:
        for x in listeners:
            await x.close()


def test_no_new_encoder_past_the_encode_budget(tmp_path: Path) -> None:
    server = start_server(tmp_path, args=("--encode-budget", "0.0001"))
    try:
        asyncio.run(saturated(server))
    finally:
        stop_server(server)


# -- in process: the daemon's encoder and tracks, no network --------------------------------------------
class InProcess:
    def __init__(self, tmp: Path) -> None:
        self.daemon = Daemon(ModelStore(tmp / "store"))

    async def __aenter__(self) -> InProcess:
        await self.daemon.group("default")
        self.daemon.engine.start()
        self.server = TestServer(make_app(self.daemon), host="127.0.0.1")
        await self.server.start_server()
        self.http = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.http.close()
        await self.server.close()  # the app's cleanup closes every stream and stops the engine

    async def stream(self, f0: float = 440.0):
        async with self.http.post(self.server.make_url("/v1/streams"),
                                  json={"controls": {"f0": f0, "loudness": -20}}) as resp:
            assert resp.status == 201
            return self.daemon.engine.streams[(await resp.json())["id"]]

    async def info(self, sid: str) -> dict:
        async with self.http.get(self.server.make_url(f"/v1/streams/{sid}")) as resp:
            return await resp.json()


async def packets(track: PacketTrack, n: int) -> list:
    return [await asyncio.wait_for(track.recv(), 5) for _ in range(n)]


async def shared_packets(tmp: Path) -> None:
    async with InProcess(tmp) as d:
        stream = await d.stream()
        encoder = d.daemon.encoder(stream)
        a, b = encoder.track(), encoder.track()
        assert d.daemon.encoder(stream) is encoder and (await d.info(stream.id))["encoders"] == 1
        started = time.monotonic()
        got_a, got_b = await asyncio.gather(packets(a, 40), packets(b, 40))
        took = time.monotonic() - started
        # the same packet objects, in the same order: one encoding, fanned out (one of the two may have
        # started a packet earlier)
        skip_a, skip_b = max(0, got_b[0].pts - got_a[0].pts) // 960, max(0, got_a[0].pts - got_b[0].pts) // 960
        assert skip_a + skip_b <= 1
        assert all(x is y for x, y in zip(got_a[skip_a:], got_b[skip_b:], strict=False))
        assert [p.pts for p in got_a] == [got_a[0].pts + PACKET_SAMPLES * i for i in range(40)]
        assert all(p.time_base == Fraction(1, 48_000) and 0 < p.size < 1500 for p in got_a)
        assert 0.7 < took < 1.2, took  # paced by the wall clock: 40 packets of 20 ms

        # a late joiner starts at the next packet, which the others get too
        last = got_a[-1].pts
        c = encoder.track()
        first_c, more_a = await asyncio.gather(packets(c, 5), packets(a, 10))
        assert last < first_c[0].pts <= last + 2 * PACKET_SAMPLES, (last, first_c[0].pts)
        assert any(p is first_c[0] for p in more_a)
        assert [p.pts for p in first_c] == [first_c[0].pts + PACKET_SAMPLES * i for i in range(5)]

        # decoded, the packets are the stream's tone, in stereo
        decoder = av.CodecContext.create("libopus", "r")
        frames = [f for p in got_a for f in decoder.decode(p)]
        pcm = np.concatenate([f.to_ndarray().reshape(-1, 2) for f in frames])
        assert np.array_equal(pcm[:, 0], pcm[:, 1])
        assert abs(estimate_f0(pcm[-SR // 2 :, 0].astype(np.float32) / 32768, SR) / 440 - 1) < 0.02

        # the last peer gone, the encoder stops and releases its reader
        assert (await d.info(stream.id))["listeners"] == 1
        for t in (a, b, c):
            t.stop()
        assert encoder.closed and encoder.ended["code"] == "no_listeners"
        assert d.daemon.encoders == {} and (await d.info(stream.id))["listeners"] == 0
        assert (await d.info(stream.id))["encoders"] == 0
        with pytest.raises(MediaStreamError):
            await a.recv()


def test_peers_get_the_same_packets_and_late_joiners_the_next(tmp_path: Path) -> None:
    asyncio.run(shared_packets(tmp_path))


class FailingEncoder(StreamEncoder):
    """A real encoder whose step raises from packet `fail_at` on, as a broken codec would."""

    fail_at: int | None = None

    def step(self):
        if self.fail_at is not None and self.packets >= self.fail_at:
            raise RuntimeError("opus exploded")
        return super().step()


async def failure_and_deletion(tmp: Path) -> None:
    async with InProcess(tmp) as d:
        healthy_stream, broken_stream = await d.stream(), await d.stream(660)
        healthy = d.daemon.encoder(healthy_stream)
        ok = healthy.track()
        # the broken encoder serves a real aiortc peer through the daemon's offer handler
        broken = d.daemon.encoders[broken_stream.id] = FailingEncoder(broken_stream, d.daemon.engine,
                                                                      d.daemon.encoding)
        broken.on_close(lambda e: d.daemon.encoders.pop(broken_stream.id, None))
        listener = await Listener.connect(str(d.server.make_url("")).rstrip("/"), broken_stream.id)
        try:
            await listener.collect(0.3)
            broken.fail_at = broken.packets + 3
            reply = await asyncio.wait_for(listener.replies.get(), 5)
            assert reply["type"] == "error" and reply["error"]["code"] == "encoder_failed", reply
            message = reply["error"]["message"]
            assert "(opus exploded); reconnect" in message and "Error(" not in message  # words, not a repr
            for _ in range(50):
                if listener.pc.connectionState == "closed" and (await d.info(broken_stream.id))["peers"] == 0:
                    break
                await asyncio.sleep(0.1)
            info = await d.info(broken_stream.id)
            assert listener.pc.connectionState == "closed" and info["peers"] == 0, (listener.pc.connectionState, info)
        finally:
            await listener.close()
        assert broken.closed and d.daemon.encoding.failures == 1
        assert info["listeners"] == 0 and info["encoders"] == 0  # its reader released
        # the other stream's encoder kept going
        got = await packets(ok, 10)
        assert [p.pts for p in got] == [got[0].pts + PACKET_SAMPLES * i for i in range(10)]

        # deleting a stream ends its peers' tracks with a reason and removes its encoder
        async with d.http.delete(d.server.make_url(f"/v1/streams/{healthy_stream.id}")) as resp:
            assert resp.status == 200
        assert ok.ended["code"] == "stream_deleted" and healthy.closed and d.daemon.encoders == {}
        with pytest.raises(MediaStreamError):
            await ok.recv()
        assert d.daemon.encoding.running == 0


def test_a_failing_encoder_ends_only_its_own_peers(tmp_path: Path) -> None:
    asyncio.run(failure_and_deletion(tmp_path))
