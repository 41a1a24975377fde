"""The neural instrument: an LSTM that turns per-frame controls into audio, DDSP style.

Controls per frame: ``f0`` (Hz) and ``loudness`` (dB, RMS dBFS of the frame). The LSTM predicts an
overall amplitude, a harmonic distribution and filtered-noise band gains; a harmonic oscillator bank and
overlap-added noise grains inside the graph turn them into HOP samples per frame. Every bit of memory is an
explicit state tensor (LSTM ``h``/``c``, oscillator ``phase`` in cycles, the previous frame's harmonic
amplitudes ``amp`` for click-free interpolation, and the overlap ``noise_tail`` of the last noise grain), so
the exported graph is pure and the engine can batch, reset and move streams freely. The same ``forward``
trains on F-frame crops and streams one frame at a time.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

SAMPLE_RATE = 48_000
HOP = 480
STATE_NAMES = ("h", "c", "phase", "amp", "noise_tail")
BLOCK = 16  # oscillator samples per block; the hop must be a multiple
UNIFORM_TO_UNIT = math.sqrt(12.0)  # noise inputs are uniform in [0, 1): centred and scaled to unit variance


@dataclass(frozen=True)
class InstrumentConfig:
    hidden: int = 128
    harmonics: int = 60
    noise_bands: int = 64
    noise_window: int = 240  # samples per noise grain; grains overlap by half
    sample_rate: int = SAMPLE_RATE
    hop: int = HOP

    def to_dict(self) -> dict:
        return asdict(self)


def exp_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """DDSP's positive output nonlinearity: smooth, bounded by 2, gradient-friendly near silence."""
    return 2.0 * torch.sigmoid(x) ** math.log(10.0) + 1e-7


def band_to_bin_matrix(bands: int, bins: int) -> np.ndarray:
    """Linear interpolation from `bands` gains (linearly spaced 0..Nyquist) to `bins` DFT bins."""
    band_pos, bin_pos = np.linspace(0.0, 1.0, bands), np.linspace(0.0, 1.0, bins)
    return np.stack([np.interp(bin_pos, band_pos, row) for row in np.eye(bands)]).astype(np.float32)


def grain_basis(window: int) -> np.ndarray:
    """[2*bins, window]: a random spectrum (real parts, then imaginary) -> one windowed noise grain.

    The inverse real DFT is scaled for unit variance and windowed by a sqrt-Hann, whose squares sum to
    one at half overlap, so overlapped grains of independent noise keep a constant variance.
    """
    bins = window // 2 + 1
    n = np.arange(window)
    k = np.arange(bins)[:, None]
    weight = np.where((k == 0) | (k == window // 2), 1.0, 2.0)
    angle = 2.0 * np.pi * k * n / window
    basis = np.concatenate([weight * np.cos(angle), -weight * np.sin(angle)])
    basis /= np.sqrt(np.mean(np.sum(basis**2, axis=0)))
    return (basis * np.sin(np.pi * n / window)).astype(np.float32)


class Instrument(nn.Module):
    def __init__(self, cfg: InstrumentConfig = InstrumentConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden
        self.inp = nn.Sequential(nn.Linear(2, h), nn.LayerNorm(h), nn.LeakyReLU(0.1))
        self.lstm = nn.LSTM(h, h, batch_first=True)
        self.out = nn.Sequential(
            nn.Linear(h + 2, h), nn.LayerNorm(h), nn.LeakyReLU(0.1),
            nn.Linear(h, 1 + cfg.harmonics + cfg.noise_bands),
        )
        self.register_buffer("harmonic_numbers", torch.arange(1, cfg.harmonics + 1, dtype=torch.float32))
        self.register_buffer("two_pi_harmonics", 2.0 * math.pi * self.harmonic_numbers)
        self.register_buffer("ramp", torch.arange(1, cfg.hop + 1, dtype=torch.float32) / cfg.hop)
        self.register_buffer("block_starts", torch.arange(0, cfg.hop, BLOCK, dtype=torch.float32))
        self.register_buffer("block_offsets", torch.arange(BLOCK, dtype=torch.float32))
        bins = cfg.noise_window // 2 + 1
        self.register_buffer("band_to_bin", torch.from_numpy(band_to_bin_matrix(cfg.noise_bands, bins)))
        self.register_buffer("grain_basis", torch.from_numpy(grain_basis(cfg.noise_window)))

    @property
    def noise_width(self) -> int:
        """Uniform [0, 1) inputs per frame: a random spectrum (real, imaginary) for each noise grain.

        Uniform rather than normal because numpy draws it ~3x faster, and that draw is per stream-frame
        work outside the batched graph; each output sample sums hundreds of them, so it is Gaussian anyway.
        """
        c = self.cfg
        return (c.hop // (c.noise_window // 2)) * 2 * (c.noise_window // 2 + 1)

    def initial_state(self, batch: int) -> tuple[torch.Tensor, ...]:
        """Zero state for `batch` streams, in STATE_NAMES order."""
        c = self.cfg
        return (
            torch.zeros(1, batch, c.hidden), torch.zeros(1, batch, c.hidden), torch.zeros(batch, 1),
            torch.zeros(batch, c.harmonics), torch.zeros(batch, c.noise_window // 2),
        )

    def forward(
        self, control: torch.Tensor, noise: torch.Tensor, h: torch.Tensor, c: torch.Tensor,
        phase: torch.Tensor, amp: torch.Tensor, noise_tail: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        """control [B,F,2] (f0 Hz, loudness dB), noise [B,F,noise_width] uniform [0,1) -> audio [B,F*hop], states."""
        cfg = self.cfg
        batch, frames = control.shape[0], control.shape[1]
        f0 = control[..., 0:1]
        features = torch.cat([torch.log2(f0 / 440.0) / 3.0, (control[..., 1:2] + 40.0) / 40.0], dim=-1)
        y, (h_out, c_out) = self.lstm(self.inp(features), (h, c))
        params = self.out(torch.cat([y, features], dim=-1))

        # The loudness control sets the frame's level outright (as the oscillator sets its pitch); the network
        # learns a correction around it. Without this, training can sink into near-silence for a long time.
        level = torch.pow(10.0, control[..., 1:2] / 20.0)  # target RMS of the frame
        # Harmonic amplitudes: overall amplitude x distribution, silent above Nyquist.
        amplitude = 2.0 * level * exp_sigmoid(params[..., :1])
        below_nyquist = (f0 * self.harmonic_numbers < cfg.sample_rate / 2).float()
        dist = torch.softmax(params[..., 1 : 1 + cfg.harmonics], dim=-1) * below_nyquist
        dist = dist / (dist.sum(dim=-1, keepdim=True) + 1e-7)
        harm = amplitude * dist  # [B,F,K]

        # Oscillator, phase in cycles: per-frame start phases wrapped to [0, 1), so float32 stays accurate
        # however long the stream runs. Sample n = BLOCK*a + b of a frame has phase X[a] + Y[b], so
        # sin(2πk(X+Y)) = sin(2πkX)cos(2πkY) + cos(2πkX)sin(2πkY): (hop/BLOCK + BLOCK)·K sines instead of
        # hop·K, and the sum over harmonics becomes one small matmul per frame.
        step = f0 / cfg.sample_rate  # [B,F,1] cycles per sample
        frame_advance = torch.remainder(step * cfg.hop, 1.0)
        ends = phase.unsqueeze(1) + torch.cumsum(frame_advance, dim=1)  # [B,F,1]
        starts = torch.remainder(ends - frame_advance, 1.0)
        coarse = (starts + step * self.block_starts).unsqueeze(-1) * self.two_pi_harmonics  # [B,F,A,K]
        fine = (step * self.block_offsets).unsqueeze(-1) * self.two_pi_harmonics  # [B,F,BLOCK,K]
        prev = torch.cat([amp.unsqueeze(1), harm[:, :-1]], dim=1)
        weights = torch.stack([prev, harm], dim=2).unsqueeze(3)  # [B,F,2,1,K]
        left = torch.cat([torch.sin(coarse), torch.cos(coarse)], dim=-1).unsqueeze(2)  # [B,F,1,A,2K]
        left = (left * torch.cat([weights, weights], dim=-1)).reshape(batch * frames, -1, 2 * cfg.harmonics)
        right = torch.cat([torch.cos(fine), torch.sin(fine)], dim=-1).reshape(batch * frames, BLOCK, -1)
        partial = torch.bmm(left, right.transpose(1, 2)).reshape(batch, frames, 2, cfg.hop)  # prev, cur
        harmonic = partial[:, :, 0] + (partial[:, :, 1] - partial[:, :, 0]) * self.ramp

        # Filtered noise: grains of random spectrum shaped by the band gains, overlap-added at half a grain.
        gains = level * exp_sigmoid(params[..., 1 + cfg.harmonics :] - 3.0)  # [B,F,bands]
        response = torch.matmul(gains, self.band_to_bin).repeat(1, 1, 2).unsqueeze(2)  # [B,F,1,2*bins]
        half = cfg.noise_window // 2
        grains_per_frame = cfg.hop // half
        spectrum = (noise.reshape(batch, frames, grains_per_frame, -1) - 0.5) * (UNIFORM_TO_UNIT * response)
        grains = torch.matmul(spectrum, self.grain_basis).reshape(batch, frames * grains_per_frame, -1)
        later = torch.cat([noise_tail.unsqueeze(1), grains[:, :-1, half:]], dim=1)
        filtered = grains[..., :half] + later  # [B,F*grains,half]

        audio = harmonic.reshape(batch, frames * cfg.hop) + filtered.reshape(batch, frames * cfg.hop)
        audio = torch.clamp(audio, -1.0, 1.0)
        phase_out = torch.remainder(ends[:, -1], 1.0)
        return audio, h_out, c_out, phase_out, harm[:, -1], grains[:, -1, half:]
