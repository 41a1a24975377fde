"""The CUDA execution provider, where a GPU is present (skipped cleanly elsewhere; CI has none)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from wavecast.streaming.engine import Engine, render
from wavecast.streaming.model import FrameModel, cuda_present

pytestmark = pytest.mark.skipif(not cuda_present(), reason="no CUDA device (libcuda.so.1 or the CUDA provider)")


def test_cuda_engine_matches_the_cpu_render(default_dir: Path, default_model: FrameModel) -> None:
    """Padded batches on the GPU, states bound through an IOBinding: the same audio as the CPU render."""
    gpu = FrameModel(default_dir, device="cuda")
    assert gpu.providers[0] == "CUDAExecutionProvider"
    engine = Engine(buffer_frames=1, max_streams=64, budget=None)
    group = engine.add_model(gpu)
    assert group.buckets and group.bucket(3) == 64
    streams = [engine.create_stream(group, s, {"f0": 220.0 * (1 + s), "loudness": -20.0}) for s in range(3)]
    readers = [s.listen() for s in streams]
    out = np.zeros((3, 50 * 480), np.float32)
    for i in range(50):
        assert engine.tick() == 3
        for j, r in enumerate(readers):
            r.read(out[j, i * 480 : (i + 1) * 480])
    for j in range(3):
        expected = render(default_model, 0.5, j, {"f0": 220.0 * (1 + j), "loudness": -20.0})
        assert np.abs(out[j] - expected).max() < 1e-3  # another device's float rounding, not another sound
