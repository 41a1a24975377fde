"""Moving live streams to another daemon (POST /v1/streams/{id}/move) and draining a daemon (POST /v1/drain).

A move, on the daemon the stream leaves (A), to the daemon it goes to (B):
1. A snapshots the stream at frame N (streaming/snapshot.py) and B resumes it (POST /v1/streams {snapshot}): B's
   stream waits at frame N, idle, since nobody listens to it yet. From here until the end A refuses changes to the
   stream (409 stream_moving), so both make the same audio.
2. Published into Janus: A picks the cut, the packet of its publisher LEAD_S ahead (its pts, the stream sample it
   reads from, its RTP numbers and the wall-clock time it is due), stops its publisher before that packet, and
   asks B to publish with that handover (POST /v1/streams/{new}/publish {janus, mountpoint, handover}). B reads its
   stream from N up to the cut at once (exact: the same state and controls), primes its Opus encoder with the
   packet before, and sends the packet at the cut when it is due, with A's SSRC and the next sequence number and
   timestamp: Janus and its listeners see one RTP stream go on. B then owns the mountpoint.
3. A deletes its stream without destroying the mountpoint. Its direct WebRTC listeners get a data-channel message
   {"type": "moved", "to": URL of the stream on B} and are hung up: they reconnect there.
A failure before the handover deletes what B made and leaves the stream playing on A.

The handover's time is wall-clock time: the two daemons' clocks must agree (one host, or NTP); a B that cannot send
in time sends at once, and the move's result says how late it was (`late_ms`).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import time
from typing import Any

import aiohttp

from wavecast.daemon.api import ApiError
from wavecast.daemon.janus import Publisher
from wavecast.daemon.peers import PACKET_SAMPLES, SAMPLE_RATE
from wavecast.daemon.service import Daemon
from wavecast.streaming.engine import Stream, describe
from wavecast.streaming.snapshot import Snapshot, encode

log = logging.getLogger("wavecast.migrate")
LEAD_S = 0.3  # from planning the cut to it: B's publish request, its Janus session and its catch-up to the cut
CATCH_UP = 4.0  # B reads to the cut at least this much faster than real time: a B slow to resume gets more lead
REQUEST_S = 30.0  # a request to B (resuming may load the model there first)
CONNECT_S = 5.0  # connecting to B
CUT_GRACE_S = 2.0  # past the cut's time, the most A waits for its own packet at the cut
LATENESS_S = 2.0  # past the cut's time, the most A waits for B to say how late its first packet was
POLL_S = 0.05
DRAIN_AT_ONCE = 4  # streams a drain moves at the same time


class Target:
    """The daemon a stream moves to: its base URL and a client session with its token."""

    def __init__(self, url: str, token: str | None, http: aiohttp.ClientSession) -> None:
        self.url, self.http = url.rstrip("/"), http
        self.headers = {"Authorization": f"Bearer {token}"} if token else None

    async def call(self, method: str, path: str, body: dict | None = None) -> dict[str, Any]:
        """B's JSON answer; ApiError 502 naming B when it cannot be reached or refuses (its error passed on)."""
        try:
            async with self.http.request(method, self.url + path, json=body, headers=self.headers,
                                         timeout=aiohttp.ClientTimeout(total=REQUEST_S, connect=CONNECT_S)) as resp:
                try:
                    answer = await resp.json(content_type=None)
                except ValueError:
                    answer = None
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:  # ValueError: a URL yarl cannot take
            what = describe(e) if str(e) else f"no answer within {REQUEST_S:g} s"
            raise ApiError(502, "move_target_unreachable", f"cannot reach the daemon at {self.url} ({what}); check "
                           "'to' (its http://HOST:PORT) and that it runs; the stream plays on here") from None
        if not isinstance(answer, dict):
            raise ApiError(502, "move_refused", f"the server at {self.url} answered HTTP {status} without JSON: it "
                           "is not a wavecast daemon's API; check 'to'; the stream plays on here")
        if status >= 400:
            error = answer.get("error") or {}
            raise ApiError(502, "move_refused", f"the daemon at {self.url} refused {method} {path} (HTTP {status}, "
                           f"{error.get('code', 'no code')}): {error.get('message', 'no message')}; the stream "
                           "plays on here")
        return answer


async def move(d: Daemon, stream: Stream, to: str, token: str | None = None) -> dict[str, Any]:
    """Move `stream` to the daemon at `to` (see the module doc); the move's result."""
    if d.draining:
        raise ApiError(503, "shutting_down", "the daemon is stopping; its streams cannot move now")
    if stream.id in d.moving:
        raise ApiError(409, "stream_moving", f"the stream is moving to {d.moving[stream.id]} already")
    d.moving[stream.id] = to
    try:
        async with aiohttp.ClientSession() as http:
            return await _move(d, stream, Target(to, token, http))
    finally:
        d.moving.pop(stream.id, None)


async def _move(d: Daemon, stream: Stream, target: Target) -> dict[str, Any]:
    snapshot = await d.snapshot(stream, "move")
    created = await target.call("POST", "/v1/streams", {"snapshot": base64.b64encode(encode(snapshot)).decode()})
    new_id = created["id"]
    url = f"{target.url}/v1/streams/{new_id}"
    result = {"stream": stream.id, "to": target.url, "id": new_id, "url": url, "snapshot_frame": snapshot.frames}
    publisher = d.publishers.get(stream.id)
    try:
        if d.engine.streams.get(stream.id) is not stream:
            raise ApiError(404, "unknown_stream", "the stream was deleted while it moved; nothing moved")
        if publisher is not None and publisher.state != "stopped":
            result["janus"] = await _hand_over(d, stream, publisher, snapshot, target, new_id)
    except BaseException:
        try:
            await target.call("DELETE", f"/v1/streams/{new_id}")
        except ApiError as e:
            log.warning("move stream=%s: the half-made stream %s is left on %s: %s", stream.id, new_id, target.url,
                        e.message)
        raise
    if publisher is not None:
        publisher.created = False  # the mountpoint is B's now: it destroys it when done
    await d.close_stream(stream, {"code": "moved", "message": f"the stream moved to {url}; listen to it there",
                                  "to": url})
    log.info("stream moved id=%s to=%s new=%s", stream.id, target.url, new_id)
    return result


async def _hand_over(d: Daemon, stream: Stream, publisher: Publisher, snapshot: Snapshot, target: Target,
                     new_id: str) -> dict[str, Any]:
    """Hand the stream's Janus mountpoint to B at a packet LEAD_S ahead (the cut); the handover's figures."""
    encoder = d.encoders.get(stream.id)  # a publisher is a sink of the stream's encoder
    pts, position, due = encoder.cursor() if encoder is not None else (0, 0, math.inf)
    if due == math.inf:
        raise ApiError(409, "stream_busy", "the stream's publisher is not sending yet; retry in a moment")
    # B resumes at the snapshot's frame and primes its encoder with the packet before the cut
    floor = snapshot.frames * stream.manifest.hop + PACKET_SAMPLES
    behind = max(0, position - floor)  # what B reads through before the cut, beyond the lead (B took a while)
    lead = LEAD_S * SAMPLE_RATE + behind / CATCH_UP
    packets = max(math.ceil(lead / PACKET_SAMPLES), math.ceil((floor - position) / PACKET_SAMPLES))
    ahead = packets * PACKET_SAMPLES
    sample, cut = position + ahead, pts + ahead
    at = due + ahead / SAMPLE_RATE - time.monotonic() + time.time()
    ssrc, seq, timestamp = publisher.rtp(cut)
    handover = {"sample": sample, "at": at, "ssrc": ssrc, "seq": seq, "timestamp": timestamp}
    handed_off = publisher.cut(cut)
    try:
        await target.call("POST", f"/v1/streams/{new_id}/publish", {
            "janus": publisher.url, "mountpoint": publisher.mountpoint, "handover": handover})
        try:
            await asyncio.wait_for(handed_off, max(0.0, at - time.time()) + CUT_GRACE_S)
        except TimeoutError:
            log.warning("move stream=%s: no packet reached the cut within %.0f s of its time", stream.id, CUT_GRACE_S)
        late = await _lateness(target, new_id, at)
    except BaseException:
        publisher.cut(None)  # A sends on (a gap if the cut passed meanwhile)
        raise
    return {"janus": publisher.url, "mountpoint": publisher.mountpoint, "cut_frame": sample // stream.manifest.hop,
            "cut_sample": sample, "at": at, "late_ms": late}


async def _lateness(target: Target, new_id: str, at: float) -> float | None:
    """How late B sent its first packet, in ms (None if B did not say in time); ApiError if B's publisher
    stopped before it (it could not take the RTP stream over)."""
    deadline = at + LATENESS_S
    while True:
        try:
            publication = await target.call("GET", f"/v1/streams/{new_id}/publish")
        except ApiError:
            return None  # B does not say; it has the handover
        late = (publication.get("handover") or {}).get("late_ms")
        if late is not None:
            return late
        if publication.get("state") == "stopped":  # before its first packet: the mountpoint is not its own
            raise ApiError(502, "move_refused", f"the daemon at {target.url} could not take the stream's RTP over "
                           f"({publication.get('error')}); the stream plays on here")
        if time.time() > deadline:
            return None
        await asyncio.sleep(POLL_S)


async def drain(d: Daemon, to: str, token: str | None = None) -> dict[str, Any]:
    """Refuse new streams from now on and move every stream to `to`, DRAIN_AT_ONCE at a time. A `to` that does not
    answer as a wavecast daemon that takes streams is refused first (502), and this daemon goes on serving."""
    async with aiohttp.ClientSession() as http:
        health = await Target(to, token, http).call("GET", "/v1/health")
    if health.get("draining"):
        raise ApiError(502, "move_refused", f"the daemon at {to} is draining itself; drain to one that stays")
    d.drain_to = to.rstrip("/")
    gate = asyncio.Semaphore(DRAIN_AT_ONCE)

    async def one(stream: Stream) -> dict[str, Any]:
        async with gate:
            try:
                return {"moved": True, **await move(d, stream, to, token)}
            except ApiError as e:
                return {"stream": stream.id, "moved": False, "error": {"code": e.code, "message": e.message}}

    results = await asyncio.gather(*(one(s) for s in list(d.engine.streams.values())))
    log.info("drained to %s: %d moved, %d not", to, sum(r["moved"] for r in results),
             sum(not r["moved"] for r in results))
    return {"to": d.drain_to, "streams": results, "moved": sum(r["moved"] for r in results),
            "failed": sum(not r["moved"] for r in results)}
