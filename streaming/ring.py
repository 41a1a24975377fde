"""Rings of generated audio, one per stream slot of a model group: one writer, many readers, no locks.

All the rings of a group live in one array ``[slots, frames * hop]``, so the inference thread writes a
whole batch of frames with one array operation. Each slot counts the frames written to it; a reader
copies samples it knows are written and then moves its own cursor. There is one writer (the inference
thread) and the writer only ever overwrites the frame a whole ring behind, so a reader that keeps within
the ring never sees a torn frame, and one that falls further behind skips ahead (counted).

Each slot has a target fill (`ahead`, in frames): the engine generates for a slot while its hungriest
reader has less than that buffered. It starts small for low latency and grows by a frame each time a
listener that already had audio underruns, up to `max_ahead`. A fill grown by a passing hiccup (a browser's
first seconds, a busy moment) would add its latency to every control change for the life of the stream, so
after RELAX_FRAMES without an underrun it steps back down a frame; an underrun soon after such a step marks
the fill the listener really needs (`floor`), and the fill never relaxes below it again, so a listener pays
at most one extra underrun per level, not one every RELAX_FRAMES.

A reader whose slot was released and reused (its stream deleted) reads silence: every slot carries a
generation that `reset` bumps.

A stream that moves to another model version takes its readers along (`move`): its ring's samples and
counters are copied into its new slot and each reader is rebound to (rings, slot, generation) by replacing
one tuple, which another thread sees whole. Positions count samples since the stream began in both rings,
so a reader goes on from the same sample: nothing skipped, nothing repeated, no gap.
"""

from __future__ import annotations

import numpy as np

RELAX_FRAMES = 500  # frames without an underrun before a grown fill steps down one (5 s of 10 ms frames)


class Rings:
    def __init__(self, slots: int, frames: int, hop: int, ahead: int, max_ahead: int) -> None:
        self.hop = hop
        self.initial_ahead, self.max_ahead = ahead, max(ahead, max_ahead)
        self.frames = frames  # ring length in frames
        self.capacity = frames * hop  # ring length in samples
        self.data = np.zeros((slots, self.capacity), np.float32)
        self._framed = self.data.reshape(slots, frames, hop)
        self.written = np.zeros(slots, np.int64)  # frames written to each slot since its stream began
        self.front = np.zeros(slots, np.int64)  # sample position of each slot's hungriest reader (the furthest on)
        self.listeners = np.zeros(slots, np.int32)
        self.generation = np.zeros(slots, np.int64)
        self.ahead = np.full(slots, ahead, np.int64)  # target fill, frames
        self.floor = np.full(slots, ahead, np.int64)  # the fill `ahead` may relax to
        self.calm_since = np.zeros(slots, np.int64)  # frames written when `ahead` last changed
        self.relaxed = np.zeros(slots, bool)  # its last change was a step down
        self.readers: list[list[Reader]] = [[] for _ in range(slots)]

    def reset(self, slot: int) -> None:
        """A fresh, empty ring for a new stream in `slot`; readers of the old stream go silent."""
        self.generation[slot] += 1
        self.readers[slot] = []
        self.listeners[slot] = 0
        self.written[slot] = 0
        self.front[slot] = 0
        self.ahead[slot] = self.floor[slot] = self.initial_ahead
        self.calm_since[slot] = 0
        self.relaxed[slot] = False

    def move(self, slot: int, to: Rings, to_slot: int) -> None:
        """Hand the stream in `slot`, its samples, fill and readers, to `to_slot` of `to` (inference thread,
        between ticks; the caller holds the stream's lock so no reader joins or leaves meanwhile)."""
        to.data[to_slot] = self.data[slot]
        for counter in ("written", "front", "ahead", "floor", "calm_since", "relaxed"):
            getattr(to, counter)[to_slot] = getattr(self, counter)[slot]
        readers, generation = self.readers[slot], int(to.generation[to_slot])
        for r in readers:
            r.at = (to, to_slot, generation)
        to.readers[to_slot] = readers
        to._update(to_slot)
        self.readers[slot] = []
        self.listeners[slot] = 0

    def write(self, slots: np.ndarray, audio: np.ndarray) -> None:
        """Append one frame `audio[i]` to the ring of each `slots[i]` (slots distinct)."""
        self._framed[slots, self.written[slots] % self.frames] = audio
        self.written[slots] += 1

    def buffered(self, slot: int) -> int | None:
        """Samples written ahead of the slot's hungriest reader (the one with the least left to read), or
        None when nobody listens."""
        return int(self.written[slot] * self.hop - self.front[slot]) if self.listeners[slot] else None

    def reader(self, slot: int) -> Reader:
        """A new listener of `slot`; it hears what is written from now on."""
        r = Reader(self, slot, int(self.written[slot]) * self.hop)
        self.readers[slot] = [*self.readers[slot], r]  # copy on write: readers iterate without a lock
        self._update(slot)
        return r

    def close(self, reader: Reader) -> None:
        rings, slot, generation = reader.at
        if rings is self and generation == self.generation[slot]:
            self.readers[slot] = [r for r in self.readers[slot] if r is not reader]
            self._update(slot)
        reader.at = (rings, slot, -1)

    def grow(self, slot: int) -> None:
        """A listener underran: one frame more ahead (and, right after a step down, never below that again)."""
        if self.relaxed[slot]:
            self.floor[slot] = min(self.ahead[slot] + 1, self.max_ahead)
            self.relaxed[slot] = False
        if self.ahead[slot] < self.max_ahead:
            self.ahead[slot] += 1
        self.calm_since[slot] = self.written[slot]

    def relax(self, slot: int) -> None:
        """RELAX_FRAMES without an underrun: one frame less ahead."""
        self.ahead[slot] -= 1
        self.relaxed[slot] = True
        self.calm_since[slot] = self.written[slot]

    def _update(self, slot: int) -> None:
        readers = self.readers[slot]
        if readers:
            self.front[slot] = max(r.position for r in readers)
        self.listeners[slot] = len(readers)


class Reader:
    """One listener's cursor. A short read plays silence for the missing part and counts an underrun."""

    def __init__(self, rings: Rings, slot: int, position: int) -> None:
        self.at = (rings, slot, int(rings.generation[slot]))  # replaced whole when the stream moves (Rings.move)
        self.position = position
        self.underruns = 0
        self.overruns = 0  # times this reader fell a whole ring behind and skipped ahead
        self.heard = False  # has had real audio (underruns before that are the stream starting up)

    @property
    def rings(self) -> Rings:
        return self.at[0]

    @property
    def slot(self) -> int:
        return self.at[1]

    @property
    def closed(self) -> bool:
        rings, slot, generation = self.at
        return generation != rings.generation[slot]

    def read(self, out: np.ndarray) -> int:
        """Fill `out` with the next samples; returns how many were real audio (the rest is silence)."""
        rings, slot, generation = self.at
        if generation != rings.generation[slot]:
            out[:] = 0.0
            return 0
        written = int(rings.written[slot]) * rings.hop
        behind = written - self.position
        if behind > rings.capacity - rings.hop:  # the writer may be overwriting the oldest frame: skip ahead
            self.position = written - rings.capacity + rings.hop
            self.overruns += 1
            behind = written - self.position
        n = min(len(out), behind)
        start = self.position % rings.capacity
        first = min(n, rings.capacity - start)
        row = rings.data[slot]
        out[:first] = row[start : start + first]
        out[first:n] = row[: n - first]
        self.position += n
        rings._update(slot)
        if n < len(out):
            out[n:] = 0.0
            self.underruns += 1
            if self.heard:
                rings.grow(slot)
        elif rings.ahead[slot] > rings.floor[slot] and rings.written[slot] - rings.calm_since[slot] >= RELAX_FRAMES:
            rings.relax(slot)
        if n:
            self.heard = True
        return n
