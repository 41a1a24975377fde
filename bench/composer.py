"""What the composer writes and what a composer step costs.

Run from the repository root:  PYTHONPATH=. .venv/bin/python bench/composer.py [--seconds 60] [--seed 7] [--out FILE]
Renders a composed piece through the engine (the same path as a live stream), writes its WAV, MIDI, a PNG
(piano roll over spectrogram) and JSON with figures about the notes: how many, how many in the requested
scale, the phrases (runs ended by a rest or a note twice the median length), how often 4-note melodic
shapes recur (repetition) and how often they recur at another pitch or only as a contour (variation).
It counts clicks in the piece and in the same piece paused, resumed and reset along the way.
Then it shows what density, register and temperature do to the notes, and times one batched composer step
for 1..256 voices. Prints a summary to stdout, progress to stderr.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # one core, set before numpy loads
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from wavecast.daemon.cli import write_wav  # noqa: E402
from wavecast.daemon.midi import write_midi  # noqa: E402
from wavecast.models.quality import count_clicks  # noqa: E402
from wavecast.models.store import ModelStore  # noqa: E402
from wavecast.streaming.composer import ComposerGroup, ComposerModel, Note, Voice  # noqa: E402
from wavecast.streaming.engine import compose  # noqa: E402
from wavecast.streaming.model import FrameModel  # noqa: E402
from wavecast.streaming.notes import Scale, note_name  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def log(msg: str) -> None:
    print(f"[composer] {msg}", file=sys.stderr, flush=True)


def note_figures(notes: list[Note], scale: Scale) -> dict[str, Any]:
    pitched = [n for n in notes if n.midi is not None]
    midis = [n.midi for n in pitched]
    # Phrases: runs of notes ended by a rest or a note at least twice the median note's length.
    long = 2.0 * float(np.median([n.quarters for n in pitched])) if pitched else 2.0
    phrases, current = [], 0
    for n in notes:
        if n.midi is None:
            if current:
                phrases.append(current)
            current = 0
            continue
        current += 1
        if n.quarters >= long:
            phrases.append(current)
            current = 0
    if current:
        phrases.append(current)
    # Repetition: 4-note shapes (intervals + durations) that occur more than once; variation: the same
    # intervals with other durations, or the same shape at another pitch.
    shapes = [tuple(b.midi - a.midi for a, b in zip(pitched[i : i + 4], pitched[i + 1 : i + 4], strict=False))
              + tuple(n.quarters for n in pitched[i : i + 4]) for i in range(len(pitched) - 3)]
    counts = Counter(shapes)
    starts: dict[tuple, set[int]] = {}
    for i, shape in enumerate(shapes):
        starts.setdefault(shape, set()).add(pitched[i].midi)
    contours = Counter(shape[:3] for shape in shapes)
    return {
        "notes": len(pitched), "rests": len(notes) - len(pitched),
        "in_scale_fraction": sum(m % 12 in scale.pitch_classes for m in midis) / max(1, len(midis)),
        "range": [note_name(min(midis)), note_name(max(midis))] if midis else None,
        "pitch_classes": {note_name(pc + 60)[:-1]: c for pc, c in sorted(Counter(m % 12 for m in midis).items())},
        "durations": {str(round(q, 3)): c for q, c in sorted(Counter(n.quarters for n in pitched).items())},
        "phrases": len(phrases), "notes_per_phrase": float(np.mean(phrases)) if phrases else 0.0,
        "shapes": len(shapes),
        "repeated_shape_fraction": sum(c for c in counts.values() if c > 1) / max(1, len(shapes)),
        "transposed_repeat_fraction": sum(c for s, c in counts.items() if len(starts[s]) > 1) / max(1, len(shapes)),
        "contour_repeat_fraction": sum(c for c in contours.values() if c > 1) / max(1, len(shapes)),
    }


RESPONSES = [("density", 0.0), ("density", 0.5), ("density", 1.0), ("register", "low"), ("register", "mid"),
             ("register", "high"), ("temperature", 0.3), ("temperature", 1.5)]


def control_response(model: FrameModel, composer: ComposerModel, seconds: float, seeds: int) -> list[dict]:
    """What a control does to the notes: notes per quarter note, median pitch and the entropy of the notes
    (pitch, duration) in bits, averaged over `seeds` renders at tempo 120 in D major."""
    rows = []
    for name, value in RESPONSES:
        rate, median, bits = [], [], []
        for seed in range(seeds):
            _, notes = compose(model, seconds, seed, {"tempo": 120, name: value}, composer=composer)
            pitched = [n.midi for n in notes if n.midi is not None]
            rate.append(len(notes) / sum(n.quarters for n in notes))
            median.append(float(np.median(pitched)))
            counts = np.array(list(Counter((n.midi, n.quarters) for n in notes).values()), float)
            bits.append(float(-(counts / counts.sum() * np.log2(counts / counts.sum())).sum()))
        rows.append({"control": name, "value": value, "notes_per_quarter": float(np.mean(rate)),
                     "median_midi": float(np.mean(median)), "entropy_bits": float(np.mean(bits))})
        log(f"{name}={value}: {rows[-1]['notes_per_quarter']:.2f} notes a quarter, median MIDI "
            f"{rows[-1]['median_midi']:.1f}, {rows[-1]['entropy_bits']:.2f} bits")
    return rows


def time_steps(composer: ComposerModel, batches: list[int], repeats: int) -> list[dict]:
    """One batched composer step (ORT call + sampling) for B voices, median over `repeats`."""
    rows = []
    for b in batches:
        group = ComposerGroup(composer, b)
        voices = []
        for i in range(b):
            v = Voice(group, i, {}, (30.0, 2000.0), 0.01)
            v.slot = group.pool.allocate()
            v.begin_frame(0)
            voices.append(v)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            group.step(voices)
            times.append(time.perf_counter() - t0)
            for v in voices:
                v.begin_frame(v.frame + 1)
        median = float(np.median(times))
        rows.append({"voices": b, "step_median_us": median * 1e6, "per_note_us": median * 1e6 / b})
        log(f"{b} voices: {median * 1e6:.0f} us a step, {median * 1e6 / b:.1f} us a note")
    return rows


def plot(audio: np.ndarray, notes: list[Note], frame_seconds: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (roll, spec) = plt.subplots(2, 1, figsize=(14, 7), sharex=True)
    for n in notes:
        if n.midi is not None:
            roll.broken_barh([(n.frame * frame_seconds, n.frames * frame_seconds)], (n.midi - 0.4, 0.8))
    roll.set_ylabel("MIDI note")
    roll.set_title(title)
    spec.specgram(audio, NFFT=2048, Fs=48_000, noverlap=1536, cmap="magma", vmin=-120)
    spec.set_ylim(0, 4000)
    spec.set_ylabel("Hz")
    spec.set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="violin", help="instrument (default: %(default)s)")
    p.add_argument("--composer", default="folk", help="composer (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=60.0, help="length of the piece (default: %(default)s)")
    p.add_argument("--seed", type=int, default=7, help="seed (default: %(default)s)")
    p.add_argument("--controls", default='{"tempo": 96, "scale": "D dorian", "temperature": 0.9, "top_k": 8}',
                   help="composer controls as JSON (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="10 s piece, fewer timing repeats (a smoke test)")
    p.add_argument("--store", type=Path, help="model store (default: shipped + $XDG_DATA_HOME/wavecast/models)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "composer.json", help="JSON results")
    p.add_argument("--png", type=Path, default=ROOT / "bench" / "img" / "composer.png", help="piano roll PNG")
    args = p.parse_args(argv)
    seconds = 10.0 if args.quick else args.seconds
    controls = json.loads(args.controls)
    store = ModelStore(args.store)
    model = FrameModel(store.resolve(args.model).directory, device="cpu")
    composer = ComposerModel(store.resolve(args.composer).directory)
    log(f"rendering {seconds:g} s: {args.model} composed by {args.composer}, seed {args.seed}, {controls}")
    t0 = time.perf_counter()
    audio, notes = compose(model, seconds, args.seed, controls, composer=composer)
    elapsed = time.perf_counter() - t0
    figures = note_figures(notes, Scale.parse(controls.get("scale", "D major")))
    figures["clicks"] = count_clicks(audio)
    actions = [(seconds * k / 6, {"action": a}) for k, a in ((2, "pause"), (3, "play"), (4, "reset"))]
    acted, _ = compose(model, seconds, args.seed, controls, actions, composer=composer)
    figures["clicks_with_pause_play_reset"] = count_clicks(acted)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    wav, midi = args.out.with_suffix(".wav"), args.out.with_suffix(".mid")
    write_wav(wav, audio, model.manifest.sample_rate)
    write_midi(midi, notes, model.manifest.frame_seconds, int(model.manifest.source.get("gm_program", 0)))
    out: dict[str, Any] = {
        "model": args.model, "composer": args.composer, "composer_version": composer.manifest.version,
        "seed": args.seed, "seconds": seconds, "controls": controls, "render_seconds": elapsed,
        "x_real_time": seconds / elapsed, "figures": figures, "wav": str(wav), "midi": str(midi),
        "first_notes": [n.to_dict() for n in notes[:24]],
        "composer_nll": composer.manifest.verification.get("quality"),
        "control_response": control_response(model, composer, 5.0 if args.quick else 20.0, 1 if args.quick else 3),
        "step_cost": time_steps(composer, [1, 16, 64, 256], 5 if args.quick else 50),
    }
    try:
        args.png.parent.mkdir(parents=True, exist_ok=True)
        plot(audio, notes, model.manifest.frame_seconds, args.png,
             f"{args.model} / {args.composer}, seed {args.seed}, {controls}")
        out["plot"] = str(args.png)
    except ImportError as e:
        out["plot"] = {"skipped": f"matplotlib not importable ({e}); pip install matplotlib"}
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    f = figures
    print(f"{seconds:g} s rendered in {elapsed:.1f} s ({seconds / elapsed:.1f}x real time): {f['notes']} notes, "
          f"{f['rests']} rests, range {f['range']}, in scale {f['in_scale_fraction']:.1%}, {f['phrases']} phrases "
          f"of {f['notes_per_phrase']:.1f} notes")
    print(f"clicks: {f['clicks']} in the piece, {f['clicks_with_pause_play_reset']} with a pause, play and reset")
    print(f"4-note shapes repeated {f['repeated_shape_fraction']:.1%}, at another pitch "
          f"{f['transposed_repeat_fraction']:.1%}, contour repeated {f['contour_repeat_fraction']:.1%}")
    for row in out["control_response"]:
        print(f"{row['control']:>11} = {row['value']!s:<4}: {row['notes_per_quarter']:.2f} notes a quarter, "
              f"median MIDI {row['median_midi']:.1f}, note entropy {row['entropy_bits']:.2f} bits")
    for row in out["step_cost"]:
        print(f"composer step, {row['voices']:>3} voices: {row['step_median_us']:8.0f} us "
              f"({row['per_note_us']:.1f} us a note)")
    print(f"wrote {args.out}, {wav}, {midi}" + (f", {args.png}" if isinstance(out["plot"], str) else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
