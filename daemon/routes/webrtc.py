"""WebRTC: the offer/answer route, each listener's `Peer`, and the data-channel protocol.

A client POSTs its SDP offer and gets an answer with one 48 kHz stereo Opus track (the stream's shared
encoder's packets). Over a data channel labelled `controls` it sends MESSAGE (PATCH's body, plus an optional
`id` the reply repeats) and gets one reply per message, `{"type": "controls", ...}` or
`{"type": "error", "error": {"code", "message"}}`; no input closes the peer. Unasked, the daemon sends
`provenance` first (the stream info's `provenance`: AI-generated, by which models from which data, the seed,
the watermark), then `now_playing` (composed streams, each note), `telemetry` (every TELEMETRY_SECONDS),
`stream_failed` once if the stream's model fails, and `{"type": "error", ...}` just before it hangs up (stream
deleted, encoder failed, daemon stopping).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time

from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from wavecast.daemon.api import ApiError, RateLimit, route
from wavecast.daemon.peers import PacketTrack
from wavecast.daemon.routes.streams import PATCH, apply_patch
from wavecast.daemon.schema import Invalid, check, parse_json
from wavecast.daemon.service import Daemon
from wavecast.streaming.engine import RETRY_AFTER_SECONDS, Stream, describe

log = logging.getLogger("wavecast.api")
TELEMETRY_SECONDS = 1.0
TELEMETRY_KEYS = ("id", "state", "latency_ms", "buffered_ms", "underruns", "listeners", "peers", "frames")
MAX_MESSAGE_BYTES = 16 * 1024
BUNDLE = re.compile(r"^a=group:BUNDLE[ \t]+(\S+)", re.M)  # its first mid carries the bundled media
MID = re.compile(r"^a=mid:(\S+)", re.M)

OFFER = {
    "type": "object", "required": ["type", "sdp"], "additionalProperties": False,
    "properties": {"type": {"enum": ["offer"]},
                   "sdp": {"type": "string", "minLength": 1, "maxLength": 64 * 1024,
                           "description": "the client's SDP offer, with at least one audio m-line"}},
}
ANSWER = {"type": "object", "required": ["type", "sdp"],
          "properties": {"type": {"enum": ["answer"]}, "sdp": {"type": "string"}}}
MESSAGE = PATCH | {"properties": PATCH["properties"] | {
    "id": {"anyOf": [{"type": "string", "maxLength": 64}, {"type": "integer"}],
           "description": "any id of the client's; the reply carries it back"}}}


class Peer:
    """One WebRTC listener of one stream: its connection, track, data channels and their tasks."""

    def __init__(self, d: Daemon, stream: Stream, track: PacketTrack) -> None:
        self.d, self.stream, self.track = d, stream, track
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.channels: list = []
        self.tasks: set[asyncio.Task] = set()
        self.messages = RateLimit(d.limits.message_rate, d.limits.message_burst)
        self.closing: asyncio.Future | None = None
        self.pc.on("connectionstatechange", self._on_state)
        self.pc.on("datachannel", self._on_channel)
        track.on("ended", lambda: asyncio.ensure_future(self.close(track.ended)) if track.ended else None)

    async def answer(self, sdp: str) -> RTCSessionDescription:
        try:
            self.pc.addTrack(self.track)
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            await self.pc.setLocalDescription(await self.pc.createAnswer())
        except Exception as e:  # for SDP it cannot use, aiortc raises anything from ValueError to KeyError
            log.info("offer refused stream=%s: %s", self.stream.id, describe(e))  # its words are rarely for people
            # Before anything else runs: aiortc has already scheduled its connect step for an offer it read, and
            # that step fails in the background on the half-made transports unless it finds the connection closed.
            await self._close_connection()
            await self.close()
            raise ApiError(400, "malformed_sdp", "cannot answer this offer; send an SDP offer with an audio m-line, "
                                                 "ICE credentials and a DTLS fingerprint, as RTCPeerConnection."
                                                 "createOffer() makes (the daemon log has the reason)") from None
        return self.pc.localDescription

    async def close(self, reason: dict | None = None) -> None:
        """Hang up; with `reason`, say it on every open data channel first. Every caller waits until the
        peer is closed, whoever started it."""
        if self.closing is None:
            self.closing = asyncio.ensure_future(self._close(reason))
        await asyncio.shield(self.closing)

    async def _close(self, reason: dict | None) -> None:
        self.track.stop()
        self.d.peers.get(self.stream.id, set()).discard(self)
        for task in self.tasks:
            task.cancel()
        if reason is not None:
            log.info("closing peer stream=%s: %s", self.stream.id, reason["message"])
            open_ = [ch for ch in self.channels if ch.readyState == "open"]
            # a stream that moved to another daemon says where it went (docs/snapshot.md); anything else is an error
            said = ({"type": "moved", "to": reason["to"], "message": reason["message"]} if reason["code"] == "moved"
                    else {"type": "error", "error": reason})
            for channel in open_:
                channel.send(json.dumps(said))
            if open_:
                await asyncio.sleep(0.1)  # let SCTP send it
        await self._close_connection()

    async def _close_connection(self) -> None:
        """Close the RTCPeerConnection, once: its close says 'closed' before its first await, and after a close that
        raised another would wait forever."""
        if self.pc.signalingState == "closed":
            return
        try:
            await self.pc.close()
        except Exception as e:  # aiortc trips over the half-made transports of an offer it refused
            log.info("closing peer stream=%s: %s", self.stream.id, describe(e))

    async def _on_state(self) -> None:
        log.info("peer stream=%s state=%s", self.stream.id, self.pc.connectionState)
        if self.pc.connectionState in ("failed", "closed"):
            await self.close()

    def _on_channel(self, channel) -> None:
        if channel.label != "controls":
            return
        self.channels.append(channel)
        # aiortc opens the channel before it announces it, so this is the first message the peer gets
        channel.send(json.dumps({"type": "provenance", **self.stream.info()["provenance"]}))
        inbox: asyncio.Queue = asyncio.Queue()
        self.tasks.add(asyncio.ensure_future(self.announce(channel)))
        self.tasks.add(asyncio.ensure_future(self.answer_all(channel, inbox)))
        channel.on("message", inbox.put_nowait)

    async def answer_all(self, channel, inbox: asyncio.Queue) -> None:
        """Answer the channel's messages one at a time, in order (switching an instrument takes a moment)."""
        while True:
            message = await inbox.get()
            reply = await self.reply(message)
            if channel.readyState == "open":
                channel.send(json.dumps(reply))

    async def reply(self, message: str | bytes) -> dict:
        """The answer to one data-channel message; never raises. It carries the message's `id` back wherever the
        message was read as JSON with a usable one, refused or not, so a client that sends many can tell which
        was refused (a rate-limited or oversized message is not read)."""
        if self.messages.take("peer"):
            return _error("rate_limited", f"at most {self.messages.rate:g} messages a second (bursts of "
                          f"{self.messages.burst}) per peer; this one was dropped, send the latest state again")
        size = len(message.encode("utf-8", "surrogatepass")) if isinstance(message, str) else len(message)
        if size > MAX_MESSAGE_BYTES:  # counted in bytes, as it says: a character may take 4
            return _error("message_too_large", f"messages are limited to {MAX_MESSAGE_BYTES} bytes")
        body: object = None
        try:
            body = parse_json(message, "the message")
            return {"type": "controls", **await apply_patch(self.d, self.stream, check(MESSAGE, body)), **_echo(body)}
        except (Invalid, ApiError) as e:
            return _error(e.code, e.message, body)
        except Exception:
            log.exception("data-channel message failed stream=%s", self.stream.id)
            return _error("internal", "internal error; the daemon log has the details", body)

    async def announce(self, channel, period: float = 0.02) -> None:
        """What a listener is told without asking: `now_playing` whenever a composed stream starts a note,
        `stream_failed` once if the stream's model fails, `telemetry` every TELEMETRY_SECONDS."""
        stream, voice, sent, failed, told = self.stream, self.stream.voice, -1, False, -math.inf
        while channel.readyState != "closed":
            if channel.readyState == "open":
                if voice is not None and voice.count != sent:
                    sent = voice.count
                    channel.send(json.dumps({"type": "now_playing", **voice.now_playing()}))
                if stream.failure and not failed:
                    failed = True
                    channel.send(json.dumps({"type": "stream_failed", "id": stream.id, "reason": stream.failure}))
                if time.monotonic() - told >= TELEMETRY_SECONDS:
                    told = time.monotonic()
                    info = self.d.stream_info(stream)
                    channel.send(json.dumps({"type": "telemetry", **{k: info[k] for k in TELEMETRY_KEYS}}))
            await asyncio.sleep(period)


def _error(code: str, message: str, body: object = None) -> dict:
    """An error reply, with the message's `id` where `body` has one."""
    return {"type": "error", "error": {"code": code, "message": message}, **_echo(body)}


def _echo(body: object) -> dict:
    """{"id": ...} to add to the reply to `body`, if it has an id that fits MESSAGE's."""
    if not isinstance(body, dict) or "id" not in body:
        return {}
    try:
        return {"id": check(MESSAGE["properties"]["id"], body["id"], "id")}
    except Invalid:
        return {}


@route("POST", "/v1/streams/{id}/webrtc", "Listen over WebRTC: an SDP offer in, the answer out", body=OFFER,
       returns=ANSWER, errors={
           400: "SDP that cannot be answered", 404: "no stream has that id",
           422: "the stream's audio cannot go over WebRTC",
           429: "the stream or the daemon has as many peers as its limit allows",
           503: "the Opus encoding thread is saturated (Retry-After) or the daemon is stopping"})
async def webrtc_offer(request: web.Request, body: dict) -> web.Response:
    d: Daemon = request.app["daemon"]
    stream = d.stream(request)
    bundle = BUNDLE.search(body["sdp"])
    if bundle and bundle.group(1) not in MID.findall(body["sdp"]):  # aiortc would leave the media with no transport
        raise ApiError(400, "malformed_sdp", "the offer's a=group:BUNDLE line starts with a mid that none of its "
                                             "media sections has (a=mid:); send the offer as "
                                             "RTCPeerConnection.createOffer() makes it")
    if d.draining:
        raise ApiError(503, "shutting_down", "the daemon is stopping; retry when it is back")
    peers = d.peers.setdefault(stream.id, set())
    if len(peers) >= d.limits.max_peers_per_stream:
        raise ApiError(429, "too_many_peers", f"a stream takes at most {d.limits.max_peers_per_stream} WebRTC "
                                              "peers (--max-peers-per-stream); publish it through an SFU for more")
    if sum(len(p) for p in d.peers.values()) >= d.limits.max_peers:
        raise ApiError(429, "too_many_peers", f"this daemon takes at most {d.limits.max_peers} WebRTC peers "
                                              "(--max-peers); retry when a listener leaves")
    if stream.id not in d.encoders and d.encoding.load > d.encode_budget:
        raise ApiError(503, "encoder_saturated", f"the Opus encoding thread is {100 * d.encoding.load:.0f} % busy "
                       f"(limit {100 * d.encode_budget:.0f} %): another stream's encoder would make every WebRTC "
                       "stream late; join a stream that already has listeners or retry later",
                       {"Retry-After": str(RETRY_AFTER_SECONDS)})
    try:
        track = d.encoder(stream).track()  # the stream's one Opus encoder; this peer gets its packets
    except ValueError as e:
        raise ApiError(422, "unsupported_model", str(e)) from None
    peer = Peer(d, stream, track)
    peers.add(peer)
    answer = await peer.answer(body["sdp"])
    return web.json_response({"sdp": answer.sdp, "type": answer.type})
