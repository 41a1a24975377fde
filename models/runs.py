"""What `wavecast train instrument` and `wavecast train composer` share: resumable checkpoints, the run's
log and loss curve, and the ending of a run (refuse and keep a model that misses its gates, else write it out or
publish it)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter

from wavecast.models.store import EXTRAS, ModelStore, gate

CHECKPOINT_EVERY = 100  # steps
PROGRESS_EVERY = 25  # steps between progress lines, each with the mean loss over them


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass
class Reporting:
    """Where a run's log lines and progress events go. By default lines go to stderr and events nowhere;
    the CLI's progress bar and the jobs worker (models/worker.py) replace them."""

    line: Callable[[str], None] = _stderr
    event: Callable[[dict], None] = lambda event: None


REPORTING = Reporting()


def log(msg: str) -> None:
    REPORTING.line(f"[train] {msg}")


def report(phase: str, **fields: object) -> None:
    """A progress event: the phase the run is in (data, train, export, verify, publish, in that order) and what
    it knows of it."""
    REPORTING.event({"phase": phase, **fields})


def learning_rate(step: int, steps: int, peak: float) -> float:
    """Linear warm-up over the first 5 % of the steps, then cosine decay to zero."""
    warmup = max(1, steps // 20)
    return peak * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))


def progress(done: int, steps: int, history: list[float], lr: float, seconds_per_step: float, unit: str = "") -> str:
    """Report a training step (mean recent loss, time left) and return its progress line: the loss, learning
    rate, speed and time left."""
    loss = sum(history[-PROGRESS_EVERY:]) / len(history[-PROGRESS_EVERY:])
    eta = seconds_per_step * (steps - done)
    report("train", step=done, steps=steps, loss=round(loss, 6), eta_seconds=round(eta, 1))
    return (f"step {done}/{steps} loss {loss:.4f}{unit} lr {lr:.2e} {seconds_per_step:.2f} s/step, "
            f"eta {eta / 60:.1f} min")


class Checkpoint:
    """A run's state in WORK/runs/NAME-<hash of its settings>.pt: the same command resumes it; other
    settings (data, model code, steps...) start afresh."""

    def __init__(self, work: Path, name: str, settings: dict) -> None:
        self.settings = settings
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
        self.path = work / "runs" / f"{name}-{digest}.pt"

    def resume(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: str
               ) -> tuple[int, list[float], float]:
        """Load a saved run into `model` and `optimizer`: (next step, loss history, seconds spent so far)."""
        if self.path.exists():
            saved = torch.load(self.path, map_location=device)
            if saved["settings"] == self.settings:
                model.load_state_dict(saved["model"])
                optimizer.load_state_dict(saved["optimizer"])
                report("train", checkpoint=str(self.path), resumed_from=saved["step"])
                return saved["step"], saved["history"], saved["seconds"]
        report("train", checkpoint=str(self.path), resumed_from=0)
        return 0, [], 0.0

    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, history: list[float],
             seconds: float) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save({"settings": self.settings, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "step": step, "history": history, "seconds": seconds}, tmp)
        os.replace(tmp, self.path)
        report("train", checkpoint=str(self.path), checkpoint_step=step)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def timings(started: float, loop_start: float, loop_end: float, first: int, steps: int) -> dict:
    """Where this process's run spent its time, in seconds (a resumed run's earlier steps are counted in its
    manifest's `training.seconds`, not here): data before the loop, the steps, and evaluation, export and
    verification after it, up to now."""
    done = steps - first
    return {"resumed_at_step": first, "before_training": round(loop_start - started, 1),
            "training": round(loop_end - loop_start, 1),
            "seconds_per_step": round((loop_end - loop_start) / done, 4) if done else None,
            "after_training": round(time.time() - loop_end, 1)}


def write_record(candidate: Path, manifest: dict, history: list[float], spent: dict, unit: str,
                 heldout: float | None) -> None:
    """The run's JSON log (`training.json`: the loss of every step, timings, the settings of its manifest's
    `training` block, the held-out loss) and its loss curve (`curve.png`), beside the candidate's model: the
    store publishes them with it. A non-finite loss is written as null (JSON has no NaN)."""
    losses = [x if math.isfinite(x) else None for x in history]
    training = manifest["training"]
    record = {"name": manifest["name"], "kind": manifest["kind"], "unit": unit, "settings": training,
              "timings": spent, "heldout_loss": heldout, "loss": losses}
    (candidate / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    figure = Figure(figsize=(8, 4.5), dpi=100, layout="constrained")
    ax = figure.add_subplot()
    steps = np.arange(1, len(history) + 1)
    ax.plot(steps, history, lw=0.6, alpha=0.35, color="tab:blue", label="loss of each step")
    if len(history) >= PROGRESS_EVERY:
        mean = np.convolve(history, np.ones(PROGRESS_EVERY) / PROGRESS_EVERY, mode="valid")
        ax.plot(steps[PROGRESS_EVERY - 1:], mean, lw=1.6, color="tab:blue", label=f"mean of {PROGRESS_EVERY} steps")
    if heldout is not None:
        ax.axhline(heldout, ls="--", color="tab:orange", label="held-out loss")
    if all(x > 0 for x in history):
        ax.set_yscale("log")
        for set_format in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            set_format(FormatStrFormatter("%g"))  # 0.6, not 6 x 10^-1
    ax.set(xlabel="step", ylabel=unit, title=f"{manifest['name']}: {manifest['kind']}, {len(history)} steps, "
                                            f"{training['seconds']:.0f} s")
    ax.grid(alpha=0.3)
    ax.legend()
    figure.savefig(candidate / "curve.png", format="png")


def deliver(candidate: Path, kind: str, work: Path, name: str, out: Path | None, store: Path | None,
            load: Callable[[Path], object], hint: str) -> tuple[Path, str]:
    """Gate the verified candidate (its model.json written); refused, keep it in WORK/rejected/NAME and exit
    naming the metric and `hint`; else copy it to `out` and load it there as the daemon will, or publish it.
    Returns where the model is and what was done, for the log."""
    verification = json.loads((candidate / "model.json").read_text())["verification"]
    report("publish")
    problems = gate(verification, kind)
    if problems:
        rejected = work / "rejected" / name
        shutil.rmtree(rejected, ignore_errors=True)
        shutil.copytree(candidate, rejected)
        refusal = (f"verification failed: {'; '.join(problems)}; the model was not published and is kept for "
                   f"inspection in {rejected} ({hint})")
        report("publish", refused=refusal)
        raise SystemExit(refusal)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        for file in ("model.onnx", "model.json", *EXTRAS):
            if (candidate / file).exists():
                (out / file).write_bytes((candidate / file).read_bytes())
        load(out)  # the contract check, exactly as the daemon will load it
        return out, f"wrote {out}"
    entry = ModelStore(store).publish(candidate)
    report("publish", model=entry.manifest.name, version=entry.manifest.version)
    return entry.directory, f"published {entry.manifest.name} v{entry.manifest.version} to {entry.directory}"
