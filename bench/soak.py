"""Leave it running: streams at a share of the admission cap for minutes, listeners joining and leaving.

Run from the repository root:  PYTHONPATH=. python bench/soak.py [--seconds 600] [--share 0.8] [--out FILE]

The live engine (its own inference thread, admission control measuring this machine) runs the shipped
model. The script finds the admission cap (creates streams until the engine refuses one), deletes down to
`--share` of it, and then, for `--seconds`, a sender thread takes a 20 ms packet from every listener of
every stream on the wall clock, as the WebRTC encoders do; every second a few listeners leave and others
join (late, mid-stream) and a few streams get new controls. It counts underruns of listeners that had
already heard audio (a new listener's first packet may find its stream's buffer empty: that is the stream
starting for it, not a glitch), samples the process's RSS every `--sample` seconds, and writes JSON.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from wavecast.streaming.engine import BUDGET, Engine, EngineSaturated, Stream  # noqa: E402
from wavecast.streaming.model import FrameModel  # noqa: E402
from wavecast.streaming.ring import Reader  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PACKET = 960


def log(msg: str) -> None:
    print(f"[soak] {msg}", file=sys.stderr, flush=True)


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class Sender(threading.Thread):
    """Takes a packet from every listener every 20 ms by the wall clock; counts glitches."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(daemon=True)
        self.engine = engine
        self.listeners: list[tuple[Stream, Reader]] = []
        self.lock = threading.Lock()
        self.glitches = 0  # underruns of listeners that had heard audio
        self.packets = 0
        self.late = 0  # packets taken more than 10 ms after their time (the sender itself fell behind)
        self.stop = threading.Event()

    def run(self) -> None:
        buf, start, k = np.zeros(PACKET, np.float32), time.monotonic(), 0
        while not self.stop.is_set():
            k += 1
            wait = start + 0.02 * k - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            elif wait < -0.01:
                self.late += 1
            with self.lock:
                listeners = list(self.listeners)
            for _, r in listeners:
                heard = r.heard
                if r.read(buf) < PACKET and heard:
                    self.glitches += 1
            self.packets += len(listeners)
            self.engine.notify()


class GcPauses:
    """The longest pause of each garbage-collector generation: a collection holds the GIL, so every thread,
    the inference thread included, waits for it."""

    def __init__(self) -> None:
        self.longest = [0.0, 0.0, 0.0]
        self.count = [0, 0, 0]
        self._started = 0.0
        gc.callbacks.append(self)

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            g = info["generation"]
            self.longest[g] = max(self.longest[g], time.perf_counter() - self._started)
            self.count[g] += 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=ROOT / "models/shipped/default", help="model.json + model.onnx")
    p.add_argument("--seconds", type=float, default=600.0, help="how long to run (default: %(default)s)")
    p.add_argument("--share", type=float, default=0.8, help="share of the admission cap to run (default: %(default)s)")
    p.add_argument("--budget", type=float, default=BUDGET, help="the engine's tick budget (default: %(default)s)")
    p.add_argument("--churn", type=float, default=0.05, help="share of listeners replaced each second")
    p.add_argument("--sample", type=float, default=10.0, help="seconds between RSS samples")
    p.add_argument("--freeze", action="store_true", help="gc.freeze() after start-up (fewer objects to collect)")
    p.add_argument("--out", type=Path, default=ROOT / "bench/out/soak.json", help="JSON results (folder is made)")
    a = p.parse_args(argv)
    pauses = GcPauses()
    model = FrameModel(a.model_dir, device="cpu", threads=1)
    engine = Engine(budget=a.budget)
    group = engine.add_model(model)
    rng = np.random.default_rng(0)
    streams = []
    try:
        while True:
            seed = len(streams)
            f0 = float(110 * 2 ** (rng.integers(0, 36) / 12))
            streams.append(engine.create_stream(group, seed, {"f0": f0, "loudness": -20.0}))
    except EngineSaturated:
        pass
    cap = len(streams)
    keep = max(1, int(a.share * cap))
    for s in streams[keep:]:
        engine.delete_stream(s.id)
    streams = streams[:keep]
    log(f"admission cap {cap} streams ({1e6 * group.stream_seconds:.1f} us/stream, "
        f"{1e6 * group.fixed_seconds:.0f} us fixed); running {keep} for {a.seconds:g} s")
    sender = Sender(engine)
    sender.listeners = [(s, s.listen()) for s in streams]
    if a.freeze:
        gc.freeze()
    engine.start()
    time.sleep(0.3)
    sender.start()
    samples, started, joined, left = [], time.monotonic(), 0, 0
    next_sample = started
    try:
        while (now := time.monotonic()) < started + a.seconds:
            if now >= next_sample:
                samples.append({"t": round(now - started, 1), "rss": rss_bytes(), "glitches": sender.glitches,
                                "overhead": round(engine.overhead, 3),
                                "tick_ms": round(1000 * engine.stats.last_tick_seconds, 3)})
                log(f"{samples[-1]['t']:6.0f} s  rss {samples[-1]['rss'] / 2**20:.1f} MiB  glitches "
                    f"{sender.glitches}  listeners {len(sender.listeners)}  last tick {samples[-1]['tick_ms']} ms")
                next_sample += a.sample
            time.sleep(1.0)
            n = max(1, int(a.churn * len(sender.listeners)))
            with sender.lock:
                leaving = [sender.listeners.pop(int(rng.integers(len(sender.listeners)))) for _ in range(n)]
            for stream, r in leaving:
                stream.unlisten(r)
            joining = [(s, s.listen()) for s in (streams[int(rng.integers(len(streams)))] for _ in range(n))]
            with sender.lock:
                sender.listeners += joining
            joined, left = joined + n, left + n
            for s in rng.choice(streams, size=n):
                s.set_controls({"f0": float(110 * 2 ** (rng.integers(0, 36) / 12))})
    finally:
        sender.stop.set()
        sender.join(2)
        engine.stop()
    rss = [s["rss"] for s in samples]
    settled = rss[1:] or rss  # the first sample is taken before the first listeners churn
    r = {"bench": "soak", "created": datetime.now(UTC).isoformat(timespec="seconds"), "model": f"{model.manifest.name}"
         f" v{model.manifest.version}", "seconds": a.seconds, "budget": a.budget, "admission_cap": cap,
         "streams": keep, "share": keep / cap, "listeners_joined": joined, "listeners_left": left,
         "packets": sender.packets, "underruns": sender.glitches, "sender_late": sender.late,
         "rss_start_mib": settled[0] / 2**20, "rss_end_mib": settled[-1] / 2**20, "rss_max_mib": max(settled) / 2**20,
         "rss_drift_pct": 100 * (settled[-1] / settled[0] - 1), "frames": engine.stats.frames,
         "max_tick_ms": 1000 * engine.stats.max_tick_seconds,
         "max_model_call_ms": 1000 * engine.stats.max_model_seconds, "gc_frozen": a.freeze,
         "gc_collections": pauses.count, "gc_longest_ms": [round(1000 * x, 2) for x in pauses.longest],
         "fill_frames": {int(k): int(v) for k, v in zip(*np.unique(group.rings.ahead[[s.slot for s in streams]],
                                                                   return_counts=True), strict=True)},
         "samples": samples}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(r, indent=2) + "\n")
    print(f"soak: {keep} streams ({100 * r['share']:.0f} % of the admission cap {cap}) for {a.seconds:g} s, "
          f"{joined} listeners joined and {left} left\n"
          f"underruns after first audio: {r['underruns']} in {r['packets']} packets "
          f"(sender late {r['sender_late']} times)\n"
          f"RSS {r['rss_start_mib']:.1f} -> {r['rss_end_mib']:.1f} MiB ({r['rss_drift_pct']:+.1f} %), "
          f"max {r['rss_max_mib']:.1f}; longest tick {r['max_tick_ms']:.1f} ms "
          f"(longest model call in a tick {r['max_model_call_ms']:.1f} ms)\n"
          f"stream fills at the end (frames: streams): {r['fill_frames']}\n"
          f"garbage collections by generation {r['gc_collections']}, longest pauses {r['gc_longest_ms']} ms\n"
          f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
