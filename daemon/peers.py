"""WebRTC delivery: an aiortc audio track that pulls a stream's frames, and loopback ICE candidates."""

from __future__ import annotations

import asyncio
import time
from fractions import Fraction

import aioice.ice
import numpy as np
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError
from av import AudioFrame

from streaming.engine import Engine, Stream

PACKET_SAMPLES = 960  # 20 ms at 48 kHz: one Opus packet
SAMPLE_RATE = 48_000
TIME_BASE = Fraction(1, SAMPLE_RATE)


def use_ice_host(address: str) -> None:
    """Offer `address` (e.g. 127.0.0.1) as the only host ICE candidate.

    aioice leaves loopback out of its host candidates, so local clients and tests could otherwise only
    connect through the machine's LAN address. This is process-wide, as aioice's gathering is.
    """
    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: [address]


class StreamTrack(MediaStreamTrack):
    """48 kHz stereo audio of one stream, paced by the wall clock from its first packet."""

    kind = "audio"

    def __init__(self, stream: Stream, engine: Engine) -> None:
        super().__init__()
        if stream.manifest.sample_rate != SAMPLE_RATE:
            raise ValueError(f"WebRTC needs a {SAMPLE_RATE} Hz model, '{stream.manifest.name}' is "
                             f"{stream.manifest.sample_rate} Hz")
        self.stream = stream
        self.engine = engine
        self.reader = stream.listen()
        self._mono = np.zeros(PACKET_SAMPLES, np.float32)
        self._stereo = np.zeros((1, 2 * PACKET_SAMPLES), np.int16)
        self._pts = 0
        self._start: float | None = None

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        now = time.monotonic()
        if self._start is None:
            self._start = now
        else:
            wait = self._start + self._pts / SAMPLE_RATE - now
            if wait > 0:
                await asyncio.sleep(wait)
        self.reader.read(self._mono)
        self.engine.notify()
        pcm = np.clip(self._mono, -1.0, 1.0) * 32767.0
        self._stereo[0, 0::2] = pcm
        self._stereo[0, 1::2] = pcm
        frame = AudioFrame.from_ndarray(self._stereo, format="s16", layout="stereo")
        frame.sample_rate = SAMPLE_RATE
        frame.pts = self._pts
        frame.time_base = TIME_BASE
        self._pts += PACKET_SAMPLES
        return frame

    def stop(self) -> None:
        if self.readyState == "live":
            self.stream.unlisten(self.reader)
        super().stop()
