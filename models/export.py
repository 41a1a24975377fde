"""Export an instrument to the frame-model contract and verify the exported graph against torch."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from wavecast.models.instrument import STATE_NAMES, Instrument
from wavecast.streaming.analysis import estimate_f0
from wavecast.streaming.model import BATCH, GRAPH, FrameModel, file_sha256

OPSET = 17


def state_shapes(model: Instrument) -> dict[str, list[int | str]]:
    c = model.cfg
    return {
        "h": [1, BATCH, c.hidden], "c": [1, BATCH, c.hidden], "phase": [BATCH, 1],
        "amp": [BATCH, c.harmonics], "noise_tail": [BATCH, c.noise_window // 2],
    }


def export_onnx(model: Instrument, directory: Path) -> dict:
    """Write `directory/model.onnx` with dynamic batch and frame axes; returns the manifest's `onnx` block."""
    model = model.eval().cpu()
    shapes = state_shapes(model)
    batch, frames = 2, 3
    values = (220.0, -20.0, 0.5)[: model.cfg.controls]  # f0, loudness[, brightness]
    control = torch.stack([torch.full((batch, frames), v) for v in values], dim=-1)
    noise = torch.rand(batch, frames, model.noise_width)
    states = model.initial_state(batch)
    dynamic = {"control": {0: "B", 1: "F"}, "noise": {0: "B", 1: "F"}, "audio": {0: "B", 1: "T"}}
    for name in STATE_NAMES:
        axis = shapes[name].index(BATCH)
        dynamic[f"state_in.{name}"] = {axis: "B"}
        dynamic[f"state_out.{name}"] = {axis: "B"}
    path = directory / GRAPH
    torch.onnx.export(
        model, (control, noise, *states), str(path), dynamo=False, opset_version=OPSET,
        input_names=["control", "noise"] + [f"state_in.{n}" for n in STATE_NAMES],
        output_names=["audio"] + [f"state_out.{n}" for n in STATE_NAMES],
        dynamic_axes=dynamic,
    )
    return {"file": GRAPH, "sha256": file_sha256(path), "opset": OPSET, "synthesis": model.synthesis}


def control_path(steps: int, batch: int, seed: int, columns: int = 2) -> np.ndarray:
    """A demanding control trajectory [batch, steps, columns]: pitch glides and jumps, loudness swells and cuts,
    and with a third column brightness sweeping its range and stepping as a new note's velocity does."""
    rng = np.random.default_rng(seed)
    t = np.arange(steps)[None, :]
    base = rng.uniform(np.log(60.0), np.log(1500.0), size=(batch, 1))
    f0 = np.exp(base + 0.8 * np.sin(2 * np.pi * t / rng.uniform(40, 120, (batch, 1))))
    f0[:, steps // 2 :] *= 1.5  # an octave-and-a-fifth style jump mid-way
    loud = -30.0 + 20.0 * np.sin(2 * np.pi * t / rng.uniform(30, 90, (batch, 1)))
    loud[:, steps // 3 : steps // 3 + 10] = -80.0  # a cut to silence and back
    bright = 0.5 + 0.5 * np.sin(2 * np.pi * t / rng.uniform(20, 60, (batch, 1)))
    bright[:, steps // 4 : steps // 2] = rng.uniform(0.0, 1.0, (batch, 1))  # a step
    return np.stack([np.clip(f0, 30, 2000), loud, bright][:columns], axis=-1).astype(np.float32)


def verify_parity(model: Instrument, frame_model: FrameModel, steps: int = 240, batch: int = 3) -> dict:
    """Run torch and ONNX Runtime side by side frame by frame, carrying state; report the worst gaps."""
    model = model.eval().cpu()
    controls = control_path(steps, batch, seed=1, columns=model.cfg.controls)
    noise = np.random.default_rng(2).random((batch, steps, model.noise_width), dtype=np.float32)
    t_states = model.initial_state(batch)
    o_states = frame_model.zero_states(batch)
    audio_gap = state_gap = 0.0
    with torch.no_grad():
        for i in range(steps):
            ctl, nz = controls[:, i : i + 1], noise[:, i : i + 1]
            t_audio, *t_states = model(torch.from_numpy(ctl), torch.from_numpy(nz), *t_states)
            o_audio, o_states = frame_model.run(ctl, nz, o_states)
            audio_gap = max(audio_gap, float(np.abs(t_audio.numpy() - o_audio).max()))
            for name, t_state in zip(STATE_NAMES, t_states, strict=True):
                gap = np.abs(t_state.numpy() - o_states[name])
                if name == "phase":  # phases (cycles) are compared on the circle
                    gap = np.minimum(gap, 1.0 - gap)
                state_gap = max(state_gap, float(gap.max()))
    return {"steps": steps, "batch": batch, "max_abs_audio": audio_gap, "max_abs_state": state_gap}


def render_constant(frame_model: FrameModel, f0: float, loudness: float, seconds: float, seed: int = 0,
                    others: dict[str, float] | None = None) -> np.ndarray:
    """Mono audio for constant controls (those past f0 and loudness as `others` says, else at their defaults),
    one frame per call as the engine runs it."""
    m = frame_model.manifest
    frames = int(round(seconds / m.frame_seconds))
    rng = np.random.default_rng(seed)
    states = frame_model.zero_states(1)
    control = np.array([[[f0, loudness, *((others or {}).get(c.name, c.default) for c in m.controls[2:])]]],
                       np.float32)
    out = np.empty(frames * m.hop, np.float32)
    for i in range(frames):
        audio, states = frame_model.run(control, rng.random((1, 1, m.noise), dtype=np.float32), states)
        out[i * m.hop : (i + 1) * m.hop] = audio[0]
    return out


def verify_pitch(frame_model: FrameModel, f0s: tuple[float, ...] = (55.0, 110.0, 220.0, 440.0, 880.0, 1760.0)) -> dict:
    """Period of 1 s renders at constant f0 (the last 0.5 s, past the attack), as relative error.

    The search spans half an octave either side of the control, so a tone whose odd harmonics are weak
    (a flute far below its range) is checked for the period the oscillator gives it, not read an octave up.
    """
    sr = frame_model.manifest.sample_rate
    errors = {}
    for f0 in f0s:
        audio = render_constant(frame_model, f0, -20.0, 1.0)
        measured = estimate_f0(audio[sr // 2 :], sr, fmin=f0 / math.sqrt(2), fmax=f0 * math.sqrt(2))
        errors[str(int(f0))] = abs(measured / f0 - 1.0) if math.isfinite(measured) else 1.0
    return {"f0_relative_error": errors, "max_f0_relative_error": max(errors.values())}
