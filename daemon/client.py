"""A small aiortc client for wavecast streams: receive a stream's audio and steer it over the data channel.

Used by the tests and benches, and a working example for programs that listen to wavecast.
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from wavecast.daemon.peers import use_ice_host


class Listener:
    def __init__(self) -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.channel = self.pc.createDataChannel("controls")
        self.replies: asyncio.Queue[dict] = asyncio.Queue()  # answers to what we sent
        self.now_playing: list[dict] = []  # a composed stream's note announcements
        self.telemetry: list[dict] = []  # the stream's latency, fill and underruns, about once a second
        self.provenance: dict | None = None  # the daemon's first message: what made the audio (AI-generated)
        self.failure: asyncio.Future = asyncio.get_running_loop().create_future()  # the stream_failed notice
        self.track_ready: asyncio.Future = asyncio.get_running_loop().create_future()
        self.channel_open = asyncio.Event()
        self.first_audio_at: float | None = None

        @self.pc.on("track")
        def on_track(track) -> None:
            if not self.track_ready.done():
                self.track_ready.set_result(track)

        @self.channel.on("open")
        def on_open() -> None:
            self.channel_open.set()

        @self.channel.on("message")
        def on_message(message: str) -> None:
            body = json.loads(message)
            kind = body.get("type")
            if kind == "now_playing":
                self.now_playing.append(body)
            elif kind == "telemetry":
                self.telemetry.append(body)
            elif kind == "provenance":
                self.provenance = body
            elif kind == "stream_failed":
                if not self.failure.done():
                    self.failure.set_result(body)
            else:
                self.replies.put_nowait(body)

    @classmethod
    async def connect(cls, base_url: str, stream_id: str, ice_host: str | None = "127.0.0.1",
                      headers: dict | None = None) -> Listener:
        """Offer to `POST /v1/streams/{id}/webrtc` and wait until audio and the data channel are up."""
        if ice_host:
            use_ice_host(ice_host)
        self = cls()
        self.pc.addTransceiver("audio", direction="recvonly")
        await self.pc.setLocalDescription(await self.pc.createOffer())
        self.offered_at = time.monotonic()
        offer = {"sdp": self.pc.localDescription.sdp, "type": "offer"}
        async with aiohttp.ClientSession(headers=headers) as http:
            async with http.post(f"{base_url}/v1/streams/{stream_id}/webrtc", json=offer) as resp:
                answer = await resp.json()
                if resp.status != 200:
                    raise RuntimeError(f"offer refused: {resp.status} {answer}")
        await self.pc.setRemoteDescription(RTCSessionDescription(**answer))
        self.track = await asyncio.wait_for(self.track_ready, 20)
        await asyncio.wait_for(self.channel_open.wait(), 20)
        return self

    async def collect(self, seconds: float) -> np.ndarray:
        """The next `seconds` of received audio, left channel, float32 in [-1, 1]."""
        chunks, total, need = [], 0, int(seconds * 48_000)
        while total < need:
            frame = await asyncio.wait_for(self.track.recv(), 10)
            if self.first_audio_at is None:
                self.first_audio_at = time.monotonic()
            pcm = frame.to_ndarray().reshape(-1, len(frame.layout.channels))[:, 0]
            chunks.append(pcm.astype(np.float32) / 32768.0)
            total += len(pcm)
        return np.concatenate(chunks)[:need]

    async def send_controls(self, controls: dict) -> dict:
        """Send new control values over the data channel and wait for the daemon's reply."""
        return await self.send({"controls": controls})

    async def send(self, message: dict) -> dict:
        """Send a message (controls and/or an action) over the data channel and wait for the reply."""
        self.channel.send(json.dumps(message))
        return await asyncio.wait_for(self.replies.get(), 10)

    async def close(self) -> None:
        await self.pc.close()
