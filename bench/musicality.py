"""Does a composed stream sound played and composed? Every figure of issue 19 in one run.

Run from the repository root:  PYTHONPATH=. .venv/bin/python bench/musicality.py [--seeds 5] [--out FILE]
(the 'train' and 'bench' extras; FluidSynth and FluidR3_GM as for training). Prints a table of figures
against their targets and writes JSON (default bench/out/musicality.json) and bench/img/musicality.png.

- headroom: samples at |x| >= 0.999 and the peak, at the loudest documented settings (a composed stream at
  volume 0, tempo 160, density 1; a plain stream at the top of loudness at the bottom, middle and top of f0).
- composed minutes: every shipped instrument x `--seeds` seeds (tempo, scale and metre varied by seed), each
  60 s rendered through the engine as a live stream, and the same notes played by FluidSynth on the
  instrument's GM program as the performer played them (the `--midi` file: its velocities, each note released
  where the performer released it) and, for comparison, held to the next one's start as written:
  * in-phrase frames below -60 dBFS, in-phrase meaning from a note's start to the next note's start where
    the rest between them is shorter than a quarter note;
  * level-matched MFCC Frechet distance to FluidSynth as played (20 coefficients, c0 the level, of 40 mel
    bands; each piece scaled to FluidSynth's RMS), against FluidSynth's own split-half distance (first halves
    of the pieces against second halves); also without c0, where the timbre shows apart from the envelope,
    and against FluidSynth holding every note as written;
  * bars repeated (exactly or moved by one scale step), recurring 4-note shapes, 4-bar phrases ending on
    the tonic (bench/composer.py's definitions).
- the composer's held-out NLL (whole tune families held out, models/corpus.py) beside key-relative Markov
  chains of order 2 and 3 (models/train_composer.py).
- each instrument's log-mel L1 distance to FluidSynth on the performances the store's gate measures
  (`data.unseen`: new seeds, melodies from tunes outside the recipe's melody families), all voiced frames
  and onset frames (the first 60 ms of a note) apart, against a per-key spectral table (each MIDI key's mean
  log-mel shape over the training data's steady frames, at the frame's loudness: the issue's baseline and
  the store's gate for a model without brightness), against that table by key and brightness band (the
  gate's for a model told the brightness), against a finer lookup (each key's mean shape at each 6 dB of
  loudness and each of a note's first 6 frames: the strongest simple method we found) and against silence;
  on steady frames also against each note's own median shape, the floor for anything that holds one shape a
  note, and fits per key on loudness and on brightness (the note's velocity); and whether loudness moves the
  timbre as FluidSynth's samples do (spectral centroid per 10 dB, within each key).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # one core, set before numpy loads
    os.environ[_var] = "1"

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import scipy.linalg  # noqa: E402

from bench.composer import PIECES, form_figures, note_figures  # noqa: E402
from bench.quality import recipe_of  # noqa: E402
from wavecast.daemon.midi import write_midi  # noqa: E402
from wavecast.models import corpus, data  # noqa: E402
from wavecast.models.quality import (  # noqa: E402
    BRIGHTNESS_BANDS,
    MELS,
    ONSET_FRAMES,
    TIMBRE_TAKES,
    assess,
    in_phrase,
    log_mel,
    note_frames,
    spectral_table,
    table_bands,
    timbre_errors,
)
from wavecast.models.store import SHIPPED, default_work  # noqa: E402
from wavecast.streaming.composer import ComposerModel, Note  # noqa: E402
from wavecast.streaming.engine import compose, render  # noqa: E402
from wavecast.streaming.model import FrameModel  # noqa: E402
from wavecast.streaming.notes import Scale  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
INSTRUMENTS = ("violin", "cello", "clarinet", "trumpet", "flute", "default")
SR, HOP = data.SAMPLE_RATE, data.HOP
SILENT_DB = -60.0  # in-phrase frames quieter than this are silent (the issue's figure)
MFCCS = 20
HELDOUT_PERFORMANCES = 4
LEVEL_DB, LOOKUP_MIN_FRAMES = 6.0, 3  # the onset-and-level lookup's loudness bins, and its least-seen cell
TARGETS = {"clipped_samples": 0, "peak_dbfs": -1.0, "in_phrase_silent": 0.02, "mfcc_ratio": 3.0,
           "repeated_bars": 0.25, "recurring_shapes": 0.30, "tonic_endings": 0.25, "composer_nll": 2.0,
           "table_gain": 0.20}


def log(msg: str) -> None:
    print(f"[musicality] {msg}", file=sys.stderr, flush=True)


def mfcc(audio: np.ndarray) -> np.ndarray:
    """[frames, MFCCS]: the orthonormal DCT-II of `log_mel`, c0 (the level) first."""
    x = log_mel(audio)
    k = np.arange(MELS)
    basis = np.cos(np.pi / MELS * (k[None] + 0.5) * np.arange(MFCCS)[:, None]) * np.sqrt(2 / MELS)
    basis[0] /= np.sqrt(2)
    return x @ basis.T


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance of Gaussians fitted to the rows of a and b."""
    ma, mb = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(ca @ cb)
    return float(np.sum((ma - mb) ** 2) + np.trace(ca + cb - 2 * np.real(root)))


def fluidsynth(notes: list[Note], program: int, samples: int, frame_seconds: float) -> np.ndarray:
    """FluidSynth playing `notes` on GM `program` as their MIDI file has them."""
    with tempfile.TemporaryDirectory(prefix="wavecast-bench-") as tmp:
        path = Path(tmp) / "notes.mid"
        write_midi(path, notes, frame_seconds, program)
        return data.render_midi_file(path, samples)


def headroom(composer: ComposerModel) -> list[dict]:
    rows = []
    for name in INSTRUMENTS:
        model = FrameModel(SHIPPED / name, device="cpu")
        f0, loud = model.manifest.control("f0"), model.manifest.control("loudness")
        takes = {"composed at volume 0": render(model, 20.0, 5, {"volume": 0.0, "tempo": 160, "density": 1.0,
                                                                   "vibrato": 1.0}, composer=composer)}
        for where, hz in (("bottom", f0.min), ("middle", (f0.min * f0.max) ** 0.5), ("top", f0.max)):
            takes[f"loudness max, f0 {where}"] = render(model, 5.0, 1, {"f0": hz, "loudness": loud.max})
        for what, audio in takes.items():
            peak = float(np.abs(audio).max())
            rows.append({"instrument": name, "setting": what, "clipped": int(np.sum(np.abs(audio) >= 0.999)),
                         "peak_dbfs": 20 * np.log10(max(peak, 1e-9))})
    return rows


def composed_minutes(composer: ComposerModel, seeds: int, img: Path | None) -> dict[str, Any]:
    rows, pooled = [], {}
    for name in INSTRUMENTS:
        model = FrameModel(SHIPPED / name, device="cpu")
        program = model.manifest.training["data"]["program"]
        fs = model.manifest.frame_seconds
        ours, theirs, held_as_written, halves = [], [], [], ([], [])
        for seed in range(seeds):
            piece = PIECES[seed % len(PIECES)]
            t0 = time.perf_counter()
            audio, notes = compose(model, 60.0, seed, piece, composer=composer)
            ref = fluidsynth(notes, program, len(audio), fs)
            frames = len(audio) // HOP
            loud, ref_loud = data.loudness_db(audio), data.loudness_db(ref)
            phrase = in_phrase(notes, frames)
            scale = Scale.parse(piece["scale"])
            form, shapes = form_figures(notes, scale), note_figures(notes, scale)
            held = fluidsynth([dataclasses.replace(n, sounding=None) for n in notes], program, len(audio), fs)
            power = np.mean(audio.astype(np.float64) ** 2)
            ref, held = (x * np.sqrt(power / max(1e-20, np.mean(x ** 2.0))) for x in (ref, held))
            a, b = mfcc(audio), mfcc(ref)
            ours.append(a)
            theirs.append(b)
            held_as_written.append(mfcc(held))
            halves[0].append(b[: len(b) // 2])
            halves[1].append(b[len(b) // 2 :])
            rows.append({"instrument": name, "seed": seed, **piece, "notes": shapes["notes"],
                         "in_phrase_frames": int(phrase.sum()),
                         "in_phrase_silent": int(np.sum(phrase & (loud < SILENT_DB))),
                         "in_phrase_silent_fluidsynth": int(np.sum(phrase & (ref_loud < SILENT_DB))),
                         "bars": form["bars"], "repeated_bars": form["repeated_bar_fraction"] * form["bars"],
                         "phrases": form["phrases_4bar"], "tonic_endings": form["tonic_ending_fraction"]
                         * form["phrases_4bar"], "shapes": shapes["shapes"],
                         "recurring_shapes": shapes["repeated_shape_fraction"] * shapes["shapes"]})
            log(f"{name} seed {seed}: {shapes['notes']} notes, in-phrase silent {rows[-1]['in_phrase_silent']} of "
                f"{rows[-1]['in_phrase_frames']} frames ({time.perf_counter() - t0:.1f} s)")
            if img is not None and seed == 0:
                pooled[name] = (audio, ref, notes)
        a, b, w = np.concatenate(ours), np.concatenate(theirs), np.concatenate(held_as_written)
        h0, h1 = np.concatenate(halves[0]), np.concatenate(halves[1])
        fd = {"to_fluidsynth": frechet(a, b), "fluidsynth_split_half": frechet(h0, h1),
              "to_fluidsynth_no_c0": frechet(a[:, 1:], b[:, 1:]),
              "fluidsynth_split_half_no_c0": frechet(h0[:, 1:], h1[:, 1:]),
              "to_fluidsynth_held": frechet(a, w)}
        fd["ratio"] = fd["to_fluidsynth"] / fd["fluidsynth_split_half"]
        fd["ratio_no_c0"] = fd["to_fluidsynth_no_c0"] / fd["fluidsynth_split_half_no_c0"]
        fd["ratio_held"] = fd["to_fluidsynth_held"] / fd["fluidsynth_split_half"]
        rows.append({"instrument": name, "mfcc_frechet": fd})
        log(f"{name}: MFCC Frechet to FluidSynth {fd['to_fluidsynth']:.2f}, FluidSynth split-half "
            f"{fd['fluidsynth_split_half']:.2f} ({fd['ratio']:.1f}x; without c0 {fd['ratio_no_c0']:.1f}x; "
            f"held as written {fd['ratio_held']:.1f}x)")
    if img is not None:
        plot(pooled, img)
    pieces = [r for r in rows if "seed" in r]
    total = {k: sum(r[k] for r in pieces) for k in ("in_phrase_frames", "in_phrase_silent",
                                                     "in_phrase_silent_fluidsynth", "bars", "repeated_bars",
                                                     "phrases", "tonic_endings", "shapes", "recurring_shapes")}
    ratios = [r["mfcc_frechet"]["ratio"] for r in rows if "mfcc_frechet" in r]
    return {
        "minutes": len(pieces),
        "in_phrase_silent_fraction": total["in_phrase_silent"] / max(1, total["in_phrase_frames"]),
        "in_phrase_silent_fraction_fluidsynth":
            total["in_phrase_silent_fluidsynth"] / max(1, total["in_phrase_frames"]),
        "repeated_bar_fraction": total["repeated_bars"] / max(1, total["bars"]),
        "recurring_shape_fraction": total["recurring_shapes"] / max(1, total["shapes"]),
        "tonic_ending_fraction": total["tonic_endings"] / max(1, total["phrases"]),
        "mfcc_ratio_worst": max(ratios), "mfcc_ratio_mean": float(np.mean(ratios)), "rows": rows,
    }


def composer_nll(composer: ComposerModel) -> dict[str, Any]:
    """The composer's held-out NLL through ONNX Runtime (each tune from START and zero state), beside the
    count baselines of models/train_composer.py, on the same split its training used."""
    from wavecast.models.train_composer import Song, baseline_nll

    tunes = corpus.load(corpus.SHIPPABLE, None, cache_dir=default_work() / "data",
                        progress=lambda line: log(f"corpus: {line}"))
    held = corpus.heldout_split(tunes)
    train = [Song.of(t) for t, h in zip(tunes, held, strict=True) if not h]
    heldout = [Song.of(t) for t, h in zip(tunes, held, strict=True) if h]
    total, events = 0.0, 0
    for song in heldout:
        x, f, y = song.sequence()
        states = {s.name: np.zeros(s.concrete(1), np.float32) for s in composer.manifest.states}
        pitch, duration, _ = composer.run(x[None].astype(np.int64), f[None], states)
        for logits, target in ((pitch[0], y[:, 0]), (duration[0], y[:, 1])):
            z = logits.astype(np.float64)
            z = z - z.max(1, keepdims=True)
            total -= float(np.sum(z[np.arange(len(target)), target] - np.log(np.exp(z).sum(1))))
        events += len(y)
    out = {"nll": total / events, **baseline_nll(train, heldout), "heldout_tunes": len(heldout),
           "training_tunes": len(train)}
    log(f"composer NLL {out['nll']:.4f} on {len(heldout)} held-out tunes; order-2 Markov {out['markov2_nll']:.4f}, "
        f"order-3 {out['markov3_nll']:.4f}")
    return out


Cell = tuple[int, ...]


def lookup_cells(perf: data.Performance) -> tuple[list[tuple[Cell, Cell, Cell]], np.ndarray]:
    """Each frame's lookup cells, finest first: (key, LEVEL_DB loudness bin, frames into the note up to
    ONSET_FRAMES), (key, frames into the note), (key,); and which frames are voiced."""
    keys, voiced, since = note_frames(perf)
    into = np.minimum(since, ONSET_FRAMES)
    level = np.floor(perf.loudness / LEVEL_DB).astype(int)
    cells = [((int(k), int(b), int(s)), (int(k), int(s)), (int(k),)) for k, b, s in zip(keys, level, into, strict=True)]
    return cells, voiced


def onset_level_lookup(perfs: list[data.Performance]) -> dict[Cell, np.ndarray]:
    """The strongest simple timbre model we found: the mean log-mel shape (relative to the frame's level) of
    each key at each loudness and each of a note's first frames, from the training data; a cell seen fewer
    than LOOKUP_MIN_FRAMES times falls back to a coarser one."""
    sums: dict[Cell, np.ndarray] = {}
    counts: dict[Cell, int] = {}
    for p in perfs:
        shape = log_mel(p.audio) - p.loudness[:, None] / 10.0
        cells, voiced = lookup_cells(p)
        for i in np.flatnonzero(voiced):
            for cell in cells[i]:
                sums[cell] = sums.get(cell, 0) + shape[i]
                counts[cell] = counts.get(cell, 0) + 1
    return {c: sums[c] / counts[c] for c in sums if counts[c] >= LOOKUP_MIN_FRAMES}


def lookup_errors(perf: data.Performance, lookup: dict[Cell, np.ndarray], reference: np.ndarray) -> np.ndarray:
    """Per-frame log-mel L1 of the lookup against `perf`'s audio, whose log-mel is `reference` (the finest cell
    it has; silence where none)."""
    cells, _ = lookup_cells(perf)
    guess = np.full_like(reference, -10.0)
    for i, finest_first in enumerate(cells):
        shape = next((lookup[c] for c in finest_first if c in lookup), None)
        if shape is not None:
            guess[i] = shape + perf.loudness[i] / 10.0
    return np.abs(guess - reference).mean(1)


def note_floor(shape: np.ndarray, since: np.ndarray, steady: np.ndarray) -> np.ndarray:
    """Per-frame log-mel L1 of each note's own median `shape` (log-mel relative to the frame's level) over its
    `steady` frames, against those frames (`since`: frames into the note, `note_frames`'): a bound, not a
    baseline. Anything that holds one shape for a note's steady part, whatever it learned, scores this or
    worse; below it only by following the sound within a note."""
    note = np.cumsum(since == 0)
    errors = np.full(len(shape), np.nan)
    for n in np.unique(note[steady]):
        pick = steady & (note == n)
        errors[pick] = np.abs(shape[pick] - np.median(shape[pick], axis=0)).mean(1)
    return errors


def instrument_gate(name: str) -> dict[str, Any]:
    """The store's timbre gate, as training measures it (`models.quality.assess` on `data.unseen`), on more
    performances: log-mel L1 of the model, the per-key table and silence against FluidSynth; and how
    loudness moves the timbre, model beside FluidSynth."""
    model = FrameModel(SHIPPED / name, device="cpu")
    recipe, _ = recipe_of(model)
    train = data.build(recipe, default_work() / "data").train
    table, lookup = spectral_table(train), onset_level_lookup(train)
    banded = spectral_table(train, BRIGHTNESS_BANDS)  # the gate's table for a model told the brightness
    perfs = data.unseen(recipe, default_work() / "data", HELDOUT_PERFORMANCES)
    assessed, rendered = assess(model, perfs, table)
    l1 = assessed["log_mel_l1"]
    result: dict[str, Any] = {"instrument": name, "brightness": table_bands(model) > 1, "performances": len(perfs),
                              "frames": l1["frames"]["all"], "onset_frames": l1["frames"]["onset"]}
    looked: dict[str, dict[str, list[np.ndarray]]] = {k: {"all": [], "onset": []} for k in ("lookup", "banded")}
    steady: dict[str, list[np.ndarray]] = {"model": [], "reference": [], "loudness": [], "keys": [], "brightness": []}
    held: dict[str, list[np.ndarray]] = {"model": [], "table": [], "banded": [], "lookup": [], "note_floor": []}
    for perf, audio in zip(perfs, rendered, strict=True):
        errors, scored, onset = timbre_errors(audio["model"], perf, table)
        reference = log_mel(perf.audio)
        keys, voiced, since = note_frames(perf)
        errors["lookup"] = lookup_errors(perf, lookup, reference)
        errors["banded"] = np.abs(banded.guess(perf, keys)[0] - reference).mean(1)
        for k in looked:  # on the frames the gate scores
            looked[k]["all"].append(errors[k][scored])
            looked[k]["onset"].append(errors[k][onset])
        frames = voiced & (since >= ONSET_FRAMES)
        for what, x in (("model", log_mel(audio["model"])), ("reference", reference),
                        ("loudness", perf.loudness), ("keys", keys), ("brightness", perf.brightness)):
            steady[what].append(x[frames])
        errors["note_floor"] = note_floor(reference - perf.loudness[:, None] / 10.0, since, frames)
        for take in held:
            held[take].append(errors[take][scored & frames])
    for part in ("all", "onset"):
        other = {k: float(np.concatenate(v[part]).mean()) for k, v in looked.items()}
        result[part] = {**{k: l1[part][k] for k in TIMBRE_TAKES}, **other,
                        "gain_over_table": 1.0 - l1[part]["model"] / l1[part]["table"],
                        "gain_over_banded": 1.0 - l1[part]["model"] / other["banded"],
                        "gain_over_lookup": 1.0 - l1[part]["model"] / other["lookup"]}
    result["steady"] = {take: float(np.concatenate(v).mean()) for take, v in held.items()}
    loud, keys = np.concatenate(steady["loudness"]), np.concatenate(steady["keys"])
    result["brightness_per_10db"] = {k: brightness_slope(np.concatenate(steady[k]), loud, keys)
                                     for k in ("model", "reference")}
    shapes = np.concatenate(steady["reference"]) - loud[:, None] / 10.0
    result["steady_fits"] = steady_fits(shapes, keys, loud, np.concatenate(steady["brightness"]))
    a, o = result["all"], result["onset"]
    log(f"{name}: log-mel L1 model {a['model']:.3f}, table {a['table']:.3f}, lookup {a['lookup']:.3f}, silence "
        f"{a['silence']:.3f} ({a['gain_over_table']:.0%} better than the table); onsets model {o['model']:.3f}, "
        f"table {o['table']:.3f}, lookup {o['lookup']:.3f} ({o['gain_over_table']:.0%}); brightness per 10 dB model "
        f"{result['brightness_per_10db']['model']:.2f}, FluidSynth {result['brightness_per_10db']['reference']:.2f} "
        "mel bands")
    return result


def steady_fits(shapes: np.ndarray, keys: np.ndarray, loudness: np.ndarray, brightness: np.ndarray
                ) -> dict[str, float]:
    """How much of the steady timbre each control explains: log-mel L1 of least-squares fits to `shapes` (steady
    frames, relative to their level) with an intercept per key and slopes shared across keys, on nothing else,
    on loudness, and on loudness and brightness (the note's velocity). Fitted and scored on the same frames, so
    optimistic for all three alike."""
    per_key = (keys[:, None] == np.unique(keys)[None, :]).astype(np.float64)
    v = brightness.astype(np.float64)

    def l1(*columns: np.ndarray) -> float:
        x = np.column_stack([per_key, *columns])
        return float(np.abs(shapes - x @ np.linalg.lstsq(x, shapes, rcond=None)[0]).mean())

    return {"per_key": l1(), "loudness": l1(loudness, loudness**2),
            "loudness_brightness": l1(loudness, loudness**2, v, v**2, loudness * v)}


def brightness_slope(mel: np.ndarray, loudness: np.ndarray, keys: np.ndarray) -> float:
    """How much brighter a note gets when played louder: mel bands of spectral centroid per 10 dB of
    loudness, fitted within each key (the pitch's own brightness held apart)."""
    power = 10.0 ** mel
    centroid = power @ np.arange(MELS) / power.sum(1)
    x, y = loudness.astype(np.float64).copy(), centroid.copy()
    for key in np.unique(keys):
        here = keys == key
        x[here] -= x[here].mean()
        y[here] -= y[here].mean()
    return 10.0 * float(np.sum(x * y) / max(float(np.sum(x * x)), 1e-9))


def plot(pieces: dict[str, tuple[np.ndarray, np.ndarray, list[Note]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(pieces), 2, figsize=(14, 2.6 * len(pieces)), squeeze=False)
    seconds = 12.0
    for row, (name, (audio, ref, notes)) in enumerate(pieces.items()):
        for col, (who, x) in enumerate((("wavecast", audio), ("FluidSynth, same notes", ref))):
            ax = axes[row, col]
            mel = log_mel(x[: int(seconds * SR)])
            ax.imshow(mel.T, origin="lower", aspect="auto", extent=(0, seconds, 0, MELS), vmin=-9, vmax=-1,
                      cmap="magma")
            for n in notes:
                if n.midi is not None and n.frame * HOP < seconds * SR:
                    start, end = n.frame * 0.01, (n.frame + n.frames) * 0.01
                    ax.plot([start, end], [(n.midi - 36) * 0.6] * 2, color="cyan", lw=1.5)
            ax.set_title(f"{name}: {who}", fontsize=9)
            ax.set_ylabel("mel band / piano roll")
    axes[-1, 0].set_xlabel("seconds")
    axes[-1, 1].set_xlabel("seconds")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def report(result: dict[str, Any]) -> str:
    c, n = result["composed"], result["composer"]
    lines = [f"{'figure':58} {'now':>22}  target", "-" * 96]

    def row(what: str, now: str, target: str, ok: bool) -> None:
        lines.append(f"{what:58} {now:>22}  {target}{'' if ok else '  MISS'}")

    if result["headroom"]:
        clipped = sum(r["clipped"] for r in result["headroom"])
        peak = max(r["peak_dbfs"] for r in result["headroom"])
        row("samples at |x| >= 0.999, loudest documented settings", str(clipped), "0", clipped == 0)
        row("peak, dBFS", f"{peak:.2f}", "<= -1", peak <= -1.0 + 1e-6)
    row(f"in-phrase frames below -60 dBFS ({c['minutes']} composed minutes)",
        f"{c['in_phrase_silent_fraction']:.1%}", "<= 2 %", c["in_phrase_silent_fraction"] <= 0.02)
    row("  FluidSynth on the same notes", f"{c['in_phrase_silent_fraction_fluidsynth']:.1%}", "", True)
    pieces = [r for r in c["rows"] if "seed" in r]
    for name in dict.fromkeys(r["instrument"] for r in pieces):  # the clarinet stops between detached notes
        mine = [r for r in pieces if r["instrument"] == name]
        frames = max(1, sum(r["in_phrase_frames"] for r in mine))
        ours, theirs = (sum(r[k] for r in mine) / frames for k in ("in_phrase_silent", "in_phrase_silent_fluidsynth"))
        row(f"  {name} (FluidSynth)", f"{ours:.1%} ({theirs:.1%})", "", True)
    for r in c["rows"]:
        if "mfcc_frechet" in r:
            fd = r["mfcc_frechet"]
            row(f"MFCC Frechet / FluidSynth split-half, {r['instrument']} (no c0; held)",
                f"{fd['ratio']:.1f}x ({fd['ratio_no_c0']:.1f}x; {fd['ratio_held']:.1f}x)", "<= 3x", fd["ratio"] <= 3.0)
    row("bars repeated", f"{c['repeated_bar_fraction']:.1%}", ">= 25 %", c["repeated_bar_fraction"] >= 0.25)
    row("recurring 4-note shapes", f"{c['recurring_shape_fraction']:.1%}", ">= 30 %",
        c["recurring_shape_fraction"] >= 0.30)
    row("4-bar phrases ending on the tonic", f"{c['tonic_ending_fraction']:.1%}", ">= 25 %",
        c["tonic_ending_fraction"] >= 0.25)
    if n is not None:
        row(f"composer NLL, {n['heldout_tunes']} held-out tunes (families)", f"{n['nll']:.3f}", "<= 2.0",
            n["nll"] <= 2.0)
        row("  order-3 / order-2 key-relative Markov", f"{n['markov3_nll']:.3f} / {n['markov2_nll']:.3f}",
            "model below", n["nll"] < n["markov3_nll"])
    for g in result["instruments"]:
        for part in ("all", "onset"):
            s = g[part]
            row(f"log-mel L1 {g['instrument']}, {part} frames: model / table / lookup / silence",
                f"{s['model']:.2f} / {s['table']:.2f} / {s['lookup']:.2f} / {s['silence']:.2f}",
                ">= 20 % under table", s["gain_over_table"] >= 0.20)
            row(f"  {g['instrument']} {part} frames: table by key and brightness band"
                f"{' (the gate' + chr(39) + 's: the model is told it)' if g['brightness'] else ''}",
                f"{s['banded']:.2f} ({s['gain_over_banded']:.0%} over it)", "", True)
        s = g["steady"]
        row(f"  {g['instrument']} steady frames: model / table / lookup / each note's own median",
            f"{s['model']:.2f} / {s['table']:.2f} / {s['lookup']:.2f} / {s['note_floor']:.2f}", "", True)
        f = g["steady_fits"]
        row(f"  {g['instrument']} steady, fitted per key / + loudness / + brightness",
            f"{f['per_key']:.2f} / {f['loudness']:.2f} / {f['loudness_brightness']:.2f}", "", True)
        b = g["brightness_per_10db"]
        row(f"  {g['instrument']} brighter per 10 dB louder: model / FluidSynth (mel bands)",
            f"{b['model']:.2f} / {b['reference']:.2f}", "", True)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=5, help="composed minutes per instrument (default 5)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "musicality.json", help="JSON file to write")
    p.add_argument("--img", type=Path, default=ROOT / "bench" / "img" / "musicality.png",
                   help="spectrograms and piano rolls beside FluidSynth's ('' for none)")
    p.add_argument("--skip", nargs="*", default=[], choices=["headroom", "composer", "instruments"],
                   help="parts to leave out (a quicker run)")
    args = p.parse_args(argv)
    composer = ComposerModel(SHIPPED / "folk")
    result: dict[str, Any] = {"seeds": args.seeds, "targets": TARGETS}
    started = time.time()
    result["headroom"] = [] if "headroom" in args.skip else headroom(composer)
    result["composed"] = composed_minutes(composer, args.seeds, args.img if str(args.img) else None)
    result["composer"] = None if "composer" in args.skip else composer_nll(composer)
    if "instruments" in args.skip:
        result["instruments"] = []
    else:
        result["instruments"] = [instrument_gate(name) for name in INSTRUMENTS]
    result["seconds"] = round(time.time() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=float) + "\n")
    print(report(result))
    print(f"\nwrote {args.out} in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
