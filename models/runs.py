"""What `wavecast train instrument` and `wavecast train composer` share: resumable checkpoints, and the
ending of a run (refuse and keep a model that misses its gates, else write it out or publish it)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from wavecast.models.store import ModelStore, gate

CHECKPOINT_EVERY = 100  # steps
PROGRESS_EVERY = 25  # steps between progress lines, each with the mean loss over them


def learning_rate(step: int, steps: int, peak: float) -> float:
    """Linear warm-up over the first 5 % of the steps, then cosine decay to zero."""
    warmup = max(1, steps // 20)
    return peak * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))


def progress(done: int, steps: int, history: list[float], lr: float, seconds_per_step: float, unit: str = "") -> str:
    """The progress line of a training step: mean recent loss, learning rate, speed and time left."""
    return (f"step {done}/{steps} loss {sum(history[-PROGRESS_EVERY:]) / len(history[-PROGRESS_EVERY:]):.4f}"
            f"{unit} lr {lr:.2e} {seconds_per_step:.2f} s/step, eta {seconds_per_step * (steps - done) / 60:.1f} min")


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
                return saved["step"], saved["history"], saved["seconds"]
        return 0, [], 0.0

    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, history: list[float],
             seconds: float) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save({"settings": self.settings, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "step": step, "history": history, "seconds": seconds}, tmp)
        os.replace(tmp, self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def deliver(candidate: Path, kind: str, work: Path, name: str, out: Path | None, store: Path | None,
            load: Callable[[Path], object], hint: str) -> tuple[Path, str]:
    """Gate the verified candidate (its model.json written); refused, keep it in WORK/rejected/NAME and exit
    naming the metric and `hint`; else copy it to `out` and load it there as the daemon will, or publish it.
    Returns where the model is and what was done, for the log."""
    verification = json.loads((candidate / "model.json").read_text())["verification"]
    problems = gate(verification, kind)
    if problems:
        rejected = work / "rejected" / name
        shutil.rmtree(rejected, ignore_errors=True)
        shutil.copytree(candidate, rejected)
        raise SystemExit(f"verification failed: {'; '.join(problems)}; the model was not published and is "
                         f"kept for inspection in {rejected} ({hint})")
    if out:
        out.mkdir(parents=True, exist_ok=True)
        for file in ("model.onnx", "model.json"):
            (out / file).write_bytes((candidate / file).read_bytes())
        load(out)  # the contract check, exactly as the daemon will load it
        return out, f"wrote {out}"
    entry = ModelStore(store).publish(candidate)
    return entry.directory, f"published {entry.manifest.name} v{entry.manifest.version} to {entry.directory}"
