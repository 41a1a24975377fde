"""`Daemon`: everything `wavecast serve` holds (the engine, loaded models, peers, encoders, device outputs),
its limits, and how it stops. The event loop only schedules: model loading and device work run in the
default executor, inference in the engine's thread, Opus encoding in the encoding thread, watermark detection in
a process of its own."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from typing import TYPE_CHECKING

from aiohttp import web

from wavecast.daemon.api import ApiError, Guard, RateLimit
from wavecast.daemon.device import DeviceOutput
from wavecast.daemon.jobs import Jobs
from wavecast.daemon.limits import Limits
from wavecast.daemon.marks import Registry, watermark_dir
from wavecast.daemon.peers import ENCODER_DELAY_SAMPLES, PACKET_SAMPLES, SAMPLE_RATE, Encoding, StreamEncoder
from wavecast.daemon.swap import Follower
from wavecast.models.store import ModelStore, UnknownVersion, default_work
from wavecast.streaming.composer import ComposerGroup, ComposerModel
from wavecast.streaming.engine import BUDGET, BUFFER_FRAMES, Engine, Group, SnapshotRefused, Stream
from wavecast.streaming.events import Events, load_events
from wavecast.streaming.model import FrameModel, ModelError
from wavecast.streaming.snapshot import Snapshot
from wavecast.streaming.watermark import Key

if TYPE_CHECKING:
    from wavecast.daemon.janus import Publisher
    from wavecast.daemon.routes.webrtc import Peer

log = logging.getLogger("wavecast.daemon")
DRAIN_SECONDS = 4.0  # SIGTERM: the most that closing peers and devices may take before the process exits
PR_SET_PDEATHSIG = 1  # prctl(2)
DRAINING_RETRY_S = 30  # Retry-After of a stream refused while draining (the daemon will be gone; use the other)
SNAPSHOT_SECONDS = 5.0  # the most a snapshot (GET .../snapshot, a move) waits for the inference thread
DETECTIONS = 2  # watermark detections accepted at once: one runs in the detector process, one waits for it


def detector_process() -> None:
    """The detector process starts below the streams' priority, and ends with the daemon even when the daemon
    is killed outright (Linux: the parent-death signal), so no killed daemon leaves it behind."""
    os.nice(10)
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Daemon:
    def __init__(self, store: ModelStore, *, limits: Limits | None = None, guard: Guard | None = None,
                 buffer_frames: int = BUFFER_FRAMES, budget: float = BUDGET, encode_budget: float = BUDGET,
                 events: Events | None = None, watermark: Key | None = None, janus: str | None = None) -> None:
        self.store = store
        self.janus = janus  # --janus: every new stream is published into this Janus (daemon/janus.py publish_new)
        self.events = events or load_events()  # the stings and moods streams can be sent
        self.limits = limits = limits or Limits()
        self.guard = guard or Guard()
        self.engine = Engine(buffer_frames=buffer_frames, max_streams=limits.max_streams, budget=budget,
                             watermark=watermark)
        # the serials streams' marks carry, and what they name
        self.marks = Registry(watermark_dir(store.root), watermark)
        self.detections = asyncio.Semaphore(DETECTIONS)  # POST /v1/detect: a busy daemon answers 503
        self._detector: ProcessPoolExecutor | None = None
        self.encode_budget = encode_budget  # busy share of the encoding thread past which no new encoder starts
        self.stream_rate = RateLimit(limits.stream_rate, limits.stream_burst)
        self.peers: dict[str, set[Peer]] = {}
        self.encoders: dict[str, StreamEncoder] = {}  # one per stream with WebRTC peers: packets fan out
        self.encoding = Encoding()  # the thread that runs them
        self.publishers: dict[str, Publisher] = {}  # streams published into Janus (their encoder's sinks too)
        self.outputs: dict[str, DeviceOutput] = {}
        self.started = time.time()
        self.errors = 0
        self.jobs = Jobs(store.root.parent / "jobs", store.root, default_work(), limits)  # training workers
        self.draining = False  # stopping: shutdown() runs
        self.drain_to: str | None = None  # POST /v1/drain: streams move to this daemon, new ones are refused
        self.moving: dict[str, str] = {}  # streams moving to another daemon (daemon/migrate.py): id -> its URL
        self._loading: dict[str, asyncio.Lock] = {}
        self.follower = Follower(self)  # moves following streams to new versions; starts with the first model

    # -- models -------------------------------------------------------------------------------------
    async def group(self, name: str) -> Group:
        """The loaded group for the current version of instrument `name` (or version N of 'name@N'), loading
        it off the loop if needed."""
        self.follower.start()
        return await self._load(name, "instrument", self.engine.groups, FrameModel, self.engine.add_model)

    async def composer(self, name: str) -> ComposerGroup:
        """The loaded group for the newest version of composer `name`."""
        return await self._load(name, "composer", self.engine.composers, ComposerModel, self.engine.add_composer)

    async def _load(self, name: str, kind: str, loaded: dict, loader, add):
        loop = asyncio.get_running_loop()
        try:
            entry = await loop.run_in_executor(None, self.store.resolve, name)
        except UnknownVersion as e:
            raise ApiError(404, "unknown_version", e.args[0]) from None
        except KeyError:
            latest = await loop.run_in_executor(None, self.store.latest)
            known = ", ".join(n for n, e in latest.items() if e.manifest.kind == kind) or "none"
            field = "composer" if kind == "composer" else "model"
            raise ApiError(404, "unknown_model", f"no {kind} is called '{name[:64]}' (the {kind}s here: {known}); "
                           f"name one in '{field}', or train one with 'wavecast train {kind}'") from None
        if entry.manifest.kind != kind:
            field = "composer" if entry.manifest.kind == "composer" else "model"
            article = "an" if kind == "instrument" else "a"
            raise ApiError(422, "wrong_model_kind", f"'{name}' is a {entry.manifest.kind}, not {article} {kind}; "
                           f"name it in '{field}' (GET /v1/models lists which is which)")
        key = (entry.manifest.name, entry.manifest.version)
        async with self._loading.setdefault(name, asyncio.Lock()):
            found = loaded.get(key)  # (the engine may unload a version nobody uses at any moment: look once)
            if found is None:
                if self.loaded_models() >= self.limits.max_models:
                    raise ApiError(503, "too_many_models", f"this daemon holds at most {self.limits.max_models} "
                                   "model versions at once (--max-models); use a model that is loaded already "
                                   "(GET /v1/models shows which) or restart the daemon with a higher limit")
                try:
                    model = await loop.run_in_executor(None, loader, entry.directory)
                except ModelError as e:
                    raise ApiError(500, "model_unusable", f"{e}; see the daemon log") from None
                found = await loop.run_in_executor(None, add, model)  # an instrument is timed here for admission
                log.info("model loaded name=%s version=%s kind=%s", *key, kind)
        return found

    def loaded_models(self) -> int:
        return len(self.engine.groups) + len(self.engine.composers)

    # -- streams ------------------------------------------------------------------------------------
    def stream(self, request: web.Request) -> Stream:
        sid = request.match_info["id"]
        stream = self.engine.streams.get(sid)
        if stream is None:
            raise ApiError(404, "unknown_stream", "no stream has that id; GET /v1/streams lists them")
        return stream

    def named(self, name: str) -> Stream | None:
        """The stream called `name`, if any."""
        return next((s for s in list(self.engine.streams.values()) if s.name == name), None)

    def steerable(self, stream: Stream) -> None:
        """Refuse a change to a stream that moves to another daemon: both must make the same audio up to the cut."""
        to = self.moving.get(stream.id)
        if to is not None:
            raise ApiError(409, "stream_moving", f"the stream is moving to the daemon at {to}; retry in a second on "
                                                 "the daemon it moves to (GET /v1/streams there finds it by name)")

    def open_for_streams(self) -> None:
        """Refuse new streams while draining, naming the daemon to use instead."""
        if self.drain_to is not None:
            raise ApiError(503, "draining", f"this daemon is draining: its streams move to {self.drain_to} and it "
                           f"will stop; create the stream there", {"Retry-After": str(DRAINING_RETRY_S)})

    def stream_info(self, stream: Stream) -> dict:
        info = stream.info()
        info["peers"] = len(self.peers.get(stream.id, ()))
        info["encoders"] = int(stream.id in self.encoders)
        # a WebRTC listener also waits for a whole Opus packet and the encoder's lookahead
        info["latency_ms"] |= {"packet": 1000 * PACKET_SAMPLES / SAMPLE_RATE,
                               "encoder": round(1000 * ENCODER_DELAY_SAMPLES / SAMPLE_RATE, 1)}
        out = self.outputs.get(stream.id)
        info["device"] = out.info() if out else None
        return info

    def encoder(self, stream: Stream) -> StreamEncoder:
        """The stream's Opus encoder, started for its first WebRTC peer; it ends with its last."""
        encoder = self.encoders.get(stream.id)
        if encoder is None or encoder.closed:
            encoder = self.encoders[stream.id] = StreamEncoder(stream, self.engine, self.encoding)
            encoder.on_close(lambda e: self.encoders.pop(stream.id) if self.encoders.get(stream.id) is e else None)
        return encoder

    async def snapshot(self, stream: Stream, purpose: str = "snapshot") -> Snapshot:
        """`stream` snapshotted on the inference thread between two ticks; ApiError 404/409/503 (`purpose`, e.g.
        "move", names what could not be done)."""
        try:
            return await asyncio.wait_for(asyncio.wrap_future(self.engine.snapshot(stream)), SNAPSHOT_SECONDS)
        except SnapshotRefused as e:
            if stream.id not in self.engine.streams:
                raise ApiError(404, "unknown_stream", "the stream ended; GET /v1/streams lists them") from None
            raise ApiError(409, "stream_busy", f"cannot {purpose} the stream now: {e}") from None
        except TimeoutError:
            raise ApiError(503, "engine_busy", f"the engine took no snapshot within {SNAPSHOT_SECONDS:g} s; retry",
                           {"Retry-After": "1"}) from None

    async def close_stream(self, stream: Stream, reason: dict | None = None) -> None:
        reason = reason or {"code": "stream_deleted", "message": "the stream was deleted"}
        publisher = self.publishers.pop(stream.id, None)
        if publisher:  # a mountpoint it made goes too
            await publisher.stop(reason["message"])
        encoder = self.encoders.pop(stream.id, None)
        if encoder:  # its peers hear `reason` and hang up
            encoder.close(**reason)
        await asyncio.gather(*(peer.close(reason) for peer in list(self.peers.pop(stream.id, ()))))
        out = self.outputs.pop(stream.id, None)
        if out:
            await asyncio.get_running_loop().run_in_executor(None, out.close)
        self.engine.delete_stream(stream.id)

    async def shutdown(self) -> None:
        """Drain: every WebRTC listener is told why and hung up, device outputs close, the engine stops; at
        most DRAIN_SECONDS, then the engine stops whatever is left."""
        self.draining = True
        await self.follower.stop()
        jobs = asyncio.ensure_future(self.jobs.shutdown())  # workers stop (jobs interrupted) while listeners hear
        reason = {"code": "shutdown", "message": "the daemon is stopping; reconnect when it is back"}
        try:
            await asyncio.wait_for(asyncio.gather(*(self.close_stream(s, reason)
                                                    for s in list(self.engine.streams.values()))), DRAIN_SECONDS)
        except TimeoutError:
            log.warning("drain took longer than %.0f s; stopping anyway", DRAIN_SECONDS)
        await jobs
        self.engine.stop()
        if self._detector is not None:
            self._detector.shutdown(wait=False, cancel_futures=True)

    def detector(self, restart: bool = False) -> ProcessPoolExecutor:
        """The process that decodes and searches files for the mark (POST /v1/detect): a file is decoded by
        ffmpeg and searched for seconds of CPU, neither of which may stall the engine's thread or the loop (the
        GIL), nor take the daemon down with it (a hostile file). Lower priority than the streams; made on first
        use, again after it died."""
        if self._detector is None or restart:
            if self._detector is not None:
                self._detector.shutdown(wait=False, cancel_futures=True)
            self._detector = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=detector_process)
        return self._detector

    def limit_metrics(self) -> dict[str, float]:
        return asdict(self.limits)
