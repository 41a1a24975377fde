"""Does the watermark survive what streams go through, stay unheard, never fire on unmarked audio, and cost
little? Every figure of issue 21 on clips this bench makes.

Run from the repository root:  PYTHONPATH=. .venv/bin/python bench/watermark.py [--quick] [--out FILE]
Prints the tables and the targets (a MISS marks a missed one) to stdout, progress to stderr, and writes
JSON (default bench/out/watermark.json). The full run takes 15-35 minutes on a shared 2-core machine.

- Marked: pieces rendered through `streaming.engine.render` with the mark of a bench key and a random serial:
  each shipped instrument playing a timeline of notes (f0 and loudness changing), and the folk composer
  playing each instrument with varied tempo, scale, register, density and a control change midway. A clip is
  cut from each at a random sample offset (the detector finds the alignment), then attacked: Opus through
  PyAV's libopus (Ogg in memory, constrained VBR, stereo with the mono signal on both channels, as the
  WebRTC stream sends it), resampling to 44.1 kHz (the detector gets the 44.1 kHz audio), gain, mixing under
  a speech-like signal, a cut, and 44.1 kHz then Opus.
- Unmarked: the same pieces rendered without the mark (the hardest negatives), FluidSynth renders of corpus
  tunes (`models.data` performances of GM programs), white and pink noise, and a speech-like signal; each
  clip goes through one of the attacks in turn.
- Audibility: the store's quality gates on each instrument's held-out data with the mark on and off
  (`models.quality.assess`), the change in spectral distance to FluidSynth, and the mark's level under the
  signal in the mark's bands and in 1/3-octave bands.
- Engine cost: ticks of 256 streams with the mark and without, alternating in one loop; the marker alone.
Detection runs in a pool of 2 processes (a 10 s clip takes a core for about a second).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # one core each, set before numpy loads
    os.environ[_var] = "1"

import argparse  # noqa: E402
import hashlib  # noqa: E402
import io  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import av  # noqa: E402
import numpy as np  # noqa: E402
import scipy.signal  # noqa: E402
from quality import check, heldout, instrument_dirs, recipe_of  # noqa: E402  (bench/quality.py, beside this file)

from wavecast.daemon.marks import decode  # noqa: E402
from wavecast.models import data  # noqa: E402
from wavecast.models import quality as metrics  # noqa: E402
from wavecast.models.store import QUALITY_TARGETS, default_work  # noqa: E402
from wavecast.streaming.composer import ComposerModel  # noqa: E402
from wavecast.streaming.engine import Engine, render  # noqa: E402
from wavecast.streaming.model import MANIFEST, FrameModel, Manifest  # noqa: E402
from wavecast.streaming.watermark import (  # noqa: E402
    DELAY,
    SERIAL_BITS,
    THRESHOLD,
    Key,
    Marker,
    band_weights,
    confidence,
    detect,
)

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "models" / "shipped"
SR = 48_000
CLIP = 10.0  # seconds a judged clip lasts
INSTRUMENTS = ("default", "violin", "cello", "clarinet")
CATEGORIES = (*INSTRUMENTS, "composed")
PROGRAMS = {0: "piano", 24: "nylon guitar", 40: "violin", 42: "cello", 56: "trumpet", 65: "alto sax", 68: "oboe",
            71: "clarinet", 73: "flute", 21: "accordion"}  # FluidSynth (GM) programs of the unmarked renders
NOTE_RANGES = {0: (36, 96), 24: (40, 84), 40: (55, 96), 42: (36, 81), 56: (52, 86), 65: (49, 81), 68: (58, 91),
               71: (50, 91), 73: (60, 96), 21: (41, 89)}
VOWELS = ((730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480), (570, 840, 2410),
          (660, 1720, 2410))  # formants F1-F3 in Hz (Peterson & Barney means, male)
TONICS = ("C", "D", "Eb", "E", "F", "F#", "G", "A", "Bb", "B")
MODES = ("major", "minor", "dorian", "mixolydian")


def log(msg: str) -> None:
    print(f"[watermark] {msg}", file=sys.stderr, flush=True)


def bench_key(seed: int) -> Key:
    return Key(hashlib.sha256(f"wavecast bench watermark key {seed}".encode()).digest())


# -- attacks ------------------------------------------------------------------------------------------
Step = Callable[[np.ndarray, int, np.random.Generator, dict], tuple[np.ndarray, int]]  # (audio, rate, rng, notes)


def opus(bitrate: int) -> Step:
    """Encode and decode with libopus (PyAV), in an Ogg container in memory: constrained VBR at `bitrate`, stereo
    with the mono signal on both channels (the WebRTC stream's layout); decoded as the detector reads files."""

    def step(x: np.ndarray, rate: int, rng: np.random.Generator, notes: dict) -> tuple[np.ndarray, int]:
        if rate != SR:
            raise ValueError(f"Opus takes {SR} Hz here, got {rate} Hz")
        pcm = np.round(np.clip(x, -1.0, 1.0) * 32767).astype(np.int16)
        with av.open(buffer := io.BytesIO(), "w", format="ogg") as out:
            stream = out.add_stream("libopus", rate=SR, layout="stereo")
            stream.bit_rate = bitrate
            stream.codec_context.options = {"vbr": "constrained"}
            frame = av.AudioFrame.from_ndarray(np.repeat(pcm[None, :], 2, axis=0).T.reshape(1, -1), format="s16",
                                               layout="stereo")
            frame.sample_rate = SR
            for packet in [*stream.encode(frame), *stream.encode(None)]:
                out.mux(packet)
        return decode(buffer.getvalue())

    return step


def resample_44k(x: np.ndarray, rate: int, rng: np.random.Generator, notes: dict) -> tuple[np.ndarray, int]:
    return scipy.signal.resample_poly(x, 147, 160), 44_100


def back_to_48k(x: np.ndarray, rate: int, rng: np.random.Generator, notes: dict) -> tuple[np.ndarray, int]:
    """44.1 kHz audio as an Opus encoder takes it: at 48 kHz."""
    return scipy.signal.resample_poly(x, 160, 147), SR


def gain(db: float) -> Step:
    def step(x: np.ndarray, rate: int, rng: np.random.Generator, notes: dict) -> tuple[np.ndarray, int]:
        return np.clip(x * 10 ** (db / 20), -1.0, 1.0), rate

    return step


def under_speech(db: float) -> Step:
    """Mix the clip under a speech-like signal `db` louder than it (RMS over the clip), clipped as it falls."""

    def step(x: np.ndarray, rate: int, rng: np.random.Generator, notes: dict) -> tuple[np.ndarray, int]:
        voice = speech_like(len(x) / rate, rng, rate)
        level = np.sqrt(np.mean(np.square(x))) * 10 ** (db / 20)
        return np.clip(x + voice * level, -1.0, 1.0), rate

    return step


def cut(seconds: float) -> Step:
    """Remove `seconds` from a random place at least 1 s from either end."""

    def step(x: np.ndarray, rate: int, rng: np.random.Generator, notes: dict) -> tuple[np.ndarray, int]:
        at = rng.uniform(1.0, len(x) / rate - 1.0 - seconds)
        notes["cut_at_s"] = round(at, 3)
        a, b = int(at * rate), int((at + seconds) * rate)
        return np.concatenate([x[:a], x[b:]]), rate

    return step


@dataclass(frozen=True)
class Attack:
    name: str
    steps: tuple[Step, ...]
    seconds: float = CLIP  # the clip it takes (a cut takes a longer one and leaves CLIP seconds)


ATTACKS = {a.name: a for a in (
    Attack("none", ()),
    Attack("opus 64k", (opus(64_000),)),
    Attack("opus 32k", (opus(32_000),)),
    Attack("resample 44.1k", (resample_44k,)),
    Attack("gain -12 dB", (gain(-12.0),)),
    Attack("gain +6 dB", (gain(6.0),)),
    Attack("under speech 0 dB", (under_speech(0.0),)),
    Attack("under speech +6 dB", (under_speech(6.0),)),
    Attack("cut 2 s", (cut(2.0),), seconds=CLIP + 2.0),
    Attack("44.1k, opus 64k", (resample_44k, back_to_48k, opus(64_000))),
)}


def attacked(attack: Attack, clip: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, int, dict]:
    x, rate, notes = clip.astype(np.float64), SR, {}
    for step in attack.steps:
        x, rate = step(x, rate, rng, notes)
    return x, rate, notes


# -- unmarked signals -------------------------------------------------------------------------------------
def speech_like(seconds: float, rng: np.random.Generator, rate: int = SR) -> np.ndarray:
    """Unit-RMS speech-like audio: syllables (~4 a second, in phrases with pauses between) of a glottal pulse
    train whose f0 falls through each phrase, through three formant resonators moving from vowel to vowel,
    some opened by a noise burst (a fricative)."""
    n = int(seconds * rate)
    envelope, noise_env = np.zeros(n), np.zeros(n)
    f0_track, formant_knots = np.zeros(n), []
    speaker = rng.uniform(0.85, 1.25)  # formant scale: a larger or smaller vocal tract
    base = rng.uniform(95, 230)  # Hz
    t = rng.uniform(0.0, 0.3)
    while t < seconds:
        syllables, start = int(rng.integers(3, 11)), t
        for _ in range(syllables):
            length = rng.uniform(0.12, 0.32)
            a, size = int(t * rate), int(length * rate)
            if a >= n:
                break
            envelope[a : a + size] = np.hanning(size)[: n - a] * rng.uniform(0.5, 1.0)
            if rng.random() < 0.3:  # a fricative before the vowel
                f = min(n - a, int(rng.uniform(0.04, 0.1) * rate))
                noise_env[a : a + f] = np.hanning(f) * rng.uniform(0.2, 0.5)
            formant_knots.append((t + length / 2, np.array(VOWELS[rng.integers(len(VOWELS))]) * speaker))
            t += length + rng.uniform(0.0, 0.06)
        end = min(n, int(t * rate))
        span = np.arange(int(start * rate), end)
        f0_track[span] = base * 2 ** ((rng.uniform(1, 4) - 6 * (span / rate - start) / max(t - start, 0.1)) / 12)
        t += rng.uniform(0.2, 0.7)
    f0_track[f0_track == 0] = base
    f0_track *= 2 ** (np.cumsum(rng.standard_normal(n)) / np.sqrt(rate) * 0.3 / 12)  # slow drift (jitter)
    phase = np.cumsum(f0_track / rate) % 1.0
    flow = np.where(phase < 0.4, 0.5 - 0.5 * np.cos(np.pi * phase / 0.4),  # Rosenberg pulse: opening, closing
                    np.where(phase < 0.56, np.cos(np.pi * (phase - 0.4) / 0.32), 0.0))
    source = np.diff(flow, prepend=0.0) * 50.0  # radiated from the lips: its derivative
    source += 0.02 * rng.standard_normal(n)  # breath
    x = source * envelope
    block = rate // 100
    times = np.array([k[0] for k in formant_knots] or [0.0])
    knots = np.array([k[1] for k in formant_knots] or [VOWELS[0]])
    states = [np.zeros(2) for _ in range(3)]
    out = np.empty(n)
    for first in range(0, n, block):  # formants move every 10 ms
        part = x[first : first + block]
        for j, (bandwidth, state) in enumerate(zip((80.0, 100.0, 150.0), states, strict=True)):
            f = np.interp(first / rate, times, knots[:, j])
            r = np.exp(-np.pi * bandwidth / rate)
            den = [1.0, -2 * r * np.cos(2 * np.pi * f / rate), r * r]
            part, states[j] = scipy.signal.lfilter([sum(den)], den, part, zi=state)  # unit gain at DC (Klatt)
        out[first : first + block] = part
    hiss = scipy.signal.lfilter(*scipy.signal.butter(2, 3500, "high", fs=rate), rng.standard_normal(n))
    out = out / (np.sqrt(np.mean(out**2)) + 1e-12) + hiss * noise_env
    return out / (np.sqrt(np.mean(out**2)) + 1e-12)


def noise(kind: str, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """White or pink (1/f power) noise at a random level from -40 to -15 dBFS RMS."""
    n = int(seconds * SR)
    x = rng.standard_normal(n)
    if kind == "pink":
        spectrum = np.fft.rfft(x)
        f = np.fft.rfftfreq(n, 1 / SR)
        x = np.fft.irfft(spectrum / np.sqrt(np.maximum(f, 20.0)), n)
    return x / np.sqrt(np.mean(x**2)) * 10 ** (rng.uniform(-40, -15) / 20)


# -- workers ------------------------------------------------------------------------------------------
_MODELS: dict[str, Any] = {}


def model(name: str) -> Any:
    """A worker's models, loaded on first use (one ORT thread each)."""
    if name not in _MODELS:
        _MODELS[name] = ComposerModel(SHIPPED / name) if name == "folk" else FrameModel(SHIPPED / name, device="cpu")
    return _MODELS[name]


def judge(key: Key, clip: np.ndarray, attack: str, rng: np.random.Generator, serial: int | None) -> dict:
    """Attack a clip and detect; with `serial` (a marked clip) the payload's bit errors against what it carries."""
    x, rate, notes = attacked(ATTACKS[attack], clip, rng)
    found = detect(x, rate, [key])
    row = {"attack": attack, "score": round(found.score, 3), "detected": found.marked, **notes}
    if found.marked:
        row["ranges"] = [[round(a, 2), round(b, 2)] for a, b in found.ranges]
    if serial is not None:
        row["serial"] = serial
        row["bit_errors"] = int.bit_count(found.payload ^ key.payload(serial)) if found.marked else None
    return row


def band_powers(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean-square power of `x` in the mark's bands (their flat-top weights) and in 1/3-octave bands."""
    n = 4096
    window = np.hanning(n)
    frames = np.lib.stride_tricks.sliding_window_view(x, n)[:: n // 2]
    psd = (np.abs(np.fft.rfft(frames * window, axis=1)) ** 2).mean(axis=0) / (n * np.sum(window**2))
    psd[1:-1] *= 2  # one-sided: the bins sum to the mean square
    freqs = np.fft.rfftfreq(n, 1 / SR)
    mark_bands = band_weights(freqs) @ psd
    thirds = np.array([psd[(freqs >= c * 2 ** (-1 / 6)) & (freqs < c * 2 ** (1 / 6))].sum() for c in THIRD_OCTAVES])
    return mark_bands, thirds


NEAR = 6.5  # unmarked clips scoring this much are counted: the tail below the threshold
THIRD_OCTAVES = tuple(float(round(1000 * 2 ** (k / 3))) for k in range(-10, 13))  # 100 Hz .. 16 kHz


def mark_level(marked: np.ndarray, plain: np.ndarray) -> dict:
    """dB the mark (marked minus the plain render DELAY samples later) lies under the signal, per band where the
    signal is above -60 dBFS."""
    signal, mark = plain[:-DELAY].astype(np.float64), marked[DELAY:].astype(np.float64) - plain[:-DELAY]
    out = {}
    for name, s, m in zip(("mark_bands", "third_octaves"), band_powers(signal), band_powers(mark), strict=True):
        audible = 10 * np.log10(s + 1e-30) > -60.0
        under = 10 * np.log10((s + 1e-30) / (m + 1e-30))
        out[name] = [round(float(v), 2) if a else None for v, a in zip(under, audible, strict=True)]
        out[f"{name}_min_db"] = float(under[audible].min()) if audible.any() else None
    return out


def piece(spec: dict) -> dict:
    """Render a piece with the mark and without; attack a marked clip every way asked; judge unmarked clips."""
    key, rng = bench_key(spec["key_seed"]), np.random.default_rng(spec["seed"])
    instrument = model(spec["instrument"])
    composer = model("folk") if spec["category"] == "composed" else None
    args = (instrument, spec["seconds"], spec["seed"], spec["controls"], spec["timeline"])
    marked = render(*args, composer=composer, watermark=key, serial=spec["serial"])
    plain = render(*args, composer=composer)
    longest = max(ATTACKS[a].seconds for a in spec["attacks"])
    start = int(rng.integers(0, len(marked) - int(longest * SR) + 1))  # any sample: the detector aligns
    rows = [judge(key, marked[start : start + int(ATTACKS[a].seconds * SR)], a, rng, spec["serial"])
            for a in spec["attacks"]]
    negatives, at = [], 0
    for attack in spec["unmarked_attacks"]:
        length = int(ATTACKS[attack].seconds * SR)
        negatives.append(judge(key, plain[at : at + length], attack, rng, None))
        at += length
    peak = float(np.abs(marked).max())
    return {"kind": "piece", "spec": spec, "marked": rows, "unmarked": negatives, "peak": peak,
            "level": mark_level(marked, plain)}


def unmarked(spec: dict) -> dict:
    """Unmarked clips of one source (a FluidSynth performance, noise or speech), each through its attack."""
    key, rng = bench_key(spec["key_seed"]), np.random.default_rng(spec["seed"])
    seconds = sum(ATTACKS[a].seconds for a in spec["attacks"])
    if spec["source"] == "fluidsynth":
        low, high = NOTE_RANGES[spec["program"]]
        recipe = data.Recipe(program=spec["program"], performances=spec["index"] + 1, seconds=seconds,
                             low_note=low, high_note=high, seed=spec["seed"], heldout=0)
        audio = data.render_one(recipe, spec["index"], spec["cache"]).audio
    elif spec["source"] == "speech":
        audio = speech_like(seconds, rng) * 10 ** (rng.uniform(-30, -12) / 20)
    else:
        audio = noise(spec["source"], seconds, rng)
    rows, at = [], 0
    for attack in spec["attacks"]:
        length = int(ATTACKS[attack].seconds * SR)
        rows.append(judge(key, audio[at : at + length], attack, rng, None))
        at += length
    return {"kind": "unmarked", "spec": spec, "unmarked": rows}


def gate(spec: dict) -> dict:
    """The store's quality gates on an instrument's held-out performances, with the mark on or off."""
    instrument = FrameModel(spec["dir"], device="cpu")
    recipe, _ = recipe_of(instrument)
    perfs, table = heldout(recipe, Path(spec["work"]), spec["quick"])
    key = bench_key(spec["key_seed"]) if spec["marked"] else None
    result, _ = metrics.assess(instrument, perfs, table, seed=0, seconds=spec["seconds"], watermark=key,
                               serial=0x1234)
    checks = {name: check(name, value) for name, value in result["metrics"].items()}
    return {"kind": "gate", "spec": spec, "name": instrument.manifest.name, "checks": checks,
            "pass": all(c["pass"] for c in checks.values()), "distance": result["spectral_distance"]["model"],
            "seconds": result["seconds_evaluated"]}


def run_task(task: tuple[str, dict]) -> dict:
    kind, spec = task
    return {"piece": piece, "unmarked": unmarked, "gate": gate}[kind](spec)


# -- what to render --------------------------------------------------------------------------------------
def plain_piece(rng: np.random.Generator, instrument: str, seconds: float) -> tuple[dict, list]:
    """Notes of random length, pitch (semitones over two octaves of the instrument's range) and loudness, with
    rests now and then: a timeline of f0 and loudness changes."""
    f0 = Manifest.read(SHIPPED / instrument / MANIFEST).control("f0")
    low = max(f0.min, 110.0 if instrument != "cello" else 65.0)
    timeline, t = [], 0.0
    while t < seconds:
        note = {"f0": round(min(f0.max, low * 2 ** (int(rng.integers(0, 25)) / 12)), 2),
                "loudness": round(float(rng.uniform(-35, -12)), 1)}
        timeline.append((round(t, 3), note))
        length = float(rng.uniform(0.1, 0.9))
        if rng.random() < 0.12:
            timeline.append((round(t + 0.7 * length, 3), {"loudness": -80.0}))
        t += length
    return timeline[0][1], timeline[1:]


def composed_piece(rng: np.random.Generator, seconds: float) -> tuple[dict, list]:
    controls = {"tempo": round(float(rng.uniform(70, 170))),
                "scale": f"{TONICS[rng.integers(len(TONICS))]} {MODES[rng.integers(len(MODES))]}",
                "register": ("low", "mid", "high")[rng.integers(3)], "density": round(float(rng.uniform(0.2, 1)), 2),
                "legato": round(float(rng.uniform(0.2, 1)), 2), "volume": round(float(rng.uniform(-30, -12)), 1),
                "metre": ("4/4", "3/4", "6/8")[rng.integers(3)]}
    change = rng.choice(["tempo", "register", "density"])
    value = {"tempo": round(float(rng.uniform(70, 170))), "register": ("low", "mid", "high")[rng.integers(3)],
             "density": round(float(rng.uniform(0.2, 1)), 2)}[change]
    return controls, [(round(float(rng.uniform(2, seconds - 2)), 2), {change: value})]


def plan(a: argparse.Namespace) -> list[tuple[str, dict]]:
    """Every task, gates first (the longest), then the pieces, then the unmarked sources. A marked piece takes
    every attack (with --quick the next two in turn: each once in all); each unmarked clip the next in turn."""
    rng = np.random.default_rng(a.seed)
    marked_turn, turn = itertools.cycle(ATTACKS), itertools.cycle(ATTACKS)
    per_piece, per_source = (2, 1) if a.quick else (len(ATTACKS), 2)  # per_source: clips per unmarked source
    tasks: list[tuple[str, dict]] = []
    for model_dir in instrument_dirs():
        for marked in (False, True):
            tasks.append(("gate", {"dir": str(model_dir), "marked": marked, "quick": a.quick, "key_seed": a.seed,
                                   "seconds": 10.0 if a.quick else None, "work": str(a.work)}))
    longest = max(x.seconds for x in ATTACKS.values())
    seconds = longest + (2.0 if a.quick else 12.0)  # room for a random offset
    for i in range(a.pieces):
        for category in CATEGORIES:
            instrument = INSTRUMENTS[i % len(INSTRUMENTS)] if category == "composed" else category
            controls, timeline = composed_piece(rng, seconds) if category == "composed" else \
                plain_piece(rng, instrument, seconds)
            clips = int(seconds // longest)
            tasks.append(("piece", {"category": category, "instrument": instrument, "seed": int(rng.integers(1 << 30)),
                                    "serial": int(rng.integers(1 << SERIAL_BITS)), "controls": controls,
                                    "timeline": timeline, "seconds": seconds,
                                    "attacks": [next(marked_turn) for _ in range(per_piece)],
                                    "unmarked_attacks": [next(turn) for _ in range(clips)], "key_seed": a.seed}))
    programs = list(PROGRAMS)
    for i in range(a.fluidsynth):
        tasks.append(("unmarked", {"source": "fluidsynth", "program": programs[i % len(programs)], "index": i,
                                   "seed": int(rng.integers(1 << 30)), "cache": str(a.work / "data"),
                                   "attacks": [next(turn) for _ in range(per_source)], "key_seed": a.seed}))
    for source, count in (("white", a.noise // 2), ("pink", a.noise - a.noise // 2), ("speech", a.speech)):
        for _ in range(count):
            tasks.append(("unmarked", {"source": source, "seed": int(rng.integers(1 << 30)),
                                       "attacks": [next(turn) for _ in range(per_source)], "key_seed": a.seed}))
    return tasks


# -- engine cost --------------------------------------------------------------------------------------------
def engine_cost(key: Key, streams: int, ticks: int) -> dict:
    """Ticks of `streams` default-model streams with the mark and without, alternating; the marker alone."""
    instrument = FrameModel(SHIPPED / "default", device="cpu", threads=1)
    hop = instrument.manifest.hop
    sides = {}
    for name, watermark in (("without", None), ("with", key)):
        engine = Engine(buffer_frames=1, max_streams=streams, budget=None, watermark=watermark)
        group = engine.add_model(instrument)
        made = [engine.create_stream(group, seed=i, controls={"f0": 110.0 * 2 ** ((i % 36) / 12), "loudness": -20.0},
                                     serial=i if watermark is not None else None) for i in range(streams)]
        sides[name] = (engine, [s.listen() for s in made])
    marker = Marker(key, streams, SR, hop)
    for slot in range(streams):
        marker.assign(slot, slot)
    slots, audio = np.arange(streams), np.random.default_rng(0).uniform(-0.1, 0.1, (streams, hop)).astype(np.float32)
    buf = np.empty(hop, np.float32)
    times: dict[str, list[float]] = {"without": [], "with": [], "marker": []}
    warmup = 5
    for i in range(warmup + ticks):
        for name, (engine, readers) in sides.items():
            t0 = time.perf_counter()
            made = engine.tick()
            elapsed = time.perf_counter() - t0
            if made != streams:
                raise RuntimeError(f"a tick made {made} frames for {streams} streams")
            for r in readers:
                r.read(buf)
            if i >= warmup:
                times[name].append(elapsed)
        t0 = time.perf_counter()
        marker.apply(slots, np.full(streams, i), audio)
        if i >= warmup:
            times["marker"].append(time.perf_counter() - t0)
    with_, without, alone = (float(np.median(times[k])) * 1e3 for k in ("with", "without", "marker"))
    return {"streams": streams, "ticks": ticks, "tick_ms_without": without, "tick_ms_with": with_,
            "share": (with_ - without) / with_, "marker_ms": alone, "marker_us_per_stream_frame": 1e3 * alone / streams,
            "marker_share_of_tick": alone / with_, "tick_budget_ms": 1e3 * instrument.manifest.frame_seconds}


# -- report -----------------------------------------------------------------------------------------------
def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def pct(hits: int, n: int) -> float | None:
    return 100.0 * hits / n if n else None


def summarise(results: list[dict]) -> dict:
    """Tables from every task's rows: detection per attack and category, false positives per source, cut ranges,
    gates, mark levels."""
    marked = [(r["spec"]["category"], row) for r in results if r["kind"] == "piece" for row in r["marked"]]
    detection = []
    for attack in dict.fromkeys(row["attack"] for _, row in marked):
        rows = [(c, x) for c, x in marked if x["attack"] == attack]
        entry: dict[str, Any] = {"attack": attack}
        for category in CATEGORIES:
            mine = [x for c, x in rows if c == category]
            entry[category] = pct(sum(x["detected"] for x in mine), len(mine))
        found = [x for _, x in rows if x["detected"]]
        entry |= {"clips": len(rows), "overall": pct(len(found), len(rows)),
                  "min_score": min(x["score"] for _, x in rows),
                  "median_score": float(np.median([x["score"] for _, x in rows])),
                  "bit_errors": sum(x["bit_errors"] for x in found),
                  "wrong_payloads": sum(x["bit_errors"] > 0 for x in found)}
        entry["worst"] = min(v for v in (entry[c] for c in CATEGORIES) if v is not None)
        detection.append(entry)
    negatives = [(r["spec"].get("source", "engine render"), row) for r in results for row in r.get("unmarked", [])]
    sources = []
    for source in dict.fromkeys(s for s, _ in negatives):
        rows = [x for s, x in negatives if s == source]
        sources.append({"source": source, "clips": len(rows), "false_positives": sum(x["detected"] for x in rows),
                        "max_score": max(x["score"] for x in rows), "near": sum(x["score"] >= NEAR for x in rows)})
    total = len(negatives)
    false = sum(x["detected"] for _, x in negatives)
    cuts = [x for _, x in marked if x["attack"].startswith("cut") and x["detected"]]
    both = [x for x in cuts if x["ranges"] and x["ranges"][0][0] <= 1.0 and x["ranges"][-1][1] >= CLIP - 1.0]
    gates: dict[str, dict] = {}
    for run in (r for r in results if r["kind"] == "gate"):
        g = gates.setdefault(run["name"], {"name": run["name"]})
        side = "on" if run["spec"]["marked"] else "off"
        g[f"pass_{side}"], g[f"distance_{side}"], g[f"checks_{side}"] = run["pass"], run["distance"], run["checks"]
        g["seconds"] = run["seconds"]
    for g in gates.values():
        g["distance_change_pct"] = 100 * (g["distance_on"] - g["distance_off"]) / g["distance_off"]
    pieces = [r for r in results if r["kind"] == "piece"]
    levels = {k: min((p["level"][f"{k}_min_db"] for p in pieces if p["level"][f"{k}_min_db"] is not None),
                     default=None) for k in ("mark_bands", "third_octaves")}
    def worst(name: str) -> list[float | None]:
        """Per band, the least dB the mark lay under the signal in any piece (None: quieter than -60 dBFS in all)."""
        table = np.array([[np.nan if v is None else v for v in p["level"][name]] for p in pieces])
        return [None if np.all(np.isnan(c)) else float(np.nanmin(c)) for c in table.T]

    return {
        "detection": detection,
        "false_positives": {"clips": total, "detected": false, "pct": pct(false, total), "threshold": THRESHOLD,
                            "max_score": max(x["score"] for _, x in negatives), "sources": sources,
                            "near_score": NEAR, "near": sum(x["score"] >= NEAR for _, x in negatives),
                            # what the detector's model (each hypothesis N(0, 1), union bound) expects there
                            "near_expected": total * (1 - confidence(NEAR))},
        "cut_ranges": {"detected": len(cuts), "both_sides": len(both),
                       "examples": [{"cut_at_s": x["cut_at_s"], "ranges": x["ranges"]} for x in cuts[:8]]},
        "gates": list(gates.values()),
        "mark_level": {"min_db_mark_bands": levels["mark_bands"], "min_db_third_octaves": levels["third_octaves"],
                       "per_mark_band_min_db": worst("mark_bands"), "per_third_octave_min_db": worst("third_octaves"),
                       "third_octave_centres_hz": list(THIRD_OCTAVES), "pieces": len(pieces),
                       "peak_max": max(p["peak"] for p in pieces)},
    }


def targets(s: dict, cost: dict) -> list[dict]:
    """Each figure of the issue beside its target."""
    rows = {r["attack"]: r for r in s["detection"]}
    out = []

    def add(figure: str, value: Any, target: str, ok: bool | None, text: str) -> None:
        out.append({"figure": figure, "value": value, "text": text, "target": target, "pass": ok})

    for attack, target in (("opus 64k", 99.0), ("opus 32k", 95.0)):
        if attack in rows:
            r = rows[attack]
            add(f"marked clips detected after {attack}", r["overall"], f">= {target:g} %", r["overall"] >= target,
                f"{r['overall']:.1f} % of {r['clips']} (worst column {r['worst']:.1f} %)")
    if "opus 64k" in rows:
        r = rows["opus 64k"]
        add("payload bit errors on those detected after opus 64k", r["bit_errors"], "0", r["bit_errors"] == 0,
            str(r["bit_errors"]))
    fp = s["false_positives"]
    add(f"false positives on {fp['clips']} unmarked clips", fp["pct"], "<= 0.1 %", fp["pct"] <= 0.1,
        f"{fp['pct']:.2f} % ({fp['detected']}; max z {fp['max_score']:.2f}, threshold {fp['threshold']:g})")
    gates = s["gates"]
    on = sum(g["pass_on"] for g in gates)
    add("quality gates with the mark on", on, "all pass", on == len(gates) and all(g["pass_off"] for g in gates),
        f"{on}/{len(gates)} pass (off: {sum(g['pass_off'] for g in gates)}/{len(gates)})")
    change = max(abs(g["distance_change_pct"]) for g in gates)
    add("spectral distance to FluidSynth, change with the mark", change, "< 2 %", change < 2.0,
        f"{change:.2f} %")
    ml = s["mark_level"]
    for name, level in (("the mark's 11 bands", ml["min_db_mark_bands"]),
                        ("1/3 octaves 100 Hz-16 kHz", ml["min_db_third_octaves"])):
        add(f"mark under the signal in {name}, worst", level, ">= 30 dB", level >= 30.0, f"{level:.1f} dB")
    add(f"marker's share of the tick at {cost['streams']} streams", 100 * cost["share"], "<= 5 %",
        cost["share"] <= 0.05,
        f"{100 * cost['share']:.1f} % ({cost['tick_ms_with']:.2f} vs {cost['tick_ms_without']:.2f} ms)")
    return out


def fmt(v: Any, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec) if isinstance(v, float) else str(v)


def report(r: dict) -> str:
    s, cost = r["summary"], r["engine_cost"]
    lines = [f"\n== Detection of marked {CLIP:g} s clips, % detected (z >= {THRESHOLD:g}); key {r['key_id']}",
             f"{'attack':<20}" + "".join(f"{c:>10}" for c in CATEGORIES)
             + f"{'overall':>9}{'clips':>7}{'min z':>7}{'bit err':>9}{'target':>13}"]
    goals = {"opus 64k": 99.0, "opus 32k": 95.0}  # on the overall figure
    for row in s["detection"]:
        goal = goals.get(row["attack"])
        verdict = "-" if goal is None else f">= {goal:g}" + ("" if row["overall"] >= goal else " MISS")
        lines.append(f"{row['attack']:<20}" + "".join(f"{fmt(row[c]):>10}" for c in CATEGORIES)
                     + f"{fmt(row['overall']):>9}{row['clips']:>7}{row['min_score']:>7.1f}{row['bit_errors']:>9}"
                     f"{verdict:>13}")
    c = s["cut_ranges"]
    lines.append(f"cut: the mark found on both sides of the cut (ranges reach both ends) in {c['both_sides']} of "
                 f"{c['detected']} detected clips; e.g. " + "; ".join(
                     f"cut at {x['cut_at_s']:.1f} s -> {x['ranges']}" for x in c["examples"][:3]))
    fp = s["false_positives"]
    lines += [f"\n== False positives on unmarked {CLIP:g} s clips (each through one of the attacks in turn)",
              f"{'source':<20}{'clips':>7}{'marked':>8}{'max z':>8}{f'z >= {NEAR:g}':>10}"]
    lines += [f"{x['source']:<20}{x['clips']:>7}{x['false_positives']:>8}{x['max_score']:>8.2f}{x['near']:>10}"
              for x in fp["sources"]]
    lines.append(f"{'all':<20}{fp['clips']:>7}{fp['detected']:>8}{fp['max_score']:>8.2f}{fp['near']:>10}   threshold "
                 f"{THRESHOLD:g}; the detector's model expects {fp['near_expected']:.1f} clips at z >= {NEAR:g}")
    lines += ["\n== Quality gates on held-out data (models/store.py), mark off / on",
              f"{'instrument':<12}{'off':>6}{'on':>6}{'distance off':>14}{'on':>8}{'change %':>10}"]
    for g in s["gates"]:
        lines.append(f"{g['name']:<12}{'pass' if g['pass_off'] else 'FAIL':>6}{'pass' if g['pass_on'] else 'FAIL':>6}"
                     f"{g['distance_off']:>14.4f}{g['distance_on']:>8.4f}{g['distance_change_pct']:>10.3f}")
    lines.append("distance = models.quality.spectral_distance to the FluidSynth reference (the gate's); change = "
                 "(on - off) / off, the marked render aligned by DELAY")
    ml = s["mark_level"]
    lines += [f"\n== Mark level under the signal, dB (worst over {ml['pieces']} pieces; bands above -60 dBFS)",
              "mark's bands (Hz): " + "  ".join(f"{h}:{fmt(v)}" for h, v in zip(
                  (400, 1000, 1600, 2300, 3000, 3800, 4700, 5700, 6800, 8000, 9400), ml["per_mark_band_min_db"],
                  strict=True)),
              "1/3 octaves (Hz): " + "  ".join(f"{h:g}:{fmt(v)}" for h, v in zip(
                  ml["third_octave_centres_hz"], ml["per_third_octave_min_db"], strict=True))]
    lines += [f"\n== Engine cost, {cost['streams']} streams of the default model, ticks alternating with and without "
              f"the mark ({cost['ticks']} each)",
              f"tick without {cost['tick_ms_without']:.2f} ms, with {cost['tick_ms_with']:.2f} ms (budget "
              f"{cost['tick_budget_ms']:g} ms): the marker's share {100 * cost['share']:.1f} %; Marker.apply alone "
              f"{cost['marker_ms']:.2f} ms ({cost['marker_us_per_stream_frame']:.1f} us per stream-frame, "
              f"{100 * cost['marker_share_of_tick']:.1f} % of the marked tick)"]
    lines += ["\n== Targets (issue 21)", f"{'figure':<58}{'value':<44}{'target':<10}"]
    lines += [f"{t['figure']:<58}{t['text']:<44}{t['target']:<10}{'' if t['pass'] else 'MISS'}" for t in r["targets"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "bench/out/watermark.json", help="JSON results (folder is made)")
    p.add_argument("--pieces", type=int, default=16, help="marked pieces per instrument and composed (default 16)")
    p.add_argument("--fluidsynth", type=int, default=150,
                   help="FluidSynth performances, 2 unmarked clips each (default 150)")
    p.add_argument("--noise", type=int, default=100, help="white and pink noise sources, 2 clips each (default 100)")
    p.add_argument("--speech", type=int, default=170, help="speech-like sources, 2 clips each (default 170)")
    p.add_argument("--streams", type=int, default=256, help="streams for the engine cost (default 256)")
    p.add_argument("--ticks", type=int, default=300, help="ticks each way for the engine cost (default 300)")
    p.add_argument("--seed", type=int, default=0, help="seeds the key, the pieces and the attacks")
    p.add_argument("--work", type=Path, default=default_work(),
                   help=f"work directory as for `wavecast train --work`: the data cache is WORK/data "
                        f"(default {default_work()})")
    p.add_argument("--processes", type=int, default=2, help="detection processes (default 2)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke test of about a minute: 1 piece each, every attack once, 9 unmarked clips, "
                        "10 s gates, 32 streams (overrides the sizes above)")
    a = p.parse_args(argv)
    if a.quick:
        a.pieces, a.fluidsynth, a.noise, a.speech, a.streams, a.ticks = 1, 1, 2, 1, 32, 20
    started = time.perf_counter()
    key = bench_key(a.seed)
    tasks = plan(a)
    log(f"{len(tasks)} tasks on {a.processes} processes: {sum(t[0] == 'piece' for t in tasks)} marked pieces, "
        f"{sum(t[0] == 'unmarked' for t in tasks)} unmarked sources, {sum(t[0] == 'gate' for t in tasks)} gate runs")
    results = []
    with multiprocessing.get_context("fork").Pool(a.processes, maxtasksperchild=50) as pool:
        for i, result in enumerate(pool.imap_unordered(run_task, tasks)):
            results.append(result)
            if i % 10 == 9 or i + 1 == len(tasks) or result["kind"] == "gate":
                log(f"{i + 1}/{len(tasks)} tasks done ({result['kind']}), {time.perf_counter() - started:.0f} s")
    log(f"engine cost: {a.streams} streams, {a.ticks} ticks with and without the mark, alternating")
    cost = engine_cost(key, a.streams, a.ticks)
    summary = summarise(results)
    manifests = [Manifest.read(SHIPPED / name / MANIFEST) for name in (*INSTRUMENTS, "folk")]
    r: dict[str, Any] = {
        "bench": "watermark", "created": datetime.now(UTC).isoformat(timespec="seconds"), "quick": a.quick,
        "date": datetime.now(UTC).date().isoformat(),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores",
        "model": ", ".join(f"{m.name} v{m.version}" for m in manifests),
        "host": {"python": platform.python_version(), "numpy": np.__version__, "av": av.__version__,
                 "libopus": "PyAV's bundled FFmpeg libopus"},
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
        "key_id": f"{key.id:04x}", "threshold": THRESHOLD,
        "gate_targets": {k: list(v) for k, v in QUALITY_TARGETS.items()},
        "summary": summary, "engine_cost": cost,
    }
    r["targets"] = targets(summary, cost)
    r["pass"] = all(t["pass"] for t in r["targets"])
    r["clips"] = [{"kind": x["kind"], "spec": x["spec"], "marked": x.get("marked"), "unmarked": x.get("unmarked"),
                   "level": x.get("level")} for x in results if x["kind"] != "gate"]
    r["seconds"] = round(time.perf_counter() - started, 1)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(r, indent=1) + "\n")
    print(report(r))
    print(f"\nwrote {a.out} in {r['seconds']:g} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
