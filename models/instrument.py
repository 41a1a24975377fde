"""The neural instrument: an LSTM that turns per-frame controls into audio, DDSP style.

Controls per frame: ``f0`` (Hz), ``loudness`` (dB, RMS dBFS of the frame) and, where the config says so,
``brightness`` (0..1: the note's MIDI velocity over the data's 40..127, which moves the timbre apart from the
level as a player's force does; see models/data.py). The LSTM predicts an
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
TABLE_POINTS = 256  # wavetable points per period (a power of two)
OSCILLATORS = ("wavetable", "blocks")
INDEX_DTYPE = torch.int32
TABLE_ORDER = 2  # polynomial order between table points: >= 86 dB SNR vs exact on the shipped models
UNIFORM_TO_UNIT = math.sqrt(12.0)  # noise inputs are uniform in [0, 1): centred and scaled to unit variance


@dataclass(frozen=True)
class InstrumentConfig:
    hidden: int = 128
    harmonics: int = 60
    noise_bands: int = 64
    noise_window: int = 240  # samples per noise grain; grains overlap by half
    sample_rate: int = SAMPLE_RATE
    hop: int = HOP
    brightness: bool = False  # a third control, `brightness`

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def controls(self) -> int:
        """Control columns per frame: f0, loudness[, brightness]."""
        return 3 if self.brightness else 2


def widen(donor: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`donor`'s weights (an instrument without brightness) for one with it, the brightness inputs at zero:
    it starts out playing exactly as the donor does, whatever the brightness."""
    out = dict(donor)
    for name in ("inp.0.weight", "out.0.weight"):  # brightness is the last column of each
        weight = donor[name]
        out[name] = torch.cat([weight, torch.zeros(weight.shape[0], 1, dtype=weight.dtype)], dim=1)
    return out


def exp_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """DDSP's positive output nonlinearity: smooth, bounded by 2, gradient-friendly near silence."""
    return 2.0 * torch.exp(math.log(10.0) * nn.functional.logsigmoid(x)) + 1e-7  # 2·sigmoid(x)^ln(10): no Pow


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


def wavetable_basis(harmonics: int, points: int, order: int = TABLE_ORDER) -> np.ndarray:
    """[harmonics, (order+1)*points]: for harmonic k at each of `points` phases of one period, the
    coefficients c_0..c_order of the polynomial in f (the fraction of the way to the next point) that is the
    least-squares fit to the sine over that step; all c_0, then all c_1, ... A fit of order 1 leaves about
    1.5 (k/points)² of harmonic k, one of order 2 about 0.003 (2πk/points)³ (RMS, relative)."""
    f = (np.arange(4096) + 0.5) / 4096
    design = np.stack([f**p for p in range(order + 1)], axis=1)
    k = np.arange(1, harmonics + 1)
    arc = np.exp(2j * np.pi * np.outer(f, k) / points)  # [f, k]: one table step of harmonic k from phase 0
    fit = np.linalg.lstsq(design, arc, rcond=None)[0]  # [order+1, k]: complex coefficients
    turn = np.exp(2j * np.pi * ((k[:, None] * np.arange(points)[None, :]) % points) / points)  # [k, points]
    return np.concatenate([np.imag(c[:, None] * turn) for c in fit], axis=1).astype(np.float32)


def half_grain_basis(window: int) -> np.ndarray:
    """[2, bins, bins]: `grain_basis` cut in half by symmetry. A grain's sample n and window - n share the
    cosine and the window and negate the sine, so the real parts give the cosine sums C and the imaginary
    parts the sine sums S only for n = 0..window/2, and the grain is C + S there and C - S mirrored after:
    half the multiply-adds of the full basis, the same sums."""
    full, bins = grain_basis(window), window // 2 + 1
    return np.stack([full[:bins, :bins], full[bins:, :bins]])


class Instrument(nn.Module):
    """`oscillator` picks the harmonic synthesis: "wavetable" (what is exported and shipped: each frame's
    one-period waveforms from one constant matmul, read at the sample phases by one gather; see
    `oscillator_wavetable`) or "blocks" (per-block sines and cosines and a matmul per frame: exact up to
    float32; what training uses, and the reference the wavetable is checked against). Both read the same
    weights, so a model trained with one exports with the other."""

    def __init__(
        self, cfg: InstrumentConfig = InstrumentConfig(), oscillator: str = "wavetable",
        table_points: int = TABLE_POINTS, table_order: int = TABLE_ORDER,
    ) -> None:
        super().__init__()
        if oscillator not in OSCILLATORS:
            raise ValueError(f"oscillator {oscillator!r}: expected one of {', '.join(OSCILLATORS)}")
        if table_points < 2 * cfg.harmonics or table_points & (table_points - 1):
            raise ValueError(f"table_points {table_points}: a power of two, at least twice the harmonics")
        self.cfg = cfg
        self.oscillator_kind = oscillator
        self.table_points, self.table_order = table_points, table_order
        h = cfg.hidden
        self.inp = nn.Sequential(nn.Linear(cfg.controls, h), nn.LayerNorm(h), nn.LeakyReLU(0.1))
        self.lstm = nn.LSTM(h, h, batch_first=True)
        self.out = nn.Sequential(
            nn.Linear(h + cfg.controls, h), nn.LayerNorm(h), nn.LeakyReLU(0.1),
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
        # Band gains -> the gain of each frequency bin of a grain, scaled for unit variance.
        self.register_buffer("noise_response", UNIFORM_TO_UNIT * self.band_to_bin, persistent=False)
        self.register_buffer("half_basis", torch.from_numpy(half_grain_basis(cfg.noise_window)), persistent=False)
        # Wavetable constants, derived from the config (not saved with the weights).
        table = torch.from_numpy(wavetable_basis(cfg.harmonics, table_points, table_order))
        self.register_buffer("wavetable", table, persistent=False)
        self.register_buffer("sample_index", torch.arange(cfg.hop, dtype=torch.float32), persistent=False)
        planes = 2 * (table_order + 1)  # (previous, change) x polynomial coefficients
        offsets = torch.arange(planes, dtype=INDEX_DTYPE).reshape(1, planes, 1) * table_points
        self.register_buffer("table_offsets", offsets, persistent=False)

    @property
    def synthesis(self) -> dict:
        """How the exported graph synthesises (recorded in the manifest's `onnx` block)."""
        if self.oscillator_kind == "wavetable":
            return {"oscillator": "wavetable", "table_points": self.table_points, "table_order": self.table_order}
        return {"oscillator": self.oscillator_kind}

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

    def oscillator(
        self, starts: torch.Tensor, step: torch.Tensor, prev: torch.Tensor, cur: torch.Tensor
    ) -> torch.Tensor:
        """Harmonic audio [B,F*hop]: phases start + step·n (cycles), amplitudes ramping from prev to cur [B,F,K]."""
        if self.oscillator_kind == "blocks":
            return self.oscillator_blocks(starts, step, prev, cur)
        return self.oscillator_wavetable(starts, step, prev, cur)

    def oscillator_wavetable(
        self, starts: torch.Tensor, step: torch.Tensor, prev: torch.Tensor, cur: torch.Tensor
    ) -> torch.Tensor:
        """The harmonic sum at constant f0 is one waveform W(phase) per amplitude set. One constant matmul
        gives, for every frame, the waveform of the previous amplitudes (P) and of their change to the current
        ones (D) as tables of polynomial coefficients over `table_points` steps of one period; one
        GatherElements reads all of them at each sample's step, and with f the fraction of the step and r the
        ramp (n+1)/hop the sample is P(f) + r·D(f), each polynomial by Horner. No sines, no per-frame matmul."""
        points, hop, planes = self.table_points, self.cfg.hop, 2 * (self.table_order + 1)
        tables = torch.matmul(torch.stack([prev, cur - prev], dim=2), self.wavetable)  # [B,F,2,planes/2*points]
        cycles = (starts + step * self.sample_index).reshape(-1, 1, hop)  # [B*F,1,hop]
        position = (cycles - torch.floor(cycles)) * points  # in [0, points): exact for a power-of-two size
        index = torch.floor(position)
        frac = position - index
        index = index.to(INDEX_DTYPE) + self.table_offsets  # [B*F,planes,hop]: the same point of each table
        read = torch.gather(tables.reshape(-1, planes * points), 1, index.reshape(-1, planes * hop))
        coefficients = torch.split(read.reshape(-1, planes, hop), 1, dim=1)
        half = planes // 2
        base, change = coefficients[half - 1], coefficients[-1]
        for p in range(half - 2, -1, -1):  # Horner: c0 + f·(c1 + f·c2)
            base = coefficients[p] + frac * base
            change = coefficients[half + p] + frac * change
        audio = base + self.ramp * change  # [B*F,1,hop]
        return audio.reshape(cur.shape[0], -1)

    def oscillator_blocks(
        self, starts: torch.Tensor, step: torch.Tensor, prev: torch.Tensor, cur: torch.Tensor
    ) -> torch.Tensor:
        """Sample n = BLOCK*a + b of a frame has phase X[a] + Y[b], so sin(2πk(X+Y)) =
        sin(2πkX)cos(2πkY) + cos(2πkX)sin(2πkY): (hop/BLOCK + BLOCK)·K sines instead of hop·K, and the sum
        over harmonics becomes one small matmul per frame."""
        cfg = self.cfg
        batch, frames, _ = cur.shape
        coarse = (starts + step * self.block_starts).unsqueeze(-1) * self.two_pi_harmonics  # [B,F,A,K]
        fine = (step * self.block_offsets).unsqueeze(-1) * self.two_pi_harmonics  # [B,F,BLOCK,K]
        weights = torch.stack([prev, cur], dim=2).unsqueeze(3)  # [B,F,2,1,K]
        left = torch.cat([torch.sin(coarse), torch.cos(coarse)], dim=-1).unsqueeze(2)  # [B,F,1,A,2K]
        left = (left * torch.cat([weights, weights], dim=-1)).reshape(batch * frames, -1, 2 * cfg.harmonics)
        right = torch.cat([torch.cos(fine), torch.sin(fine)], dim=-1).reshape(batch * frames, BLOCK, -1)
        partial = torch.bmm(left, right.transpose(1, 2)).reshape(batch, frames, 2, cfg.hop)  # prev, cur
        return (partial[:, :, 0] + (partial[:, :, 1] - partial[:, :, 0]) * self.ramp).reshape(batch, frames * cfg.hop)

    def forward(
        self, control: torch.Tensor, noise: torch.Tensor, h: torch.Tensor, c: torch.Tensor,
        phase: torch.Tensor, amp: torch.Tensor, noise_tail: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        """control [B,F,C] (f0 Hz, loudness dB[, brightness 0..1]), noise [B,F,noise_width] uniform [0,1) ->
        audio [B,F*hop], states."""
        cfg = self.cfg
        batch, frames = control.shape[0], control.shape[1]
        f0 = control[..., 0:1]
        inputs = [torch.log2(f0 / 440.0) / 3.0, (control[..., 1:2] + 40.0) / 40.0]
        if cfg.brightness:
            inputs.append(2.0 * control[..., 2:3] - 1.0)
        features = torch.cat(inputs, dim=-1)
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
        # however long the stream runs; within a frame the phase is start + step * n.
        step = f0 / cfg.sample_rate  # [B,F,1] cycles per sample
        frame_advance = torch.remainder(step * cfg.hop, 1.0)
        ends = phase.unsqueeze(1) + torch.cumsum(frame_advance, dim=1)  # [B,F,1]
        starts = torch.remainder(ends - frame_advance, 1.0)
        prev = torch.cat([amp.unsqueeze(1), harm[:, :-1]], dim=1)
        harmonic = self.oscillator(starts, step, prev, harm)  # [B,F*hop]

        # Filtered noise: grains of random spectrum shaped by the band gains, overlap-added at half a grain.
        gains = level * exp_sigmoid(params[..., 1 + cfg.harmonics :] - 3.0)  # [B,F,bands]
        bins = cfg.noise_window // 2 + 1
        response = torch.matmul(gains, self.noise_response).unsqueeze(2).unsqueeze(3)  # [B,F,1,1,bins]
        half = cfg.noise_window // 2
        grains_per_frame = cfg.hop // half
        spectrum = (noise.reshape(batch, frames, grains_per_frame, 2, bins) - 0.5) * response
        cosines, sines = torch.matmul(spectrum.permute(3, 0, 1, 2, 4).reshape(2, -1, bins), self.half_basis).unbind(0)
        first = (cosines + sines)[:, :half].reshape(batch, frames * grains_per_frame, half)  # samples 0..half-1
        second = torch.flip((cosines - sines)[:, 1:], dims=[1]).reshape(batch, frames * grains_per_frame, half)
        later = torch.cat([noise_tail.unsqueeze(1), second[:, :-1]], dim=1)
        filtered = first + later  # [B,F*grains,half]

        audio = harmonic + filtered.reshape(batch, frames * cfg.hop)
        audio = torch.clamp(audio, -1.0, 1.0)
        phase_out = torch.remainder(ends[:, -1], 1.0)
        return audio, h_out, c_out, phase_out, harm[:, -1], second[:, -1]
