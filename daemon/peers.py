"""WebRTC delivery: one Opus encoder per listened-to stream, its packets fanned out to every peer.

A stream with WebRTC listeners has one `StreamEncoder`: one ring reader, one Opus encoder (aiortc's own
settings: 48 kHz stereo s16, 96 kb/s, 20 ms packets), paced by the wall clock from its first packet, which
it encodes when the first peer's RTP sender asks for one (until then its reader only buffers). Each
peer gets a `PacketTrack` whose `recv()` returns the shared, already encoded `av.Packet`; aiortc's
RTCRtpSender packs a Packet (`Encoder.pack`) instead of encoding it, so a listener costs RTP/SRTP sending
only, not a resampler and an Opus encoder of its own. A Janus publisher (daemon/janus.py) is one more sink: it
sends the same packets on as RTP. A publisher that takes over another daemon's RTP stream (a move) starts its
encoder with `seek` and `start_at` instead: from an agreed sample, at an agreed time, primed with the packet before.

RTP timestamps: a packet's pts counts samples since its encoder started (time_base 1/48000) and the sender
adds its own random origin, so every peer sees timestamps advance by exactly 960 per packet; a peer that
joins late starts at the next packet, at whatever pts the stream has reached, which RTP allows (the first
timestamp is arbitrary). A peer that falls behind loses its oldest packets, and the gap shows in the
timestamps as it should.

Encoding runs in one thread per daemon (`Encoding`), never on the event loop: each pass encodes every
stream whose packet is due and hands the batch to the loop with one `call_soon_threadsafe`, so hundreds of
streams cost the loop one wake-up per pass, not an executor future per packet. PyAV holds the GIL for most
of an Opus encode (two threads encode only ~1.2x faster than one on this machine), so more threads would
not add throughput. The thread starts with the first encoder and ends with the last.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from fractions import Fraction
from typing import Protocol

import aioice.ice
import av
import numpy as np
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from wavecast.streaming.engine import Engine, Stream, describe

PACKET_SAMPLES = 960  # 20 ms at 48 kHz: one Opus packet
SAMPLE_RATE = 48_000
TIME_BASE = Fraction(1, SAMPLE_RATE)
BIT_RATE = 96_000  # as aiortc's OpusEncoder
ENCODER_DELAY_SAMPLES = 312  # libopus's lookahead at 48 kHz (6.5 ms): its first packet's pts is -312
COALESCE_S = 0.002  # one pass encodes every packet due within this much of now
MAX_LAG_S = 0.2  # an encoder further behind the wall clock than this restarts its clock instead of bursting
QUEUE_PACKETS = 10  # a peer further behind than this loses its oldest packets
LOG_EVERY_S = 10.0  # encoder failures are logged at most this often
LOAD_WINDOW_S = 0.5  # the encoding thread's busy share is measured over windows this long
SEEK_POLL_S = 0.002  # seek(): how long to wait for the engine when nothing more is written yet

log = logging.getLogger("wavecast.peers")


def use_ice_host(address: str) -> None:
    """Offer `address` (e.g. 127.0.0.1) as the only host ICE candidate.

    aioice leaves loopback out of its host candidates, so local clients and tests could otherwise only
    connect through the machine's LAN address. This is process-wide, as aioice's gathering is.
    """
    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: [address]


def opus_codec() -> av.CodecContext:
    """An Opus encoder configured as aiortc's own (aiortc/codecs/opus.py OpusEncoder)."""
    codec = av.CodecContext.create("libopus", "w")
    codec.bit_rate = BIT_RATE
    codec.format = "s16"
    codec.layout = "stereo"
    codec.options = {"application": "voip"}
    codec.sample_rate = SAMPLE_RATE
    codec.time_base = TIME_BASE
    return codec


class Encoding:
    """The thread that encodes every stream's packets when they are due, for one daemon."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._encoders: set[StreamEncoder] = set()
        self._thread: threading.Thread | None = None
        self.packets = 0  # packets encoded, by every encoder this thread ever ran
        self.failures = 0
        self._logged_at = -LOG_EVERY_S
        self._unlogged = 0
        self.load = 0.0  # share of the last window the thread spent encoding (it holds the GIL most of it)
        self._window_start, self._busy = time.monotonic(), 0.0

    def add(self, encoder: StreamEncoder) -> None:
        with self._cond:
            self._encoders.add(encoder)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="wavecast-opus", daemon=True)
                self._thread.start()
            self._cond.notify()

    def remove(self, encoder: StreamEncoder) -> None:
        with self._cond:
            self._encoders.discard(encoder)
            self._cond.notify()

    @property
    def running(self) -> int:
        return len(self._encoders)

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def _due(self) -> list[StreamEncoder]:
        """Wait until some encoder is due; the ones due now, or [] when none is left (the thread ends)."""
        with self._cond:
            while self._encoders:
                now = time.monotonic()
                due = min(e.due for e in self._encoders)
                if due <= now + COALESCE_S:
                    return sorted((e for e in self._encoders if e.due <= now + COALESCE_S), key=lambda e: e.due)
                self._cond.wait(due - now if due < math.inf else None)
            self._thread = None
            return []

    def _run(self) -> None:
        while ready := self._due():
            batches: dict[asyncio.AbstractEventLoop, list] = {}
            started = time.monotonic()
            for encoder in ready:
                try:
                    packet = encoder.step()
                except Exception as e:
                    self.remove(encoder)
                    self._failed(encoder, e)
                    packet = e
                if packet is not None:
                    batches.setdefault(encoder.loop, []).append((encoder, packet))
            self._measure(started)
            for loop, batch in batches.items():
                try:
                    loop.call_soon_threadsafe(deliver, batch)
                except RuntimeError:  # that loop is closed: its encoders go with it
                    for encoder, _ in batch:
                        self.remove(encoder)

    def _measure(self, started: float) -> None:
        now = time.monotonic()
        self._busy += now - started
        if now - self._window_start >= LOAD_WINDOW_S:
            self.load = self._busy / (now - self._window_start)
            self._window_start, self._busy = now, 0.0

    def _failed(self, encoder: StreamEncoder, error: Exception) -> None:
        self.failures += 1
        now = time.monotonic()
        if now - self._logged_at < LOG_EVERY_S:
            self._unlogged += 1
            return
        more = f" ({self._unlogged} more failures not logged)" if self._unlogged else ""
        log.error("opus encoder failed stream=%s: %r%s", encoder.stream.id, error, more,
                  exc_info=(type(error), error, error.__traceback__))
        self._logged_at, self._unlogged = now, 0


class Sink(Protocol):
    """What a StreamEncoder hands its packets to: a peer's `PacketTrack`, or a `janus.Publisher` that sends them
    on as RTP. An encoder runs while it has at least one."""

    def push(self, packet: av.Packet) -> None:
        """On the event loop: the stream's next packet (the same object for every sink; do not change it)."""

    def end(self, reason: dict) -> None:
        """The encoder closed ({"code", "message"}): no packets will follow."""



def deliver(batch: list[tuple[StreamEncoder, av.Packet | Exception]]) -> None:
    """On the event loop: hand each encoder's new packet to its peers (or end them on a failure)."""
    for encoder, packet in batch:
        if encoder.closed:
            continue
        if isinstance(packet, Exception):
            encoder.close("encoder_failed", f"the stream's Opus encoder failed ({describe(packet)}); reconnect "
                                            "to get a new one")
            continue
        for sink in encoder.sinks:
            sink.push(packet)


class StreamEncoder:
    """One stream's Opus packets for all its sinks (WebRTC peers, a Janus publisher), while it has at least one
    (see the module doc).

    Created on the event loop; `track()` subscribes a peer, `subscribe()` any other sink. It closes itself when
    its last sink leaves, and `close()` ends every sink (peers see MediaStreamError and `PacketTrack.ended`)."""

    def __init__(self, stream: Stream, engine: Engine, encoding: Encoding) -> None:
        if stream.manifest.sample_rate != SAMPLE_RATE:
            raise ValueError(f"WebRTC needs a {SAMPLE_RATE} Hz model, '{stream.manifest.name}' is "
                             f"{stream.manifest.sample_rate} Hz")
        self.stream, self.engine, self.encoding = stream, engine, encoding
        self.loop = asyncio.get_running_loop()
        self.sinks: list[Sink] = []  # copy on write
        self.packets = 0
        self.closed = False
        self.ended: dict | None = None  # {"code", "message"}: why it closed
        self._on_close: list[Callable[[StreamEncoder], None]] = []
        self._lock = threading.Lock()  # held by the encoding thread through a step; close() waits for it
        self._codec = opus_codec()
        self._mono = np.zeros(PACKET_SAMPLES, np.float32)
        self._stereo = np.zeros((1, 2 * PACKET_SAMPLES), np.int16)
        self._pts = 0  # samples read, i.e. the next frame's pts
        self._out_pts = 0  # the next packet's pts
        self._start: float | None = None
        self._warmup = 0  # packets still to encode and drop before the first one sent (handover)
        self.due = math.inf  # from the first peer's first recv(), when its RTP sender starts
        self.reader = stream.listen()
        encoding.add(self)

    def track(self) -> PacketTrack:
        track = PacketTrack(self)
        self.subscribe(track)
        return track

    def subscribe(self, sink: Sink) -> None:
        if self.closed:
            raise RuntimeError("this encoder is closed")
        self.sinks = [*self.sinks, sink]

    def start(self) -> None:
        """A peer began sending: encode from now on (until then the reader keeps its buffer, no underruns)."""
        if self.due == math.inf and not self.closed:
            self.due = time.monotonic()
            self.encoding.wake()

    def cursor(self) -> tuple[int, int, float]:
        """(pts of the next packet, the stream sample it starts reading at, when it is due on the monotonic
        clock), consistent with one another: taken between two steps."""
        with self._lock:
            return self._out_pts, self.reader.position, self.due

    async def seek(self, position: int) -> None:
        """Before the first packet: read and drop the stream up to sample `position`, as fast as the engine makes
        it (it generates while this reader is below its fill, and ticks again at once when it made frames), and
        never more than is written, so no underrun grows the stream's fill."""
        if position < self.reader.position:
            raise ValueError(f"the stream is at sample {self.reader.position} already, past {position}")
        scratch = np.empty(self.reader.rings.capacity, np.float32)
        while not self.closed and self.reader.position < position:
            rings, slot, _ = self.reader.at
            ready = min(int(rings.written[slot]) * rings.hop - self.reader.position, position - self.reader.position)
            if ready > 0:
                self.reader.read(scratch[:ready])
            else:
                self.engine.notify()
                await asyncio.sleep(SEEK_POLL_S)

    def start_at(self, at: float) -> None:
        """Take over another encoder's packets (a handover): encode one packet now and drop it, so that libopus's
        lookahead is primed with the audio before this reader's position, then send from the packet due at `at`
        (monotonic clock) on; the first sent packet decodes to the audio from the reader's position plus one packet,
        minus the lookahead, exactly as the other encoder's packet of that pts would. Later than MAX_LAG_S past `at`,
        it sends at once."""
        if self.due != math.inf or self.closed:
            raise RuntimeError("this encoder has started already")
        self._warmup = 1
        self._start = at - PACKET_SAMPLES / SAMPLE_RATE
        self.due = self._start
        self.encoding.wake()

    def on_close(self, callback: Callable[[StreamEncoder], None]) -> None:
        self._on_close.append(callback)

    def step(self) -> av.Packet | None:
        """In the encoding thread: read, encode and time the next 20 ms; the packet, or None if closed."""
        with self._lock:
            if self.closed:
                return None
            now = time.monotonic()
            if self._start is None or now - self.due > MAX_LAG_S:
                self._start = now - self._pts / SAMPLE_RATE
            self.reader.read(self._mono)
            self.engine.notify()
            np.clip(self._mono, -1.0, 1.0, out=self._mono)
            self._mono *= 32767.0
            self._stereo[0, 0::2] = self._mono
            self._stereo[0, 1::2] = self._mono
            frame = av.AudioFrame.from_ndarray(self._stereo, format="s16", layout="stereo")
            frame.sample_rate = SAMPLE_RATE
            frame.pts = self._pts
            frame.time_base = TIME_BASE
            self._pts += PACKET_SAMPLES
            self.due = self._start + self._pts / SAMPLE_RATE
            packets = self._codec.encode(frame)
            if self._warmup:
                self._warmup -= 1
                return None
            # libopus gives one packet per 20 ms frame; its pts starts at minus the encoder delay, so number
            # them ourselves: consecutive packets are 960 apart, whatever the delay
            for packet in packets:
                packet.pts = self._out_pts
                packet.time_base = TIME_BASE
                self._out_pts += PACKET_SAMPLES
            self.packets += len(packets)
            self.encoding.packets += len(packets)
            return packets[-1] if packets else None

    def unsubscribe(self, sink: Sink) -> None:
        self.sinks = [s for s in self.sinks if s is not sink]
        if not self.sinks:
            self.close("no_listeners", "the last listener left")

    def close(self, code: str = "closed", message: str = "the stream's WebRTC encoder closed", **more: str) -> None:
        """Stop encoding, release the reader and end every sink (on the event loop); `more` goes into the
        reason the sinks get (a move's "to")."""
        if self.closed:
            return
        with self._lock:
            self.closed = True
        self.ended = {"code": code, "message": message, **more}
        self.encoding.remove(self)
        self.stream.unlisten(self.reader)
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.end(self.ended)
        for callback in self._on_close:
            callback(self)


class PacketTrack(MediaStreamTrack):
    """One peer's view of a StreamEncoder: the shared Opus packets from the first one after its first recv."""

    kind = "audio"

    def __init__(self, encoder: StreamEncoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.ended: dict | None = None  # {"code", "message"} when the encoder ended it
        self.dropped = 0  # packets lost because this peer fell QUEUE_PACKETS behind
        self._queue: deque[av.Packet] = deque()
        self._receiving = False
        self._waiter: asyncio.Future | None = None

    def push(self, packet: av.Packet) -> None:
        if not self._receiving:  # not sending yet: a peer starts at the packet after its first recv
            return
        if len(self._queue) >= QUEUE_PACKETS:
            self._queue.popleft()
            self.dropped += 1
        self._queue.append(packet)
        self._wake()

    async def recv(self) -> av.Packet:
        if not self._receiving:
            self._receiving = True
            self.encoder.start()
        while True:
            if self.readyState != "live":
                raise MediaStreamError
            if self._queue:
                return self._queue.popleft()
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def end(self, reason: dict) -> None:
        """The encoder closed: say why, and stop (recv raises MediaStreamError, "ended" is emitted)."""
        self.ended = reason
        self.stop()

    def stop(self) -> None:
        if self.readyState == "live":
            super().stop()
            self.encoder.unsubscribe(self)
        self._queue.clear()
        self._wake()
