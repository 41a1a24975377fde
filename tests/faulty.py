"""A tiny instrument that honours the frame-model contract and fails on a marked input, for fault tests.

It plays a sine at `f0` and `loudness` (one state: the phase). When a stream's loudness is at the top of
its range (0 dB, the mark) the graph either raises inside ONNX Runtime (`fault="raise"`: a Reshape to a
width that does not divide the batch) or returns NaN for that stream only (`fault="nan"`). Built with
onnx.helper, so the fault is a real runtime error of a real session, not a stub.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from wavecast.streaming.model import file_sha256

SR, HOP = 48_000, 480
MARK_DB = 0.0


def write_faulty_model(directory: Path, name: str, fault: str, version: int = 1) -> Path:
    """Write model.onnx + model.json for an instrument called `name` into `directory`; returns it."""
    directory.mkdir(parents=True, exist_ok=True)
    const = {
        "ramp": np.arange(1, HOP + 1, dtype=np.float32)[None] / SR,  # [1, hop] seconds into the frame
        "two_pi": np.array(2 * np.pi, np.float32), "hop_s": np.array(HOP / SR, np.float32),
        "one": np.array(1.0, np.float32), "twenty": np.array(20.0, np.float32), "ten": np.array(10.0, np.float32),
        "sqrt2": np.array(np.sqrt(2.0), np.float32), "mark": np.array(MARK_DB - 0.5, np.float32),
        "i0": np.array([0], np.int64), "i1": np.array([1], np.int64), "i2": np.array([2], np.int64),
        "minus1": np.array([-1], np.int64),
        "width_ok": np.array([1], np.int64), "width_bad": np.array([7], np.int64),
        "nan": np.array(np.nan, np.float32),
    }
    n = helper.make_node
    nodes = [
        n("Slice", ["control", "i0", "i1", "i2"], ["f0_3"]),  # [B,F,1]
        n("Slice", ["control", "i1", "i2", "i2"], ["loud_3"]),
        n("Squeeze", ["f0_3", "i2"], ["f0"]),  # [B,F]; the engine calls F=1
        n("Squeeze", ["loud_3", "i2"], ["loud"]),
        n("Div", ["loud", "twenty"], ["loud_b"]),
        n("Pow", ["ten", "loud_b"], ["rms"]),
        n("Mul", ["rms", "sqrt2"], ["amp"]),
        n("Mul", ["f0", "ramp"], ["cycles"]),  # [B,hop] with F=1
        n("Add", ["cycles", "state_in.phase"], ["phases"]),
        n("Mul", ["phases", "two_pi"], ["radians"]),
        n("Sin", ["radians"], ["wave"]),
        n("Mul", ["wave", "amp"], ["clean"]),
        n("Mul", ["f0", "hop_s"], ["advance"]),
        n("Add", ["state_in.phase", "advance"], ["phase_sum"]),
        n("Mod", ["phase_sum", "one"], ["state_out.phase"], fmod=1),
        n("Greater", ["loud", "mark"], ["marked"]),  # [B,F]
    ]
    if fault == "raise":
        nodes += [
            n("ReduceMax", ["loud"], ["loudest"], keepdims=0),
            n("Greater", ["loudest", "mark"], ["any_marked"]),
            n("Where", ["any_marked", "width_bad", "width_ok"], ["width"]),
            n("Concat", ["minus1", "width"], ["odd_shape"], axis=0),
            n("Reshape", ["clean", "odd_shape"], ["odd"]),  # B*480 values do not fill rows of 7
            n("Shape", ["clean"], ["clean_shape"]),
            n("Reshape", ["odd", "clean_shape"], ["audio"]),
        ]
    elif fault == "nan":
        nodes += [n("Where", ["marked", "nan", "one"], ["poison"]), n("Mul", ["clean", "poison"], ["audio"])]
    else:
        raise ValueError(f"fault must be 'raise' or 'nan', got {fault}")
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("control", TensorProto.FLOAT, ["B", "F", 2]),
         helper.make_tensor_value_info("noise", TensorProto.FLOAT, ["B", "F", 1]),
         helper.make_tensor_value_info("state_in.phase", TensorProto.FLOAT, ["B", 1])],
        [helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["B", "T"]),
         helper.make_tensor_value_info("state_out.phase", TensorProto.FLOAT, ["B", 1])],
        [numpy_helper.from_array(v, k) for k, v in const.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(directory / "model.onnx"))
    manifest = {
        "name": name, "version": version, "kind": "instrument", "sample_rate": SR, "hop": HOP,
        "controls": [{"name": "f0", "unit": "Hz", "min": 20.0, "max": 2000.0, "default": 440.0, "smoothing": 0.0},
                     {"name": "loudness", "unit": "dB", "min": -80.0, "max": 0.0, "default": -20.0,
                      "smoothing": 0.0}],
        "states": [{"name": "phase", "shape": ["B", 1]}], "noise": 1,
        "onnx": {"file": "model.onnx", "sha256": file_sha256(directory / "model.onnx"), "opset": 17},
        "training": {"command": f"tests/faulty.py write_faulty_model(fault={fault!r})"},
    }
    (directory / "model.json").write_text(json.dumps(manifest, indent=2))
    return directory
