"""Noise inputs for a whole batch in one call: each stream-frame's noise is a function of (seed, frame).

The frame-model contract feeds every stream-frame `width` uniform [0, 1) values. Drawing them per stream
from a sequential generator costs a Python call per stream; here they are windows of one fixed table of
uniform noise (2^20 values, 4 MiB, the same on every machine), and a stream-frame's window starts at a
64-bit hash of its seed and frame index. So a batch is one hash over a few hundred integers and one
gather, a stream's noise depends on its seed and frame index alone (render = live, and a stream can be
resumed at any frame), and two frames share values only where their windows happen to overlap (about
width / 2^20 of pairs), which a noise input does not hear.
"""

from __future__ import annotations

import functools

import numpy as np

TABLE_BITS = 20
TABLE_SEED = 0x5EED_A0D1  # fixed: the table is part of what a seed means
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, in place on a uint64 array (wrapping arithmetic)."""
    x ^= x >> np.uint64(30)
    x *= _M1
    x ^= x >> np.uint64(27)
    x *= _M2
    x ^= x >> np.uint64(31)
    return x


def stream_key(seed: int) -> np.uint64:
    """A well-mixed 64-bit key for a stream's seed (seeds 0, 1, 2 ... give unrelated keys)."""
    return mix(np.array([seed & 0xFFFF_FFFF_FFFF_FFFF], np.uint64))[0]


class NoiseTable:
    def __init__(self, width: int) -> None:
        self.width = width
        size = 1 << TABLE_BITS
        table = np.random.Generator(np.random.PCG64(TABLE_SEED)).random(size + width, dtype=np.float32)
        self.windows = np.lib.stride_tricks.sliding_window_view(table, width)[:size]  # [size, width], no copy
        self._shift = np.uint64(64 - TABLE_BITS)

    def fill(self, keys: np.ndarray, frames: np.ndarray, out: np.ndarray) -> None:
        """out[i] = the noise of frame `frames[i]` of the stream with key `keys[i]` (uint64, int64, [n, width])."""
        with np.errstate(over="ignore"):
            h = mix(keys ^ (frames.astype(np.uint64) * _GOLDEN))
        out[...] = self.windows[(h >> self._shift).astype(np.intp)]  # (np.take would copy the whole view)


@functools.cache
def shared_table(width: int) -> NoiseTable:
    """One table per width for the process: it is the same for every model of that width (and read-only)."""
    return NoiseTable(width)
