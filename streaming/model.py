"""The frame-model contract: an ONNX graph plus its `model.json` manifest, checked before use.

Inputs ``control [B,F,C]``, ``noise [B,F,N]`` and ``state_in.<name>``; outputs ``audio [B,F*hop]`` and
``state_out.<name>``. B and F are dynamic; all memory lives in the state tensors. A model whose manifest,
checksum or graph signature does not match is refused with an error naming the file and the field.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

ort.set_default_logger_severity(3)

MANIFEST = "model.json"
GRAPH = "model.onnx"
BATCH = "B"  # placeholder for the batch axis in manifest state shapes
KINDS = ("instrument", "composer")


class ModelError(Exception):
    """A model that does not satisfy the contract; the message names the file and the field."""


@dataclass(frozen=True)
class Control:
    name: str
    unit: str
    min: float
    max: float
    default: float
    smoothing: float  # seconds: time constant of the per-frame one-pole smoother


@dataclass(frozen=True)
class StateSpec:
    name: str
    shape: tuple[int | str, ...]  # BATCH marks the batch axis

    @property
    def batch_axis(self) -> int:
        return self.shape.index(BATCH)

    def concrete(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if d == BATCH else int(d) for d in self.shape)


@dataclass(frozen=True)
class Manifest:
    name: str
    version: int
    kind: str  # "instrument" (the frame contract) or "composer" (streaming.composer's note contract)
    sample_rate: int  # instrument only (0 for a composer), as are hop and noise
    hop: int
    controls: tuple[Control, ...]
    states: tuple[StateSpec, ...]
    noise: int
    onnx: dict[str, Any]  # file, sha256, opset
    vocabulary: dict[str, Any] = field(default_factory=dict)  # composer only: see streaming.notes
    training: dict[str, Any] = field(default_factory=dict)
    verification: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def frame_seconds(self) -> float:
        return self.hop / self.sample_rate

    def control(self, name: str) -> Control:
        for c in self.controls:
            if c.name == name:
                return c
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["states"] = [{"name": s.name, "shape": list(s.shape)} for s in self.states]
        d["controls"] = [asdict(c) for c in self.controls]
        return d

    def write(self, directory: Path) -> None:
        (directory / MANIFEST).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def read(cls, path: Path) -> Manifest:
        try:
            raw = json.loads(path.read_bytes().decode("utf-8"))
        except FileNotFoundError:
            raise ModelError(f"{path}: no manifest; a model directory holds {MANIFEST} and {GRAPH}") from None
        except OSError as e:
            raise ModelError(f"{path}: cannot read it ({e.strerror}); check the file's permissions") from None
        except UnicodeDecodeError:
            raise ModelError(f"{path}: not UTF-8 text; re-export or re-publish the model") from None
        except json.JSONDecodeError as e:
            raise ModelError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
        except RecursionError:
            raise ModelError(f"{path}: JSON nested too deeply to be a manifest") from None
        try:
            return cls.from_dict(raw, str(path))
        except OverflowError:
            raise ModelError(f"{path}: a number is too large for its field") from None

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> Manifest:
        def need(obj: Any, key: str, kind: type | tuple[type, ...], at: str) -> Any:
            if not isinstance(obj, dict) or key not in obj:
                raise ModelError(f"{where}: field '{at}{key}' is missing")
            value = obj[key]
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ModelError(f"{where}: field '{at}{key}' has the wrong type ({type(value).__name__})")
            return value

        num = (int, float)
        controls = []
        for i, c in enumerate(need(raw, "controls", list, "")):
            at = f"controls[{i}]."
            ctl = Control(
                need(c, "name", str, at), need(c, "unit", str, at), float(need(c, "min", num, at)),
                float(need(c, "max", num, at)), float(need(c, "default", num, at)),
                float(need(c, "smoothing", num, at)),
            )
            if not (math.isfinite(ctl.min) and math.isfinite(ctl.max) and ctl.min <= ctl.default <= ctl.max):
                raise ModelError(f"{where}: field '{at}default' must lie in [min, max] (control '{ctl.name}': "
                                 f"min {ctl.min:g}, max {ctl.max:g}, default {ctl.default:g})")
            if ctl.smoothing < 0:
                raise ModelError(f"{where}: field '{at}smoothing' must be >= 0 seconds")
            controls.append(ctl)
        states = []
        for i, s in enumerate(need(raw, "states", list, "")):
            at = f"states[{i}]."
            shape = tuple(need(s, "shape", list, at))
            if shape.count(BATCH) != 1 or not all(d == BATCH or (isinstance(d, int) and d > 0) for d in shape):
                raise ModelError(f"{where}: field '{at}shape' needs positive sizes and exactly one '{BATCH}'")
            states.append(StateSpec(need(s, "name", str, at), shape))
        onnx = need(raw, "onnx", dict, "")
        for key, kind in (("file", str), ("sha256", str), ("opset", int)):
            need(onnx, key, kind, "onnx.")
        kind = need(raw, "kind", str, "")
        if kind not in KINDS:
            raise ModelError(f"{where}: field 'kind' is '{kind}', expected one of {', '.join(KINDS)}")
        audio = kind == "instrument"
        manifest = cls(
            name=need(raw, "name", str, ""), version=need(raw, "version", int, ""), kind=kind,
            sample_rate=need(raw, "sample_rate", int, "") if audio else 0,
            hop=need(raw, "hop", int, "") if audio else 0,
            controls=tuple(controls), states=tuple(states), noise=need(raw, "noise", int, "") if audio else 0,
            onnx=onnx, vocabulary=need(raw, "vocabulary", dict, "") if not audio else {},
            training=raw.get("training", {}), verification=raw.get("verification", {}), source=raw.get("source", {}),
        )
        if audio and (manifest.sample_rate <= 0 or manifest.hop <= 0 or manifest.noise < 0):
            raise ModelError(f"{where}: fields 'sample_rate', 'hop' and 'noise' must be positive")
        return manifest


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cuda_present() -> bool:
    """True where an NVIDIA driver is loadable; onnxruntime-gpu lists CUDA even where it is not."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def session_options(threads: int = 1) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning burns a whole core while the engine waits for the next tick; on small machines that hurts.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def checked_graph(directory: Path, manifest: Manifest) -> Path:
    """The graph file the manifest names, after checking that it exists and matches its sha256."""
    name = manifest.onnx["file"]
    if Path(name).name != name or name in ("", ".", ".."):
        raise ModelError(f"{directory / MANIFEST}: field 'onnx.file' must name a file in the model's directory, "
                         f"not a path")
    graph = directory / name
    if not graph.is_file():
        raise ModelError(f"{graph}: graph file named by field 'onnx.file' is missing")
    digest = file_sha256(graph)
    if digest != manifest.onnx["sha256"]:
        raise ModelError(
            f"{graph}: sha256 {digest[:12]}… does not match field 'onnx.sha256' "
            f"{manifest.onnx['sha256'][:12]}… in {directory / MANIFEST}; re-export or re-publish it"
        )
    return graph


class PoolFull(Exception):
    """Every slot of a state pool is taken."""


class StatePool:
    """The state tensors of up to `capacity` streams of one model, one slot each, sized up front so the
    inference thread never allocates or grows a pool. Slots are taken and given back under a lock (streams
    are created on the event loop, released on the inference thread); a taken slot is `reset` before use.

    `run` advances a batch: when the batch is the pool's leading slots (the usual case: the streams fill
    slots from 0 and are all due each tick) the pool itself is the call's input and a second, spare pool
    takes its output, and the two swap, so the states are never copied; otherwise the batch's states are
    gathered into a buffer and the results scattered back. With `run`, only the inference thread may
    write states (reset included)."""

    def __init__(self, manifest: Manifest, capacity: int) -> None:
        self.states = manifest.states
        self.capacity = capacity
        self.pool = {s.name: np.zeros(s.concrete(capacity), np.float32) for s in self.states}
        self.spare = {s.name: np.zeros(s.concrete(capacity), np.float32) for s in self.states}
        self.gathered = {s.name: np.zeros(s.concrete(capacity), np.float32) for s in self.states}
        self.free = list(range(capacity - 1, -1, -1))
        self._lock = threading.Lock()

    @staticmethod
    def _index(axis: int, index: slice | np.ndarray | int) -> tuple:
        return (slice(None),) * axis + (index,)

    def allocate(self) -> int:
        with self._lock:
            if not self.free:
                raise PoolFull(f"all {self.capacity} state slots are in use")
            return self.free.pop()

    def reset(self, slot: int) -> None:
        for spec in self.states:
            self.pool[spec.name][self._index(spec.batch_axis, slot)] = 0.0

    def release(self, slot: int) -> None:
        with self._lock:
            self.free.append(slot)

    def batch(self, buffers: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
        """The first `n` streams of preallocated `buffers` (contiguous views: the batch axis is leading or
        follows axes of size 1)."""
        return {s.name: buffers[s.name][self._index(s.batch_axis, slice(0, n))] for s in self.states}

    @staticmethod
    def _leading(slots: np.ndarray) -> bool:
        """True when `slots` is 0, 1, ..., n-1: strictly increasing and ending at n-1."""
        n = len(slots)
        return n > 0 and slots[-1] == n - 1 and bool((slots[1:] > slots[:-1]).all())

    def gather(self, slots: np.ndarray, rows: int | None = None) -> dict[str, np.ndarray]:
        """The states of `slots` as the first rows of a batch of `rows` (default len(slots)); views of a
        preallocated buffer, valid until the next gather."""
        rows = len(slots) if rows is None else rows
        states = self.batch(self.gathered, rows)
        for spec in self.states:
            np.take(self.pool[spec.name], slots, axis=spec.batch_axis,
                    out=states[spec.name][self._index(spec.batch_axis, slice(0, len(slots)))])
        return states

    def run(self, slots: np.ndarray, rows: int, call: Callable[[dict, dict], None], live: np.ndarray) -> None:
        """`call(states_in, states_out)` with `slots` as the first rows of a batch of `rows` (views of
        preallocated buffers), keeping what it writes as their new states. `live` marks the slots whose
        states must survive although they are not in the batch."""
        if not self._leading(slots):
            call(self.gather(slots, rows), self.batch(self.spare, rows))
            self.scatter(slots, self.batch(self.spare, len(slots)))
            return
        call(self.batch(self.pool, rows), self.batch(self.spare, rows))
        others = np.flatnonzero(live[len(slots) :]) + len(slots)  # rows the call did not own (or only padded)
        for spec in self.states if len(others) else ():
            index = self._index(spec.batch_axis, others)
            self.spare[spec.name][index] = self.pool[spec.name][index]
        self.pool, self.spare = self.spare, self.pool

    def scatter(self, slots: np.ndarray, states: dict[str, np.ndarray]) -> None:
        for spec in self.states:
            self.pool[spec.name][self._index(spec.batch_axis, slots)] = states[spec.name]


class FrameModel:
    """A checked ONNX frame model: `run` advances B streams by F frames."""

    def __init__(self, directory: Path, device: str = "auto", threads: int = 1) -> None:
        self.directory = Path(directory)
        self.manifest = Manifest.read(self.directory / MANIFEST)
        if self.manifest.kind != "instrument":
            raise ModelError(f"{self.directory / MANIFEST}: field 'kind' is '{self.manifest.kind}', an instrument "
                             "is needed here")
        graph = checked_graph(self.directory, self.manifest)
        use_cuda = device == "cuda" or (device == "auto" and cuda_present())
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if use_cuda else ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(graph), session_options(threads), providers=providers)
        except Exception as e:  # onnxruntime raises several unrelated types for a corrupt graph
            raise ModelError(f"{graph}: ONNX Runtime cannot load it ({e})") from None
        self.providers = self.session.get_providers()
        self._check_signature(graph)
        self.state_names = [s.name for s in self.manifest.states]
        self.input_names = ["control", "noise"] + [f"state_in.{n}" for n in self.state_names]
        self.output_names = ["audio"] + [f"state_out.{n}" for n in self.state_names]
        self._binding = self.session.io_binding()

    def _check_signature(self, graph: Path) -> None:
        m = self.manifest
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        outputs = {o.name: o.shape for o in self.session.get_outputs()}
        expect_in: dict[str, tuple] = {"control": (None, None, len(m.controls)), "noise": (None, None, m.noise)}
        expect_out: dict[str, tuple] = {"audio": (None, None)}
        for s in m.states:
            shape = tuple(None if d == BATCH else d for d in s.shape)
            expect_in[f"state_in.{s.name}"] = shape
            expect_out[f"state_out.{s.name}"] = shape
        for kind, have, want in (("input", inputs, expect_in), ("output", outputs, expect_out)):
            if set(have) != set(want):
                raise ModelError(
                    f"{graph}: graph {kind}s {sorted(have)} do not match the manifest's {sorted(want)} "
                    f"(fields 'controls', 'noise', 'states')"
                )
            for name, shape in want.items():
                got = have[name]
                ok = len(got) == len(shape) and all(
                    w is None or not isinstance(g, int) or g == w for g, w in zip(got, shape, strict=True)
                )
                if not ok:
                    raise ModelError(f"{graph}: {kind} '{name}' has shape {got}, the manifest implies {shape}")

    def zero_states(self, batch: int) -> dict[str, np.ndarray]:
        return {s.name: np.zeros(s.concrete(batch), np.float32) for s in self.manifest.states}

    def run(
        self, control: np.ndarray, noise: np.ndarray, states: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        feeds = {"control": control, "noise": noise}
        for name in self.state_names:
            feeds[f"state_in.{name}"] = states[name]
        audio, *outs = self.session.run(self.output_names, feeds)
        return audio, dict(zip(self.state_names, outs, strict=True))

    def run_into(
        self, control: np.ndarray, noise: np.ndarray, states: dict[str, np.ndarray],
        audio: np.ndarray, states_out: dict[str, np.ndarray],
    ) -> None:
        """`run`, with ONNX Runtime writing the audio and new states straight into the caller's
        (contiguous, preallocated) arrays through an IOBinding: no output is allocated per call."""
        b = self._binding
        b.bind_cpu_input("control", control)
        b.bind_cpu_input("noise", noise)
        for name in self.state_names:
            b.bind_cpu_input(f"state_in.{name}", states[name])
        for name, arr in (("audio", audio), *((f"state_out.{n}", states_out[n]) for n in self.state_names)):
            b.bind_output(name, "cpu", 0, np.float32, list(arr.shape), arr.ctypes.data)
        self.session.run_with_iobinding(b)

    def calibrate(self, batch: int = 256, reps: int = 5) -> tuple[float, float]:
        """Seconds for one frame of a batched call: (fixed cost, cost per stream), from the medians of
        `reps` calls at batch 1 and at `batch`. The engine's admission control starts from these."""
        m = self.manifest
        times = []
        for n in (1, batch):
            control = np.tile(np.array([c.default for c in m.controls], np.float32), (n, 1, 1))
            noise = np.random.default_rng(0).random((n, 1, m.noise), dtype=np.float32)
            states = self.zero_states(n)
            took = []
            for _ in range(reps + 1):
                t0 = time.perf_counter()
                self.run(control, noise, states)
                took.append(time.perf_counter() - t0)
            times.append(float(np.median(took[1:])))
        per = max((times[1] - times[0]) / (batch - 1), 1e-9)
        return max(times[0] - per, 0.0), per
