"""Does a training job beside the engine cost the streams their real time?

Run from the repository root:  PYTHONPATH=. .venv/bin/python bench/jobs.py [--streams 64] [--phase 30] [--rounds 3]

The live engine (its own inference thread) plays `--streams` streams of the shipped default model to a sender
thread that takes a 20 ms packet from each on the wall clock, as the WebRTC encoders do. Beside it, one real
training job runs in a worker process exactly as the daemon starts one (`python -m wavecast.models.worker
instrument --quick ...`: nice 10, one torch thread). Once the worker is training, phases alternate in one run:
the job paused (SIGSTOP: the machine as without a job) and the job running (SIGCONT), `--phase` seconds each,
`--rounds` times; every tick's duration and the listeners' underruns are counted per phase. Prints the table and
writes JSON (default bench/out/jobs.json).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from wavecast.streaming.engine import Engine, Stream
from wavecast.streaming.model import FrameModel
from wavecast.streaming.ring import Reader

ROOT = Path(__file__).resolve().parent.parent
PACKET = 960  # samples: 20 ms at 48 kHz


def log(msg: str) -> None:
    print(f"[jobs] {msg}", file=sys.stderr, flush=True)


class Sender(threading.Thread):
    """Takes a packet from every listener every 20 ms by the wall clock; counts underruns after first audio."""

    def __init__(self, engine: Engine, listeners: list[tuple[Stream, Reader]]) -> None:
        super().__init__(daemon=True)
        self.engine, self.listeners = engine, listeners
        self.underruns = 0
        self.stop = threading.Event()

    def run(self) -> None:
        buf, start, k = np.zeros(PACKET, np.float32), time.monotonic(), 0
        while not self.stop.is_set():
            k += 1
            wait = start + 0.02 * k - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            for _, reader in self.listeners:
                heard = reader.heard
                if reader.read(buf) < PACKET and heard:
                    self.underruns += 1
            self.engine.notify()


def timed_ticks(engine: Engine) -> list[float]:
    """Wrap the engine's tick so that every tick that made audio records its duration (seconds)."""
    durations: list[float] = []
    tick = engine.tick

    def timed() -> int:
        started = time.perf_counter()
        made = tick()
        if made:
            durations.append(time.perf_counter() - started)
        return made

    engine.tick = timed  # the inference thread looks the method up on each tick
    return durations


def start_job(tmp: Path) -> subprocess.Popen:
    """A quick instrument job, started as the daemon's jobs manager starts one (daemon/jobs.py)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "wavecast.models.worker", "instrument", "--quick", "--name", "bench-job",
            "--threads", "1", "--store", str(tmp / "store"), "--work", str(tmp / "work")]
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=(tmp / "job.log").open("wb"),
                            env=env, cwd=tmp, start_new_session=True)


def wait_for_training(job: subprocess.Popen, timeout: float) -> None:
    """Until the worker reports a training step (its data is made by then), or fail."""
    deadline = time.monotonic() + timeout
    for line in job.stdout:
        message = json.loads(line)
        if message.get("phase") == "train" and message.get("step"):
            return
        if time.monotonic() > deadline:
            break
    raise SystemExit("the training job did not reach its training steps; see its log")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=ROOT / "models/shipped/default", help="model.json + model.onnx")
    p.add_argument("--streams", type=int, default=64, help="streams playing (default: %(default)s)")
    p.add_argument("--phase", type=float, default=30.0, help="seconds per phase (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="pairs of phases, paused and running (default: %(default)s)")
    p.add_argument("--out", type=Path, default=ROOT / "bench/out/jobs.json", help="JSON results (folder is made)")
    a = p.parse_args(argv)

    model = FrameModel(a.model_dir, device="cpu", threads=1)
    engine = Engine()
    group = engine.add_model(model)
    rng = np.random.default_rng(0)
    streams = [engine.create_stream(group, seed, {"f0": float(110 * 2 ** (rng.integers(0, 36) / 12)),
                                                  "loudness": -20.0}) for seed in range(a.streams)]
    durations = timed_ticks(engine)
    sender = Sender(engine, [(s, s.listen()) for s in streams])
    phases = []
    with tempfile.TemporaryDirectory(prefix="wavecast-bench-jobs-") as tmp:
        job = start_job(Path(tmp))
        try:
            log("waiting for the job to train (it makes its data first)")
            wait_for_training(job, timeout=1200)
            threading.Thread(target=lambda: [None for _ in job.stdout], daemon=True).start()  # keep its pipe drained
            engine.start()
            sender.start()
            time.sleep(2.0)  # streams start; their first underruns are not counted
            for k in range(2 * a.rounds):
                running = k % 2 == 1
                os.killpg(job.pid, signal.SIGCONT if running else signal.SIGSTOP)
                durations.clear()
                before = sender.underruns
                time.sleep(a.phase)
                ticks = np.array(durations) * 1000
                phases.append({"job": "running" if running else "paused", "ticks": len(ticks),
                               "tick_ms_p50": float(np.percentile(ticks, 50)),
                               "tick_ms_p99": float(np.percentile(ticks, 99)), "tick_ms_max": float(ticks.max()),
                               "underruns": sender.underruns - before})
                f = phases[-1]
                log(f"phase {k + 1}: job {f['job']:7}  tick p50 {f['tick_ms_p50']:.2f} ms  p99 {f['tick_ms_p99']:.2f} "
                    f"ms  max {f['tick_ms_max']:.1f} ms  underruns {f['underruns']}")
        finally:
            sender.stop.set()
            engine.stop()
            os.killpg(job.pid, signal.SIGCONT)
            job.terminate()
            job.wait(30)

    def summary(state: str) -> dict:
        rows = [f for f in phases if f["job"] == state]
        return {"tick_ms_p50": float(np.median([f["tick_ms_p50"] for f in rows])),
                "tick_ms_p99": float(np.median([f["tick_ms_p99"] for f in rows])),
                "underruns": sum(f["underruns"] for f in rows), "seconds": a.phase * len(rows)}

    r = {"bench": "jobs", "created": datetime.now(UTC).isoformat(timespec="seconds"), "cores": os.cpu_count(),
         "model": f"{model.manifest.name} v{model.manifest.version}", "streams": a.streams, "phase_seconds": a.phase,
         "without_job": summary("paused"), "with_job": summary("running"), "phases": phases}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(r, indent=2) + "\n")
    w, j = r["without_job"], r["with_job"]
    print(f"{a.streams} streams, {a.rounds} x {a.phase:g} s per state, alternating, one run\n"
          f"| job beside the engine | tick p50 | tick p99 | underruns |\n| --- | --- | --- | --- |\n"
          f"| none (worker paused) | {w['tick_ms_p50']:.2f} ms | {w['tick_ms_p99']:.2f} ms | {w['underruns']} |\n"
          f"| training (nice 10, 1 thread) | {j['tick_ms_p50']:.2f} ms | {j['tick_ms_p99']:.2f} ms | "
          f"{j['underruns']} |\nwrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
