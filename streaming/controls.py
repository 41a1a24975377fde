"""Control values: validated against the manifest (known name, finite number, in range), smoothed per frame."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from streaming.model import Manifest


class ControlError(ValueError):
    """A control value the model cannot take; the message says which and what is allowed."""


def validate(manifest: Manifest, values: object) -> dict[str, float]:
    """Checked control values by name; raises ControlError naming the first bad one."""
    if not isinstance(values, Mapping):
        raise ControlError(f"'controls' must be an object of name: number, got {type(values).__name__}")
    known = {c.name: c for c in manifest.controls}
    checked = {}
    for name, value in values.items():
        ctl = known.get(name)
        if ctl is None:
            raise ControlError(f"unknown control '{name}'; model '{manifest.name}' takes {', '.join(known)}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ControlError(f"control '{name}' must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ControlError(f"control '{name}' must be finite, got {value!r}")
        if not ctl.min <= value <= ctl.max:
            raise ControlError(f"control '{name}' = {value} is outside [{ctl.min:g}, {ctl.max:g}] {ctl.unit}")
        checked[name] = float(value)
    return checked


class Smoother:
    """Per-frame one-pole smoothing of control targets, so steps in a control never click."""

    def __init__(self, manifest: Manifest, targets: Mapping[str, float]) -> None:
        self.names = [c.name for c in manifest.controls]
        self.targets = np.array([targets.get(c.name, c.default) for c in manifest.controls], np.float32)
        self.current = self.targets.copy()
        self.alpha = np.array(
            [1.0 - math.exp(-manifest.frame_seconds / c.smoothing) if c.smoothing > 0 else 1.0
             for c in manifest.controls], np.float32,
        )

    def set(self, values: Mapping[str, float]) -> None:
        """New targets (already validated); safe to call from another thread than `step`."""
        targets = self.targets.copy()
        for name, value in values.items():
            targets[self.names.index(name)] = value
        self.targets = targets  # one reference swap: the engine sees the old or the new array, never a mix

    def jump(self, values: np.ndarray) -> None:
        """Take `values` (all controls, manifest order) now, unsmoothed: for control curves already smooth."""
        self.targets = np.asarray(values, np.float32).copy()
        self.current = self.targets.copy()

    def step(self, out: np.ndarray) -> None:
        """Advance one frame and write the smoothed values into `out`."""
        self.current += self.alpha * (self.targets - self.current)
        out[:] = self.current

    def as_dict(self) -> dict[str, float]:
        return {n: float(v) for n, v in zip(self.names, self.targets, strict=True)}
