"""Training jobs: `wavecast train` runs queued by the daemon, each in a worker process of its own
(`python -m wavecast.models.worker`, niced, with a bounded torch thread count; torch is never imported here),
and their records on disk, which outlive the daemon.

Records live in a `jobs` directory beside the store (the store's parent: for the default store
`$XDG_DATA_HOME/wavecast/jobs`), one directory per job: `job.json`, the record (rewritten whole and atomically
on every change, by the daemon only), `log.txt`, the worker's log, and while it runs `tmp/`, the worker's
TMPDIR, removed when the worker ends however it ends (its export candidate lives there). Data caches and
checkpoints are in the daemon's work directory (`~/.cache/wavecast`, as for `wavecast train`), so a job
resumed after a failure, an interruption or a cancel that kept its checkpoint goes on from its last checkpoint
(every 100 steps). One daemon per store: a daemon that starts marks the jobs it finds queued or running as
interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import shutil
import signal
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from wavecast.daemon.api import ApiError
from wavecast.daemon.limits import Limits
from wavecast.daemon.schema import check

log = logging.getLogger("wavecast.jobs")
KINDS = ("instrument", "composer")
ENDED = frozenset({"succeeded", "failed", "cancelled"})
SETTLED = ENDED | {"interrupted"}  # states in which nothing moves until someone acts
GRACE_SECONDS = 5.0  # SIGTERM, then SIGKILL after this: a cancelled worker unwinds its temporary files first
SHUTDOWN_GRACE_SECONDS = 2.0  # shorter when the daemon stops: it promises to exit within 5 s
LOG_TAIL_LINES = 20
# `wavecast train` options a job may not set: paths on the daemon's machine. A job publishes to the store the
# daemon serves and uses the daemon's work directory (so its checkpoint is found again on resume); an API
# client must not choose where the daemon writes files.
NOT_FOR_JOBS = frozenset({"store", "out", "work"})
JOB_THREADS = 1  # torch threads of a job unless its config says: streams keep real time on a 2-core machine


# -- the config: `wavecast train` options, as JSON -------------------------------------------------------------
def train_parser(kind: str) -> argparse.ArgumentParser:
    """A parser with exactly the options of `wavecast train KIND` (the CLI's own definitions)."""
    from wavecast.daemon.cli import add_composer_train_arguments, add_train_arguments

    parser = argparse.ArgumentParser(prog=f"wavecast train {kind}", add_help=False)
    (add_composer_train_arguments if kind == "composer" else add_train_arguments)(parser)
    return parser


def option_schema(action: argparse.Action) -> dict:
    """The JSON Schema of one argparse option: booleans for flags, numbers with the range of `number()`, names
    with their pattern, lists for nargs='+', enums for choices; its help as the description."""
    if action.nargs == 0:  # store_true
        schema: dict = {"type": "boolean"}
    elif hasattr(action.type, "kind"):  # cli.number(kind, low, high)
        schema = {"type": "integer" if action.type.kind is int else "number",
                  "minimum": action.type.low, "maximum": action.type.high}
    elif action.choices is not None:
        schema = {"enum": list(action.choices)}
    elif hasattr(action.type, "pattern"):  # cli.model_name
        schema = {"type": "string", "pattern": action.type.pattern, "description": action.type.description}
    else:
        schema = {"type": "string", "minLength": 1, "maxLength": 256}
    if action.nargs == "+":
        schema = {"type": "array", "items": schema, "minItems": 1}
    if action.default is not None and action.nargs != 0:
        schema["default"] = action.default
    if action.help and "description" not in schema:
        schema["description"] = action.help.replace("%(default)s", str(action.default))
    return schema


def config_schema(kind: str) -> dict:
    props = {a.dest: option_schema(a) for a in train_parser(kind)._actions if a.dest not in NOT_FOR_JOBS}
    props["threads"] |= {"default": JOB_THREADS, "maximum": os.cpu_count() or 1,
                         "description": f"torch CPU threads of the worker (default {JOB_THREADS}, so that the "
                                        "streams keep real time; at most this machine's CPUs)"}
    return {"type": "object", "additionalProperties": False, "properties": props,
            "description": f"the options of 'wavecast train {kind}' by name, without the dashes (--quick -> "
                           "\"quick\": true); a job publishes to the daemon's own store"}


CONFIG_SCHEMAS = {kind: config_schema(kind) for kind in KINDS}


def validate_config(kind: str, config: dict) -> None:
    """Refuse (422, naming the field) a `config` that does not fit the options of `wavecast train KIND`."""
    from wavecast.daemon.schema import Invalid

    schema = CONFIG_SCHEMAS[kind]
    try:
        check(schema, config, "config")
        for key, value in config.items():
            items = schema["properties"][key].get("items")
            if items is not None:
                if not value:
                    raise Invalid(f"'config.{key}' must not be empty; name at least one")
                for i, item in enumerate(value):
                    check(items, item, f"config.{key}[{i}]")
    except Invalid as e:
        raise ApiError(422, "invalid_config", f"{e.message}; 'wavecast train {kind} --help' describes each "
                       "option") from None


def config_argv(kind: str, config: dict) -> list[str]:
    """The `wavecast train KIND` options that say what `config` says."""
    argv = []
    for key in CONFIG_SCHEMAS[kind]["properties"]:
        value = config.get(key, JOB_THREADS if key == "threads" else None)
        if value is None or value is False:
            continue
        if value is True:
            argv.append(f"--{key}")
        elif isinstance(value, list):
            argv += [f"--{key}", *map(str, value)]
        else:
            argv.append(f"--{key}={value}")
    return argv


# -- records ---------------------------------------------------------------------------------------------------
def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class Job:
    """A job's record, as job.json holds it and the API shows it."""

    id: str
    kind: str
    config: dict
    created: str
    state: str = "queued"  # queued, running, succeeded, failed, cancelled, interrupted
    started: str | None = None
    ended: str | None = None
    phase: str | None = None  # data, train, export, verify, publish
    step: int | None = None
    steps: int | None = None
    loss: float | None = None
    eta_seconds: float | None = None
    checkpoint: str | None = None  # the run's checkpoint file, once the worker has named it
    checkpoint_step: int | None = None  # the step it holds
    resumed_from: int | None = None  # the step this attempt began at (0: from scratch)
    result: dict | None = None  # {"model", "version"} published, or {"refused": why}
    error: str | None = None
    pid: int | None = None  # the worker's, while it runs
    attempts: int = 0

    @classmethod
    def from_dict(cls, record: dict) -> Job:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in names})


class Jobs:
    """The daemon's jobs: a FIFO queue, at most `limits.job_concurrency` workers at once, at most
    `limits.max_jobs` queued and running together."""

    def __init__(self, root: Path, store: Path, work: Path, limits: Limits) -> None:
        self.root, self.store, self.work, self.limits = root, store, work, limits
        self.jobs: dict[str, Job] = {}
        self.queue: deque[str] = deque()
        self.running: dict[str, asyncio.Task] = {}
        self.workers: dict[str, asyncio.subprocess.Process] = {}
        self.stopping: dict[str, str] = {}  # id -> why its worker is being stopped: "cancel" or "shutdown"
        self.keep: set[str] = set()  # ids cancelled with keep_checkpoint
        self.watchers: dict[str, set[asyncio.Queue]] = {}
        self.seq: dict[str, int] = {}  # updates per job, the `id:` of its server-sent events
        self.closed = False
        self.tasks: set[asyncio.Task] = set()  # background stops, referenced until they end
        self._load()

    def _load(self) -> None:
        """Read the records left by earlier daemons; a job they left queued or running is interrupted."""
        if not self.root.is_dir():
            return
        for d in sorted(self.root.iterdir()):
            path = d / "job.json"
            try:
                job = Job.from_dict(json.loads(path.read_text()))
            except (OSError, ValueError, TypeError, AttributeError):
                if path.exists():
                    log.warning("job record unreadable, left out path=%s", path)
                continue
            if job.id != d.name or job.kind not in KINDS or not isinstance(job.config, dict):
                log.warning("job record does not match its directory, left out path=%s", path)
                continue
            if job.state in ("queued", "running"):
                job.error = (f"the daemon stopped while it was {job.state}; POST /v1/jobs/{job.id}/resume "
                             + ("continues from its last checkpoint" if job.state == "running" else "queues it again"))
                job.state, job.pid, job.ended = "interrupted", None, job.ended or now()
                self._save(job)
            shutil.rmtree(d / "tmp", ignore_errors=True)  # a worker that died with its daemon leaves its TMPDIR
            self.jobs[job.id] = job

    def _save(self, job: Job) -> None:
        d = self.root / job.id
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / "job.json.tmp"
        tmp.write_text(json.dumps(asdict(job), indent=1) + "\n")
        os.replace(tmp, d / "job.json")

    def _changed(self, job: Job, event: str = "progress") -> None:
        """Save the record and tell whoever follows the job (an `end` event when it has settled)."""
        self._save(job)
        seq = self.seq[job.id] = self.seq.get(job.id, 0) + 1
        update = (event, seq, self.info(job, tail=event == "end"))
        for queue in self.watchers.get(job.id, ()):
            if queue.full():  # a follower that does not read loses the oldest progress, never the end
                queue.get_nowait()
            queue.put_nowait(update)

    # -- what the API asks ---------------------------------------------------------------------------------
    def get(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise ApiError(404, "unknown_job", "no job has that id; GET /v1/jobs lists them")
        return job

    def info(self, job: Job, tail: bool = True) -> dict:
        info = asdict(job) | {"log": str(self.root / job.id / "log.txt")}
        if tail:
            info["log_tail"] = self.log_tail(job)
        return info

    def log_tail(self, job: Job) -> list[str]:
        try:
            with (self.root / job.id / "log.txt").open("rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 8192))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return []
        return text.splitlines()[-LOG_TAIL_LINES:]

    def active(self) -> int:
        return len(self.queue) + len(self.running)

    def submit(self, kind: str, config: dict) -> Job:
        validate_config(kind, config)  # a bad config is refused as such, even when the queue is full
        self._admit()
        job = Job(id=f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}", kind=kind, config=config,
                  created=now())
        self.jobs[job.id] = job
        self._enqueue(job)
        return job

    def resume(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job.state not in ("interrupted", "failed", "cancelled"):
            what = "its model is published; POST /v1/jobs to train again" if job.state == "succeeded" \
                else "it is on its way already"
            raise ApiError(409, "job_not_resumable", f"the job is {job.state}: {what}")
        self._admit()
        job.error = job.ended = None
        self._enqueue(job)
        return job

    def _admit(self) -> None:
        if self.closed:
            raise ApiError(503, "shutting_down", "the daemon is stopping; submit the job when it is back")
        if self.active() >= self.limits.max_jobs:
            raise ApiError(429, "too_many_jobs", f"this daemon holds at most {self.limits.max_jobs} queued and "
                           "running jobs (--max-jobs); wait for one to end or cancel one (DELETE /v1/jobs/ID)")

    def _enqueue(self, job: Job) -> None:
        job.state = "queued"
        self.queue.append(job.id)
        self._changed(job)
        self._pump()

    def _pump(self) -> None:
        while self.queue and len(self.running) < self.limits.job_concurrency and not self.closed:
            job = self.jobs[self.queue.popleft()]
            self.running[job.id] = asyncio.get_running_loop().create_task(self._run(job))

    async def cancel(self, job_id: str, keep_checkpoint: bool) -> Job:
        """End the job: a queued one leaves the queue, a running one's worker is stopped (SIGTERM, then SIGKILL
        after GRACE_SECONDS) and its temporary files go; its checkpoint goes too unless `keep_checkpoint`."""
        job = self.get(job_id)
        if job.state in ENDED:
            raise ApiError(409, "job_ended", f"the job has already ended ({job.state}); nothing to cancel")
        if job.id in self.running:
            self.stopping[job.id] = "cancel"
            if keep_checkpoint:
                self.keep.add(job.id)
            task = self.running[job.id]
            await self._stop(job.id, GRACE_SECONDS)
            await asyncio.shield(task)
            return job
        if job.id in self.queue:
            self.queue.remove(job.id)
        if not keep_checkpoint:
            self._remove_checkpoint(job)
        job.state, job.ended, job.error = "cancelled", now(), None
        self._changed(job, "end")
        return job

    async def shutdown(self) -> None:
        """Stop every worker (their jobs become interrupted, checkpoints kept) and take no more jobs."""
        self.closed = True
        running = list(self.running.items())
        for job_id, _ in running:
            self.stopping[job_id] = "shutdown"
        await asyncio.gather(*(self._stop(job_id, SHUTDOWN_GRACE_SECONDS) for job_id, _ in running))
        await asyncio.gather(*(task for _, task in running), return_exceptions=True)

    async def _stop(self, job_id: str, grace: float) -> None:
        proc = self.workers.get(job_id)
        if proc is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)  # the worker leads its own process group: its children go too
            except ProcessLookupError:
                return
            try:
                await asyncio.wait_for(proc.wait(), grace)
                return
            except TimeoutError:
                log.warning("job worker did not stop on SIGTERM within %.0f s; killing it id=%s", grace, job_id)

    def _background(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -- a job's run -------------------------------------------------------------------------------------------
    async def _run(self, job: Job) -> None:
        d = self.root / job.id
        tmp = d / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        job.state, job.started, job.ended, job.attempts = "running", now(), None, job.attempts + 1
        job.error = job.result = job.phase = job.step = job.loss = job.eta_seconds = job.resumed_from = None
        threads = str(job.config.get("threads", JOB_THREADS))
        env = os.environ | {"TMPDIR": str(tmp), "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
                            "PYTHONUNBUFFERED": "1"}
        argv = [job.kind, *config_argv(job.kind, job.config), "--store", str(self.store), "--work", str(self.work)]
        error = None
        try:
            with (d / "log.txt").open("ab") as log_file:
                log_file.write(f"-- {now()} attempt {job.attempts}: wavecast train {' '.join(argv)}\n".encode())
                log_file.flush()
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "wavecast.models.worker", *argv, stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE, stderr=log_file, env=env, cwd=d, start_new_session=True)
            self.workers[job.id] = proc
            if job.id in self.stopping:  # cancelled (or the daemon stopping) while the worker started
                self._background(self._stop(job.id, GRACE_SECONDS))
            job.pid = proc.pid
            self._changed(job)
            log.info("job started id=%s kind=%s pid=%s", job.id, job.kind, proc.pid)
            async for line in proc.stdout:
                try:
                    message = json.loads(line)
                except ValueError:
                    continue
                if message.get("event") == "progress":
                    self._progress(job, message)
                elif message.get("event") == "error":
                    error = str(message.get("message"))
            returncode = await proc.wait()
        except OSError as e:
            returncode, error = None, f"the worker could not start ({e.strerror or e}); see the daemon log"
            log.exception("job worker did not start id=%s", job.id)
        finally:
            self.workers.pop(job.id, None)
            shutil.rmtree(tmp, ignore_errors=True)
        self._settle(job, returncode, error)
        del self.running[job.id]
        self._pump()

    def _progress(self, job: Job, message: dict) -> None:
        job.phase = message.get("phase", job.phase)
        for key in ("step", "steps", "loss", "eta_seconds", "checkpoint", "checkpoint_step", "resumed_from"):
            if key in message:
                setattr(job, key, message[key])
        if "refused" in message:
            job.result = {"refused": message["refused"]}
        elif "model" in message:
            job.result = {"model": message["model"], "version": message["version"]}
        self._changed(job)

    def _settle(self, job: Job, returncode: int | None, error: str | None) -> None:
        """The job's end, from why its worker was stopped, its exit status and what it said last."""
        why = self.stopping.pop(job.id, None)
        keep = job.id in self.keep
        self.keep.discard(job.id)
        resume = f"POST /v1/jobs/{job.id}/resume " + (
            f"goes on from its checkpoint at step {job.checkpoint_step}" if job.checkpoint_step else "starts it again")
        if why == "cancel":
            state, error = "cancelled", None
            if not keep:
                self._remove_checkpoint(job)
        elif why == "shutdown":
            state, error = "interrupted", f"the daemon stopped while the job ran; {resume}"
        elif returncode == 0 and job.result and "model" in job.result:
            state, error = "succeeded", None
            job.checkpoint = job.checkpoint_step = None  # a finished run removes its checkpoint
        elif job.result and "refused" in job.result:
            state, error = "failed", job.result["refused"]
        elif returncode is not None and returncode < 0:
            try:
                name = signal.Signals(-returncode).name
            except ValueError:
                name = "unknown"
            state = "failed"
            error = (f"the worker was killed by signal {-returncode} ({name})"
                     + ("; the system may have run out of memory (see 'dmesg' for the OOM killer) or something "
                        "else killed it" if -returncode == signal.SIGKILL else "")
                     + f"; the daemon and its streams went on; {resume}")
        else:
            state = "failed"
            error = error or (f"the worker exited with status {returncode} before it finished; the end of its "
                              f"log says: {(self.log_tail(job) or ['nothing'])[-1]}")
        job.state, job.error, job.pid, job.ended = state, error, None, now()
        job.eta_seconds = None
        log.info("job ended id=%s state=%s", job.id, state)
        self._changed(job, "end")

    def _remove_checkpoint(self, job: Job) -> None:
        """Remove the job's checkpoint, if it named one inside the work directory's runs/."""
        if job.checkpoint:
            path = Path(job.checkpoint)
            if path.parent == self.work / "runs":
                path.unlink(missing_ok=True)
                path.with_suffix(".tmp").unlink(missing_ok=True)
            job.checkpoint = job.checkpoint_step = None

    # -- followers -------------------------------------------------------------------------------------------
    def watch(self, job_id: str) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue(maxsize=256)
        self.watchers.setdefault(job_id, set()).add(queue)
        return queue

    def unwatch(self, job_id: str, queue: asyncio.Queue) -> None:
        queue_set = self.watchers.get(job_id, set())
        queue_set.discard(queue)
        if not queue_set:
            self.watchers.pop(job_id, None)
