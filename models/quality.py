"""Quality metrics for a neural instrument, all driven by the same exact per-frame controls as the data.

Numpy only (plus `streaming.analysis` and `models.data.loudness_db`), so the bench, the tests and a
future verification step can use them without torch:

- `spectral_distance`: the training loss's multi-scale spectral distance, computed the same way.
- `baseline`: a dumb band-limited sawtooth + noise following the controls; the model must beat it.
- `pitch_error_cents`: a pitch tracker on the output against the f0 control, on steady voiced frames.
- `loudness_correlation`: measured frame loudness against the loudness control.
- `count_clicks`: isolated sample-to-sample jumps far beyond the signal's own.
- `in_phrase`: the frames of a composed piece inside its phrases (where it should keep sounding).
- `spectral_table`, `timbre_errors`: the fair non-neural baseline for timbre, each MIDI key's mean log-mel
  shape over the training data's steady frames at the frame's level (and, for a model that is told the
  brightness, each key's shape in each brightness band: the table knows what the model knows), and the
  per-frame log-mel L1 of the model, that table and silence against the data, onset frames scored apart.
- `assess`: all of them for a model over held-out performances; `metrics` is what the gate reads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from wavecast.models.data import HOP, LOUDNESS_FLOOR_DB, SAMPLE_RATE, Performance, loudness_db
from wavecast.streaming.analysis import estimate_f0
from wavecast.streaming.composer import Note
from wavecast.streaming.engine import render
from wavecast.streaming.model import FrameModel
from wavecast.streaming.watermark import DELAY, Key

FFT_SIZES = (2048, 1024, 512, 256, 128, 64)  # also the training loss's (models/train.py)
MEL_FFT, MELS = 1024, 40  # the timbre figures' log-mel frames: a 21 ms window centred on each frame
VOICED_DB = -60.0  # frames louder than this are scored for timbre
ONSET_FRAMES = 6  # a note's first 60 ms: its onset, scored apart from the steady frames after it
TIMBRE_TAKES = ("model", "table", "silence")
BRIGHTNESS_BANDS = 4  # the table's bands of brightness for a model that has the control


def stft_magnitude(x: np.ndarray, n: int) -> np.ndarray:
    """|STFT| [bins, frames] exactly as `torch.stft(x, n, n // 4, window=hann_window(n))` with its defaults:
    periodic Hann window, centred frames (reflect padding by n // 2), one-sided, unnormalised."""
    hop = n // 4
    padded = np.pad(np.asarray(x, np.float64), n // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, n)[::hop]
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)
    return np.abs(np.fft.rfft(frames * window, axis=1)).T


def spectral_distance(a: np.ndarray, b: np.ndarray, sizes: tuple[int, ...] = FFT_SIZES) -> float:
    """Mean over FFT sizes of mean |Sa - Sb| + mean |log(Sa + 1e-5) - log(Sb + 1e-5)| (STFT magnitudes,
    Hann window, hop size/4): `models.train.spectral_loss` for one signal, so it reads like the training
    loss. The signals are cut to the shorter one's length."""
    n = min(len(a), len(b))
    if n <= max(sizes) // 2:
        raise ValueError(f"need more than {max(sizes) // 2} samples, got {n}")
    total = 0.0
    for size in sizes:
        sa, sb = stft_magnitude(a[:n], size), stft_magnitude(b[:n], size)
        total += float(np.mean(np.abs(sa - sb)) + np.mean(np.abs(np.log(sa + 1e-5) - np.log(sb + 1e-5))))
    return total / len(sizes)


def _per_sample(frame_values: np.ndarray, samples: int, hop: int) -> np.ndarray:
    """Linear interpolation of per-frame values (at frame centres) to every sample; held at the ends."""
    centres = np.arange(len(frame_values)) * hop + hop / 2
    return np.interp(np.arange(samples), centres, np.asarray(frame_values, np.float64))


def baseline(f0: np.ndarray, loudness: np.ndarray, seed: int = 0, sample_rate: int = SAMPLE_RATE,
             hop: int = HOP) -> np.ndarray:
    """The honest dumb baseline: a band-limited sawtooth plus white noise 20 dB below it, following the
    same per-frame controls as the model. float32, len(f0) * hop samples.

    The sawtooth sums sin(k*phase)/k over the harmonics below Nyquist; each harmonic fades out over the
    last 5 % below Nyquist so that a glide does not switch harmonics on and off (a click). f0 is linearly
    interpolated between frame centres and integrated, so the phase is continuous. The carrier is
    normalised to unit RMS sample by sample; a gain interpolated linearly between frame centres (no
    steps, so no clicks) then sets the level, its knots refined so that each frame's RMS matches the
    loudness control (`loudness_db` of the result ~= `loudness`, within about 1 dB where a frame holds a
    few periods, i.e. above ~150 Hz; lower, a 10 ms frame's RMS depends on which part of the period it
    holds, in the rendered data as here). Frames at the loudness floor
    (LOUDNESS_FLOOR_DB, meaning "this quiet or quieter") get gain 0: silence, as in the rendered data.
    """
    frames = len(f0)
    if len(loudness) != frames:
        raise ValueError(f"f0 has {frames} frames, loudness {len(loudness)}")
    loudness = np.asarray(loudness, np.float64)
    target = np.where(loudness > LOUDNESS_FLOOR_DB, 10.0 ** (loudness / 20.0), 0.0)
    audible = np.convolve(target > 0, np.ones(3), mode="same") > 0  # a frame takes gain from its neighbours
    samples = frames * hop
    nyquist = sample_rate / 2
    freq = np.clip(_per_sample(f0, samples, hop), 1.0, nyquist)
    cycles = np.cumsum(freq / sample_rate)
    cycles -= np.floor(cycles)
    saw, power = np.zeros(samples), np.ones(samples)
    for i in np.nonzero(audible)[0]:  # one frame at a time keeps the [hop, harmonics] matrices small
        part = slice(i * hop, (i + 1) * hop)
        k = np.arange(1, int(nyquist / freq[part].min()) + 1)
        fade = (np.clip(20.0 * (1.0 - np.outer(freq[part], k) / nyquist), 0.0, 1.0) / k).astype(np.float32)
        # float32 sin is ~5x faster than float64; its phase error (< 1e-3 rad at k = 800) is inaudible.
        saw[part] = np.einsum("ij,ij->i", np.sin(np.outer(2.0 * np.pi * cycles[part], k).astype(np.float32)), fade)
        power[part] = 0.5 * np.einsum("ij,ij->i", fade, fade)
    rng = np.random.default_rng(seed)
    carrier = saw / np.sqrt(power) + 0.1 * rng.standard_normal(samples)

    # Gain knots such that each frame's RMS of the interpolated gain curve is the target: the carrier has
    # unit RMS on average, so this matches the loudness without chasing the carrier's own frame-to-frame
    # RMS wobble (a frame holds less than a period below 100 Hz), which would break its periodicity.
    gains = target.copy()
    for _ in range(4):
        rms = np.sqrt(np.mean(_per_sample(gains, samples, hop).reshape(frames, hop) ** 2, axis=1))
        gains *= np.where(target > 0, target / np.maximum(rms, 1e-12), 0.0)
    out = carrier * _per_sample(gains, samples, hop) / np.sqrt(1.01)  # carrier RMS: sqrt(1 + 0.1^2)
    return np.clip(out, -1.0, 1.0).astype(np.float32)


def steady_frames(f0: np.ndarray, loudness: np.ndarray, min_db: float = -45.0, samples: int | None = None,
                  sample_rate: int = SAMPLE_RATE, hop: int = HOP, window_s: float = 0.06) -> list[tuple[int, int]]:
    """The frames `pitch_error_cents` measures, each with its window length in samples.

    A frame's window is centred on the frame centre and lasts `window_s`, or longer for low notes: it must
    hold two periods of the tracker's lowest search frequency f0 / 2.2 (YIN's need), e.g. 138 ms at 32 Hz.
    A frame is kept when every frame its window touches has loudness > `min_db` (voiced: no onsets, no
    release tails, no rests) and f0 within 1 % (max / min <= 1.01: no note changes or glides; vibrato up
    to about +-8 cents passes), and the window lies inside the audio (`samples`, default len(f0) * hop).
    """
    f0, loudness = np.asarray(f0, np.float64), np.asarray(loudness, np.float64)
    samples = len(f0) * hop if samples is None else samples
    kept = []
    for i in range(len(f0)):
        if loudness[i] <= min_db or f0[i] <= 0:
            continue
        length = max(int(window_s * sample_rate), 2 * int(np.ceil(sample_rate / (f0[i] / 2.2))) + 2)
        start = i * hop + hop // 2 - length // 2
        if start < 0 or start + length > samples:
            continue
        span = slice(start // hop, (start + length - 1) // hop + 1)
        if loudness[span].min() > min_db and f0[span].max() <= 1.01 * f0[span].min():
            kept.append((i, length))
    return kept


def pitch_error_cents(audio: np.ndarray, f0: np.ndarray, loudness: np.ndarray, min_db: float = -45.0,
                      sample_rate: int = SAMPLE_RATE, hop: int = HOP) -> np.ndarray:
    """1200 * log2(measured / f0) at each frame `steady_frames` keeps (see there for which frames).

    The tracker is `streaming.analysis.estimate_f0` (YIN) on the output, searching f0 / 2.2 .. f0 * 2.2:
    octave errors of the output show up as about +-1200 cents, not hidden. Where it finds no pitch (the
    output is unvoiced although the control is voiced) the error is nan; callers report those apart.
    """
    f0 = np.asarray(f0, np.float64)
    errors = []
    for i, length in steady_frames(f0, loudness, min_db, len(audio), sample_rate, hop):
        start = i * hop + hop // 2 - length // 2
        measured = estimate_f0(audio[start : start + length], sample_rate,
                               fmin=f0[i] / 2.2, fmax=min(f0[i] * 2.2, sample_rate / 4))
        errors.append(1200.0 * np.log2(measured / f0[i]) if np.isfinite(measured) else np.nan)
    return np.array(errors, np.float64)


def loudness_correlation(audio: np.ndarray, loudness: np.ndarray, hop: int = HOP, floor_db: float = -70.0) -> float:
    """Pearson correlation of `loudness_db(audio)` with the loudness control, over the frames where either
    is above `floor_db` (shared silence would agree trivially and inflate it). nan if undefined."""
    measured = loudness_db(audio, hop).astype(np.float64)
    n = min(len(measured), len(loudness))
    measured, control = measured[:n], np.asarray(loudness, np.float64)[:n]
    keep = (measured > floor_db) | (control > floor_db)
    if keep.sum() < 2 or measured[keep].std() == 0 or control[keep].std() == 0:
        return float("nan")
    return float(np.corrcoef(measured[keep], control[keep])[0, 1])


def count_clicks(audio: np.ndarray, k: float = 4.0, floor: float = 2e-3, window: int = 480,
                 percentile: float = 99.0, merge: int = 48) -> int:
    """Clicks: sample-to-sample jumps far beyond the signal's own nearby jumps.

    With d[n] = |x[n+1] - x[n]|, a jump is flagged when d[n] > k * scale(n) and d[n] > `floor` (so
    near-silent noise and dither never count), where scale(n) is the `percentile` of d over the
    surrounding `window` samples (10 ms at 48 kHz; computed every 48 samples and held; zeros beyond the
    ends). Flagged jumps less than `merge` samples apart (1 ms) count as one click, so a one-sample
    dropout (a jump down and one back up) is one click.

    Why a high percentile and not the median: a bright periodic waveform (a 2 kHz sawtooth, 24 samples a
    period) has one big jump per period, 12-24x its median jump, as large relative to the median as a
    0.1 step in a -20 dB 440 Hz sine (about 12x). The 99th percentile of 481 samples is about the 6th
    largest jump nearby, so it includes a periodic waveform's own jumps (ratio ~1) but not a few isolated
    clicks (scale ~ the signal's ordinary slope: the 0.1 step reads about 12x), and a click at every
    frame boundary (one per 480 samples) still counts, once per frame.
    Why k = 4: white noise peaks at about 2x its own 99th percentile over 20 s; FluidSynth renders of
    flute, violin, cello, trumpet, clarinet, piano and guitar peak at 1.2-1.8x, sweeps and fast (5 ms)
    attacks at 1.0x. The smallest jump counted is k times the local slope: 0.033 in a -20 dB 440 Hz sine.

    Limit: a waveform with a full-band discontinuity in every period, like an ideal band-limited sawtooth
    (1/k up to Nyquist) below ~1 kHz or GM program 80 (square lead), has fewer than 6 such jumps in 10 ms
    and counts as clicks: physically it is a click train. Recorded instruments roll their harmonics off,
    so their edges span several samples and do not count.
    """
    x = np.asarray(audio, np.float64)
    if len(x) < 2:
        return 0
    d = np.abs(np.diff(x))
    stride, half = 48, window // 2
    # Window j is centred on d[j * stride + stride // 2] and serves d[j * stride : (j + 1) * stride].
    padded = np.concatenate([np.zeros(half - stride // 2), d, np.zeros(half + stride)])
    kth = int(round(percentile / 100.0 * window))
    scale = np.empty((len(d) + stride - 1) // stride)
    windows = np.lib.stride_tricks.sliding_window_view(padded, window + 1)[::stride][: len(scale)]
    for first in range(0, len(scale), 4096):  # bounded memory: 4096 windows at a time
        rows = windows[first : first + 4096]
        scale[first : first + len(rows)] = np.partition(rows, kth, axis=1)[:, kth]
    flagged = np.nonzero((d > floor) & (d > k * np.repeat(scale, stride)[: len(d)]))[0]
    if len(flagged) == 0:
        return 0
    return int(1 + np.count_nonzero(np.diff(flagged) >= merge))


def in_phrase(notes: list[Note], frames: int) -> np.ndarray:
    """A composed piece's in-phrase frames: from a note's start to the next note's start where the rests
    between them (if any) last less than a quarter note."""
    keep = np.zeros(frames, bool)
    pitched = [i for i, n in enumerate(notes) if n.midi is not None]
    for a, b in zip(pitched, pitched[1:], strict=False):
        if sum(n.quarters for n in notes[a + 1 : b]) < 1.0:
            keep[notes[a].frame : min(frames, notes[b].frame)] = True
    return keep


def mel_filters(n_fft: int = MEL_FFT, mels: int = MELS, low: float = 40.0, high: float = 16000.0,
                sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """[mels, bins] triangular filters, evenly spaced in mel (HTK formula)."""
    mel = np.linspace(2595 * np.log10(1 + low / 700), 2595 * np.log10(1 + high / 700), mels + 2)
    hz = 700 * (10 ** (mel / 2595) - 1)
    bins = np.fft.rfftfreq(n_fft, 1 / sample_rate)
    rise = (bins[None] - hz[:-2, None]) / (hz[1:-1] - hz[:-2])[:, None]
    fall = (hz[2:, None] - bins[None]) / (hz[2:] - hz[1:-1])[:, None]
    return np.maximum(0.0, np.minimum(rise, fall))


MEL_FILTERS = mel_filters()


def log_mel(audio: np.ndarray, hop: int = HOP) -> np.ndarray:
    """[frames, MELS] log10 mel power, one frame a hop (centred), floored at -100 dB."""
    padded = np.pad(np.asarray(audio, np.float64), (MEL_FFT // 2, MEL_FFT // 2))
    frames = np.lib.stride_tricks.sliding_window_view(padded, MEL_FFT)[::hop][: len(audio) // hop]
    power = np.abs(np.fft.rfft(frames * np.hanning(MEL_FFT), axis=1)) ** 2 / MEL_FFT
    return np.log10(power @ MEL_FILTERS.T + 1e-10)


def note_frames(perf: Performance) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each frame's MIDI key, which frames are voiced, and how many frames into its note each is (voiced
    frames of one key in a row; ONSET_FRAMES or more: a steady frame)."""
    keys = np.round(69 + 12 * np.log2(np.maximum(perf.f0, 1.0) / 440.0)).astype(int)
    voiced = perf.loudness > VOICED_DB
    since = np.zeros(len(keys), int)
    for i in range(1, len(keys)):
        same = voiced[i] and voiced[i - 1] and keys[i] == keys[i - 1]
        since[i] = since[i - 1] + 1 if same else 0
    return keys, voiced, since


@dataclass(frozen=True)
class SpectralTable:
    """Mean log-mel shapes relative to the frame's level (loudness / 10): by (key, band) for each of `bands`
    equal bands of brightness, and by (key, None) over all of them, which a (key, band) the data never
    played falls back to."""

    bands: int
    shapes: dict[tuple[int, int | None], np.ndarray]

    def band(self, brightness: np.ndarray) -> np.ndarray:
        return np.clip((np.asarray(brightness) * self.bands).astype(int), 0, self.bands - 1)

    def guess(self, perf: Performance, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each frame's log-mel [frames, MELS] by the table: its key's (and band's) shape at the frame's level
        (the level alone where the key is unknown), and which frames have a shape."""
        shape, known = np.zeros((len(keys), MELS)), np.zeros(len(keys), bool)
        for i, (key, band) in enumerate(zip(keys.tolist(), self.band(perf.brightness).tolist(), strict=True)):
            found = self.shapes.get((key, band if self.bands > 1 else None), self.shapes.get((key, None)))
            if found is not None:
                shape[i], known[i] = found, True
        return shape + perf.loudness[:, None] / 10.0, known


def table_bands(model: FrameModel) -> int:
    """The brightness bands of the fair table for `model`: BRIGHTNESS_BANDS when it has the control, else 1."""
    return BRIGHTNESS_BANDS if any(c.name == "brightness" for c in model.manifest.controls) else 1


def spectral_table(perfs: list[Performance], bands: int = 1) -> SpectralTable:
    """Each MIDI key's (and with `bands` > 1, each key and brightness band's) mean log-mel shape, relative to
    the frame's level, over the steady frames of `perfs` (the training data): a lookup table, no learning."""
    sums: dict[tuple[int, int | None], np.ndarray] = {}
    counts: dict[tuple[int, int | None], int] = {}
    table = SpectralTable(bands, {})
    for p in perfs:
        keys, voiced, since = note_frames(p)
        steady = voiced & (since >= ONSET_FRAMES)
        shape = log_mel(p.audio) - p.loudness[:, None] / 10.0
        band = table.band(p.brightness)
        for i in np.flatnonzero(steady):
            for entry in [(int(keys[i]), None)] + ([(int(keys[i]), int(band[i]))] if bands > 1 else []):
                sums[entry] = sums.get(entry, 0) + shape[i]
                counts[entry] = counts.get(entry, 0) + 1
    table.shapes.update({k: sums[k] / counts[k] for k in sums})
    return table


def timbre_errors(audio: np.ndarray, perf: Performance, table: SpectralTable
                  ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Per-frame log-mel L1 against `perf`'s audio of `audio`, of the table's shape for each frame's key (and
    band) at the frame's level, and of silence; with the frames to score (voiced, a key the table has) and
    which of them are onset frames."""
    reference = log_mel(perf.audio)
    keys, voiced, since = note_frames(perf)
    guess, known = table.guess(perf, keys)
    takes = {"model": log_mel(audio), "table": guess, "silence": np.full_like(reference, -10.0)}
    errors = {k: np.abs(v - reference).mean(1) for k, v in takes.items()}
    return errors, voiced & known, voiced & known & (since < ONSET_FRAMES)


def pitch_summary(cents: np.ndarray) -> dict[str, Any]:
    """Median and p95 of |error| over frames where a pitch was found; the unvoiced share reported apart."""
    found = np.abs(cents[np.isfinite(cents)])
    return {
        "median": float(np.median(found)) if len(found) else None,
        "p95": float(np.percentile(found, 95)) if len(found) else None,
        "frames": int(len(cents)),
        "unvoiced_fraction": float(1.0 - len(found) / len(cents)) if len(cents) else None,
    }


def curves_for(model: FrameModel, perf: Performance) -> np.ndarray:
    """[frames, C] controls in manifest order: f0, loudness and brightness from the data, any others at
    default."""
    names = [c.name for c in model.manifest.controls]
    if not {"f0", "loudness"} <= set(names):
        raise ValueError(f"{model.directory}: an instrument needs controls f0 and loudness, has {names}")
    columns = {"f0": perf.f0, "loudness": perf.loudness, "brightness": perf.brightness}
    return np.stack([columns.get(c.name, np.full(len(perf.f0), c.default, np.float32))
                     for c in model.manifest.controls], axis=1).astype(np.float32)


def assess(model: FrameModel, perfs: list[Performance], table: SpectralTable | None, seed: int = 0,
           seconds: float | None = None, log: Callable[[str], None] = lambda line: None,
           watermark: Key | None = None, serial: int = 0) -> tuple[dict[str, Any], list[dict[str, np.ndarray]]]:
    """Render each performance through the engine with its exact controls and measure it against the
    FluidSynth audio, the saw+noise baseline and, given the training data's `spectral_table`, that table
    (timbre: all frames and onset frames; None leaves those figures out). Returns the figures and each
    performance's audio (model, baseline, reference). With `watermark` the model's audio carries the mark of
    (key, `serial`) and is measured DELAY samples later, where it lines up with the data (the marker delays
    what it marks)."""
    m = model.manifest
    if not perfs:
        raise ValueError("no performances to assess")
    rows, rendered = [], []
    timbre: dict[str, dict[str, list[np.ndarray]]] = {k: {"all": [], "onset": []} for k in TIMBRE_TAKES}
    cents: dict[str, list[np.ndarray]] = {"model": [], "baseline": [], "reference": []}
    loud: dict[str, list[np.ndarray]] = {"model": [], "baseline": []}
    for index, perf in enumerate(perfs):
        frames = len(perf.f0) if seconds is None else min(len(perf.f0), round(seconds / m.frame_seconds))
        perf = replace(perf, f0=perf.f0[:frames], loudness=perf.loudness[:frames], audio=perf.audio[: frames * m.hop],
                       brightness=perf.brightness[:frames])
        shift = 0 if watermark is None else DELAY
        curves = curves_for(model, perf)
        curves = np.concatenate([curves, curves[-1:]])  # one frame more (its controls held) covers the shift
        out = render(model, len(curves) * m.frame_seconds, seed, {}, curves=curves, watermark=watermark,
                     serial=serial)[shift : shift + frames * m.hop]
        audio = {"model": out, "baseline": baseline(perf.f0, perf.loudness, seed=seed), "reference": perf.audio}
        row: dict[str, Any] = {"performance": index, "seconds": frames * m.frame_seconds}
        row["spectral_distance"] = {k: spectral_distance(audio[k], perf.audio) for k in ("model", "baseline")}
        # Sanity: silence scores this much; a baseline scoring worse than silence is no bar to clear.
        row["spectral_distance"]["silence"] = spectral_distance(np.zeros_like(perf.audio), perf.audio)
        for k in cents:
            cents[k].append(pitch_error_cents(audio[k], perf.f0, perf.loudness))
        for k in loud:  # the reference's own correlation is 1 by construction: its loudness is the control
            measured = loudness_db(audio[k])
            keep = (measured > -70.0) | (perf.loudness > -70.0)
            loud[k].append(np.stack([measured[keep], perf.loudness[keep]]))
        # One frame of silence in front: the jump from nothing to the first sample counts, as at a stream start.
        silence = np.zeros(m.hop, np.float32)
        row["clicks"] = {k: count_clicks(np.concatenate([silence, audio[k]])) for k in ("model", "reference")}
        if table is not None:
            errors, scored, onset = timbre_errors(out, perf, table)
            for k, e in errors.items():
                timbre[k]["all"].append(e[scored])
                timbre[k]["onset"].append(e[onset])
        rows.append(row)
        rendered.append(audio)
        sd = row["spectral_distance"]
        log(f"held-out {index + 1}/{len(perfs)}: {row['seconds']:.1f} s, spectral distance model {sd['model']:.3f} "
            f"baseline {sd['baseline']:.3f}, clicks {row['clicks']['model']}")

    weights = np.array([r["seconds"] for r in rows])
    distance = {k: float(np.average([r["spectral_distance"][k] for r in rows], weights=weights))
                for k in ("model", "baseline", "silence")}
    distance["ratio"] = distance["model"] / distance["baseline"]
    pitch = {k: pitch_summary(np.concatenate(v)) for k, v in cents.items()}
    correlation = {}
    for k, pairs in loud.items():
        both = np.concatenate(pairs, axis=1)
        correlation[k] = float(np.corrcoef(both)[0, 1]) if both.shape[1] > 1 else None
    clicks = {k: int(sum(r["clicks"][k] for r in rows)) for k in ("model", "reference")}
    metrics = {
        "spectral_ratio": distance["ratio"], "pitch_median_cents": pitch["model"]["median"],
        "pitch_p95_cents": pitch["model"]["p95"], "loudness_correlation": correlation["model"],
        "clicks": clicks["model"],
    }
    result = {
        "heldout_evaluated": len(rows), "seconds_evaluated": float(weights.sum()), "seed": seed,
        "spectral_distance": distance, "pitch_cents": pitch, "loudness_correlation": correlation,
        "clicks": clicks, "metrics": metrics, "performances": rows,
    }
    if table is not None:  # log-mel L1 per frame, averaged over every scored frame of every performance
        l1 = {part: {k: _mean(timbre[k][part]) for k in TIMBRE_TAKES} for part in ("all", "onset")}
        l1["frames"] = {part: int(sum(len(e) for e in timbre["model"][part])) for part in ("all", "onset")}
        result["log_mel_l1"] = l1
        metrics["table_ratio"] = _ratio(l1["all"]["model"], l1["all"]["table"])
        metrics["onset_table_ratio"] = _ratio(l1["onset"]["model"], l1["onset"]["table"])
    return result, rendered


def _mean(parts: list[np.ndarray]) -> float | None:
    joined = np.concatenate(parts) if parts else np.zeros(0)
    return float(joined.mean()) if len(joined) else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def verification_quality(assessed: dict) -> dict:
    """The manifest's `verification.quality` block from an `assess` result (what the store's gate reads)."""
    figures = {**assessed["metrics"], "spectral_distance": assessed["spectral_distance"]["model"],
               "baseline_distance": assessed["spectral_distance"]["baseline"],
               "heldout_seconds": assessed["seconds_evaluated"]}
    return figures | ({"log_mel_l1": assessed["log_mel_l1"]} if "log_mel_l1" in assessed else {})
