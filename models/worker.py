"""`python -m wavecast.models.worker KIND [options of wavecast train KIND]`: one training job in a process of its
own, started by the daemon's jobs manager (daemon/jobs.py), so that torch never enters the daemon.

It lowers its own priority first (nice 10) and bounds torch's threads (`--threads`; the daemon also sets
OMP_NUM_THREADS), so the daemon's streams keep real time, then runs the same `run()` as `wavecast train KIND`.
Its stdout carries JSON lines for the daemon, one object each:
  {"event": "progress", "phase": "data"|"train"|"export"|"verify"|"publish", ...}  as models/runs.py reports
      them: step, steps, loss, eta_seconds; checkpoint, checkpoint_step, resumed_from; at the end model and
      version (published) or refused (the gate's reason)
  {"event": "error", "message": ...}  why the run stopped early (the exit status is then not 0)
Log lines go to stderr (the job's log.txt); anything else printed to stdout joins them, as the protocol has a
file descriptor of its own. SIGTERM, or its stdin closing (the daemon is gone), unwinds the run like an
exception, so its temporary files go.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import signal
import sys
import threading

NICE = 10


class Stopped(BaseException):
    """SIGTERM (the daemon cancels the job or is stopping), or the daemon is gone."""


def finite(value: object) -> object:
    """JSON has no NaN or infinity: a diverged loss is reported as null."""
    return value if not isinstance(value, float) or math.isfinite(value) else None


def emit(protocol: int, message: dict) -> None:
    """One JSON line to the daemon; when it is gone (a broken pipe), the run stops as on SIGTERM."""
    try:
        os.write(protocol, (json.dumps({k: finite(v) for k, v in message.items()}) + "\n").encode())
    except BrokenPipeError:
        raise Stopped from None


def on_sigterm(signum: int, frame: object) -> None:
    raise Stopped


def stop_when_stdin_closes() -> None:
    """The daemon holds the other end of stdin: EOF means it is gone, and the job with it."""
    while os.read(0, 4096):  # not sys.stdin: a thread blocked in its buffered reader aborts the interpreter's exit
        pass
    os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str]) -> int:
    os.nice(NICE)
    protocol = os.dup(1)
    os.dup2(2, 1)  # stray prints join the log, not the protocol
    signal.signal(signal.SIGTERM, on_sigterm)
    threading.Thread(target=stop_when_stdin_closes, daemon=True, name="stdin-watch").start()

    from wavecast.daemon.cli import build_parser
    from wavecast.models import runs

    args = build_parser().parse_args(["train", *argv])  # exits 2 with the parser's message on bad options
    runs.REPORTING.event = lambda event: emit(protocol, {"event": "progress", **event})
    try:
        import torch

        torch.set_num_interop_threads(args.threads)
        module = importlib.import_module("wavecast.models.train_composer" if args.what == "composer"
                                         else "wavecast.models.train")
        module.run(args, ["train", *argv])
    except Stopped:  # the run has unwound (its temporary files are gone); skip the interpreter's slow teardown
        with contextlib.suppress(Stopped):
            emit(protocol, {"event": "error", "message": "stopped by SIGTERM"})
        sys.stderr.flush()
        os._exit(128 + signal.SIGTERM)
    except SystemExit as e:  # the run's own refusal, in words
        if e.code in (0, None):
            return 0
        emit(protocol, {"event": "error", "message": str(e.code).removeprefix("error: ")})
        return 1
    except Exception as e:
        runs.log(f"the run failed: {type(e).__name__}: {e}")
        emit(protocol, {"event": "error", "message": f"the run failed ({type(e).__name__}: {e}); the job's log "
                                                     "has the traceback"})
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
