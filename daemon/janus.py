"""Publishing streams into a Janus WebRTC server: Janus's Streaming plugin serves the listeners.

A `Publisher` is one more sink of the stream's `StreamEncoder` (daemon/peers.py): it sends each Opus packet,
encoded once for every listener, as plain RTP over UDP to an RTP mountpoint on the Janus host, and Janus relays it
to any number of WebRTC listeners. The daemon's cost is one RTP stream whatever the audience: no peer connection,
DTLS or SRTP per listener.

The mountpoint is made over Janus's HTTP API (`Janus`: a session with a handle on janus.plugin.streaming, kept
alive with a keepalive every KEEPALIVE_S and a long poll). When Janus goes away (a restart, a crash) the long poll
or a request fails, and the publisher retries with exponential backoff (up to BACKOFF_MAX_S) to make a new session
and the mountpoint again, with the same id; the stream is never touched, and RTP keeps going meanwhile (UDP to a
port nobody listens on is simply lost).

RTP numbers follow the packets' pts: sequence = origin + pts / 960, timestamp = origin + pts, so the numbers of any
packet to come are known in advance. That is what a handover (a stream moving to another daemon, daemon/migrate.py)
needs: the old publisher stops before the packet of an agreed pts (`cut`), and the new daemon's publisher, given
that packet's SSRC, sequence number and timestamp (`Handover`), sends it and the ones after, so Janus and its
listeners see one RTP stream go on. From its first packet on, the new publisher owns the mountpoint (destroys it
when it stops).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import socket
import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
import av
from yarl import URL

from wavecast.daemon.peers import PACKET_SAMPLES, StreamEncoder
from wavecast.streaming.engine import Stream, describe

if TYPE_CHECKING:
    from wavecast.daemon.service import Daemon

log = logging.getLogger("wavecast.janus")
PLUGIN = "janus.plugin.streaming"
REQUEST_TIMEOUT_S = 5.0  # a Janus request, connecting included
POLL_TIMEOUT_S = 45.0  # Janus answers a long poll within 30 s (a keepalive event when nothing happened)
KEEPALIVE_S = 25.0  # Janus ends a session after 60 s without a request (session_timeout)
BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 10.0
NO_SUCH_MOUNTPOINT = 455  # the Streaming plugin's error code
OPUS_PT = 111
RTP_VERSION = 0x80  # V=2, no padding, no extension, no CSRC
MARKER = 0x80


class JanusError(Exception):
    """Janus answered but refused (`code`: Janus's or the plugin's error code; None when the answer was not
    Janus's at all)."""

    def __init__(self, reason: str, code: int | None = None) -> None:
        super().__init__(f"{reason} (Janus error {code})" if code is not None else reason)
        self.reason, self.code = reason, code


class MountpointUnusable(JanusError):
    """The mountpoint asked for exists, but is not one an Opus RTP stream can be sent to."""


class JanusUnreachable(Exception):
    """No answer from Janus: the connection failed, broke or timed out."""


class Janus:
    """A session on Janus's HTTP API (e.g. http://HOST:8088/janus) with a handle on the Streaming plugin."""

    def __init__(self, url: str, http: aiohttp.ClientSession) -> None:
        self.url = url.rstrip("/")
        self.http = http
        self.session: int | None = None
        self.handle: int | None = None

    async def connect(self) -> None:
        self.session = (await self._post(self.url, {"janus": "create"}))["data"]["id"]
        attached = await self._post(f"{self.url}/{self.session}", {"janus": "attach", "plugin": PLUGIN})
        self.handle = attached["data"]["id"]

    async def request(self, body: dict[str, Any], jsep: dict | None = None) -> dict[str, Any]:
        """Send `body` to the plugin: a synchronous request's answer (the plugin's data), or {} for an asynchronous
        one (watch, start), whose answer comes as an event (`events`). Raises JanusError for the plugin's errors."""
        message: dict[str, Any] = {"janus": "message", "body": body}
        if jsep is not None:
            message["jsep"] = jsep
        answer = await self._post(f"{self.url}/{self.session}/{self.handle}", message)
        data = answer.get("plugindata", {}).get("data", {})
        if "error_code" in data:
            raise JanusError(str(data.get("error", "the Streaming plugin refused the request")), data["error_code"])
        return data

    async def keepalive(self) -> None:
        await self._post(f"{self.url}/{self.session}", {"janus": "keepalive"})

    async def events(self) -> list[dict[str, Any]]:
        """The session's next events: a long poll that Janus answers within 30 s (with a keepalive event when
        nothing happened), and that fails at once when Janus goes away."""
        try:
            async with self.http.get(f"{self.url}/{self.session}", params={"maxev": "10"},
                                     timeout=aiohttp.ClientTimeout(total=POLL_TIMEOUT_S)) as resp:
                answer = await self._read(resp)
        except (aiohttp.ClientError, TimeoutError) as e:
            raise JanusUnreachable(f"lost Janus at {self.url} ({describe(e) or 'the connection broke'})") from None
        events = answer if isinstance(answer, list) else [answer]
        for event in events:
            if isinstance(event, dict) and event.get("janus") == "error":
                error = event.get("error", {})
                raise JanusError(str(error.get("reason", "Janus refused")), error.get("code"))
        return events

    async def close(self) -> None:
        """End the session (and its handle) if Janus is there to hear it."""
        if self.session is None:
            return
        try:
            await self._post(f"{self.url}/{self.session}", {"janus": "destroy"})
        except (JanusError, JanusUnreachable):
            pass  # gone already, or Janus is: either way the session ends
        self.session = self.handle = None

    async def _post(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        body = {**body, "transaction": secrets.token_hex(8)}
        try:
            async with self.http.post(url, json=body,
                                      timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) as resp:
                answer = await self._read(resp)
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:  # ValueError: a host name IDNA cannot encode
            what = describe(e) if str(e) else f"no answer within {REQUEST_TIMEOUT_S:g} s"
            raise JanusUnreachable(f"cannot reach Janus at {self.url} ({what})") from None
        if not isinstance(answer, dict):
            raise JanusError(f"the server at {self.url} does not answer as Janus's HTTP API does")
        if answer.get("janus") == "error":
            error = answer.get("error", {})
            raise JanusError(str(error.get("reason", "Janus refused the request")), error.get("code"))
        return answer

    async def _read(self, resp: aiohttp.ClientResponse) -> Any:
        if resp.status != 200:
            raise JanusError(f"the server at {self.url} answered HTTP {resp.status}, not as Janus's HTTP API does")
        try:
            return json.loads(await resp.read())
        except ValueError:
            raise JanusError(f"the server at {self.url} answered something other than JSON; it is not Janus's "
                             "HTTP API") from None


def rtp_audio(info: dict[str, Any]) -> tuple[int, int] | None:
    """(port, payload type) of a mountpoint (its `info`) that takes one Opus RTP stream; None for any other."""
    media = info.get("media") or []
    if len(media) != 1 or media[0].get("type") != "audio" or media[0].get("codec") != "opus":
        return None
    port = media[0].get("port")  # shown only for a mountpoint without a secret (or with ours)
    return (port, int(media[0].get("pt", OPUS_PT))) if isinstance(port, int) and port > 0 else None


@dataclass(frozen=True)
class Handover:
    """Another daemon's RTP stream to go on with: its next packet is the one that reads the stream from sample
    `sample` on, due at `at` (wall clock, time.time()), with these RTP numbers."""

    sample: int
    at: float
    ssrc: int
    seq: int
    timestamp: int

    def to_json(self) -> dict[str, Any]:
        return {"sample": self.sample, "at": self.at, "ssrc": self.ssrc, "seq": self.seq, "timestamp": self.timestamp}


class Publisher:
    """One stream published to one Janus mountpoint (see the module doc). `connect()` makes the session and
    the mountpoint, `attach(encoder)` starts sending and keeps both up, `stop()` ends it. With a `handover` it
    goes on with another daemon's RTP stream to that mountpoint, and owns it."""

    def __init__(self, stream: Stream, url: str, mountpoint: int | None = None,
                 handover: Handover | None = None) -> None:
        self.stream, self.url = stream, url.rstrip("/")
        self.mountpoint = mountpoint  # the one asked for, or Janus's choice once made
        self.handover = handover
        self.late_ms: float | None = None  # a handover's first packet: how late it was sent
        self.created = False  # we made the mountpoint, or took it over by sending (so stop() destroys it)
        self.state = "connecting"  # then publishing, retrying (Janus went away), stopped
        self.error: str | None = None  # why it is retrying or stopped
        self.packets = 0
        self.retries = 0
        self._pt = OPUS_PT
        self._seq0, self._ts0 = (handover.seq, handover.timestamp) if handover else (secrets.randbits(16),
                                                                                     secrets.randbits(32))
        self._ssrc = handover.ssrc if handover else secrets.randbits(32)
        self._marker = 0 if handover else MARKER  # on the first packet of an RTP stream only
        self._cut: int | None = None  # a packet of this pts and later ones are not sent (a handover to elsewhere)
        self.handed_off: asyncio.Future | None = None  # done when the packet at the cut came (not sent)
        self._target: tuple | None = None  # the mountpoint's (address, port)
        self._transport: asyncio.DatagramTransport | None = None
        self._http = aiohttp.ClientSession()
        self._janus: Janus | None = None
        self._encoder: StreamEncoder | None = None
        self._task: asyncio.Task | None = None
        self._seeking: asyncio.Task | None = None

    def info(self) -> dict[str, Any]:
        handover = None if self.handover is None else {**self.handover.to_json(), "late_ms": self.late_ms}
        return {"stream": self.stream.id, "janus": self.url, "mountpoint": self.mountpoint, "created": self.created,
                "state": self.state, "error": self.error, "packets": self.packets, "retries": self.retries,
                "rtp": {"host": self._target[0], "port": self._target[1]} if self._target else None,
                "handover": handover}

    def rtp(self, pts: int) -> tuple[int, int, int]:
        """(SSRC, sequence number, timestamp) of the packet of `pts`, sent or to come."""
        return self._ssrc, (self._seq0 + pts // PACKET_SAMPLES) & 0xFFFF, (self._ts0 + pts) & 0xFFFFFFFF

    def cut(self, pts: int | None) -> asyncio.Future | None:
        """Send no packet of `pts` or later (None: send them again); the future is done when that packet comes."""
        self._cut = pts
        self.handed_off = None if pts is None else asyncio.get_running_loop().create_future()
        return self.handed_off

    async def connect(self) -> None:
        """Make the session and the mountpoint (or find the one asked for); raises JanusError or
        JanusUnreachable, having left nothing behind."""
        janus = Janus(self.url, self._http)
        try:
            await janus.connect()
            family, _, _, _, address = (await asyncio.get_running_loop().getaddrinfo(
                URL(self.url).host, 0, type=socket.SOCK_DGRAM))[0]
            port = await self._mountpoint(janus)
        except BaseException as e:
            await janus.close()
            if isinstance(e, OSError):  # the name resolved for HTTP but not now: as good as unreachable
                raise JanusUnreachable(f"cannot resolve {URL(self.url).host} ({describe(e)})") from None
            if isinstance(e, KeyError | IndexError | TypeError):  # an answer without the fields Janus's have
                raise JanusError(f"the server at {self.url} answered without the fields Janus's answers have "
                                 f"({describe(e)} missing); is it Janus 1.x with the Streaming plugin?") from None
            raise
        if self._transport is None or self._transport.get_extra_info("socket").family != family:
            if self._transport is not None:
                self._transport.close()
            self._transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
                asyncio.DatagramProtocol, family=family)
        self._janus, self._target = janus, (address[0], port)
        self.state, self.error = "publishing", None
        log.info("publishing stream=%s to Janus %s mountpoint=%s rtp=%s:%s", self.stream.id, self.url,
                 self.mountpoint, *self._target)

    async def _mountpoint(self, janus: Janus) -> int:
        """The RTP port of the mountpoint asked for if it exists (it must take Opus audio), else of a new one."""
        if self.mountpoint is not None:
            try:
                info = (await janus.request({"request": "info", "id": self.mountpoint}))["info"]
            except JanusError as e:
                if e.code != NO_SUCH_MOUNTPOINT:
                    raise
            else:
                found = rtp_audio(info)
                if found is None:
                    raise MountpointUnusable(f"mountpoint {self.mountpoint} exists on Janus but is not an RTP "
                                             "mountpoint of one Opus audio stream whose port Janus shows (it has "
                                             "other media, or a secret)")
                port, self._pt = found  # `created` stays: False, or True if we made it before (a reconnection)
                return port
        provenance = self.stream.info()["provenance"]
        body = {"request": "create", "type": "rtp", "description": f"wavecast {self.stream.id}: "
                f"{provenance['statement']}", "metadata": json.dumps(provenance),
                "media": [{"type": "audio", "mid": "a", "port": 0, "pt": OPUS_PT, "codec": "opus"}]}
        if self.mountpoint is not None:
            body["id"] = self.mountpoint
        made = (await janus.request(body))["stream"]
        self.mountpoint, self.created, self._pt = made["id"], True, OPUS_PT
        return made["ports"][0]["port"]

    def attach(self, encoder: StreamEncoder) -> None:
        """Subscribe to the stream's encoder and start it (no peer will ask for packets), and keep the mountpoint
        up from now on: when not connected yet (--janus), the first connection is the first retry. With a
        handover the encoder first reads up to the handover's sample (fast), then sends from the packet due then."""
        self._encoder = encoder
        encoder.subscribe(self)
        if self.handover is None:
            encoder.start()
        else:
            self._seeking = asyncio.ensure_future(self._take_over(encoder, self.handover))
        self._task = asyncio.ensure_future(self._run())

    async def _take_over(self, encoder: StreamEncoder, handover: Handover) -> None:
        try:
            await encoder.seek(handover.sample - PACKET_SAMPLES)  # one packet early: it primes the encoder
            encoder.start_at(handover.at - time.time() + time.monotonic())
        except (ValueError, RuntimeError) as e:  # the stream passed the sample, or a peer started the encoder
            asyncio.ensure_future(self.stop(f"cannot take the RTP stream over: {e}"))

    async def _run(self) -> None:
        backoff = BACKOFF_START_S
        while True:
            try:
                if self._janus is None:
                    await self.connect()
                backoff = BACKOFF_START_S
                await self._hold(self._janus)
            except (JanusError, JanusUnreachable) as e:
                if self._janus is not None:
                    janus, self._janus = self._janus, None
                    await janus.close()
                self.state, self.error = "retrying", str(e)
                self.retries += 1
                log.warning("Janus publisher stream=%s: %s; retrying in %.1f s", self.stream.id, e, backoff)
                await asyncio.sleep(backoff)
                backoff = min(2 * backoff, BACKOFF_MAX_S)

    async def _hold(self, janus: Janus) -> None:
        """Keep the session until Janus fails: a keepalive every KEEPALIVE_S, and the long poll, which notices a
        Janus that went away at once. Returns only by raising."""

        async def keepalives() -> None:
            while True:
                await asyncio.sleep(KEEPALIVE_S)
                await janus.keepalive()

        async def polls() -> None:
            while True:
                await janus.events()  # a publisher's handle gets no events worth reading

        tasks = [asyncio.ensure_future(keepalives()), asyncio.ensure_future(polls())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        finally:
            for task in tasks:
                task.cancel()

    def push(self, packet: av.Packet) -> None:
        """Send one Opus packet as RTP, numbered from its pts (`rtp`), unless it is at or past the cut."""
        if self._cut is not None and packet.pts >= self._cut:
            if not self.handed_off.done():
                self.handed_off.set_result(None)
            return
        if self.handover is not None and self.late_ms is None:  # our first packet: the mountpoint is ours now
            self.late_ms = round(1000 * (time.time() - self.handover.at), 1)
            self.created = True
        if self._transport is None or self._target is None:
            return
        ssrc, seq, timestamp = self.rtp(packet.pts)
        header = struct.pack("!BBHII", RTP_VERSION, self._marker | self._pt, seq, timestamp, ssrc)
        self._transport.sendto(header + bytes(packet), self._target)
        self._marker = 0
        self.packets += 1

    def end(self, reason: dict) -> None:
        """The encoder closed on its own (it failed): stop, saying why (GET .../publish shows it)."""
        self._encoder: StreamEncoder | None = None
        asyncio.ensure_future(self.stop(reason["message"]))

    async def stop(self, why: str | None = None) -> bool:
        """Stop sending, leave the encoder, end the session; destroy the mountpoint if we made it. True if it
        was destroyed."""
        for task in (self._seeking, self._task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._encoder is not None:
            encoder, self._encoder = self._encoder, None
            encoder.unsubscribe(self)  # the encoder closes if this was its last sink
        destroyed = False
        if self._janus is not None:
            if self.created:
                try:
                    await self._janus.request({"request": "destroy", "id": self.mountpoint})
                    destroyed = True
                except (JanusError, JanusUnreachable) as e:
                    log.info("Janus publisher stream=%s: mountpoint %s not destroyed: %s", self.stream.id,
                             self.mountpoint, e)
            await self._janus.close()
            self._janus = None
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        await self._http.close()
        self.state, self.error = "stopped", why
        return destroyed


def publish_new(d: Daemon, stream: Stream, url: str) -> None:
    """`wavecast serve --janus URL`: publish a stream the daemon just made (as POST .../publish without a
    mountpoint), retrying while Janus cannot be reached. A resumed stream is left alone: the move that brought it
    publishes it with its handover, to the mountpoint its listeners are on."""
    try:
        encoder = d.encoder(stream)
    except ValueError as e:
        log.warning("not publishing stream=%s to Janus: %s", stream.id, e)
        return
    publisher = d.publishers[stream.id] = Publisher(stream, url)
    publisher.attach(encoder)
