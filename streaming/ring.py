"""A single-writer, many-reader ring of mono float32 samples: one generated stream, many listeners."""

from __future__ import annotations

import threading

import numpy as np


class RingBuffer:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._data = np.zeros(capacity, np.float32)
        self._written = 0  # samples written since the start
        self._lock = threading.Lock()
        self._readers: list[Reader] = []

    @property
    def written(self) -> int:
        return self._written

    def write(self, samples: np.ndarray) -> None:
        n = len(samples)
        with self._lock:
            start = self._written % self.capacity
            first = min(n, self.capacity - start)
            self._data[start : start + first] = samples[:first]
            self._data[: n - first] = samples[first:]
            self._written += n

    def reader(self) -> Reader:
        """A new listener; it hears what is written from now on."""
        with self._lock:
            r = Reader(self, self._written)
            self._readers.append(r)
            return r

    def close(self, reader: Reader) -> None:
        with self._lock:
            if reader in self._readers:
                self._readers.remove(reader)

    def readers(self) -> list[Reader]:
        with self._lock:
            return list(self._readers)

    def min_buffered(self) -> int | None:
        """Samples buffered ahead of the hungriest reader, or None when nobody listens."""
        with self._lock:
            return min((self._written - r.position for r in self._readers), default=None)


class Reader:
    """One listener's cursor. A short read plays silence for the missing part and counts an underrun."""

    def __init__(self, ring: RingBuffer, position: int) -> None:
        self.ring = ring
        self.position = position
        self.underruns = 0
        self.overruns = 0  # times this reader fell a whole buffer behind and skipped ahead

    def read(self, out: np.ndarray) -> int:
        """Fill `out` with the next samples; returns how many were real audio (the rest is silence)."""
        ring = self.ring
        with ring._lock:
            behind = ring._written - self.position
            if behind > ring.capacity:
                self.position = ring._written - ring.capacity
                self.overruns += 1
                behind = ring.capacity
            n = min(len(out), behind)
            start = self.position % ring.capacity
            first = min(n, ring.capacity - start)
            out[:first] = ring._data[start : start + first]
            out[first:n] = ring._data[: n - first]
            self.position += n
        if n < len(out):
            out[n:] = 0.0
            self.underruns += 1
        return n
