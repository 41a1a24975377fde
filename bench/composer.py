"""What the composer writes and what a composer step costs.

Run from the repository root:  PYTHONPATH=. .venv/bin/python bench/composer.py [--seconds 60] [--seed 7] [--out FILE]
Renders a composed piece through the engine (the same path as a live stream), writes its WAV, MIDI, a PNG
(piano roll over spectrogram) and JSON with figures about the notes: how many, how many in the requested
scale, the phrases (runs ended by a rest or a note twice the median length), how often 4-note melodic
shapes recur (repetition) and how often they recur at another pitch or only as a contour (variation).
It counts clicks in the piece and in the same piece paused, resumed and reset along the way.
Then it shows what density, register and temperature do to the notes, and times one batched composer step
for 1..256 voices. Prints a summary to stdout, progress to stderr.

Form and responsiveness (`--form-only` runs just these; notes only, no audio: `compose_notes` plays the same
notes as a render): composed minutes (4 instruments x 5 seeds, varied tempo, scale and metre) for `form`
free and the default, with the bars repeated (exactly or moved by one scale step), recurring 4-note shapes
and 4-bar phrases ending on the tonic; the note rate density 0 / 0.5 / 1 gives; and how much of its
from-start effect a mid-piece change of density or register shows in the 2 bars after it (5 seeds).
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
from wavecast.streaming.composer import CHOICES, ComposerGroup, ComposerModel, Note, Voice, compose_notes  # noqa: E402
from wavecast.streaming.engine import compose  # noqa: E402
from wavecast.streaming.model import FrameModel  # noqa: E402
from wavecast.streaming.notes import Scale, density_rate, note_name  # noqa: E402

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


def _degree(midi: int, scale: Scale) -> int | None:
    """A pitch as steps of its scale from the tonic (octaves counted), None outside the scale."""
    steps = [(scale.tonic + s) % 12 for s in sorted((pc - scale.tonic) % 12 for pc in scale.pitch_classes)]
    if midi % 12 not in steps:
        return None
    return (midi - scale.tonic) // 12 * 7 + steps.index(midi % 12)


def _repeats(bar: list[tuple], other: list[tuple], scale: Scale) -> bool:
    """Bars as (beat, quarters, MIDI or None): the same rhythm and rests, and the same pitches or every pitch
    moved by the same one scale step."""
    if [(b, q, m is None) for b, q, m in bar] != [(b, q, m is None) for b, q, m in other]:
        return False
    pairs = [(_degree(m, scale), _degree(o, scale)) for (_, _, m), (_, _, o) in zip(bar, other, strict=True)
             if m is not None]
    if all(m == o for (_, _, m), (_, _, o) in zip(bar, other, strict=True)):
        return True
    if not pairs or any(d is None or e is None for d, e in pairs):
        return False
    return len({d - e for d, e in pairs}) == 1 and abs(pairs[0][0] - pairs[0][1]) == 1


def form_figures(notes: list[Note], scale: Scale) -> dict[str, Any]:
    """Bars repeated: a bar whose notes (start in the bar, length, rest or pitch) are an earlier bar's,
    exactly or moved by one scale step; 4-bar phrases (bars 1-4, 5-8, ..., not the one the piece stops in)
    whose last pitched note is the tonic. Bars are those the notes carry (`Note.bar`)."""
    bars: dict[int, list[tuple]] = {}
    for n in notes:
        bars.setdefault(n.bar, []).append((round(n.beat, 4), round(n.quarters, 4), n.midi))
    order = sorted(bars)
    repeated = sum(any(_repeats(bars[b], bars[a], scale) for a in order[:i]) for i, b in enumerate(order))
    ends = []
    for first in range(1, (order[-1] if order else 0) - 3, 4):
        pitched = [m for b in range(first, first + 4) for _, _, m in bars.get(b, []) if m is not None]
        if pitched:
            ends.append(pitched[-1] % 12 == scale.tonic)
    return {"bars": len(bars), "repeated_bar_fraction": repeated / max(1, len(bars)), "phrases_4bar": len(ends),
            "tonic_ending_fraction": sum(ends) / max(1, len(ends))}


INSTRUMENTS = ("violin", "cello", "clarinet", "default")
PIECES = [{"tempo": 96, "scale": "D major", "metre": "4/4"}, {"tempo": 132, "scale": "A dorian", "metre": "6/8"},
          {"tempo": 84, "scale": "G major", "metre": "3/4"}, {"tempo": 112, "scale": "E minor", "metre": "4/4"},
          {"tempo": 120, "scale": "F mixolydian", "metre": "2/4"}]


def composed_minutes(composer: ComposerModel, store: ModelStore, form: str, seeds: int) -> dict[str, Any]:
    """Form figures over 60 s pieces: every instrument's range x `seeds` seeds, tempo/scale/metre varied by
    seed; the fractions are over all bars, shapes and phrases together."""
    totals: Counter = Counter()
    for name in INSTRUMENTS:
        f0 = store.resolve(name).manifest.control("f0")
        for seed in range(seeds):
            piece = PIECES[seed % len(PIECES)] | {"form": form}
            notes = compose_notes(composer, 60.0, seed, piece, f0_range=(f0.min, f0.max))
            scale = Scale.parse(piece["scale"])
            f, shapes = form_figures(notes, scale), note_figures(notes, scale)
            totals.update({"minutes": 1, "bars": f["bars"], "phrases": f["phrases_4bar"], "shapes": shapes["shapes"],
                           "repeated_bars": f["repeated_bar_fraction"] * f["bars"],
                           "tonic_endings": f["tonic_ending_fraction"] * f["phrases_4bar"],
                           "recurring_shapes": shapes["repeated_shape_fraction"] * shapes["shapes"]})
    out = {"form": form, "minutes": totals["minutes"], "bars": totals["bars"],
           "repeated_bar_fraction": totals["repeated_bars"] / max(1, totals["bars"]),
           "recurring_shape_fraction": totals["recurring_shapes"] / max(1, totals["shapes"]),
           "tonic_ending_fraction": totals["tonic_endings"] / max(1, totals["phrases"])}
    log(f"form {form}: {out['minutes']} minutes, bars repeated {out['repeated_bar_fraction']:.1%}, 4-note shapes "
        f"recurring {out['recurring_shape_fraction']:.1%}, phrases ending on the tonic "
        f"{out['tonic_ending_fraction']:.1%}")
    return out


def _window(notes: list[Note], start: int, end: int) -> tuple[float, float]:
    """Notes a quarter (rests counted) and median MIDI of the notes starting in frames [start, end)."""
    inside = [n for n in notes if start <= n.frame < end]
    pitched = [n.midi for n in inside if n.midi is not None]
    return (len(inside) / max(1e-9, sum(n.quarters for n in inside)),
            float(np.median(pitched)) if pitched else float("nan"))


MID_CHANGES = [("density", 0.0, 1.0), ("density", 1.0, 0.0), ("register", "low", "high"),
               ("register", "high", "low")]


def mid_piece_response(composer: ComposerModel, seeds: int, at: float = 20.5) -> list[dict]:
    """A control changed at `at` s (tempo 120, 4/4: half a bar into bar 11) against the same value from the
    start and the old value kept, over the 2 bars after the change: response = (changed - kept) /
    (from start - kept), of notes a quarter (density) or median MIDI (register), averaged over `seeds`."""
    rows = []
    frames = int(round(at / 0.01)), int(round((at + 4.0) / 0.01))  # 2 bars at 120 = 4 s
    for name, old, new in MID_CHANGES:
        figure = 0 if name == "density" else 1
        kept, start, changed = [], [], []
        for seed in range(seeds):
            base = {"tempo": 120.0, "scale": "D major", "form": CHOICES["form"]}
            kept.append(_window(compose_notes(composer, at + 4.0, seed, base | {name: old}), *frames)[figure])
            start.append(_window(compose_notes(composer, at + 4.0, seed, base | {name: new}), *frames)[figure])
            changed.append(_window(compose_notes(composer, at + 4.0, seed, base | {name: old}, [(at, {name: new})]),
                                   *frames)[figure])
        k, s, c = float(np.nanmean(kept)), float(np.nanmean(start)), float(np.nanmean(changed))
        rows.append({"control": name, "from": old, "to": new, "kept": k, "from_start": s, "changed": c,
                     "response": (c - k) / (s - k) if s != k else float("nan")})
        log(f"{name} {old} -> {new}: kept {k:.2f}, from start {s:.2f}, changed mid-piece {c:.2f} "
            f"({rows[-1]['response']:.0%} of the from-start effect within 2 bars)")
    return rows


def density_rates(composer: ComposerModel, seeds: int) -> list[dict]:
    """Notes a quarter (rests counted) over 60 s at tempo 120 against the rate each density asks for."""
    rows = []
    for density in (0.0, 0.5, 1.0):
        rates = []
        for seed in range(seeds):
            notes = compose_notes(composer, 60.0, seed, {"tempo": 120.0, "density": density})
            rates.append(len(notes) / sum(n.quarters for n in notes))
        rows.append({"density": density, "asked": density_rate(density), "notes_per_quarter": float(np.mean(rates))})
        log(f"density {density}: {rows[-1]['notes_per_quarter']:.2f} notes a quarter (asked "
            f"{rows[-1]['asked']:.2f})")
    return rows


def corpus_figures(tunes: int) -> dict[str, Any]:
    """The same figures on the first `tunes` tunes of each shippable corpus collection (the parsed corpus is
    cached in `wavecast train`'s work directory), bars counted from the first full bar after a pickup."""
    from wavecast.models import corpus
    from wavecast.models.store import default_work

    totals: Counter = Counter()
    for tune in corpus.load(corpus.SHIPPABLE, tunes, default_work() / "data", log):
        position = -((tune.bar - tune.start) % tune.bar)  # the pickup's notes fall in bar 0 and are left out
        notes = []
        for midi, quarters in tune.events:
            bar = int((position + 1e-6) // tune.bar)
            if bar >= 0:
                notes.append(Note(0, 0, midi, quarters, bar + 1, position - bar * tune.bar + 1.0, tune.scale, 120.0))
            position += quarters
        scale = Scale.parse(tune.scale)
        f, shapes = form_figures(notes, scale), note_figures(notes, scale)
        totals.update({"tunes": 1, "bars": f["bars"], "phrases": f["phrases_4bar"], "shapes": shapes["shapes"],
                       "repeated_bars": f["repeated_bar_fraction"] * f["bars"],
                       "tonic_endings": f["tonic_ending_fraction"] * f["phrases_4bar"],
                       "recurring_shapes": shapes["repeated_shape_fraction"] * shapes["shapes"]})
    return {"form": "corpus", "tunes": totals["tunes"], "bars": totals["bars"],
            "repeated_bar_fraction": totals["repeated_bars"] / max(1, totals["bars"]),
            "recurring_shape_fraction": totals["recurring_shapes"] / max(1, totals["shapes"]),
            "tonic_ending_fraction": totals["tonic_endings"] / max(1, totals["phrases"])}


def form_and_response(composer: ComposerModel, store: ModelStore, seeds: int, corpus_tunes: int) -> dict[str, Any]:
    """Form figures for `free` and the default form (and the corpus), the density rates and the mid-piece
    response; prints them as a table."""
    rows = [composed_minutes(composer, store, form, seeds) for form in ("free", CHOICES["form"])]
    if corpus_tunes:
        rows.append(corpus_figures(corpus_tunes))
    out = {"form": rows, "density": density_rates(composer, seeds), "mid_piece": mid_piece_response(composer, 5)}
    print(f"{'form':>8} | {'minutes':>9} | {'bars repeated':>13} | {'4-note shapes recurring':>23} | "
          "4-bar phrases ending on the tonic")
    for r in rows:
        amount = f"{r['tunes']} tunes" if r["form"] == "corpus" else f"{r['minutes']}"
        print(f"{r['form']:>8} | {amount:>9} | {r['repeated_bar_fraction']:>13.1%} | "
              f"{r['recurring_shape_fraction']:>23.1%} | {r['tonic_ending_fraction']:.1%}")
    for r in out["density"]:
        print(f"density {r['density']:<3}: {r['notes_per_quarter']:.2f} notes a quarter (asked {r['asked']:.2f}, "
              f"{r['notes_per_quarter'] / r['asked'] - 1:+.0%})")
    for r in out["mid_piece"]:
        print(f"{r['control']} {r['from']} -> {r['to']} mid-piece: {r['changed']:.2f} in the next 2 bars; kept "
              f"{r['kept']:.2f}, from the start {r['from_start']:.2f}: {r['response']:.0%} of the effect")
    return out


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
    p.add_argument("--quick", action="store_true",
                   help="10 s piece, fewer timing repeats, 4 composed minutes and no corpus (a smoke test)")
    p.add_argument("--form-only", action="store_true", help="only the form and control-response figures")
    p.add_argument("--form-seeds", type=int, default=5,
                   help="seeds per instrument for the form figures (default: %(default)s: 20 composed minutes)")
    p.add_argument("--corpus-tunes", type=int, default=50,
                   help="tunes per corpus collection to measure beside them, 0 for none (default: %(default)s)")
    p.add_argument("--store", type=Path, help="model store (default: shipped + $XDG_DATA_HOME/wavecast/models)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "composer.json", help="JSON results")
    p.add_argument("--png", type=Path, default=ROOT / "bench" / "img" / "composer.png", help="piano roll PNG")
    args = p.parse_args(argv)
    seconds = 10.0 if args.quick else args.seconds
    controls = json.loads(args.controls)
    store = ModelStore(args.store)
    model = FrameModel(store.resolve(args.model).directory, device="cpu")
    composer = ComposerModel(store.resolve(args.composer).directory)
    form = form_and_response(composer, store, *((1, 0) if args.quick else (args.form_seeds, args.corpus_tunes)))
    if args.form_only:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"composer": args.composer, "composer_version": composer.manifest.version,
                                        **form}, indent=2) + "\n")
        print(f"wrote {args.out}")
        return 0
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
        "step_cost": time_steps(composer, [1, 16, 64, 256], 5 if args.quick else 50), **form,
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
