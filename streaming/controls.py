"""Control values: validated against the manifest (known name, finite number, in range), smoothed per frame."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from wavecast.streaming.model import Manifest


class ControlError(ValueError):
    """A control value the model cannot take; the message says which and what is allowed."""


def validate(manifest: Manifest, values: object) -> dict[str, float]:
    """Checked control values by name; raises ControlError naming the first bad one."""
    if not isinstance(values, Mapping):
        raise ControlError("'controls' must be an object of name: number, e.g. {\"f0\": 440}")
    known = {c.name: c for c in manifest.controls}
    checked = {}
    for name, value in values.items():
        ctl = known.get(name)
        if ctl is None:
            raise ControlError(f"unknown control '{name}'; model '{manifest.name}' takes {', '.join(known)}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ControlError(f"control '{name}' must be a number ({ctl.unit}, {ctl.min:g} to {ctl.max:g})")
        if isinstance(value, float) and not math.isfinite(value):  # an int of any size is finite
            raise ControlError(f"control '{name}' must be a finite number ({ctl.min:g} to {ctl.max:g} {ctl.unit})")
        if not ctl.min <= value <= ctl.max:
            raise ControlError(f"control '{name}' is outside [{ctl.min:g}, {ctl.max:g}] {ctl.unit}; send a value in "
                               "that range")
        checked[name] = float(value)
    return checked


class Controls:
    """Control targets and smoothed values of every slot of one model, one row a stream: a whole batch is
    smoothed with a few array operations. Each frame a value moves by `alpha` of the way to its target
    (one-pole smoothing with the manifest's time constant), so a step in a control never clicks.

    Targets may be set from any thread: each is one element write, seen by the next frame made."""

    def __init__(self, manifest: Manifest, slots: int) -> None:
        self.names = [c.name for c in manifest.controls]
        self.index = {n: i for i, n in enumerate(self.names)}
        self.defaults = np.array([c.default for c in manifest.controls], np.float32)
        self.alpha = np.array(
            [1.0 - math.exp(-manifest.frame_seconds / c.smoothing) if c.smoothing > 0 else 1.0
             for c in manifest.controls], np.float32,
        )
        self.targets = np.zeros((slots, len(self.names)), np.float32)
        self.current = np.zeros_like(self.targets)
        self._target = np.zeros_like(self.targets)  # scratch for a batch

    def reset(self, slot: int, values: Mapping[str, float]) -> None:
        """A new stream in `slot` starts at its controls (defaults for the rest), unsmoothed."""
        row = self.defaults.copy()
        for name, value in values.items():
            row[self.index[name]] = value
        self.targets[slot] = row
        self.current[slot] = row

    def set(self, slot: int, values: Mapping[str, float]) -> None:
        """New targets (already validated)."""
        for name, value in values.items():
            self.targets[slot, self.index[name]] = value

    def jump(self, slot: int, columns: list[int] | slice, values: np.ndarray) -> None:
        """Take `values` for `columns` now, unsmoothed: for control curves already smooth."""
        self.targets[slot, columns] = values
        self.current[slot, columns] = values

    def step(self, slots: np.ndarray, out: np.ndarray) -> None:
        """Advance the streams in `slots` one frame and write their smoothed values into `out` [n, C]."""
        target = self._target[: len(slots)]
        np.take(self.current, slots, axis=0, out=out)
        np.take(self.targets, slots, axis=0, out=target)
        target -= out
        target *= self.alpha
        out += target
        self.current[slots] = out

    def as_dict(self, slot: int) -> dict[str, float]:
        return {n: float(v) for n, v in zip(self.names, self.targets[slot], strict=True)}
