"""The real-time engine: one inference thread, one batched ONNX Runtime call per model per tick.

A stream is a model version + a state slot + a seeded noise generator + smoothed controls + a ring
buffer. Sinks pull from the ring at their own clock; each tick the engine generates one frame for every
stream whose hungriest listener has less than `buffer_frames` frames buffered, so the engine is paced by
its listeners and a stream nobody listens to costs nothing. Stream and slot changes are queued and
applied by the inference thread at the start of a tick, so the pools are touched by one thread only.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from streaming.composer import ComposerGroup, ComposerModel, Note, Voice
from streaming.controls import Smoother
from streaming.model import FrameModel, Manifest, StatePool
from streaming.ring import Reader, RingBuffer

log = logging.getLogger("wavecast.engine")
RING_SECONDS = 0.5  # a listener that falls this far behind skips ahead


class Group:
    """The streams of one model version: the model, its state pool and preallocated batch arrays."""

    def __init__(self, model: FrameModel) -> None:
        self.model = model
        self.manifest = model.manifest
        self.pool = StatePool(model.manifest)
        self.control = np.zeros((0, 1, len(self.manifest.controls)), np.float32)
        self.noise = np.zeros((0, 1, self.manifest.noise), np.float32)
        self.slots = np.zeros(0, np.intp)

    def run(self, streams: list[Stream]) -> np.ndarray:
        """One batched frame for `streams`; writes each stream's audio to its ring and returns the batch."""
        n = len(streams)
        if len(self.control) < n:  # batch arrays grow by doubling; a tick allocates nothing otherwise
            size = max(n, 2 * len(self.control), 8)
            self.control = np.zeros((size, 1, len(self.manifest.controls)), np.float32)
            self.noise = np.zeros((size, 1, self.manifest.noise), np.float32)
            self.slots = np.zeros(size, np.intp)
        slots = self.slots[:n]
        for i, s in enumerate(streams):
            slots[i] = s.slot
            s.smoother.step(self.control[i, 0])
            s.rng.random(out=self.noise[i, 0], dtype=np.float32)
        audio, states = self.model.run(self.control[:n], self.noise[:n], self.pool.gather(slots))
        self.pool.scatter(slots, states)
        for i, s in enumerate(streams):
            s.ring.write(audio[i])
            s.frames += 1
        return audio


class Stream:
    """One generated stream; listeners read it through their own `Reader`."""

    def __init__(self, group: Group, seed: int, controls: Mapping[str, float], ring_seconds: float,
                 voice: Voice | None = None) -> None:
        m = group.manifest
        self.id = uuid.uuid4().hex[:12]
        self.group = group
        self.seed = seed
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.smoother = Smoother(m, controls)
        self.voice = voice  # a composed stream: the voice sets f0 and loudness every frame
        self.performed = self.smoother.targets.copy()
        self.played = [self.smoother.names.index(n) for n in ("f0", "loudness")] if voice else []
        self.ring = RingBuffer(int(ring_seconds * m.sample_rate))
        self.slot: int | None = None  # assigned by the inference thread
        self.frames = 0
        self.closed_underruns = 0

    @property
    def manifest(self) -> Manifest:
        return self.group.manifest

    def listen(self) -> Reader:
        return self.ring.reader()

    def unlisten(self, reader: Reader) -> None:
        self.closed_underruns += reader.underruns
        self.ring.close(reader)

    @property
    def underruns(self) -> int:
        return self.closed_underruns + sum(r.underruns for r in self.ring.readers())

    def perform(self) -> None:
        """Take this frame's f0 and loudness from the voice (unsmoothed: the performer shapes them)."""
        self.performed[self.played] = self.voice.frame_controls(self.frames)
        self.smoother.jump(self.performed)

    def info(self) -> dict:
        m, listeners = self.manifest, len(self.ring.readers())
        buffered = self.ring.min_buffered()
        composed = {}
        if self.voice is not None:
            v = self.voice
            composed = {"composer": v.group.manifest.name, "composer_version": v.group.manifest.version,
                        "now_playing": v.now_playing()}
        return {
            "id": self.id, "model": m.name, "version": m.version, "seed": self.seed, **composed,
            "controls": self.voice.settings if self.voice else self.smoother.as_dict(),
            "state": "playing" if listeners else "idle",
            "underruns": self.underruns, "listeners": listeners, "frames": self.frames,
            "seconds": round(self.frames * m.frame_seconds, 3),
            "buffered_ms": None if buffered is None else round(1000 * buffered / m.sample_rate, 1),
        }


@dataclass
class Stats:
    ticks: int = 0
    frames: int = 0
    batches: int = 0
    busy_seconds: float = 0.0  # time spent generating
    max_tick_seconds: float = 0.0
    last_batch: int = 0
    composer_steps: int = 0  # batched composer calls
    notes: int = 0  # notes (and rests) composed


class Engine:
    """Owns the groups, the streams and the inference thread."""

    def __init__(self, buffer_frames: int = 6, ring_seconds: float = RING_SECONDS) -> None:
        self.buffer_frames = buffer_frames
        self.ring_seconds = ring_seconds
        self.groups: dict[tuple[str, int], Group] = {}
        self.composers: dict[tuple[str, int], ComposerGroup] = {}
        self.streams: dict[str, Stream] = {}
        self.stats = Stats()
        self._pending: deque[Callable[[], None]] = deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- called from any thread ---------------------------------------------------------------------
    def add_model(self, model: FrameModel) -> Group:
        key = (model.manifest.name, model.manifest.version)
        if key not in self.groups:
            self.groups[key] = Group(model)
        return self.groups[key]

    def add_composer(self, model: ComposerModel) -> ComposerGroup:
        key = (model.manifest.name, model.manifest.version)
        if key not in self.composers:
            self.composers[key] = ComposerGroup(model)
        return self.composers[key]

    def create_stream(self, group: Group, seed: int, controls: Mapping[str, Any],
                      composer: ComposerGroup | None = None, keep_notes: int | None = 2000) -> Stream:
        """A stream of `group`'s instrument; with `composer`, `controls` are the composer's (validated)."""
        voice = None
        if composer is not None:
            f0 = group.manifest.control("f0")
            voice = Voice(composer, seed, controls, (f0.min, f0.max), group.manifest.frame_seconds, keep_notes)
            controls = {}
        stream = Stream(group, seed, controls, self.ring_seconds, voice)

        def attach() -> None:
            stream.slot = group.pool.allocate()
            if voice is not None:
                voice.slot = voice.group.pool.allocate()

        self._pending.append(attach)
        self.streams[stream.id] = stream
        self.notify()
        return stream

    def delete_stream(self, stream_id: str) -> Stream | None:
        stream = self.streams.pop(stream_id, None)
        if stream is not None:

            def detach() -> None:
                if stream.slot is not None:
                    stream.group.pool.release(stream.slot)
                    stream.slot = None
                if stream.voice is not None and stream.voice.slot is not None:
                    stream.voice.group.pool.release(stream.voice.slot)
                    stream.voice.slot = None

            self._pending.append(detach)
            self.notify()
        return stream

    def notify(self) -> None:
        """Wake the inference thread: a listener has taken audio or the streams changed."""
        self._wake.set()

    # -- the inference thread -----------------------------------------------------------------------
    def tick(self) -> int:
        """Generate one frame for every stream that needs one; returns how many frames were made."""
        while self._pending:
            self._pending.popleft()()
        needy: dict[Group, list[Stream]] = {}
        for s in list(self.streams.values()):
            if s.slot is None:
                continue
            buffered = s.ring.min_buffered()
            if buffered is not None and buffered < self.buffer_frames * s.manifest.hop:
                needy.setdefault(s.group, []).append(s)
        if not needy:
            return 0
        started = time.perf_counter()
        self._compose(needy)
        for group, streams in needy.items():
            group.run(streams)
            self.stats.batches += 1
        elapsed = time.perf_counter() - started
        made = sum(len(v) for v in needy.values())
        st = self.stats
        st.ticks, st.frames, st.last_batch = st.ticks + 1, st.frames + made, made
        st.busy_seconds += elapsed
        st.max_tick_seconds = max(st.max_tick_seconds, elapsed)
        return made

    def _compose(self, needy: dict[Group, list[Stream]]) -> None:
        """Composed streams: one batched composer step for the voices whose next note starts now, then
        every voice sets its stream's f0 and loudness for the frame."""
        due: dict[ComposerGroup, list[Voice]] = {}
        voiced = [s for streams in needy.values() for s in streams if s.voice is not None]
        for s in voiced:
            if s.voice.begin_frame(s.frames):
                due.setdefault(s.voice.group, []).append(s.voice)
        for composer, voices in due.items():
            composer.step(voices)
            self.stats.composer_steps += 1
            self.stats.notes += len(voices)
        for s in voiced:
            s.perform()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                made = self.tick()
            except Exception:  # a failing model must not kill the thread that serves every stream
                log.exception("engine tick failed")
                made = 0
            if not made:
                self._wake.wait(0.005)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="wavecast-inference", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=5)


def render(
    model: FrameModel, seconds: float, seed: int, controls: Mapping[str, Any],
    timeline: list[tuple[float, Mapping[str, Any]]] = (), curves: np.ndarray | None = None,
    composer: ComposerModel | None = None,
) -> np.ndarray:
    """The engine's output for one stream without a clock: the same code path as live streaming.

    `timeline` holds (time in seconds, controls) changes applied at the first frame at or after that time;
    for a composed stream (`composer` given) `controls` are the composer's and a timeline entry may also
    hold an "action" (play, pause, reset). `curves` [frames, C] (manifest order) gives every frame's
    controls exactly, bypassing the smoother.
    """
    return compose(model, seconds, seed, controls, timeline, curves, composer)[0]


def compose(
    model: FrameModel, seconds: float, seed: int, controls: Mapping[str, Any],
    timeline: list[tuple[float, Mapping[str, Any]]] = (), curves: np.ndarray | None = None,
    composer: ComposerModel | None = None,
) -> tuple[np.ndarray, list[Note]]:
    """`render`, also returning the notes a composed stream played (empty without a composer)."""
    engine = Engine(buffer_frames=1)
    group = engine.add_model(model)
    composers = engine.add_composer(composer) if composer is not None else None
    stream = engine.create_stream(group, seed, controls, composers, keep_notes=None)
    reader = stream.listen()
    hop = model.manifest.hop
    frames = int(round(seconds / model.manifest.frame_seconds))
    out = np.empty(frames * hop, np.float32)
    pending = iter(sorted(timeline, key=lambda c: c[0]))
    nxt = next(pending, None)
    for i in range(frames):
        while nxt is not None and nxt[0] <= i * model.manifest.frame_seconds + 1e-9:
            change = dict(nxt[1])
            if stream.voice is not None:
                if "action" in change:
                    stream.voice.act(change.pop("action"))
                stream.voice.set(change)
            else:
                stream.smoother.set(change)
            nxt = next(pending, None)
        if curves is not None:
            stream.smoother.jump(curves[i])
        engine.tick()
        reader.read(out[i * hop : (i + 1) * hop])
    return out, stream.voice.notes if stream.voice is not None else []
