"""The real-time engine: one inference thread, one batched ONNX Runtime call per model per tick.

A stream is a slot in its model's group: a row of state tensors, control targets, a noise key and a ring
of audio. Sinks pull from the ring at their own clock; each tick the engine generates one frame for every
stream whose hungriest listener has less than the stream's target fill buffered, so the engine is paced by
its listeners and a stream nobody listens to costs nothing.

A tick is a pipeline of stages over whole batches, each owning preallocated arrays sized up front:
controls (smoothed as arrays) and noise (one gather) -> the model call (ONNX Runtime writes into the
group's buffers through an IOBinding) -> stings mixed in and ducks -> the limiter (no sample above
LIMIT, -1 dBFS; bit-transparent below it) -> the output guard (non-finite or out-of-range samples never
reach a listener) -> the rings (one array write). Only composed streams do Python per stream (the
performer). Each model group runs in its own guard: a group whose call raises is quarantined and its
streams fail with the reason, while every other group keeps its real time.

Hot swap: `Engine.swap` moves a stream to another version of its model between ticks. Its new slot starts
from states warmed off the inference thread (`warm`: a few frames of the new model on the stream's
controls; the oscillator's phase is then taken from the old slot, so old and new are in phase), its readers
move with its ring (`Rings.move`), and for CROSSFADE_SECONDS both models play it: each tick the old slot is
run first and the new slot's frame becomes old * cos + new * sin (equal power) before it is written. Then the
old slot is released. Only the frames of a moving stream cost an extra call, and only while it fades.

Admission: each group knows its cost (fixed + per stream, measured when the model is loaded and
corrected by the ticks' measured times), and the engine refuses a stream that would push the predicted
tick past `budget` of a frame.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from wavecast.streaming.composer import ComposerGroup, ComposerModel, Note, Voice
from wavecast.streaming.controls import Controls
from wavecast.streaming.events import Duck, Sting, midi_of, nearest_scale, register_midi, sting_key
from wavecast.streaming.model import FrameModel, Manifest, PoolFull, StatePool
from wavecast.streaming.noise import shared_table, stream_key
from wavecast.streaming.notes import Scale
from wavecast.streaming.performer import FLOOR_DB, articulation_of
from wavecast.streaming.provenance import provenance
from wavecast.streaming.ring import Reader, Rings
from wavecast.streaming.snapshot import ModelRef, Snapshot, check
from wavecast.streaming.watermark import DELAY, Key, Marker, payload_text

log = logging.getLogger("wavecast.engine")
BUFFER_FRAMES = 3  # target fill a stream starts with: 30 ms generated ahead of its hungriest listener
MAX_BUFFER_FRAMES = 12  # a listener that underruns grows its stream's fill up to this
RING_FRAMES = 24  # ring length: twice the largest fill, so a listener never laps the writer
MAX_STREAMS = 1024  # hard bound on the slots of a group (admission control usually refuses well before)
BUDGET = 0.7  # share of a frame the predicted tick may take before new streams are refused
RETRY_AFTER_SECONDS = 10
LOG_EVERY_SECONDS = 10.0
NO_ROWS = np.zeros(0, np.intp)
STING_TEMPO = 100.0  # quarter notes a minute of a sting on a stream that has no composer (no tempo)
CROSSFADE_SECONDS = 0.03  # equal-power crossfade of a stream moving to a new version (>= 20 ms)
WARM_FRAMES = 20  # frames a new version runs on a moving stream's controls before it is heard
SHARED_STATES = ("phase",)  # states carried from the old slot to the new: the oscillator's running phase
MAX_STINGS = 2  # stings one stream may play at once
LIMIT = 10 ** (-1 / 20)  # the limiter's ceiling: -1 dBFS, so no documented control value clips
LIMIT_F32 = np.float32(LIMIT)  # 0.8912509: float32 rounds LIMIT down (3e-8 under it), so a clip here holds it
LIMIT_RELEASE_DB_PER_S = 60.0  # how fast a limited stream's gain comes back
BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192)  # batch sizes a CUDA group pads to: few shapes to plan for


class EngineSaturated(Exception):
    """Admitting another stream would break real time for the ones playing."""

    def __init__(self, message: str, retry_after: int = RETRY_AFTER_SECONDS) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TooManyStings(Exception):
    """The stream already plays MAX_STINGS stings."""


class ModelFailed(Exception):
    """The model's group is quarantined after a fault; the message says what failed."""


class SnapshotRefused(Exception):
    """The stream cannot be snapshotted at this moment (it is moving to another version, playing a sting,
    failed or deleted); the message says why and when to try again."""


class Throttled:
    """Logs the first occurrence of each kind of fault at once, then at most one line per `every` seconds
    saying how many were left out, so a fault that repeats every tick cannot flood the log."""

    def __init__(self, logger: logging.Logger, every: float = LOG_EVERY_SECONDS) -> None:
        self.logger, self.every = logger, every
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def error(self, key: str, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -math.inf) < self.every:
            self._held[key] = self._held.get(key, 0) + 1
            return
        held = self._held.pop(key, 0)
        self._last[key] = now
        self.logger.error(message + (f" ({held} more like it in the last {self.every:g} s)" if held else ""), *args)


def describe(error: BaseException) -> str:
    """One line for people: the exception's own message (first line, bounded), not its repr."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text[:300]


class Group:
    """The streams of one model version: the model and every per-slot array its batches use."""

    def __init__(self, model: FrameModel, capacity: int, buffer_frames: int, max_buffer_frames: int,
                 cost: tuple[float, float], watermark: Key | None = None) -> None:
        m = model.manifest
        self.model = model
        self.manifest = m
        # On a GPU a padded row costs next to nothing, and a few fixed shapes let ORT reuse its plans.
        self.buckets = model.providers[0] == "CUDAExecutionProvider"
        if self.buckets:
            capacity = self.bucket(capacity)
        self.capacity = capacity
        self.fixed_seconds, self.stream_seconds = cost  # predicted call time: fixed + per stream
        self.pool = StatePool(m, capacity)
        self.controls = Controls(m, capacity)
        self.rings = Rings(capacity, max(RING_FRAMES, 2 * max_buffer_frames), m.hop, buffer_frames,
                           max_buffer_frames)
        self.noise_table = shared_table(m.noise)
        self.keys = np.zeros(capacity, np.uint64)
        self.active = np.zeros(capacity, bool)  # slots whose stream is generated (created, not failed)
        self.composed = np.zeros(capacity, bool)  # slots whose stream a composer plays (Python per frame)
        self.streams: list[Stream | None] = [None] * capacity
        self.control = np.tile(np.array([c.default for c in m.controls], np.float32), (capacity, 1, 1))
        self.noise = np.zeros((capacity, 1, m.noise), np.float32)
        self.audio = np.zeros((capacity, m.hop), np.float32)
        self._abs = np.zeros((capacity, m.hop), np.float32)
        self._peak = np.zeros(capacity, np.float32)
        self.admitted = 0  # streams that exist (a deleted one's slot is released a tick later)
        self.failure: str | None = None
        self.call_seconds = 0.0  # the last model call alone: the rest of a tick is the engine's own work
        self.guarded_frames = 0  # frames whose samples the guard had to clip or silence
        self.fades: dict[int, Fade] = {}  # slots of streams moving in, by slot (inference thread only)
        self.duck = Duck(capacity, m.hop, m.frame_seconds)
        self.limit_gain = np.ones(capacity, np.float32)  # the limiter's gain at the end of each slot's last frame
        self.limiting = False  # some slot's gain is below 1
        # r: the release per sample; rise[n] = r^(n+1), fall[k] = r^-(k+1) (see `limit`)
        r = 10.0 ** (LIMIT_RELEASE_DB_PER_S / 20.0 / m.sample_rate)
        self.rise = (r ** np.arange(1, m.hop + 1, dtype=np.float64)).astype(np.float32)
        self.fall = (r ** -np.arange(1, m.hop + 1, dtype=np.float64)).astype(np.float32)
        self.limited = 0  # frames the limiter turned down since the engine last counted them
        self.marker = Marker(watermark, capacity, m.sample_rate, m.hop) if watermark is not None else None
        self.layers: list[Layer] = []  # stings playing on top of streams (inference thread only)
        # the columns a performer plays (a composer's voice, a sting): f0 and loudness, where the model has them;
        # a voice also plays the brightness, where the model has that too (a sting leaves it as it is)
        self.played = [self.controls.index[n] for n in ("f0", "loudness")] if {"f0", "loudness"} <= \
            set(self.controls.index) else []
        self.performed = self.played + [self.controls.index["brightness"]] if self.played and \
            "brightness" in self.controls.index else self.played
        self.removed = False  # unloaded by `Engine.remove_model`; a new stream puts it back

    def predicted_seconds(self, streams: int) -> float:
        return self.fixed_seconds + self.stream_seconds * streams if streams else 0.0

    def bucket(self, n: int) -> int:
        """The batch a call of `n` streams runs at: `n` itself on the CPU, padded up to a bucket on CUDA."""
        return next((b for b in BUCKETS if b >= n), n) if self.buckets else n

    def needy(self) -> np.ndarray:
        """Slots to generate this tick: active, listened to, and below their target fill."""
        r = self.rings
        below = r.written * r.hop - r.front < r.ahead * r.hop
        return np.flatnonzero(self.active & (r.listeners > 0) & below)

    def run(self, slots: np.ndarray, mark: bool = True) -> np.ndarray:
        """One frame for every slot in `slots`, written to their rings; returns the batch rows whose
        output was not finite (they were silenced). `mark` False: the frame of a stream's old version, which
        its new slot crossfades and then marks."""
        n, b = len(slots), self.bucket(len(slots))  # rows n..b pad a bucket: stale inputs, outputs unused
        self.controls.step(slots, self.control[:n, 0])
        self.noise_table.fill(self.keys[slots], self.rings.written[slots], self.noise[:n, 0])

        def call(states: dict[str, np.ndarray], states_out: dict[str, np.ndarray]) -> None:
            started = time.perf_counter()
            self.model.run_into(self.control[:b], self.noise[:b], states, self.audio[:b], states_out)
            self.call_seconds = time.perf_counter() - started

        self.pool.run(slots, b, call, self.active)
        audio = self.audio[:n]
        if self.fades:
            self.crossfade(slots, audio)
        if self.layers:
            self.mix(slots, audio)
        self.duck.apply(slots, self.rings.written, audio)
        if self.marker is not None and mark:
            self.marker.apply(slots, self.rings.written[slots], audio)
        self.limit(slots, audio)
        bad = self.guard(audio)
        self.rings.write(slots, audio)
        return bad

    def add_layers(self, slots: np.ndarray) -> np.ndarray:
        """`slots` and the slots of the stings playing on the streams among them (sorted), each sting set to
        its next frame's pitch and loudness."""
        due = []
        for layer in self.layers:
            row = int(np.searchsorted(slots, layer.parent))
            layer.due = row < len(slots) and slots[row] == layer.parent
            if layer.due:
                self.controls.jump(layer.slot, self.played, layer.curve[layer.done])
                due.append(layer.slot)
        return np.union1d(slots, np.array(due, np.intp)) if due else slots

    def mix(self, slots: np.ndarray, audio: np.ndarray) -> None:
        """Add each sting's frame to its stream's row (before the duck and the guard: both apply to the sum)."""
        for layer in self.layers:
            if layer.due:
                audio[np.searchsorted(slots, layer.parent)] += audio[np.searchsorted(slots, layer.slot)]
                layer.done += 1

    def crossfade(self, slots: np.ndarray, audio: np.ndarray) -> None:
        """Mix the old version's frame into the rows of streams moving in (see `Fade`)."""
        for slot, fade in self.fades.items():
            if fade.ready:
                row = int(np.searchsorted(slots, slot))
                if row < len(slots) and slots[row] == slot:
                    audio[row] *= fade.fade_in[fade.done]
                    audio[row] += fade.fade_out[fade.done] * fade.frame
                    fade.done += 1
                fade.ready = False

    def limit(self, slots: np.ndarray, audio: np.ndarray) -> None:
        """Keep every sample of every row within +-LIMIT, in place: a peak limiter with instant attack and a
        LIMIT_RELEASE_DB_PER_S release, per stream. Its gain is g[n] = min(needed[n], g[n-1] * r) with needed =
        min(1, LIMIT / |x|), r the release per sample and g[-1] the gain the slot's last frame ended at, which
        unrolls to r^(n+1) * min(g[-1], min over k <= n of needed[k] * r^-(k+1)): one running minimum per row, no
        loop over samples. Rows below LIMIT at full gain are untouched."""
        if not self.limiting and audio.max() <= LIMIT and audio.min() >= -LIMIT:  # the common case (False on NaN)
            return
        n = len(audio)
        peak = self._peak[:n]
        np.max(np.abs(audio, out=self._abs[:n]), axis=1, out=peak)
        before = self.limit_gain[slots]
        rows = np.flatnonzero((peak > LIMIT) | (before < 1.0))
        if not len(rows):
            return
        x = audio[rows]
        needed = np.abs(x)
        np.maximum(needed, 1e-30, out=needed)
        np.divide(LIMIT_F32, needed, out=needed)
        np.minimum(needed, 1.0, out=needed)
        needed *= self.fall
        gain = np.minimum.accumulate(needed, axis=1)
        np.minimum(gain, before[rows, None], out=gain)
        gain *= self.rise
        gain[gain > 1.0 - 1e-6] = 1.0  # back to full gain exactly (float32 r^-k * r^k can fall a rounding short)
        # x * LIMIT / |x| can round a float32 ulp past LIMIT: the clip makes the ceiling exact
        audio[rows] = np.clip(x * gain, -LIMIT_F32, LIMIT_F32)
        self.limit_gain[slots[rows]] = gain[:, -1]
        self.limited += int(np.count_nonzero(peak[rows] > LIMIT))
        self.limiting = bool((self.limit_gain < 1.0).any())

    def guard(self, audio: np.ndarray) -> np.ndarray:
        """Silence rows with NaN or inf and clip rows beyond [-1, 1], in place; returns the silenced rows."""
        if audio.max() <= 1.0 and audio.min() >= -1.0:  # the common case; False when any sample is NaN
            return NO_ROWS
        n = len(audio)
        peak = self._peak[:n]
        np.max(np.abs(audio, out=self._abs[:n]), axis=1, out=peak)
        finite = np.isfinite(peak)
        bad = np.flatnonzero(~finite)
        audio[bad] = 0.0
        np.clip(audio, -1.0, 1.0, out=audio)
        self.guarded_frames += int(np.count_nonzero(finite & (peak > 1.0))) + len(bad)
        return bad


@dataclass(eq=False)
class Layer:
    """A sting playing on top of the stream in slot `parent`, from slot `slot` of the same group."""

    stream: Stream
    sting: Sting
    parent: int
    slot: int
    curve: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))  # f0, loudness per frame
    done: int = 0  # frames played
    due: bool = False  # in this tick's batch


class Fade:
    """A stream moving from slot `old_slot` of group `old` to a new group: the equal-power gains of each
    of its fade frames ([frames, hop]; cos^2 + sin^2 = 1 at every sample), and this tick's frame of the
    old version (`ready` once the old slot has run this tick)."""

    def __init__(self, stream: Stream, old: Group, old_slot: int) -> None:
        hop = old.manifest.hop
        frames = max(1, math.ceil(CROSSFADE_SECONDS / old.manifest.frame_seconds - 1e-9))
        angle = (np.arange(frames * hop) + 0.5) * (0.5 * math.pi / (frames * hop))
        self.stream, self.old, self.old_slot, self.frames = stream, old, old_slot, frames
        self.slots = np.array([old_slot], np.intp)
        self.fade_out = np.cos(angle).astype(np.float32).reshape(frames, hop)
        self.fade_in = np.sin(angle).astype(np.float32).reshape(frames, hop)
        self.frame = np.zeros(hop, np.float32)
        self.ready = False
        self.done = 0  # fade frames written


class Stream:
    """One generated stream; listeners read it through their own `Reader`. `follows`: it moves to each new
    current version of its model; a stream pinned to a version (`name@N`) does not."""

    def __init__(self, group: Group, slot: int, seed: int, voice: Voice | None = None, follows: bool = True) -> None:
        self.id = uuid.uuid4().hex[:12]
        self.group = group
        self.slot = slot
        self.follows = follows
        self.moving: Group | None = None  # the group it is moving to, from `Engine.swap` to the fade's end
        self.fade: Fade | None = None
        self.lock = threading.Lock()  # (group, slot) change together under it; readers join and leave under it
        self.seed = seed
        self.voice = voice  # a composed stream: the voice sets f0 and loudness every frame
        self.failure: str | None = None
        self.closed_underruns = 0
        self.name: str | None = None  # a name clients find it by (an overlay and its dock), unique among streams
        self.mark: int | None = None  # the watermark's 32-bit payload (key id, serial); None: not marked

    @property
    def manifest(self) -> Manifest:
        return self.group.manifest

    @property
    def frames(self) -> int:
        return int(self.group.rings.written[self.slot])

    @property
    def readers(self) -> list[Reader]:
        return self.group.rings.readers[self.slot]

    def listen(self) -> Reader:
        with self.lock:
            return self.group.rings.reader(self.slot)

    def unlisten(self, reader: Reader) -> None:
        with self.lock:
            if not reader.closed:
                self.closed_underruns += reader.underruns
            reader.rings.close(reader)

    @property
    def underruns(self) -> int:
        return self.closed_underruns + sum(r.underruns for r in self.readers)

    def set_controls(self, values: Mapping[str, float]) -> None:
        """New (validated) control targets; the next frame made starts moving to them."""
        with self.lock:
            self.group.controls.set(self.slot, values)

    def controls(self) -> dict[str, float]:
        return self.group.controls.as_dict(self.slot)

    def perform(self) -> None:
        """Take this frame's f0, loudness and (where the model has it) brightness from the voice (unsmoothed: the
        performer shapes them)."""
        performed = self.group.performed
        self.group.controls.jump(self.slot, performed, self.voice.frame_controls(self.frames)[: len(performed)])

    def fail(self, reason: str) -> None:
        self.failure = reason
        self.group.active[self.slot] = False

    @property
    def state(self) -> str:
        return "failed" if self.failure else "playing" if self.readers else "idle"

    def latency(self) -> dict[str, Any]:
        """What stands between a control change and the audio leaving the engine, in ms."""
        m = self.manifest
        frame_ms = 1000 * m.frame_seconds
        marker = self.group.marker  # the mark's band filters delay the audio (every stream of a marking engine)
        return {"buffer": round(int(self.group.rings.ahead[self.slot]) * frame_ms, 1),
                "smoothing": {c.name: round(1000 * c.smoothing, 1) for c in m.controls},
                "watermark": round(1000 * DELAY / m.sample_rate, 2) if marker is not None else 0.0}

    def info(self) -> dict:
        m = self.manifest
        buffered = self.group.rings.buffered(self.slot)
        composed = {}
        if self.voice is not None:
            v = self.voice
            composed = {"composer": v.group.manifest.name, "composer_version": v.group.manifest.version,
                        "now_playing": v.now_playing()}
        group, slot = self.group, self.slot
        events = {"stings": [x.sting.name for x in list(group.layers) if x.stream is self],
                  "duck_db": round(float(group.duck.gain[slot]), 1)}
        mark = None if self.mark is None else {"key_id": f"{self.mark >> 16:04x}", "payload": payload_text(self.mark)}
        return {
            "id": self.id, "name": self.name, "model": m.name, "version": m.version, "follows": self.follows,
            "seed": self.seed,
            **composed,
            "controls": self.voice.settings if self.voice else self.controls(),
            "state": self.state, **({"failure": self.failure} if self.failure else {}),
            "underruns": self.underruns, "listeners": len(self.readers), "frames": self.frames,
            "seconds": round(self.frames * m.frame_seconds, 3),
            "buffered_ms": None if buffered is None else round(1000 * buffered / m.sample_rate, 1),
            "latency_ms": self.latency(), "events": events,
            "mark": mark,
            "provenance": provenance(m, self.voice.group.manifest if self.voice else None, self.seed, mark),
        }


@dataclass
class Stats:
    ticks: int = 0
    frames: int = 0
    batches: int = 0
    busy_seconds: float = 0.0  # time spent generating
    max_tick_seconds: float = 0.0
    last_batch: int = 0
    last_tick_seconds: float = 0.0
    last_model_seconds: float = 0.0  # of the last tick, the time inside the model calls
    max_model_seconds: float = 0.0  # the longest such time so far
    swaps: int = 0  # streams moved to another version of their model
    unloaded: int = 0  # model versions unloaded (no stream used them)
    composer_steps: int = 0  # batched composer calls
    notes: int = 0  # notes (and rests) composed
    refused: int = 0  # streams refused by admission control
    limited_frames: int = 0  # stream-frames the limiter turned down (they would have peaked above -1 dBFS)
    stings: int = 0  # stings started
    ducks: int = 0  # ducks asked for
    stream_failures: int = 0  # streams failed by a fault of their model or their own output
    nonfinite_frames: int = 0  # stream-frames silenced by the output guard
    failures: list[dict] = field(default_factory=list)  # quarantined models and composers, with reasons


class Engine:
    """Owns the groups, the streams and the inference thread.

    `budget` is the share of a frame the predicted tick may take (None: no admission control, for
    renders and benches); `max_streams` bounds the slots of each group."""

    def __init__(self, buffer_frames: int = BUFFER_FRAMES, max_buffer_frames: int = MAX_BUFFER_FRAMES,
                 max_streams: int = MAX_STREAMS, budget: float | None = BUDGET, watermark: Key | None = None) -> None:
        self.buffer_frames = buffer_frames
        self.max_buffer_frames = max(buffer_frames, max_buffer_frames)
        self.max_streams = max_streams
        self.budget = budget
        self.watermark = watermark  # every stream created with a serial carries this key's mark
        self.overhead = 1.0  # measured tick time / predicted model time (>= 1), updated every tick
        self.groups: dict[tuple[str, int], Group] = {}
        self.composers: dict[tuple[str, int], ComposerGroup] = {}
        self.streams: dict[str, Stream] = {}
        self.stats = Stats()
        self._faults = Throttled(log)
        self._pending: deque[tuple[Stream | None, Callable[[], None]]] = deque()  # for the inference thread
        self._fades: list[Fade] = []  # streams moving between versions (inference thread only)
        self._admit = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- called from any thread (model loading runs off the event loop: it measures the model) -------
    def add_model(self, model: FrameModel) -> Group:
        key = (model.manifest.name, model.manifest.version)
        if key not in self.groups:
            capacity, cost = self.max_streams, (0.0, 0.0)
            if self.budget is not None:
                cost = model.calibrate()
                fits = (self.budget * model.manifest.frame_seconds - cost[0]) / cost[1]
                capacity = max(1, min(self.max_streams, int(2 * fits) + 8))  # headroom for a faster machine state
            self.groups[key] = Group(model, capacity, self.buffer_frames, self.max_buffer_frames, cost, self.watermark)
            log.info("model group name=%s version=%s slots=%d fixed_us=%.0f per_stream_us=%.1f", *key, capacity,
                     1e6 * cost[0], 1e6 * cost[1])
        return self.groups[key]

    def add_composer(self, model: ComposerModel) -> ComposerGroup:
        key = (model.manifest.name, model.manifest.version)
        if key not in self.composers:
            self.composers[key] = ComposerGroup(model, self.max_streams)
        return self.composers[key]

    def predicted_seconds(self, extra: Group | None = None) -> float:
        """The tick time predicted for every stream there is (plus one of `extra`), measured overhead included."""
        total = sum(g.predicted_seconds(g.admitted + (g is extra)) for g in list(self.groups.values())
                    if g.failure is None)
        return total * self.overhead

    def admission(self) -> dict[str, Any]:
        """Admission figures for health and metrics."""
        frame = min((g.manifest.frame_seconds for g in list(self.groups.values())), default=0.01)
        return {"budget_ms": None if self.budget is None else round(1000 * self.budget * frame, 2),
                "predicted_tick_ms": round(1000 * self.predicted_seconds(), 3), "overhead": round(self.overhead, 3)}

    def create_stream(self, group: Group, seed: int, controls: Mapping[str, Any],
                      composer: ComposerGroup | None = None, keep_notes: int | None = 2000,
                      follows: bool = True, serial: int | None = None, resume: Snapshot | None = None) -> Stream:
        """A stream of `group`'s instrument; with `composer`, `controls` are the composer's (validated); with
        `serial` (16 bits) and the engine's watermark, every sample carries the mark of (key, serial). With
        `resume` (already `check`ed against `group` and `composer`: see `resume`) the stream goes on from it.
        Raises EngineSaturated when it would break real time, ModelFailed for a quarantined model."""
        if group.failure is not None:
            raise ModelFailed(group.failure)
        with self._admit:
            group = self._keep(group)
            if self.budget is not None:
                predicted = self.predicted_seconds(extra=group)
                budget = self.budget * group.manifest.frame_seconds
                if predicted > budget:
                    self.stats.refused += 1
                    raise EngineSaturated(
                        f"the engine is at its real-time budget: {len(self.streams)} streams would take "
                        f"{1000 * predicted:.1f} ms of every {1000 * group.manifest.frame_seconds:.0f} ms frame "
                        f"with another (limit {1000 * budget:.1f} ms); delete a stream or retry later")
            try:
                slot = group.pool.allocate()
            except PoolFull:
                self.stats.refused += 1
                raise EngineSaturated(f"model '{group.manifest.name}' has all its {group.capacity} slots in use; "
                                      "delete a stream or retry later") from None
            group.admitted += 1
        voice = None
        if composer is not None:
            f0 = group.manifest.control("f0")
            voice = Voice(composer, seed, controls, (f0.min, f0.max), group.manifest.frame_seconds, keep_notes,
                          group.manifest.control("loudness").max, articulation_of(group.manifest))
            try:
                voice.slot = composer.pool.allocate()
            except PoolFull:
                group.pool.release(slot)
                group.admitted -= 1
                raise EngineSaturated("the composer has all its slots in use; retry later") from None
            composer.pool.reset(voice.slot)
            with self._admit:  # put back if `remove_model` took it meanwhile
                self.composers.setdefault((composer.manifest.name, composer.manifest.version), composer)
            controls = {}
        group.rings.reset(slot)
        group.duck.reset(slot)
        group.limit_gain[slot] = 1.0
        if group.marker is not None:
            group.marker.assign(slot, serial)
        group.controls.reset(slot, controls)
        group.composed[slot] = voice is not None
        group.keys[slot] = stream_key(seed)
        if resume is not None:
            self._restore(group, slot, voice, resume)
        stream = Stream(group, slot, seed, voice, follows)
        if group.marker is not None and serial is not None:
            stream.mark = self.watermark.payload(serial)
        group.streams[slot] = stream
        self.streams[stream.id] = stream

        def attach() -> None:  # on the inference thread, which alone writes a pool's states
            group.pool.reset(slot)
            if resume is not None:
                group.pool.scatter(np.array([slot], np.intp), resume.states)
                if voice is not None:
                    voice.group.pool.scatter(np.array([voice.slot], np.intp), resume.composer_states)
            group.active[slot] = stream.id in self.streams and stream.failure is None

        self._pending.append((stream, attach))
        self.notify()
        return stream

    def resume(self, group: Group, snapshot: Snapshot, composer: ComposerGroup | None = None,
               serial: int | None = None, keep_notes: int | None = 2000) -> Stream:
        """A new stream that goes on from `snapshot`: its next frame is the one the snapshotted stream would have
        made next, sample for sample (the watermark aside: with `serial` it carries this engine's mark). Raises
        snapshot.Mismatch when `group` or `composer` is not the snapshot's exact model, SnapshotError when its
        tensors or controls do not fit them, and what `create_stream` raises."""
        check(snapshot, group.manifest, composer.manifest if composer is not None else None)
        return self.create_stream(group, snapshot.seed, {}, composer, keep_notes, snapshot.follows, serial,
                                  resume=snapshot)

    def _restore(self, group: Group, slot: int, voice: Voice | None, snapshot: Snapshot) -> None:
        """Everything of `snapshot` but the state tensors (which `attach` writes on the inference thread) into
        the new stream's `slot`, before the stream exists for anyone else."""
        c = group.controls
        c.targets[slot] = [snapshot.targets[n] for n in c.names]
        c.current[slot] = [snapshot.current[n] for n in c.names]
        group.keys[slot] = np.uint64(snapshot.noise_key)
        group.rings.written[slot] = group.rings.calm_since[slot] = snapshot.frames  # the noise's and duck's clock
        d = group.duck
        d.depth[slot], d.until[slot], d.gain[slot] = snapshot.duck
        d.busy = d.busy or d.depth[slot] < 0 or d.gain[slot] < 0
        group.limit_gain[slot] = snapshot.limit_gain
        group.limiting = group.limiting or snapshot.limit_gain < 1.0
        if group.marker is not None and snapshot.delay is not None:
            group.marker.delayed[slot] = snapshot.delay[0]
        if voice is not None:
            voice.restore(snapshot.voice)

    def snapshot(self, stream: Stream) -> Future[Snapshot]:
        """`stream` as a Snapshot, taken on the inference thread at the next tick boundary (the future's
        result); it fails with SnapshotRefused while the stream moves to another version or plays a sting, or when
        it has failed or ended."""
        future: Future[Snapshot] = Future()

        def take() -> None:  # on the inference thread, between ticks
            if not future.set_running_or_notify_cancel():  # the caller gave up waiting
                return
            try:
                future.set_result(self._snapshot(stream))
            except Exception as e:  # a refusal is the caller's to report; the stream plays on
                future.set_exception(e)

        self._pending.append((None, take))
        self.notify()
        return future

    def _snapshot(self, stream: Stream) -> Snapshot:
        with stream.lock:
            group, slot, voice = stream.group, stream.slot, stream.voice
            if stream.id not in self.streams:
                raise SnapshotRefused("the stream was deleted")
            if stream.failure is not None:
                raise SnapshotRefused(f"the stream has failed ({stream.failure}); there is nothing to resume")
            if stream.moving is not None:
                raise SnapshotRefused(f"the stream is crossfading to version {stream.moving.manifest.version} of its "
                                      f"model; retry in a moment (a crossfade takes {1000 * CROSSFADE_SECONDS:.0f} ms)")
            if any(layer.stream is stream for layer in group.layers):
                raise SnapshotRefused("the stream is playing a sting; retry when it ends (a few seconds)")
            if voice is not None and voice.group.failure is not None:
                raise SnapshotRefused(f"the stream's composer has failed ({voice.group.failure})")

            def states(pool: StatePool, at: int) -> dict[str, np.ndarray]:  # copies: gather's buffer is reused
                return {name: state.copy() for name, state in pool.gather(np.array([at], np.intp)).items()}

            c, d = group.controls, group.duck
            return Snapshot(
                model=ModelRef.of(group.manifest), seed=stream.seed, frames=stream.frames,
                noise_key=int(group.keys[slot]),
                targets=dict(zip(c.names, c.targets[slot].tolist(), strict=True)),
                current=dict(zip(c.names, c.current[slot].tolist(), strict=True)),
                states=states(group.pool, slot),
                duck=(float(d.depth[slot]), int(d.until[slot]), float(d.gain[slot])),
                limit_gain=float(group.limit_gain[slot]), name=stream.name, follows=stream.follows,
                composer=ModelRef.of(voice.group.manifest) if voice is not None else None,
                composer_states=states(voice.group.pool, voice.slot) if voice is not None else {},
                voice=voice.export() if voice is not None else None,
                delay=group.marker.delayed[slot : slot + 1].copy() if group.marker is not None else None,
            )

    def delete_stream(self, stream_id: str) -> Stream | None:
        stream = self.streams.pop(stream_id, None)
        if stream is not None:
            with stream.lock:  # not while it moves to another group
                group, slot = stream.group, stream.slot
            group.active[slot] = False
            group.composed[slot] = False
            with self._admit:
                group.admitted -= 1

            def release() -> None:  # after the tick that may still be writing the slot
                group.streams[slot] = None
                group.rings.reset(slot)
                group.pool.release(slot)
                if stream.voice is not None and stream.voice.slot is not None:
                    stream.voice.group.pool.release(stream.voice.slot)
                    stream.voice.slot = None
                if stream.fade is not None:
                    self._end_fade(stream.fade)
                self._end_stings(group, [x for x in group.layers if x.parent == slot])

            self._pending.append((stream, release))
            self.notify()
        return stream

    def _keep(self, group: Group) -> Group:
        """`group` as loaded (under `_admit`): an unloaded group is put back, or the one loaded again since."""
        if group.removed:
            group.removed = False
            return self.groups.setdefault((group.manifest.name, group.manifest.version), group)
        return group

    def warm(self, stream: Stream, group: Group, frames: int = WARM_FRAMES) -> dict[str, np.ndarray]:
        """States for `stream` in `group` after `frames` frames of its model on the stream's current
        controls (its own noise): the new version's LSTM settles before anyone hears it. Runs off the
        inference thread (ONNX Runtime sessions take concurrent calls); its arrays are its own."""
        old, slot = stream.group, stream.slot
        values = dict(zip(old.controls.names, old.controls.current[slot].tolist(), strict=True))
        row = np.array([values.get(c.name, c.default) for c in group.manifest.controls], np.float32)
        noise = np.empty((frames, group.manifest.noise), np.float32)
        first = max(0, stream.frames - frames)
        group.noise_table.fill(np.full(frames, old.keys[slot]), np.arange(first, first + frames), noise)
        _, states = group.model.run(np.tile(row, (1, frames, 1)), noise[None], group.model.zero_states(1))
        return states

    def swap(self, stream: Stream, group: Group, states: Mapping[str, np.ndarray]) -> None:
        """Move `stream` to `group` (another version of its model) at the next tick boundary, starting from
        warmed `states` (see `warm`), with an equal-power crossfade. Raises EngineSaturated when `group` has
        no free slot, ValueError when its controls differ from the stream's model's."""
        old = stream.group
        if stream.moving is not None:
            raise ValueError(f"stream {stream.id} is already moving to another version; wait for it to arrive")
        if [c.name for c in old.manifest.controls] != [c.name for c in group.manifest.controls]:
            raise ValueError(f"version {group.manifest.version} of '{group.manifest.name}' takes other controls "
                             f"than version {old.manifest.version}; create a new stream for it")
        with self._admit:
            group = self._keep(group)
            try:
                slot = group.pool.allocate()
            except PoolFull:
                raise EngineSaturated(f"model '{group.manifest.name}' v{group.manifest.version} has all its "
                                      f"{group.capacity} slots in use") from None
            group.admitted += 1
        stream.moving = group

        def move() -> None:  # on the inference thread, between ticks
            with stream.lock:  # delete_stream reads (group, slot) under it
                if stream.id in self.streams and stream.failure is None:
                    self._move(stream, group, slot, states)
                    return
            self._drop(group, slot)
            stream.moving = None

        self._pending.append((stream, move))
        self.notify()

    def _move(self, stream: Stream, group: Group, slot: int, states: Mapping[str, np.ndarray]) -> None:
        """`swap`'s move, on the inference thread under the stream's lock."""
        old, old_slot = stream.group, stream.slot
        group.pool.reset(slot)
        group.pool.scatter(np.array([slot], np.intp), states)
        for spec in group.pool.states:  # in phase with the old slot: the crossfade cannot cancel itself
            if spec.name in SHARED_STATES and spec in old.pool.states:
                axis = spec.batch_axis
                group.pool.pool[spec.name][StatePool._index(axis, slot)] = \
                    old.pool.pool[spec.name][StatePool._index(axis, old_slot)]
        group.keys[slot], group.composed[slot] = old.keys[old_slot], old.composed[old_slot]
        group.controls.targets[slot] = old.controls.targets[old_slot]
        group.controls.current[slot] = old.controls.current[old_slot]
        old.duck.move(old_slot, group.duck, slot)
        group.limit_gain[slot], old.limit_gain[old_slot] = old.limit_gain[old_slot], 1.0
        group.limiting = group.limiting or group.limit_gain[slot] < 1.0
        if group.marker is not None and old.marker is not None:
            group.marker.take(slot, old.marker, old_slot)
        self._end_stings(old, [x for x in old.layers if x.parent == old_slot])  # a sting is cut
        group.streams[slot] = stream
        if stream.voice is not None:  # the composer writes for the new instrument's range from its next note
            f0 = group.manifest.control("f0")
            stream.voice.instrument((f0.min, f0.max), group.manifest.control("loudness").max,
                                    articulation_of(group.manifest))
        old.rings.move(old_slot, group.rings, slot)
        stream.group, stream.slot = group, slot
        old.composed[old_slot] = False
        group.active[slot] = True
        stream.fade = group.fades[slot] = Fade(stream, old, old_slot)
        self._fades.append(stream.fade)
        self.stats.swaps += 1
        log.info("stream moving id=%s from %s v%d to %s v%d", stream.id, old.manifest.name, old.manifest.version,
                 group.manifest.name, group.manifest.version)

    def recompose(self, stream: Stream, composer: ComposerGroup) -> None:
        """Let `composer` write `stream`'s notes from its next note on (a fresh melody in the same key, metre
        and bar). Raises EngineSaturated when the composer has no free slot."""
        voice = stream.voice
        try:
            slot = composer.pool.allocate()
        except PoolFull:
            raise EngineSaturated("the composer has all its slots in use; retry later") from None
        with self._admit:  # put back if `remove_model` took it meanwhile
            self.composers.setdefault((composer.manifest.name, composer.manifest.version), composer)

        def switch() -> None:  # on the inference thread, between notes
            old, old_slot = voice.group, voice.slot
            if stream.id not in self.streams or old_slot is None:
                composer.pool.release(slot)
                return
            composer.pool.reset(slot)
            voice.use(composer, slot)
            old.pool.release(old_slot)

        self._pending.append((stream, switch))
        self.notify()

    def sting(self, stream: Stream, sting: Sting) -> float:
        """Play `sting` on top of `stream` (in its key, register, tempo and level), from a slot of its own in
        the stream's group; returns how long the phrase lasts. Raises ValueError when the stream's model has no
        f0 and loudness to play it with, TooManyStings when it already plays MAX_STINGS, EngineSaturated when no
        slot is free."""
        with stream.lock:
            group, parent = stream.group, stream.slot
        if not group.played:
            raise ValueError(f"model '{group.manifest.name}' has no 'f0' and 'loudness' controls to play a sting "
                             "with; use an instrument that has them")
        if sum(layer.stream is stream for layer in list(group.layers)) >= MAX_STINGS:
            raise TooManyStings(f"this stream already plays {MAX_STINGS} stings; send the next one when one ends")
        with self._admit:
            group = self._keep(group)
            try:
                slot = group.pool.allocate()
            except PoolFull:
                raise EngineSaturated(f"model '{group.manifest.name}' has no free slot for a sting") from None
            group.admitted += 1
        layer = Layer(stream, sting, parent, slot)

        def start() -> None:  # on the inference thread
            with stream.lock:
                if stream.group is not group or stream.slot != parent or stream.id not in self.streams:
                    self._drop(group, slot)  # it moved or ended meanwhile
                    return
                layer.curve = self._sting_curve(stream, sting)
                group.rings.reset(slot)
                group.pool.reset(slot)
                group.limit_gain[slot] = 1.0
                if group.marker is not None:
                    group.marker.assign(slot, None)
                group.controls.targets[slot] = group.controls.targets[parent]
                group.controls.current[slot] = group.controls.current[parent]
                group.keys[slot] = stream_key(sting_key(stream.seed, self.stats.stings))
                group.active[slot] = True  # its state lives; with no listener of its own it is never `needy`
                group.layers.append(layer)
                self.stats.stings += 1

        self._pending.append((stream, start))
        self.notify()
        voice = stream.voice
        tempo = voice.settings["tempo"] if voice is not None else STING_TEMPO
        return sting.quarters * 60.0 / sting.tempo_for(tempo)

    def _sting_curve(self, stream: Stream, sting: Sting) -> np.ndarray:
        """A sting's frames for `stream` as it plays now (inference thread): a composed stream's key, register,
        tempo and volume, starting on its next eighth note; a plain stream's pitch (as the tonic of a major
        scale) and loudness, at once."""
        group, slot, voice = stream.group, stream.slot, stream.voice
        f0 = group.manifest.control("f0")
        fs = group.manifest.frame_seconds
        if voice is None:
            hz, level = (float(v) for v in group.controls.current[slot, group.played])
            level = level if level > FLOOR_DB + 20 else -20.0
            return sting.curve(nearest_scale(hz), midi_of(hz) + 12, STING_TEMPO, level, (f0.min, f0.max), fs)
        s, delay = voice.settings, 0.0
        note = voice.note
        if note is not None and not voice.paused and voice.next_time is not None:
            beat = 60.0 / note.tempo  # the grid the current note was placed on
            now = stream.frames * fs
            quarter = voice.position - (voice.next_time - now) / beat
            delay = max(0.0, (math.ceil(quarter * 2 - 1e-6) / 2 - quarter) * beat)
        # at the piece's level: its volume and its instrument's level in the piece's register (key_db)
        middle = register_midi(s["register"])
        level = s["volume"] + voice.performer.articulation.key_level(round(middle))
        return sting.curve(Scale.parse(s["scale"]), middle + 12, s["tempo"], level, voice.f0_range, fs, delay)

    def _end_stings(self, group: Group, layers: list[Layer]) -> None:
        """Stop `layers` (stings of `group`) and release their slots (inference thread)."""
        for layer in layers:
            group.layers.remove(layer)
            self._drop(group, layer.slot)

    def duck(self, stream: Stream, db: float, seconds: float) -> None:
        """Lower `stream` by `db` for `seconds` with smooth ramps, then restore it (see streaming/events.py)."""
        with stream.lock:
            stream.group.duck.start(stream.slot, stream.frames, db, seconds)
        self.stats.ducks += 1

    def remove_model(self, group: Group | ComposerGroup) -> None:
        """Unload `group` at the next tick boundary if no stream uses it then (a new stream puts it back)."""
        def remove() -> None:
            with self._admit:
                loaded = self.composers if isinstance(group, ComposerGroup) else self.groups
                key = (group.manifest.name, group.manifest.version)
                if loaded.get(key) is not group or len(group.pool.free) < group.pool.capacity:
                    return
                if isinstance(group, Group):
                    if group.admitted:
                        return
                    group.removed = True
                del loaded[key]
            self.stats.unloaded += 1
            log.info("model unloaded name=%s version=%s (no stream uses it)", *key)

        self._pending.append((None, remove))
        self.notify()

    def _drop(self, group: Group, slot: int) -> None:
        """Release a slot whose stream has left it (inference thread)."""
        group.active[slot] = group.composed[slot] = False
        group.streams[slot] = None
        group.rings.reset(slot)
        group.pool.release(slot)
        with self._admit:
            group.admitted -= 1

    def _end_fade(self, fade: Fade) -> None:
        """The stream plays its new version alone; its old slot goes back (inference thread)."""
        stream = fade.stream
        stream.group.fades.pop(stream.slot, None)
        self._fades.remove(fade)
        self._drop(fade.old, fade.old_slot)
        stream.fade = stream.moving = None

    def _fade_sources(self, work: list[tuple[Group, np.ndarray]]) -> None:
        """This tick's frame of the old version for each moving stream the tick generates, run before the
        new version's batch mixes it in; a fade that is over ends here."""
        for fade in list(self._fades):
            if fade.done >= fade.frames:
                self._end_fade(fade)
                continue
            stream, old = fade.stream, fade.old
            if old.failure is not None:  # nothing left to fade from
                self._end_fade(fade)
                continue
            due = next((slots for g, slots in work if g is stream.group), NO_ROWS)
            if not np.any(due == stream.slot):
                continue
            new = stream.group
            old.controls.targets[fade.old_slot] = new.controls.targets[stream.slot]
            old.controls.current[fade.old_slot] = new.controls.current[stream.slot]
            try:
                old.run(fade.slots, mark=False)
            except Exception as e:
                self._quarantine(old, e)
                continue
            fade.frame[:] = old.audio[0]
            fade.ready = True

    def notify(self) -> None:
        """Wake the inference thread: a listener has taken audio or the streams changed."""
        self._wake.set()

    def health(self) -> dict[str, Any]:
        failed = [s for s in list(self.streams.values()) if s.failure]
        return {"status": "degraded" if failed or self.stats.failures else "ok",
                "failed_streams": [{"id": s.id, "model": s.manifest.name, "reason": s.failure} for s in failed],
                "failed_models": list(self.stats.failures)}

    # -- the inference thread -----------------------------------------------------------------------
    def tick(self) -> int:
        """Generate one frame for every stream that needs one; returns how many frames were made."""
        while self._pending:
            stream, op = self._pending.popleft()
            try:
                op()
            except Exception as e:  # neither stops the tick, and the stream is not lost silently
                self._faults.error("pending", "engine: setting up, moving or releasing a stream (%s) failed: %s",
                                   stream.id if stream else "none", describe(e))
                self._fail(stream, f"the engine could not set the stream up: {describe(e)}")
        work = [(g, slots) for g in list(self.groups.values()) if g.failure is None and len(slots := g.needy())]
        if not work:
            return 0
        started = time.perf_counter()
        self._compose(work)
        work = [(g, g.add_layers(slots) if g.layers else slots) for g, slots in work]
        if self._fades:
            self._fade_sources(work)
        predicted, made, model_seconds = 0.0, 0, 0.0
        for group, slots in work:
            if group.failure is not None:  # its composer failed it during this tick
                continue
            try:
                bad = group.run(slots)
            except Exception as e:
                self._quarantine(group, e)
                continue
            for row in bad:
                self._fail(group.streams[slots[row]], "the model produced non-finite audio (NaN or infinity); "
                                                      "the stream was stopped, create a new one")
            if group.layers:
                self._end_stings(group, [x for x in group.layers if x.done >= len(x.curve)])
            self.stats.limited_frames += group.limited
            group.limited = 0
            predicted += group.predicted_seconds(len(slots))
            model_seconds += group.call_seconds
            made += len(slots)
            self.stats.batches += 1
        elapsed = time.perf_counter() - started
        if predicted > 0 and made >= 8:
            self.overhead = min(4.0, max(1.0, 0.95 * self.overhead + 0.05 * elapsed / predicted))
        st = self.stats
        st.ticks, st.frames, st.last_batch, st.last_tick_seconds = st.ticks + 1, st.frames + made, made, elapsed
        st.last_model_seconds = model_seconds
        st.max_model_seconds = max(st.max_model_seconds, model_seconds)
        st.busy_seconds += elapsed
        st.max_tick_seconds = max(st.max_tick_seconds, elapsed)
        return made

    def _fail(self, stream: Stream | None, reason: str) -> None:
        if stream is None or stream.failure:
            return
        stream.fail(reason)
        self.stats.stream_failures += 1
        self.stats.nonfinite_frames += reason.startswith("the model produced non-finite")
        self._faults.error(f"stream:{reason[:40]}", "stream failed id=%s model=%s reason=%s", stream.id,
                           stream.manifest.name, reason)

    def _quarantine(self, group: Group | ComposerGroup, error: BaseException) -> None:
        """Stop a model whose call raised: its streams fail with the reason; the other groups go on."""
        kind = "composer" if isinstance(group, ComposerGroup) else "model"
        name, version = group.manifest.name, group.manifest.version
        reason = f"{kind} '{name}' v{version} failed and was stopped: {describe(error)}"
        group.failure = reason
        self.stats.failures.append({"kind": kind, "model": name, "version": version, "reason": reason,
                                    "at": round(time.time(), 3)})
        log.error("quarantined %s name=%s version=%s reason=%s", kind, name, version, describe(error))
        for stream in list(self.streams.values()):
            if stream.group is group or (stream.voice is not None and stream.voice.group is group):
                self._fail(stream, reason)

    def _compose(self, work: list[tuple[Group, np.ndarray]]) -> None:
        """Composed streams: one batched composer step for the voices whose next note starts now, then
        every voice sets its stream's f0 and loudness for the frame."""
        due: dict[ComposerGroup, list[Voice]] = {}
        voiced = [g.streams[i] for g, slots in work for i in slots[g.composed[slots]]]
        for s in voiced:
            if s.voice.begin_frame(s.frames):
                due.setdefault(s.voice.group, []).append(s.voice)
        for composer, voices in due.items():
            if composer.failure is not None:
                continue
            try:
                composer.step(voices)
            except Exception as e:
                self._quarantine(composer, e)
                continue
            self.stats.composer_steps += 1
            self.stats.notes += len(voices)
        for s in voiced:
            if s.failure is None:
                s.perform()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                made = self.tick()
            except Exception as e:  # a fault outside every group's guard: keep serving, say it (throttled)
                self._faults.error("tick", "engine tick failed: %s", describe(e))
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
    composer: ComposerModel | None = None, watermark: Key | None = None, serial: int = 0,
) -> np.ndarray:
    """The engine's output for one stream without a clock: the same code path as live streaming.

    `timeline` holds (time in seconds, controls) changes applied at the first frame at or after that time;
    for a composed stream (`composer` given) `controls` are the composer's and a timeline entry may also
    hold an "action" (play, pause, reset). `curves` [frames, C] (manifest order) gives every frame's
    controls exactly, bypassing the smoother. With `watermark` the audio carries the mark of (key, `serial`).
    """
    return compose(model, seconds, seed, controls, timeline, curves, composer, watermark, serial)[0]


def compose(
    model: FrameModel, seconds: float, seed: int, controls: Mapping[str, Any],
    timeline: list[tuple[float, Mapping[str, Any]]] = (), curves: np.ndarray | None = None,
    composer: ComposerModel | None = None, watermark: Key | None = None, serial: int = 0,
) -> tuple[np.ndarray, list[Note]]:
    """`render`, also returning the notes a composed stream played (empty without a composer)."""
    engine = Engine(buffer_frames=1, max_streams=1, budget=None, watermark=watermark)
    group = engine.add_model(model)
    composers = engine.add_composer(composer) if composer is not None else None
    stream = engine.create_stream(group, seed, controls, composers, keep_notes=None,
                                  serial=serial if watermark is not None else None)
    reader = stream.listen()
    hop = model.manifest.hop
    frames = int(round(seconds / model.manifest.frame_seconds))
    out = np.empty(frames * hop, np.float32)
    pending = iter(sorted(timeline, key=lambda c: c[0]))
    nxt = next(pending, None)
    everything = slice(None)
    for i in range(frames):
        while nxt is not None and nxt[0] <= i * model.manifest.frame_seconds + 1e-9:
            change = dict(nxt[1])
            if stream.voice is not None:
                if "action" in change:
                    stream.voice.act(change.pop("action"))
                stream.voice.set(change)
            else:
                stream.set_controls(change)
            nxt = next(pending, None)
        if curves is not None:
            group.controls.jump(stream.slot, everything, curves[i])
        engine.tick()
        reader.read(out[i * hop : (i + 1) * hop])
    return out, stream.voice.notes if stream.voice is not None else []
