"""Measurements of audio used to verify models and to test streams: pitch and level."""

from __future__ import annotations

import numpy as np


def rms_db(x: np.ndarray) -> float:
    """RMS level in dBFS (a full-scale sine is -3 dB); -inf for silence."""
    rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if len(x) else 0.0
    return 20.0 * np.log10(rms) if rms > 0 else float("-inf")


def estimate_f0(x: np.ndarray, sample_rate: int, fmin: float = 30.0, fmax: float = 2000.0) -> float:
    """Fundamental frequency in Hz by YIN (cumulative mean normalised difference), or nan if unvoiced.

    Needs at least two periods of `fmin`; sub-sample accuracy from parabolic interpolation.
    """
    x = np.asarray(x, np.float64)
    x = x - x.mean()
    max_lag = int(np.ceil(sample_rate / fmin))
    min_lag = max(2, int(sample_rate / fmax))
    window = len(x) - max_lag
    if window < max_lag:
        raise ValueError(f"estimate_f0 needs at least {2 * max_lag} samples for fmin={fmin} Hz, got {len(x)}")
    n = 1 << int(np.ceil(np.log2(len(x) + window)))
    acf = np.fft.irfft(np.conj(np.fft.rfft(x[:window], n)) * np.fft.rfft(x, n), n)[: max_lag + 1]
    energy = np.concatenate([[0.0], np.cumsum(x * x)])
    e_lag = energy[window : window + max_lag + 1] - energy[: max_lag + 1]
    diff = np.maximum(energy[window] + e_lag - 2.0 * acf, 0.0)
    cmnd = np.ones_like(diff)
    running = np.cumsum(diff[1:])
    cmnd[1:] = diff[1:] * np.arange(1, max_lag + 1) / np.maximum(running, 1e-20)
    below = np.nonzero(cmnd[min_lag:max_lag] < 0.15)[0]
    if len(below):
        tau = below[0] + min_lag
        while tau + 1 < max_lag and cmnd[tau + 1] < cmnd[tau]:
            tau += 1
    else:
        tau = int(np.argmin(cmnd[min_lag:max_lag])) + min_lag
        if cmnd[tau] > 0.5:
            return float("nan")
    a, b, c = cmnd[tau - 1], cmnd[tau], cmnd[tau + 1]
    denom = a - 2 * b + c
    shift = 0.5 * (a - c) / denom if denom > 0 else 0.0
    return sample_rate / (tau + shift)
