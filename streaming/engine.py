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

import numpy as np

from streaming.controls import Smoother
from streaming.model import FrameModel, Manifest
from streaming.ring import Reader, RingBuffer

log = logging.getLogger("wavecast.engine")
RING_SECONDS = 0.5  # a listener that falls this far behind skips ahead


class Group:
    """The streams of one model version: the model, its state pool and preallocated batch arrays."""

    def __init__(self, model: FrameModel, capacity: int = 8) -> None:
        self.model = model
        self.manifest = model.manifest
        self.capacity = 0
        self.free: list[int] = []
        self.pool: dict[str, np.ndarray] = {}
        self._grow(capacity)

    def _grow(self, capacity: int) -> None:
        m, old = self.manifest, self.capacity
        grown = {}
        for spec in m.states:
            arr = np.zeros(spec.concrete(capacity), np.float32)
            if old:
                arr[self._index(spec.batch_axis, slice(0, old))] = self.pool[spec.name]
            grown[spec.name] = arr
        self.pool = grown
        self.gathered = {s.name: np.zeros(s.concrete(capacity), np.float32) for s in m.states}
        self.control = np.zeros((capacity, 1, len(m.controls)), np.float32)
        self.noise = np.zeros((capacity, 1, m.noise), np.float32)
        self.slots = np.zeros(capacity, np.intp)
        self.free.extend(range(capacity - 1, old - 1, -1))
        self.capacity = capacity

    @staticmethod
    def _index(axis: int, index: slice | np.ndarray | int) -> tuple:
        return (slice(None),) * axis + (index,)

    def allocate(self) -> int:
        if not self.free:
            self._grow(self.capacity * 2)
        slot = self.free.pop()
        self.reset(slot)
        return slot

    def reset(self, slot: int) -> None:
        for spec in self.manifest.states:
            self.pool[spec.name][self._index(spec.batch_axis, slot)] = 0.0

    def release(self, slot: int) -> None:
        self.free.append(slot)

    def run(self, streams: list[Stream]) -> np.ndarray:
        """One batched frame for `streams`; writes each stream's audio to its ring and returns the batch."""
        n = len(streams)
        slots = self.slots[:n]
        for i, s in enumerate(streams):
            slots[i] = s.slot
            s.smoother.step(self.control[i, 0])
            s.rng.random(out=self.noise[i, 0], dtype=np.float32)
        states = {}
        for spec in self.manifest.states:
            view = self.gathered[spec.name][self._index(spec.batch_axis, slice(0, n))]
            np.take(self.pool[spec.name], slots, axis=spec.batch_axis, out=view)
            states[spec.name] = view
        audio, states = self.model.run(self.control[:n], self.noise[:n], states)
        for spec in self.manifest.states:
            self.pool[spec.name][self._index(spec.batch_axis, slots)] = states[spec.name]
        for i, s in enumerate(streams):
            s.ring.write(audio[i])
            s.frames += 1
        return audio


class Stream:
    """One generated stream; listeners read it through their own `Reader`."""

    def __init__(self, group: Group, seed: int, controls: Mapping[str, float], ring_seconds: float) -> None:
        m = group.manifest
        self.id = uuid.uuid4().hex[:12]
        self.group = group
        self.seed = seed
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.smoother = Smoother(m, controls)
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

    def info(self) -> dict:
        m, listeners = self.manifest, len(self.ring.readers())
        buffered = self.ring.min_buffered()
        return {
            "id": self.id, "model": m.name, "version": m.version, "seed": self.seed,
            "controls": self.smoother.as_dict(), "state": "playing" if listeners else "idle",
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


class Engine:
    """Owns the groups, the streams and the inference thread."""

    def __init__(self, buffer_frames: int = 6, ring_seconds: float = RING_SECONDS) -> None:
        self.buffer_frames = buffer_frames
        self.ring_seconds = ring_seconds
        self.groups: dict[tuple[str, int], Group] = {}
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

    def create_stream(self, group: Group, seed: int, controls: Mapping[str, float]) -> Stream:
        stream = Stream(group, seed, controls, self.ring_seconds)

        def attach() -> None:
            stream.slot = group.allocate()

        self._pending.append(attach)
        self.streams[stream.id] = stream
        self.notify()
        return stream

    def delete_stream(self, stream_id: str) -> Stream | None:
        stream = self.streams.pop(stream_id, None)
        if stream is not None:

            def detach() -> None:
                if stream.slot is not None:
                    stream.group.release(stream.slot)
                    stream.slot = None

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
    model: FrameModel, seconds: float, seed: int, controls: Mapping[str, float],
    timeline: list[tuple[float, Mapping[str, float]]] = (), curves: np.ndarray | None = None,
) -> np.ndarray:
    """The engine's output for one stream without a clock: the same code path as live streaming.

    `timeline` holds (time in seconds, controls) changes applied at the first frame at or after that time.
    `curves` [frames, C] (manifest order) gives every frame's controls exactly, bypassing the smoother.
    """
    engine = Engine(buffer_frames=1)
    stream = engine.create_stream(engine.add_model(model), seed, controls)
    reader = stream.listen()
    hop = model.manifest.hop
    frames = int(round(seconds / model.manifest.frame_seconds))
    out = np.empty(frames * hop, np.float32)
    pending = iter(sorted(timeline, key=lambda c: c[0]))
    nxt = next(pending, None)
    for i in range(frames):
        while nxt is not None and nxt[0] <= i * model.manifest.frame_seconds + 1e-9:
            stream.smoother.set(nxt[1])
            nxt = next(pending, None)
        if curves is not None:
            stream.smoother.jump(curves[i])
        engine.tick()
        reader.read(out[i * hop : (i + 1) * hop])
    return out
