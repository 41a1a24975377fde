"""Does the neural instrument sound like the instrument? Quality figures on its held-out data.

Run from the repository root:  PYTHONPATH=. .venv/bin/python bench/quality.py [--quick] [--model-dir DIR ...]
For each instrument model it rebuilds the model's data recipe from its manifest (same FluidSynth renders,
same cache as `wavecast train`), renders the performances the store's gate measures (unseen seeds and tunes,
`data.unseen`) through the engine (`streaming.engine.render`, the live code path) with every frame's exact
(f0, loudness) from the data and a fixed seed, and compares with the FluidSynth audio, with a dumb baseline
driven by the same controls (`models.quality.baseline`: band-limited sawtooth + noise) and with the per-key
spectral table of the training data (`models.quality.spectral_table`). Prints a table, progress to stderr, writes
JSON (default bench/out/quality.json) and a PNG of spectrograms (default bench/out/quality.png).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from wavecast.models import data, quality
from wavecast.models.store import QUALITY_TARGETS, default_work, meets
from wavecast.streaming.model import FrameModel

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "models" / "shipped"
PLOT_SECONDS = 4.0


def log(msg: str) -> None:
    print(f"[quality] {msg}", file=sys.stderr, flush=True)


def instrument_dirs() -> list[Path]:
    """Every directory under models/shipped/ whose manifest says kind "instrument"."""
    found = []
    for manifest in sorted(SHIPPED.glob("*/model.json")):
        try:
            if json.loads(manifest.read_text()).get("kind") == "instrument":
                found.append(manifest.parent)
        except (OSError, json.JSONDecodeError):
            log(f"skipping {manifest}: unreadable")
    return found


def recipe_of(model: FrameModel) -> tuple[data.Recipe, str | None]:
    """The model's training data recipe from its manifest, and the cache key recorded at training."""
    fields = dict(model.manifest.training.get("data") or {})
    if not fields:
        raise SystemExit(f"{model.directory}: manifest has no training.data recipe to rebuild")
    key = fields.pop("key", None)
    return data.Recipe(**fields), key


def heldout(recipe: data.Recipe, work: Path, quick: bool) -> tuple[list[data.Performance], dict | None]:
    """What the store's gate measures a model on: performances of unseen seeds and tunes (`data.unseen`), and
    the per-key spectral table of the training data (from the cache, rendering and caching the whole dataset
    as training does when it is missing). --quick takes one performance and, with no cache, no table (the
    timbre figures are left out): a smoke test on a fresh machine takes seconds, not minutes."""
    cache = work / "data"
    perfs = data.unseen(recipe, cache, 1 if quick else None)
    if quick and not (cache / f"{recipe.key()}.npz").exists():
        log(f"data: no cache for recipe {recipe.key()}; timbre against the per-key table left out")
        return perfs, None
    dataset = data.build(recipe, cache, progress=lambda line: log(f"data: {line}"))
    return perfs, quality.spectral_table(dataset.train)


def check(name: str, value: float | None) -> dict[str, Any]:
    kind, target = QUALITY_TARGETS[name]
    return {"value": value, "target": target, "kind": kind, "pass": meets(kind, value, target)}


def evaluate(model_dir: Path, work: Path, seconds: float | None, quick: bool, seed: int) -> tuple[dict, dict]:
    """Figures for one model, and the audio of its first performance for the plot."""
    model = FrameModel(model_dir, device="cpu")
    m = model.manifest
    if (m.sample_rate, m.hop) != (data.SAMPLE_RATE, data.HOP):
        raise SystemExit(f"{model_dir}: {m.sample_rate} Hz hop {m.hop}; "
                         f"the data is {data.SAMPLE_RATE} Hz hop {data.HOP}")
    recipe, key = recipe_of(model)
    if key is not None and key != recipe.key():
        log(f"warning: recipe key {recipe.key()} differs from {key} recorded at training (data code or "
            "SoundFont changed): the held-out audio is not what the model was evaluated on")
    log(f"{m.name} v{m.version}: recipe {recipe.key()} (GM program {recipe.program}, {recipe.heldout} held out)")
    perfs, table = heldout(recipe, work, quick)
    if not perfs:
        raise SystemExit(f"{model_dir}: its recipe holds out no performances")
    result, rendered = quality.assess(model, perfs, table, seed, seconds, log=lambda line: log(f"  {line}"))
    checks = {name: check(name, value) for name, value in result["metrics"].items()}
    training = m.training
    return {
        "name": m.name, "version": m.version, "directory": str(model_dir),
        "instrument": m.source.get("instrument"),
        "training": {k: training.get(k) for k in ("steps", "final_loss", "heldout_loss")},
        "data": {**{k: getattr(recipe, k) for k in data.Recipe.__dataclass_fields__}, "key": recipe.key(),
                 "key_matches_training": key is None or key == recipe.key()},
        **result, "checks": checks, "pass": all(c["pass"] for c in checks.values()),
    }, rendered[0]


def plot_spectrograms(results: list[dict], audios: list[dict], path: Path, seconds: float) -> None:
    """Per model one row: FluidSynth | model | baseline, log magnitude in dB on one colour scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, rate = 2048, data.SAMPLE_RATE  # hop n / 4, as in the spectral distance
    fig, axes = plt.subplots(len(results), 3, figsize=(15, 3.6 * len(results)), squeeze=False, sharey=True)
    for row, (result, audio) in enumerate(zip(results, audios, strict=True)):
        specs = {}
        for key in ("reference", "model", "baseline"):
            x = audio[key][: int(seconds * rate)]
            specs[key] = 20 * np.log10(quality.stft_magnitude(x, n) + 1e-6)
        top = max(s.max() for s in specs.values())
        for col, (key, title) in enumerate((("reference", "FluidSynth"), ("model", "model"), ("baseline", "baseline"))):
            ax = axes[row][col]
            spec = specs[key]
            image = ax.imshow(spec, origin="lower", aspect="auto", cmap="magma", vmin=top - 90, vmax=top,
                              extent=(0, spec.shape[1] * n / 4 / rate, 0, rate / 2 / 1000))
            ax.set_ylim(0, 12)
            ax.set_title(f"{result['name']} v{result['version']}: {title}"
                         + (f" (distance {result['spectral_distance'][key]:.3f})" if key != "reference" else ""))
            ax.set_xlabel("s")
            if col == 0:
                ax.set_ylabel("kHz")
        fig.colorbar(image, ax=axes[row].tolist(), label="dB", fraction=0.02)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def fmt(x: Any, spec: str = ".3f") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return format(x, spec)


COLUMNS = ("model", "baseline", "reference")
RELATIONS = {"max": "<= ", "below": "< ", "above": "> "}


def row(name: str, cells: tuple[str, ...], check: dict | None = None) -> str:
    """One table line: metric, model / baseline / FluidSynth cells, target and verdict."""
    target = "-" if check is None else RELATIONS[check["kind"]] + f"{check['target']:g}"
    verdict = "-" if check is None else ("yes" if check["pass"] else "NO")
    model, base, ref = (*cells, "-", "-")[:3]
    return f"{name:<30}{model:>10}{base:>10}{ref:>12}{target:>10}{verdict:>6}"


def report(results: list[dict]) -> str:
    lines = []
    for r in results:
        c, p, d, lc = r["checks"], r["pitch_cents"], r["spectral_distance"], r["loudness_correlation"]
        median = tuple(fmt(p[k]["median"], ".2f") for k in COLUMNS)
        p95 = tuple(fmt(p[k]["p95"], ".2f") for k in COLUMNS)
        unvoiced = tuple(fmt(100 * p[k]["unvoiced_fraction"], ".1f") if p[k]["frames"] else "-" for k in COLUMNS)
        lines += [
            "", f"{r['name']} v{r['version']} ({r['instrument']}, {r['training']['steps']} training steps): "
            f"{r['heldout_evaluated']} held-out performance(s), {r['seconds_evaluated']:.1f} s",
            f"{'metric':<30}{'model':>10}{'baseline':>10}{'FluidSynth':>12}{'target':>10}{'pass':>6}",
            row("spectral distance", (fmt(d["model"]), fmt(d["baseline"]), "0")),
            row("  ratio model / baseline", (fmt(d["ratio"]),), c["spectral_ratio"]),
            f"  (silence scores {fmt(d['silence'])}: a baseline scoring more is no bar to clear)",
            row("pitch |error| median, cents", median, c["pitch_median_cents"]),
            row("pitch |error| p95, cents", p95, c["pitch_p95_cents"]),
            row(f"  unvoiced % of {p['model']['frames']} frames", unvoiced),
            row("loudness correlation", (fmt(lc["model"]), fmt(lc["baseline"]), "1"), c["loudness_correlation"]),
            row("clicks", (str(r["clicks"]["model"]), "-", str(r["clicks"]["reference"])), c["clicks"]),
        ]
        if "log_mel_l1" in r:  # timbre against the per-key table of the training data
            t = r["log_mel_l1"]
            lines.append(f"{'timbre, log-mel L1':<30}{'model':>10}{'table':>10}{'silence':>12}")
            for part, gate in (("all", "table_ratio"), ("onset", "onset_table_ratio")):
                lines += [row(f"  {part} voiced, {t['frames'][part]} frames",
                              tuple(fmt(t[part][k]) for k in quality.TIMBRE_TAKES)),
                          row("  ratio model / table", (fmt(r["metrics"][gate]),), c[gate])]
        lines.append(f"{'all gates':<30}{'PASS' if r['pass'] else 'FAIL':>10}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, action="append",
                        help="model directory (repeatable); default: every instrument under models/shipped/")
    parser.add_argument("--work", type=Path, default=None,
                        help="work directory as for `wavecast train --work`; the data cache is WORK/data "
                             f"(default {default_work()})")
    parser.add_argument("--seconds", type=float, default=None,
                        help="evaluate at most this many seconds of each held-out performance (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 3 s of the first performance only (about 20 s)")
    parser.add_argument("--seed", type=int, default=0, help="engine noise seed and baseline noise seed")
    parser.add_argument("--plot-seconds", type=float, default=PLOT_SECONDS,
                        help=f"seconds of the first held-out performance in the PNG (default {PLOT_SECONDS:g})")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "quality.json", help="JSON output")
    parser.add_argument("--png", type=Path, default=ROOT / "bench" / "out" / "quality.png", help="PNG output")
    a = parser.parse_args(argv)
    started = time.perf_counter()
    seconds = a.seconds if a.seconds is not None else (3.0 if a.quick else None)
    work = a.work or default_work()
    dirs = a.model_dir or instrument_dirs()
    if not dirs:
        raise SystemExit(f"no instrument models under {SHIPPED}; pass --model-dir")

    results, audios = [], []
    for model_dir in dirs:
        result, audio = evaluate(model_dir, work, seconds, a.quick, a.seed)
        results.append(result)
        audios.append(audio)
    out: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": {"seconds": seconds, "quick": a.quick, "seed": a.seed, "work": str(work)},
        "targets": {k: {"kind": kind, "target": t} for k, (kind, t) in QUALITY_TARGETS.items()},
        "models": results,
    }
    try:
        log(f"plotting {a.png}")
        plot_spectrograms(results, audios, a.png, a.plot_seconds)
        out["plot"] = str(a.png)
    except ImportError as e:
        out["plot"] = {"skipped": f"matplotlib not importable ({e}); pip install matplotlib"}
        log(out["plot"]["skipped"])
    out["seconds"] = round(time.perf_counter() - started, 1)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    print(report(results))
    print(f"\nwrote {a.out}" + (f" and {a.png}" if isinstance(out["plot"], str) else "") + f" in {out['seconds']:g} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
