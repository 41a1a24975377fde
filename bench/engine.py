"""What a frame and a stream cost: ticks through the real Engine, batching, ORT vs torch, memory, pitch, roofline.

Run from the repository root:  PYTHONPATH=. .venv/bin/python bench/engine.py [--quick] [--device cuda] [--out FILE]
Prints a table to stdout, progress to stderr, and writes JSON (default bench/out/engine.json).
Every CPU measurement uses one intra-op thread. Compared costs (batched vs per-stream calls, ORT vs torch)
are timed alternately in the same loop, so load from other processes hits both sides alike: trust the
ratios more than the absolute numbers, and medians more than p99.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # one core, set before numpy loads
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import replace  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

from wavecast.streaming.analysis import estimate_f0  # noqa: E402
from wavecast.streaming.engine import BUDGET, BUFFER_FRAMES, Engine, Stream, render  # noqa: E402
from wavecast.streaming.model import FrameModel, cuda_present, session_options  # noqa: E402
from wavecast.streaming.noise import NoiseTable, stream_key  # noqa: E402
from wavecast.streaming.ring import Reader  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def timed(fns: dict[str, Callable[[], object]], seconds: float, max_iters: int, warmup: int = 3) -> dict:
    """Call each fn in turn, round after round, until the time budget or max_iters; seconds per call.

    A fn may return its own duration (a float, seconds) to leave out work around the part it measures."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    deadline = time.perf_counter() + seconds
    for i in range(max_iters):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            own = fn()
            times[key].append(own if isinstance(own, float) else time.perf_counter() - t0)
        if i >= 4 and time.perf_counter() > deadline:
            break
    return times


def median_us(t: list[float]) -> float:
    return float(np.median(t)) * 1e6


def controls_for(i: int) -> dict[str, float]:
    return {"f0": 110.0 * 2 ** ((i % 36) / 12), "loudness": -20.0}  # three octaves of semitones


def make_streams(model: FrameModel, n: int, loudness: float = -20.0) -> tuple[Engine, list[Stream], list[Reader]]:
    engine = Engine(buffer_frames=1, max_streams=n, budget=None)
    group = engine.add_model(model)
    streams = [engine.create_stream(group, seed=i, controls=controls_for(i) | {"loudness": loudness})
               for i in range(n)]
    return engine, streams, [s.listen() for s in streams]


def ticker(engine: Engine, readers: list[Reader], n: int, hop: int,
           inside: list[float] | None = None) -> Callable[[], float]:
    """One tick, timed alone; the listeners then take the frame, so every stream is needy again next tick.
    `inside` collects the time each tick spent in its model call."""
    buf = np.empty(hop, np.float32)

    def tick() -> float:
        t0 = time.perf_counter()
        made = engine.tick()
        elapsed = time.perf_counter() - t0
        assert made == n, f"tick made {made} frames for {n} streams"
        if inside is not None:
            inside.append(engine.stats.last_model_seconds)
        for r in readers:
            r.read(buf)
        return elapsed

    return tick


def bench_ticks(model: FrameModel, counts: list[int], seconds: float, max_ticks: int) -> list[dict]:
    """Ticks of n streams through the real Engine, alternating with a bare ORT call of the same batch."""
    m, rows = model.manifest, []
    for n in counts:
        log(f"ticks: {n} streams on {model.providers[0]}")
        engine, _, readers = make_streams(model, n)
        noise = np.random.default_rng(0).random((n, 1, m.noise), dtype=np.float32)
        control = np.tile(np.array([[[220.0, -20.0]]], np.float32), (n, 1, 1))
        bare = partial(model.run_into, control, noise, model.zero_states(n), np.zeros((n, m.hop), np.float32),
                       model.zero_states(n))  # the call the engine makes: outputs into preallocated arrays
        inside: list[float] = []
        t = timed({"tick": ticker(engine, readers, n, m.hop, inside), "ort": bare}, seconds, max_ticks)
        per, tick_us = median_us(t["tick"]) / n, median_us(t["tick"])
        share = float(np.median(1 - np.array(inside[-len(t["tick"]) :]) / np.array(t["tick"])))
        rows.append({"streams": n, "ticks": len(t["tick"]), "median_us": tick_us,
                     "p99_us": float(np.percentile(t["tick"], 99)) * 1e6, "us_per_stream_frame": per,
                     "realtime_factor": m.frame_seconds * 1e6 / per, "ort_call_us": median_us(t["ort"]),
                     "engine_overhead_pct": 100 * share,
                     "vs_bare_call_pct": 100 * (1 - median_us(t["ort"]) / tick_us)})
    return rows


def bench_limiter(model: FrameModel, n: int, seconds: float, max_ticks: int) -> dict:
    """Ticks of n streams at -20 dB (the limiter's fast path: nothing near its ceiling) and of n streams at the
    loudness control's top (every stream limited), alternating in one loop: what the limiter costs when it works."""
    log(f"limiter: {n} streams at -20 dB vs at the loudness control's top")
    top = model.manifest.control("loudness").max
    quiet, _, quiet_readers = make_streams(model, n)
    loud, _, loud_readers = make_streams(model, n, loudness=top)
    hop = model.manifest.hop
    t = timed({"quiet": ticker(quiet, quiet_readers, n, hop), "loud": ticker(loud, loud_readers, n, hop)},
              seconds, max_ticks)
    q, lo = median_us(t["quiet"]), median_us(t["loud"])
    return {"streams": n, "loudness_db": top, "quiet_tick_us": q, "loud_tick_us": lo,
            "limited_share": loud.stats.limited_frames / max(1, loud.stats.frames),
            "limiter_us_per_stream_frame": (lo - q) / n, "limiter_pct_of_tick": 100 * (lo - q) / lo}


def per_stream_loop(model: FrameModel, n: int) -> Callable[[], None]:
    """The unbatched alternative: one B=1 ORT call per stream, each with its own state and noise generator."""
    states = [model.zero_states(1) for _ in range(n)]
    rngs = [np.random.default_rng(i) for i in range(n)]
    controls = [np.array([[[c["f0"], c["loudness"]]]], np.float32) for c in map(controls_for, range(n))]
    noise = np.empty((1, 1, model.manifest.noise), np.float32)

    def loop() -> None:
        for i in range(n):
            rngs[i].random(out=noise[0, 0], dtype=np.float32)
            _, states[i] = model.run(controls[i], noise, states[i])

    return loop


def bench_batching(model: FrameModel, counts: list[int], seconds: float, max_ticks: int) -> list[dict]:
    """The engine's one batched call vs a loop of B=1 calls for the same streams, timed alternately."""
    rows = []
    for n in counts:
        log(f"batched vs per-stream calls: {n} streams")
        engine, _, readers = make_streams(model, n)
        tick = ticker(engine, readers, n, model.manifest.hop)
        t = timed({"tick": tick, "loop": per_stream_loop(model, n)}, seconds, max_ticks)
        batched, single = median_us(t["tick"]) / n, median_us(t["loop"]) / n
        rows.append({"streams": n, "batched_us_per_stream": batched, "loop_us_per_stream": single,
                     "ratio": single / batched})
    return rows


def torch_frame(net: Any, args: tuple) -> None:
    import torch

    with torch.inference_mode():
        net(*args)


def bench_torch(model: FrameModel, batches: list[int], seconds: float, max_iters: int) -> dict:
    """ORT vs torch eager, one frame, same architecture and shapes (weights untrained: timing ignores values)."""
    try:
        import torch

        from wavecast.models.instrument import Instrument, InstrumentConfig
    except ImportError as e:
        return {"skipped": f"torch not importable ({e})"}
    m = model.manifest
    shape = {s.name: s.shape for s in m.states}
    if m.kind != "instrument" or not {"h", "amp", "noise_tail"} <= set(shape):
        return {"skipped": f"model kind '{m.kind}' has no torch twin here"}
    cfg = InstrumentConfig(hidden=int(shape["h"][-1]), harmonics=int(shape["amp"][-1]),
                           noise_window=2 * int(shape["noise_tail"][-1]), sample_rate=m.sample_rate, hop=m.hop)
    net = Instrument(cfg).eval()  # timing does not depend on the weights' values, only on the shapes
    if net.noise_width != m.noise:
        return {"skipped": f"model is not an Instrument of this code (noise width {m.noise} != {net.noise_width})"}
    torch.set_num_threads(1)
    rows = []
    for b in batches:
        log(f"ORT vs torch eager: B={b}")
        control = np.tile(np.array([[[220.0, -20.0]]], np.float32), (b, 1, 1))
        noise = np.random.default_rng(0).random((b, 1, m.noise), dtype=np.float32)
        feeds = (control, noise, model.zero_states(b))
        t_args = (torch.from_numpy(control), torch.from_numpy(noise), *net.initial_state(b))
        t = timed({"ort": partial(model.run, *feeds), "torch": partial(torch_frame, net, t_args)}, seconds, max_iters)
        o, p = median_us(t["ort"]), median_us(t["torch"])
        rows.append({"batch": b, "ort_us": o, "torch_us": p, "ratio": p / o})
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}


def bench_memory(model: FrameModel, n: int = 64) -> dict:
    """Bytes per stream: computed from the manifest and the engine's arrays, and traced while creating n streams."""
    m = model.manifest
    state = sum(4 * math.prod(s.concrete(1)) for s in m.states)
    # per slot: gathered + returned states, control/noise rows, audio and guard rows, control targets/current
    scratch = 2 * state + 4 * (len(m.controls) + m.noise) + 4 * (2 * m.hop + 1) + 4 * 3 * len(m.controls)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    engine, streams, _ = make_streams(model, n)
    engine.tick()
    traced = (tracemalloc.get_traced_memory()[0] - before) // n
    tracemalloc.stop()
    rings = streams[0].group.rings
    ring = rings.capacity * 4
    return {"state_bytes": state, "batch_scratch_bytes": scratch, "ring_bytes": ring,
            "ring_seconds": rings.frames * m.frame_seconds, "total_bytes": state + scratch + ring,
            "traced_bytes": traced, "traced_streams": n}


def bench_pitch(model: FrameModel, f0s: list[float]) -> list[dict]:
    log(f"pitch: {len(f0s)} renders of 1.5 s")
    sr, rows = model.manifest.sample_rate, []
    for f0 in f0s:
        audio = render(model, 1.5, seed=0, controls={"f0": f0, "loudness": -20.0})
        got = estimate_f0(audio[-sr:], sr)
        ok = math.isfinite(got)
        rows.append({"f0": f0, "measured": got if ok else None, "cents": 1200 * math.log2(got / f0) if ok else None,
                     "percent": 100 * (got / f0 - 1) if ok else None})
    return rows


def count_macs(model: FrameModel) -> dict:
    """Multiply-adds and sines per frame at B=1, from the ONNX graph's MatMul/Gemm/LSTM/Sin/Cos input shapes,
    read by running the graph once with those inputs added as outputs."""
    import onnx
    from onnx import helper

    g = onnx.load(str(model.directory / model.manifest.onnx["file"]))
    inits = {i.name: tuple(i.dims) for i in g.graph.initializer}
    feeds = {"control": np.array([[[220.0, -20.0]]], np.float32),
             "noise": np.zeros((1, 1, model.manifest.noise), np.float32),
             **{f"state_in.{k}": v for k, v in model.zero_states(1).items()}}
    nodes = [n for n in g.graph.node if n.op_type in ("MatMul", "Gemm", "LSTM", "Sin", "Cos")]
    probe = [x for x in dict.fromkeys(x for n in nodes for x in n.input) if x and x not in inits and x not in feeds]
    outputs = {o.name for o in g.graph.output}
    for name in probe:
        if name not in outputs:
            g.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(g.SerializeToString(), providers=["CPUExecutionProvider"])
    shapes = {**inits, **{k: v.shape for k, v in feeds.items()}}
    shapes.update(zip(probe, (a.shape for a in sess.run(probe, feeds)), strict=True))
    macs = sines = 0
    for n in nodes:
        s = [shapes[x] if x else () for x in n.input]
        if n.op_type == "MatMul":
            a, b = s[0], s[1]
            macs += math.prod(np.broadcast_shapes(a[:-2], b[:-2])) * a[-2] * a[-1] * b[-1]
        elif n.op_type == "Gemm":
            macs += math.prod(s[0]) * s[1][0 if s[1][1] == s[0][1] else 1]
        elif n.op_type == "LSTM":  # X [seq, batch, in], W [dirs, 4H, in], R [dirs, 4H, H]
            macs += s[0][0] * s[0][1] * s[1][0] * s[1][1] * (s[1][2] + s[2][2])
        else:
            sines += math.prod(s[0])
    return {"method": "ONNX graph: MatMul/Gemm/LSTM shapes at B=1, F=1 (elementwise ops not counted)",
            "macs_per_frame": macs, "sin_cos_per_frame": sines}


def peak_gflops(seconds: float) -> float:
    a = np.random.default_rng(0).random((1024, 1024), dtype=np.float32)
    c = np.empty_like(a)
    t = timed({"dot": lambda: np.dot(a, a, out=c)}, seconds, 50, warmup=2)["dot"]
    return 2 * 1024**3 / float(np.median(t)) / 1e9


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def op_profile(model: FrameModel, batches: list[int], runs: int, top: int = 9) -> dict:
    """ORT kernel time by op type, per stream-frame, from ORT's profiler (which inflates tiny kernels)."""
    m, per_batch = model.manifest, {}
    with tempfile.TemporaryDirectory(prefix="wavecast-prof-") as tmp:
        for b in batches:
            log(f"where the time goes: ORT profile at B={b}")
            so = session_options(1)
            so.enable_profiling, so.profile_file_prefix = True, f"{tmp}/b{b}"
            sess = ort.InferenceSession(str(model.directory / m.onnx["file"]), so, providers=["CPUExecutionProvider"])
            feeds = {"control": np.tile(np.array([[[220.0, -20.0]]], np.float32), (b, 1, 1)),
                     "noise": np.random.default_rng(0).random((b, 1, m.noise), dtype=np.float32),
                     **{f"state_in.{k}": v for k, v in model.zero_states(b).items()}}
            for _ in range(2 * runs):  # the first half warms up and is left out
                sess.run(None, feeds)
            events = json.loads(Path(sess.end_profiling()).read_text())
            kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
            us: dict[str, float] = {}
            for e in kernels[len(kernels) // 2 :]:
                us[e["args"]["op_name"]] = us.get(e["args"]["op_name"], 0.0) + e["dur"] / runs / b
            per_batch[b] = us
            kernels_per_run = len(kernels) // (2 * runs)
    last = per_batch[batches[-1]]
    named = sorted(last, key=lambda k: -last[k])[:top]
    rows = []
    for label, ops in [(op, [op]) for op in named] + [("(other)", None), ("(total)", "all")]:
        row: dict[str, Any] = {"op": label}
        for b, us in per_batch.items():
            pick = us if ops == "all" else [k for k in us if k not in named] if ops is None else ops
            row[f"us_b{b}"] = sum(us.get(k, 0.0) for k in pick)
            row[f"pct_b{b}"] = 100 * row[f"us_b{b}"] / sum(us.values())
        rows.append(row)
    b = batches[-1]
    table, out = NoiseTable(m.noise), np.empty((b, m.noise), np.float32)
    keys, frames = np.array([stream_key(i) for i in range(b)]), np.arange(b)
    noise = timed({"noise": lambda: table.fill(keys, frames, out)}, 0.2, 2000)["noise"]
    return {"kernels_per_run": kernels_per_run, "batches": batches, "rows": rows,
            "engine_noise_us_per_stream": median_us(noise) / b}


def bench_control_latency(model: FrameModel, reps: int, load: int, buffer_frames: int) -> dict:
    """Control change -> first changed sample sent, on the live engine thread with a paced sender.

    A sender thread takes 960 samples (one 20 ms Opus packet) from each stream every 20 ms by the wall clock,
    as the WebRTC encoder does. Each rep creates twin streams (same seed and controls), lets them fill,
    then at a random moment in the packet cycle moves one twin's f0 by a semitone (the call a data channel
    message makes, after parsing) and times until the sender takes the first packet whose audio differs
    from the other twin's. `load` more streams are generated and sent meanwhile."""
    log(f"control -> sent: {reps} reps, {load} streams of load, fill {buffer_frames} frames")
    engine = Engine(buffer_frames=buffer_frames, budget=None)
    group = engine.add_model(model)
    background = [engine.create_stream(group, 1000 + i, controls_for(i)) for i in range(load)]
    readers = [s.listen() for s in background]
    twins: list = []  # (changed reader, reference reader, change time, result list)
    stop = threading.Event()

    def sender() -> None:
        a, b, pkt = (np.zeros(960, np.float32) for _ in range(3))
        start, k = time.monotonic(), 0
        while not stop.is_set():
            k += 1
            time.sleep(max(0.0, start + 0.02 * k - time.monotonic()))
            for r in readers:
                r.read(pkt)
            for pair in list(twins):
                changed, reference, since, out = pair
                changed.read(a)
                reference.read(b)
                if since[0] is not None and not out and not np.array_equal(a, b):
                    out.append(time.perf_counter() - since[0])
            engine.notify()

    thread = threading.Thread(target=sender, daemon=True)
    engine.start()
    thread.start()
    rng, results = np.random.default_rng(0), []
    try:
        for i in range(reps):
            pair = [engine.create_stream(group, 7 + i, {"f0": 440.0, "loudness": -20.0}) for _ in range(2)]
            since: list = [None]
            out: list[float] = []
            entry = (pair[0].listen(), pair[1].listen(), since, out)
            twins.append(entry)
            time.sleep(0.25 + rng.uniform(0, 0.02))  # filled, at a random point of the packet cycle
            since[0] = time.perf_counter()
            pair[0].set_controls({"f0": 466.16})
            deadline = time.monotonic() + 1.0
            while not out and time.monotonic() < deadline:
                time.sleep(0.002)
            twins.remove(entry)
            for s in pair:
                engine.delete_stream(s.id)
            results.append(1000 * out[0] if out else None)
    finally:
        stop.set()
        thread.join(2)
        engine.stop()
    got = [x for x in results if x is not None]
    return {"reps": reps, "load_streams": load, "buffer_frames": buffer_frames, "missed": len(results) - len(got),
            "p50_ms": float(np.percentile(got, 50)) if got else None,
            "p95_ms": float(np.percentile(got, 95)) if got else None, "max_ms": max(got, default=None),
            "underruns": sum(r.underruns for r in readers)}


def bench_smoothing(model: FrameModel, taus_ms: list[float]) -> list[dict]:
    """Clicks (models.quality.count_clicks) made by control steps at each smoothing time constant: f0 jumps
    of a fifth and an octave at three registers, loudness steps of 30 dB up and down."""
    from wavecast.models.quality import count_clicks

    m, rows = model.manifest, []
    steps = {"f0": [(110.0, 220.0), (220.0, 330.0), (440.0, 880.0), (880.0, 440.0)],
             "loudness": [(-40.0, -10.0), (-10.0, -40.0), (-60.0, -20.0)]}
    original = model.manifest
    try:
        for tau in taus_ms:
            row: dict[str, Any] = {"tau_ms": tau}
            for name, pairs in steps.items():
                model.manifest = replace(original, controls=tuple(
                    replace(c, smoothing=tau / 1000 if c.name == name else c.smoothing) for c in original.controls))
                clicks = 0
                for before, after in pairs:
                    start = {"f0": 440.0, "loudness": -20.0, name: before}
                    audio = render(model, 0.6, 3, start, timeline=[(0.3, {name: after})])
                    clicks += count_clicks(audio[int(0.2 * m.sample_rate) :])
                row[f"{name}_clicks"] = clicks
            rows.append(row)
            log(f"smoothing {tau:g} ms: f0 clicks {row['f0_clicks']}, loudness clicks {row['loudness_clicks']}")
    finally:
        model.manifest = original
    return rows


Column = tuple[str, str] | tuple[str, str, str]  # heading, JSON key[, format spec for floats]


def table(title: str, section: Any, columns: list[Column], note: str = "") -> str:
    """One section of the results as an aligned table with a note under it."""
    if isinstance(section, dict) and "skipped" in section:
        return f"\n== {title}: skipped: {section['skipped']}"
    rows = section.get("rows", [section]) if isinstance(section, dict) else section

    def cell(row: dict, col: Column) -> str:
        v = row.get(col[1])
        if isinstance(v, float):
            return f"{v:{col[2] if len(col) > 2 else ',.1f'}}"
        return "-" if v is None else str(v)

    cells = [[cell(row, col) for col in columns] for row in rows]
    widths = [max(len(col[0]), *(len(r[i]) for r in cells)) for i, col in enumerate(columns)]
    lines = [f"\n== {title}", "  ".join(col[0].rjust(w) for col, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines + ([note] if note else []))


TICK_COLUMNS: list[Column] = [
    ("streams", "streams"), ("ticks", "ticks"), ("median us", "median_us"), ("p99 us", "p99_us"),
    ("us/stream-frame", "us_per_stream_frame"), ("x real time", "realtime_factor"),
    ("bare ORT call us", "ort_call_us"), ("engine overhead %", "engine_overhead_pct", ".0f"),
    ("tick vs bare call %", "vs_bare_call_pct", ".0f"),
]
TICK_NOTE = ("x real time = 10 ms / (us per stream-frame) = real-time streams one core could carry.\n"
             "engine overhead = share of each tick spent outside its model call (noise, controls, gather/scatter, "
             "guard, rings), the call timed inside the tick;\ntick vs bare call = 1 - (a bare call of the same batch "
             "with constant inputs, timed alternately) / tick: it also counts the caches the engine's stages and "
             "the listeners' reads leave cold for the call")


def report(r: dict) -> str:
    m, h, prof, mem, roof = r["model_detail"], r["host"], r["profile"], r["memory"], r["roofline"]
    out = [f"wavecast engine bench: model {m['name']} v{m['version']} ({m['dir']}), {m['frame_ms']:g} ms frames; "
           f"{h['cpu']}, {h['cores']} cores, onnxruntime {h['onnxruntime']}", r["note"]]
    out.append(table("Engine tick, CPU, 1 intra-op thread", r["ticks"], TICK_COLUMNS, TICK_NOTE))
    out.append(table("Batched engine vs one ORT call per stream", r["batching"], [
        ("streams", "streams"), ("batched us/stream", "batched_us_per_stream"),
        ("looped us/stream", "loop_us_per_stream"), ("ratio", "ratio")],
        "ratio = real-time streams per core, batched / looped (DESIGN target >= 10)"))
    out.append(table("ORT vs torch eager, one frame, 1 thread", r["ort_vs_torch"], [
        ("batch", "batch"), ("ORT us", "ort_us"), ("torch us", "torch_us"), ("ratio", "ratio")],
        "ratio = torch eager / ORT time per frame (DESIGN target >= 3); torch has the same shapes, untrained weights"))
    cols: list[Column] = [("op type", "op")]
    for b in prof["batches"]:
        cols += [(f"B={b} us/stream", f"us_b{b}"), ("%", f"pct_b{b}", ".0f")]
    out.append(table("Where the time goes: ORT kernel time by op type", prof, cols,
                     f"{prof['kernels_per_run']} kernels per run; the profiler inflates small kernels, so totals exceed"
                     f" untraced timings.\nOutside ORT, the engine's numpy noise for one stream-frame ({m['noise']} "
                     f"uniform values, one gather for B={prof['batches'][-1]}) takes "
                     f"{prof['engine_noise_us_per_stream']:.2f} us"))
    out.append(table("Memory per stream, bytes", mem, [
        ("state", "state_bytes"), ("batch scratch", "batch_scratch_bytes"),
        (f"ring ({mem['ring_seconds']:g} s)", "ring_bytes"), ("total", "total_bytes"), ("traced", "traced_bytes")],
        f"traced = Python heap growth per stream while creating {mem['traced_streams']} streams"))
    out.append(table("Pitch: last 1 s of a 1.5 s render at -20 dB", r["pitch"], [
        ("f0 Hz", "f0", ".0f"), ("measured Hz", "measured", ".2f"), ("cents", "cents", ".1f"),
        ("error %", "percent", ".2f")], "'-' = unvoiced (no pitch found)"))
    out.append(table("Roofline, one core", roof, [
        ("MACs/frame", "macs_per_frame"), ("sin+cos/frame", "sin_cos_per_frame"), ("peak GFLOP/s", "peak_gflops"),
        ("at streams", "streams"), ("engine GFLOP/s", "engine_gflops"), ("% of peak", "percent")],
        f"{roof.get('method', '')}; peak = numpy float32 1024x1024 matmul"))
    out.append(table("Limiter: ticks with every stream limited vs none (alternating)", [r["limiter"]], [
        ("streams", "streams"), ("loudness dB", "loudness_db", ".0f"), ("quiet tick us", "quiet_tick_us"),
        ("loud tick us", "loud_tick_us"), ("frames limited", "limited_share", ".2f"),
        ("limiter us/stream-frame", "limiter_us_per_stream_frame", ".2f"), ("% of tick", "limiter_pct_of_tick")],
        "quiet: -20 dB, below the -1 dBFS ceiling (the limiter's fast path); loud: the loudness control's top, "
        "every frame of every stream limited"))
    lat = r["control_latency"]
    out.append(table("Control change -> first changed sample sent (paced 20 ms sender, live engine thread)", lat, [
        ("reps", "reps"), ("load streams", "load_streams"), ("fill frames", "buffer_frames"), ("p50 ms", "p50_ms"),
        ("p95 ms", "p95_ms"), ("max ms", "max_ms"), ("missed", "missed"), ("underruns", "underruns")],
        "DESIGN target: p95 <= 40 ms"))
    out.append(table("Clicks from control steps by smoothing time constant", r["smoothing"], [
        ("tau ms", "tau_ms", ".0f"), ("f0 clicks", "f0_clicks"), ("loudness clicks", "loudness_clicks")],
        "f0: 4 jumps (fifth/octave, 110-880 Hz); loudness: 3 steps of 30-40 dB; models.quality.count_clicks"))
    keys = ["streams_per_core_256", "overhead_fraction_256", "batched_vs_looped_64", "batched_vs_looped_256",
            "control_to_sent_ms_p95"]
    out.append("\n== Headline (JSON keys)\n" + "\n".join(
        f"{k:24s} {r[k]:.3f}" if isinstance(r[k], float) else f"{k:24s} {r[k]}" for k in keys))
    if "cuda_ticks" in r:
        cuda = r["cuda_ticks"]
        out.append(table(f"Engine tick, --device cuda, session providers {cuda.get('providers', [])}", cuda,
                         TICK_COLUMNS, cuda.get("warning", CUDA_NOTE)))
    return "\n".join(out)


CUDA_NOTE = ("x real time = streams the GPU engine could carry; batches padded to buckets, states gathered on the "
             "host and bound through an IOBinding, engine in Python on one CPU thread")


def bench_cuda(model_dir: Path, counts: list[int], seconds: float, max_ticks: int) -> dict:
    """The tick table on a CUDA session, and the most streams whose median tick fits the admission budget."""
    if not cuda_present():
        return {"skipped": "CUDA not present (no libcuda.so.1 or no CUDAExecutionProvider)"}
    gpu = FrameModel(model_dir, device="cuda")
    log(f"CUDA: session providers {gpu.providers}")
    rows = bench_ticks(gpu, counts, seconds, max_ticks)
    fits = [row["streams"] for row in rows if row["median_us"] <= 1e6 * BUDGET * gpu.manifest.frame_seconds]
    out = {"providers": gpu.providers, "rows": rows, "realtime_streams": max(fits, default=0)}
    if gpu.providers[0] != "CUDAExecutionProvider":
        out["warning"] = "ONNX Runtime fell back to the CPU: these are not GPU numbers"
    return out


def summary(r: dict) -> dict:
    """The headline figures under stable keys (None where this run did not measure them)."""
    tick = {row["streams"]: row for row in r["ticks"]}
    batching = {row["streams"]: row["ratio"] for row in r["batching"]}
    at = tick.get(256)
    return {"streams_per_core_256": at and at["realtime_factor"],
            "overhead_fraction_256": at and at["engine_overhead_pct"] / 100,
            "batched_vs_looped_64": batching.get(64), "batched_vs_looped_256": batching.get(256),
            "control_to_sent_ms_p95": r["control_latency"]["p95_ms"],
            "model": f"{r['model_detail']['name']} v{r['model_detail']['version']} "
                     f"({r['model_detail']['sha256'][:12]})",
            "machine": f"{r['host']['cpu']}, {r['host']['cores']} cores", "date": r["created"][:10]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=ROOT / "models/shipped/default", help="model.json + model.onnx")
    p.add_argument("--out", type=Path, default=ROOT / "bench/out/engine.json", help="JSON results (folder is made)")
    p.add_argument("--streams", default="1,8,64,256", help="stream counts for the CPU tick table")
    p.add_argument("--compare", default="64,256", help="stream counts for batched vs per-stream calls")
    p.add_argument("--torch-batches", default="1,64", help="batch sizes for ORT vs torch")
    p.add_argument("--seconds", type=float, default=6.0, help="time budget per measured point")
    p.add_argument("--ticks", type=int, default=1000, help="most ticks (or calls) per measured point")
    p.add_argument("--quick", action="store_true",
                   help="a few seconds in all (overrides the counts and bounds above): a smoke test, rough numbers")
    p.add_argument("--latency-reps", type=int, default=60, help="control changes timed to the first changed packet")
    p.add_argument("--latency-load", type=int, default=64, help="streams generated and sent meanwhile")
    p.add_argument("--buffer-frames", type=int, default=BUFFER_FRAMES, help="stream fill for the latency test")
    p.add_argument("--smoothing", default="0,5,10,15,20,30", help="smoothing time constants (ms) to click-test")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda adds GPU tick measurements")
    p.add_argument("--cuda-streams", default="1,64,256,1024,2048,4096,8192",
                   help="stream counts for --device cuda")
    p.add_argument("--cuda-only", action="store_true", help="only the CUDA tick table (what bench/gpu.sh runs)")
    a = p.parse_args(argv)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    if a.quick:
        a.streams, a.compare, a.torch_batches, a.seconds, a.ticks = "1,16", "16", "1,16", 0.2, 40
        a.latency_reps, a.latency_load, a.smoothing = 5, 4, "0,30"
        a.cuda_streams = "1,64"
    started = time.perf_counter()
    if a.cuda_only:  # a GPU host's run (bench/gpu.sh): just the CUDA ticks
        cuda = bench_cuda(a.model_dir, ints(a.cuda_streams), a.seconds, a.ticks)
        r = {"bench": "engine-cuda", "created": datetime.now(UTC).isoformat(timespec="seconds"),
             "host": {"cpu": cpu_name() or platform.machine(), "cores": os.cpu_count(), "onnxruntime": ort.__version__},
             "cuda_ticks": cuda, "gpu_realtime_streams": cuda.get("realtime_streams")}
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(r, indent=2) + "\n")
        print(table("Engine tick, CUDA", cuda, TICK_COLUMNS, cuda.get("warning", CUDA_NOTE)))
        print(f"real-time streams (median tick within the {BUDGET:g} budget): {r['gpu_realtime_streams']}")
        print(f"wrote {a.out}")
        return 0
    model = FrameModel(a.model_dir, device="cpu", threads=1)
    m = model.manifest
    log(f"model {m.name} v{m.version} from {a.model_dir}, providers {model.providers}")
    r: dict = {
        "bench": "engine", "created": datetime.now(UTC).isoformat(timespec="seconds"), "quick": a.quick,
        "note": "ratios are measured side by side (alternating calls in one run); medians of repeated calls",
        "host": {"cpu": cpu_name() or platform.machine(), "cores": os.cpu_count(),
                 "python": platform.python_version(), "numpy": np.__version__, "onnxruntime": ort.__version__},
        "model_detail": {"dir": str(a.model_dir), "name": m.name, "version": m.version, "sha256": m.onnx["sha256"],
                  "sample_rate": m.sample_rate, "hop": m.hop, "noise": m.noise, "frame_ms": 1000 * m.frame_seconds},
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
    }
    r["ticks"] = bench_ticks(model, ints(a.streams), a.seconds, a.ticks)
    r["batching"] = bench_batching(model, ints(a.compare), a.seconds, a.ticks)
    r["limiter"] = bench_limiter(model, max(ints(a.streams)), a.seconds, a.ticks)
    r["ort_vs_torch"] = bench_torch(model, ints(a.torch_batches), a.seconds, a.ticks)
    r["memory"] = bench_memory(model)
    r["pitch"] = bench_pitch(model, [55.0, 110.0, 220.0, 440.0, 880.0, 1760.0])
    log("roofline: counting multiply-adds, timing a 1024x1024 matmul")
    try:
        roof = count_macs(model)
    except ImportError as e:
        roof = {"skipped": f"onnx not importable ({e}); pip install onnx"}
    if "skipped" not in roof:
        top = max(r["ticks"], key=lambda x: x["streams"])
        roof["peak_gflops"] = peak_gflops(min(a.seconds, 1.0))
        roof["streams"] = top["streams"]
        roof["engine_gflops"] = 2 * roof["macs_per_frame"] / top["us_per_stream_frame"] / 1e3
        roof["fraction"] = roof["engine_gflops"] / roof["peak_gflops"]
        roof["percent"] = 100 * roof["fraction"]
    r["roofline"] = roof
    r["profile"] = op_profile(model, [1, max(ints(a.compare))], 20 if a.quick else 100)
    r["control_latency"] = bench_control_latency(model, a.latency_reps, a.latency_load, a.buffer_frames)
    r["smoothing"] = bench_smoothing(model, [float(x) for x in a.smoothing.split(",") if x])
    if a.device == "cuda":
        r["cuda_ticks"] = bench_cuda(a.model_dir, ints(a.cuda_streams), a.seconds, a.ticks)
    r.update(summary(r))
    r["seconds"] = round(time.perf_counter() - started, 1)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(r, indent=2) + "\n")
    print(report(r))
    print(f"\nwrote {a.out} in {r['seconds']:g} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
