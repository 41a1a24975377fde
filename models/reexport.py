"""`wavecast export`: re-export a published instrument's graph with today's synthesis, without retraining.

The trained weights are read back out of the model's ONNX file (the Linear and LayerNorm tensors keep their
torch names, the LSTM's W/R/B are reordered from ONNX gate order i,o,f,c to torch's i,f,g,o), loaded into
``Instrument`` and first checked against the file they came from with the formulation it was exported
with (``oscillator="blocks"``): that proves the weights were mapped right. Then the graph is exported with
the current forward, verified torch against ONNX Runtime over 240 stateful steps (as training verifies)
and against the old graph on the same inputs, its held-out quality measured again through the engine on
the data recipe it was trained with (unless --no-quality) and passed through the store's gate, and written
with a manifest that keeps the model's name, version, controls, states and training provenance, takes this
code's control smoothing, and records the re-export under ``training.reexport``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from wavecast.models import data, quality
from wavecast.models.export import control_path, export_onnx, state_shapes, verify_parity, verify_pitch
from wavecast.models.instrument import Instrument, InstrumentConfig
from wavecast.models.store import gate, judge
from wavecast.models.train import CONTROL_SMOOTHING_SECONDS
from wavecast.streaming.model import GRAPH, MANIFEST, FrameModel, Manifest, checked_graph, file_sha256

ORIGIN_LIMIT = 1e-5  # max |torch - ORT| of the weights read back, run as the graph they came from (~1e-6)
EQUIVALENCE_STEPS = 240
EQUIVALENCE_SNR_DB = 60.0  # the new graph's audio vs the old one's, over the equivalence run
LSTM_GATES = [0, 2, 3, 1]  # torch's i, f, g, o blocks, taken from ONNX's i, o, f, c
LINEARS = ("inp.0", "out.0", "out.3")  # the graph's MatMul nodes are named after these modules


def log(msg: str) -> None:
    print(f"[export] {msg}", file=sys.stderr, flush=True)


def torch_gates(x: np.ndarray) -> np.ndarray:
    """LSTM weights or biases stacked by gate in ONNX order (i, o, f, c) -> torch order (i, f, g, o)."""
    h = x.shape[0] // 4
    return np.concatenate([x[g * h : (g + 1) * h] for g in LSTM_GATES])


def weights_from_onnx(path: Path, hidden: int) -> dict[str, torch.Tensor]:
    """The torch state dict's parameters of an instrument, read back from its exported graph."""
    graph = onnx.load(str(path)).graph
    init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    state: dict[str, np.ndarray] = {}
    for name in ("inp.0.bias", "inp.1.weight", "inp.1.bias", "out.0.bias", "out.1.weight", "out.1.bias",
                 "out.3.bias"):
        state[name] = init[name]
    for node in graph.node:
        if node.op_type == "MatMul":
            module = next((m for m in LINEARS if node.output[0].startswith(f"/{m.split('.')[0]}/{m}/")), None)
            if module is not None:
                state[f"{module}.weight"] = init[node.input[1]].T  # torch keeps Linear weights [out, in]
        elif node.op_type == "LSTM":
            w, r, b = (init[node.input[i]][0] for i in (1, 2, 3))  # one direction
            h = w.shape[0] // 4
            if h != hidden:
                raise ValueError(f"{path}: LSTM hidden size {h}, the manifest says {hidden}")
            state.update({"lstm.weight_ih_l0": torch_gates(w), "lstm.weight_hh_l0": torch_gates(r),
                          "lstm.bias_ih_l0": torch_gates(b[: 4 * h]), "lstm.bias_hh_l0": torch_gates(b[4 * h :])})
    missing = [f"{m}.weight" for m in LINEARS if f"{m}.weight" not in state]
    if missing or "lstm.weight_ih_l0" not in state:
        raise ValueError(f"{path}: cannot find {missing or ['the LSTM']} in the graph")
    return {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in state.items()}


def graph_synthesis(manifest: Manifest) -> dict:
    """How the manifest's graph synthesises; graphs exported before this was recorded used "blocks"."""
    return dict(manifest.onnx.get("synthesis") or {"oscillator": "blocks"})


def load_instrument(directory: Path, synthesis: dict | None = None) -> tuple[Instrument, Manifest]:
    """The instrument in `directory` as a torch module with its trained weights, synthesising as
    `synthesis` says (default: today's formulation; `graph_synthesis(manifest)` gives the file's own)."""
    manifest = Manifest.read(directory / MANIFEST)
    if manifest.kind != "instrument":
        raise ValueError(f"{directory / MANIFEST}: kind '{manifest.kind}', only instruments can be re-exported")
    cfg = InstrumentConfig(**manifest.training.get("model", {}))
    model = Instrument(cfg, **(synthesis or {}))
    params = weights_from_onnx(checked_graph(directory, manifest), cfg.hidden)
    want = {k for k, _ in model.named_parameters()}
    if set(params) != want:
        raise ValueError(f"{directory}: parameters {sorted(set(params) ^ want)} do not match the model")
    model.load_state_dict(params, strict=False)  # buffers come from the config
    return model.eval(), manifest


def equivalence(new: FrameModel, old: FrameModel, steps: int = EQUIVALENCE_STEPS, batch: int = 3,
                seed: int = 1, controls: np.ndarray | None = None) -> dict:
    """Both graphs side by side over `steps` stateful frames on the same controls and noise: the largest
    audio gap, and the signal-to-difference ratio (old audio energy over the energy of new - old; None when
    the audio is identical, as a re-export with the synthesis unchanged makes it)."""
    columns = len(old.manifest.controls)
    controls = control_path(steps, batch, seed, columns) if controls is None else controls
    batch, steps = controls.shape[:2]
    noise = np.random.default_rng(seed + 1).random((batch, steps, old.manifest.noise), dtype=np.float32)
    s_new, s_old = new.zero_states(batch), old.zero_states(batch)
    gap = signal = error = 0.0
    for i in range(steps):
        ctl, nz = controls[:, i : i + 1], noise[:, i : i + 1]
        a_new, s_new = new.run(ctl, nz, s_new)
        a_old, s_old = old.run(ctl, nz, s_old)
        diff = a_new.astype(np.float64) - a_old
        gap = max(gap, float(np.abs(diff).max()))
        signal += float(np.sum(a_old.astype(np.float64) ** 2))
        error += float(np.sum(diff**2))
    snr = float(10 * np.log10(signal / error)) if error > 0 else None
    rms = (signal / (batch * steps * old.manifest.hop)) ** 0.5
    return {"steps": steps, "batch": batch, "max_abs_diff": gap, "snr_db": snr, "signal_rms": rms}


def heldout_quality(model: FrameModel, manifest: Manifest, work: Path) -> dict:
    """`verification.quality` measured again as training measures it: on performances of unseen seeds and
    tunes (`data.unseen`) of the model's own data recipe, against the fair table of its training data."""
    recorded = dict(manifest.training.get("data") or {})
    key = recorded.pop("key", None)
    try:
        recipe = data.Recipe(**recorded)
    except TypeError as e:
        raise SystemExit(f"{manifest.name}: training.data is not a data recipe of this code ({e}); "
                         "re-export with --no-quality") from None
    if recipe.key() != key:
        raise SystemExit(f"{manifest.name}: training.data gives recipe {recipe.key()}, the manifest says {key} "
                         "(the data code changed); re-export with --no-quality")
    dataset = data.build(recipe, work / "data", progress=lambda line: log(f"data: {line}"))
    table = quality.spectral_table(dataset.train, quality.table_bands(model))
    assessed, _ = quality.assess(model, data.unseen(recipe, work / "data"), table,
                                 log=lambda line: log(f"{manifest.name} quality: {line}"))
    return quality.verification_quality(assessed)


def reexport(source: Path, out: Path, command: str, revision: str, work: Path | None) -> dict:
    """Re-export the instrument in `source` into `out` (may be the same directory); returns the report."""
    started = time.time()
    source, out = Path(source), Path(out)
    old = FrameModel(source, device="cpu")
    reference, manifest = load_instrument(source, graph_synthesis(Manifest.read(source / MANIFEST)))
    origin = verify_parity(reference, old)
    log(f"{manifest.name}: weights read back, run as the graph they came from: max |torch - ORT| "
        f"{origin['max_abs_audio']:.2e}")
    if origin["max_abs_audio"] > ORIGIN_LIMIT:
        raise SystemExit(f"{source}: the weights read back do not reproduce its graph "
                         f"(max |torch - ORT| {origin['max_abs_audio']:.2e} > {ORIGIN_LIMIT:g})")
    model, _ = load_instrument(source)
    with tempfile.TemporaryDirectory(prefix="wavecast-export-") as tmp:
        candidate = Path(tmp)
        onnx_block = export_onnx(model, candidate)
        raw = manifest.to_dict()
        shapes = state_shapes(model)
        if raw["states"] != [{"name": k, "shape": v} for k, v in shapes.items()] or raw["noise"] != model.noise_width:
            raise SystemExit(f"{source}: states or noise width differ from what the model exports")
        raw["onnx"] = onnx_block
        smoothing = {c["name"]: c["smoothing"] for c in raw["controls"]}
        for control in raw["controls"]:
            if control["name"] in ("f0", "loudness"):
                control["smoothing"] = CONTROL_SMOOTHING_SECONDS
        Manifest.from_dict(raw, "candidate").write(candidate)
        new = FrameModel(candidate, device="cpu")
        parity = verify_parity(model, new)
        log(f"{manifest.name}: torch vs ONNX Runtime over {parity['steps']} stateful steps: "
            f"max |torch - ORT| {parity['max_abs_audio']:.2e}")
        policy = judge(manifest.verification, "instrument").policy  # the store's, tightened by the manifest
        if parity["max_abs_audio"] > policy.parity_limit:
            raise SystemExit(f"{manifest.name}: parity {parity['max_abs_audio']:.2e} misses its limit "
                             f"{policy.parity_limit:g}")
        same = equivalence(new, old)
        snr = "identical" if same["snr_db"] is None else f"SNR {same['snr_db']:.1f} dB"
        log(f"{manifest.name}: new graph vs old over {same['steps']} stateful steps: max |new - old| "
            f"{same['max_abs_diff']:.2e}, {snr} (signal RMS {same['signal_rms']:.3g})")
        if same["snr_db"] is not None and same["snr_db"] < EQUIVALENCE_SNR_DB:
            raise SystemExit(f"{manifest.name}: the new graph differs from the old by more than "
                             f"-{EQUIVALENCE_SNR_DB:g} dB (SNR {same['snr_db']:.1f} dB)")
        f0 = manifest.control("f0")
        checks = tuple(float(k) for k in manifest.verification.get("pitch", {}).get("f0_relative_error", {}))
        pitch = verify_pitch(new, tuple(f for f in checks if f0.min <= f <= f0.max) or (f0.default,))
        if pitch["max_f0_relative_error"] > policy.pitch_limit:
            raise SystemExit(f"{manifest.name}: pitch error {pitch['max_f0_relative_error']:.4%} misses its limit")
        verification = {**manifest.verification, **policy.record(), "parity": parity, "pitch": pitch}
        if work is not None:
            verification["quality"] = heldout_quality(new, manifest, work)
            problems = gate(verification, "instrument")
            if problems:
                raise SystemExit(f"{manifest.name}: the re-exported graph fails the gate: {'; '.join(problems)}")
        final = {
            **raw,
            "training": {**manifest.training, "reexport": {
                "command": command, "from_sha256": manifest.onnx["sha256"],
                "from_synthesis": graph_synthesis(manifest), "code_revision": revision,
                "torch": torch.__version__, "seconds": round(time.time() - started, 1),
                "weights_check": origin, "equivalence": same, "max_abs_diff": same["max_abs_diff"],
                "smoothing_was": smoothing, "quality_remeasured": work is not None,
                **({"previous": manifest.training["reexport"]} if "reexport" in manifest.training else {}),
            }},
            "verification": verification,
        }
        (candidate / MANIFEST).write_text(json.dumps(final, indent=2) + "\n")
        FrameModel(candidate, device="cpu")  # the written pair passes the contract
        out.mkdir(parents=True, exist_ok=True)
        for name in (GRAPH, MANIFEST):  # graph first: a manifest never names a graph that is not there
            shutil.copyfile(candidate / name, out / f".{name}.tmp")
        for name in (GRAPH, MANIFEST):
            (out / f".{name}.tmp").replace(out / name)
    log(f"{manifest.name}: wrote {out} (sha256 {file_sha256(out / GRAPH)[:12]}…) in {time.time() - started:.0f} s")
    return {"name": manifest.name, "origin": origin, "parity": parity, "equivalence": same, "pitch": pitch}


def run(args: argparse.Namespace, argv: list[str]) -> list[dict]:
    from wavecast.models.store import default_work
    from wavecast.models.train import code_revision

    torch.set_num_threads(args.threads)
    revision = code_revision()
    command = " ".join(["wavecast", *argv])
    reports = []
    for directory in args.model_dirs:
        out = args.out if args.out is not None else directory
        if args.out is not None and len(args.model_dirs) > 1:
            out = args.out / Path(directory).resolve().name
        reports.append(reexport(Path(directory), Path(out), command, revision,
                                None if args.no_quality else (args.work or default_work())))
    return reports
