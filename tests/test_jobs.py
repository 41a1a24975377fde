"""Training jobs against a real `wavecast serve`: real worker processes train real (tiny) composers on the music21
corpus. A job publishes its model; the daemon never maps torch; a SIGKILLed worker fails its job alone while a
stream plays on; cancel removes the job's files; a restart keeps the records and interrupts the running job,
which resumes from its checkpoint; a bad config is refused up front, naming the field."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, Server, start_server, stop_server, wavecast_command
from tests.test_packaging import torch_files
from wavecast.daemon.cli import build_parser
from wavecast.daemon.client import Listener

pytest.importorskip("torch", reason="training needs the 'train' extra: ./install train")

TONE = {"seed": 1, "controls": {"f0": 440, "loudness": -20}}
# The smallest composer run that passes the store's gate here (held-out NLL below the order-3 Markov chain's).
TINY = ["--quick", "--name", "jobs-tiny"]
# A run that goes on for as long as a test needs, each step a few milliseconds: a checkpoint every 100 steps.
LONG = {"quick": True, "steps": 1_000_000, "hidden": 16, "batch": 2, "length": 8}
PHASES = ["data", "train", "export", "verify", "publish"]
REPR = re.compile(r"\bNone\b|got '|!r|Traceback")
SERVE_ARGS = ("--max-jobs", "3")


@dataclass
class Served:
    """The module's daemon; the restart test replaces it with a new one on the same directories."""

    server: Server
    tmp: Path
    env: dict

    def restart(self) -> None:
        self.server = start_server(self.tmp, extra_env=self.env, args=SERVE_ARGS)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("jobs")
    env = {"XDG_CACHE_HOME": str(tmp / "cache")}  # the jobs' corpus cache and checkpoints
    s = Served(start_server(tmp, extra_env=env, args=SERVE_ARGS), tmp, env)
    yield s
    stop_server(s.server)


def job_dir(served: Served, job: dict) -> Path:
    return served.tmp / "jobs" / job["id"]


def until(server: Server, job: dict, done, what: str, timeout: float = 240) -> dict:
    """Poll the job until `done(job)`; the timeout only stops a hung test."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, job = server.request("GET", f"/v1/jobs/{job['id']}")
        assert status == 200, job
        if done(job):
            return job
        assert job["state"] not in ("succeeded", "failed", "cancelled"), (what, job)
        time.sleep(0.3)
    raise AssertionError(f"job never {what}: {job}")


def running_at(step: int):
    return lambda j: j["state"] == "running" and (j["checkpoint_step"] or 0) >= step


def nice(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


def alive(pid: int) -> bool:
    """Whether `pid` is a job worker still (a pid may be reused by then)."""
    try:
        return b"wavecast.models.worker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def server_sent_events(url: str, job_id: str) -> Iterator[tuple[int, str, dict]]:
    """(id, event, data) of each event, until the daemon closes the stream."""
    with urllib.request.urlopen(f"{url}/v1/jobs/{job_id}/events", timeout=120) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        fields: dict[str, str] = {}
        for raw in response:
            line = raw.decode().rstrip("\n")
            if line.startswith(":"):
                continue
            if line:
                name, _, value = line.partition(": ")
                fields[name] = value
            elif fields:
                yield int(fields["id"]), fields["event"], json.loads(fields["data"])
                fields = {}


def assert_error(status: int, body: dict, want: int, code: str, *words: str) -> None:
    assert status == want and body["error"]["code"] == code, (status, body)
    message = body["error"]["message"]
    assert not REPR.search(message), message
    for word in words:
        assert word in message, message


def test_a_bad_config_is_refused_naming_the_field(served: Served) -> None:
    server = served.server
    before = server.request("GET", "/v1/jobs")[1]["jobs"]
    for body, field in [
        ({"kind": "composer", "config": {"steps": 0}}, "'config.steps'"),
        ({"kind": "composer", "config": {"quick": "yes"}}, "'config.quick'"),
        ({"kind": "instrument", "config": {"length": 8}}, "'length'"),  # an option of the composer only
        ({"kind": "composer", "config": {"store": "/etc"}}, "'store'"),  # no paths: the daemon's store and work dir
        ({"kind": "instrument", "config": {"name": "Not A Name"}}, "'config.name'"),
        ({"kind": "composer", "config": {"collections": ["nope"]}}, "'config.collections[0]'"),
        ({"kind": "composer", "config": {"threads": 100_000}}, "'config.threads'"),
    ]:
        status, answer = server.request("POST", "/v1/jobs", body)
        assert_error(status, answer, 422, "invalid_config", field)
    status, answer = server.request("POST", "/v1/jobs", {"kind": "painter"})
    assert_error(status, answer, 422, "invalid_request", "'kind'", '"composer"')
    assert server.request("GET", "/v1/jobs")[1]["jobs"] == before  # nothing was queued


def test_the_config_schema_is_the_cli_options(served: Served) -> None:
    """One source of truth: the jobs API takes exactly `wavecast train KIND`'s options, less the paths."""
    doc = json.loads(served.server.text("/v1/openapi.json"))
    submit = doc["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    train = next(a for a in build_parser()._actions if a.dest == "command").choices["train"]
    kinds = next(a for a in train._actions if a.dest == "what").choices
    for branch in submit["oneOf"]:
        kind = branch["properties"]["kind"]["const"]
        options = {a.dest for a in kinds[kind]._actions} - {"help", "store", "out", "work", "daemon"}
        config = branch["properties"]["config"]
        assert set(config["properties"]) == options and config["additionalProperties"] is False
        assert config["properties"]["quick"]["type"] == "boolean"
        assert config["properties"]["steps"].items() >= {"type": "integer", "minimum": 1}.items()
    events = doc["paths"]["/v1/jobs/{id}/events"]["get"]["responses"]["200"]["content"]
    assert "end" in events["text/event-stream"]["schema"]["description"]


def test_limits_unknown_ids_and_ended_jobs(served: Served) -> None:
    server = served.server
    ids = []
    try:
        for _ in range(3):  # --max-jobs 3: one runs, two wait
            status, job = server.request("POST", "/v1/jobs", {"kind": "composer", "config": LONG | {"name": "x"}})
            assert status == 202 and job["state"] in ("queued", "running"), job
            ids.append(job["id"])
        status, answer = server.request("POST", "/v1/jobs", {"kind": "composer", "config": LONG})
        assert_error(status, answer, 429, "too_many_jobs", "--max-jobs")
    finally:
        for job_id in reversed(ids):
            status, job = server.request("DELETE", f"/v1/jobs/{job_id}")
            assert status == 200 and job["state"] == "cancelled" and job["pid"] is None, job
    assert_error(*server.request("DELETE", f"/v1/jobs/{ids[0]}"), 409, "job_ended", "cancelled")
    assert_error(*server.request("GET", "/v1/jobs/nope"), 404, "unknown_job", "GET /v1/jobs")
    assert_error(*server.request("DELETE", "/v1/jobs/nope"), 404, "unknown_job")
    assert_error(*server.request("POST", "/v1/jobs/nope/resume"), 404, "unknown_job")
    assert_error(*server.request("DELETE", f"/v1/jobs/{ids[1]}?keep_checkpoint=yes"), 422, "invalid_query",
                 "keep_checkpoint")
    listed = subprocess.run([*wavecast_command(), "jobs", "--daemon", server.url, "--json"], capture_output=True,
                            text=True, timeout=60, cwd=ROOT)
    assert listed.returncode == 0, listed.stderr
    assert {j["id"]: j["state"] for j in json.loads(listed.stdout)}.items() >= dict.fromkeys(ids, "cancelled").items()
    again = subprocess.run([*wavecast_command(), "jobs", "cancel", ids[0], "--daemon", server.url],
                           capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert again.returncode == 2 and "409" in again.stderr and "already ended" in again.stderr, again.stderr


def test_a_job_trains_in_a_niced_worker_and_publishes_its_model(served: Served) -> None:
    """`wavecast train composer ... --daemon URL` submits and follows; the test follows the events too."""
    server = served.server
    cli = subprocess.Popen([*wavecast_command(), "train", "composer", *TINY, "--daemon", server.url],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        first = cli.stderr.readline()
        job_id = re.search(r"job (\S+) (queued|running) on ", first).group(1)
        events, checked = [], False
        for seq, event, job in server_sent_events(server.url, job_id):
            events.append((seq, event, job))
            if not checked and job["phase"] == "train" and job["step"]:
                worker = job["pid"]
                assert torch_files(worker), "the check finds torch in the worker"
                assert torch_files(server.process.pid) == [], "the daemon maps torch"
                assert nice(worker) == min(19, nice(server.process.pid) + 10)
                checked = True
        out, err = cli.communicate(timeout=120)
    finally:
        if cli.poll() is None:
            cli.kill()
    assert checked, events[-1]
    assert cli.returncode == 0 and "job " + job_id + " succeeded: published 'jobs-tiny' version 1" in err, err
    # the events: in order, progress until one `end`, the states and phases in their order, steps never back
    seqs = [s for s, _, _ in events]
    assert seqs == sorted(set(seqs)), seqs
    assert [e for _, e, _ in events] == ["progress"] * (len(events) - 1) + ["end"]
    states = [j["state"] for _, _, j in events]
    assert states[-1] == "succeeded" and all(s in ("queued", "running") for s in states[:-1]), states
    assert states[:-1] == sorted(states[:-1], key=["queued", "running"].index)
    phases = [j["phase"] for _, _, j in events if j["phase"]]
    assert phases == sorted(phases, key=PHASES.index) and phases[-1] == "publish", phases
    steps = [j["step"] for _, _, j in events if j["step"] is not None]
    assert steps == sorted(steps) and steps[-1] == 600, steps
    end = events[-1][2]
    assert end["result"] == {"model": "jobs-tiny", "version": 1} and end["error"] is None, end
    assert any("published jobs-tiny v1" in line for line in end["log_tail"]), end["log_tail"]
    models = {m["name"]: m for m in server.request("GET", "/v1/models")[1]["models"]}
    assert models["jobs-tiny"]["kind"] == "composer" and models["jobs-tiny"]["version"] == 1
    record = json.loads((job_dir(served, end) / "job.json").read_text())
    assert record["state"] == "succeeded" and not (job_dir(served, end) / "tmp").exists()
    assert list((served.tmp / "cache" / "wavecast" / "runs").glob("jobs-tiny-*")) == []  # the run removed it


async def record_until(listener: Listener, stop: asyncio.Event) -> np.ndarray:
    chunks = []
    while not stop.is_set():
        chunks.append(await listener.collect(0.5))
    return np.concatenate(chunks)


async def kill_a_worker_while_a_stream_plays(served: Served) -> np.ndarray:
    server = served.server

    async def call(*args, **kwargs):
        return await asyncio.to_thread(*args, **kwargs)

    sid = server.request("POST", "/v1/streams", TONE)[1]["id"]
    listener = await Listener.connect(server.url, sid)
    stop = asyncio.Event()
    recording = asyncio.create_task(record_until(listener, stop))
    try:
        a = (await call(server.request, "POST", "/v1/jobs", {"kind": "composer", "config": LONG | {"name": "a"}}))[1]
        b = (await call(server.request, "POST", "/v1/jobs", {"kind": "composer", "config": LONG | {"name": "b"}}))[1]
        a = await call(until, server, a, lambda j: j["state"] == "running" and (j["step"] or 0) >= 25, "trained")
        os.kill(a["pid"], signal.SIGKILL)
        a = await call(until, server, a, lambda j: j["state"] != "running", "ended", timeout=60)
        assert a["state"] == "failed" and a["pid"] is None, a
        assert "killed by signal 9 (SIGKILL)" in a["error"] and f"/v1/jobs/{a['id']}/resume" in a["error"], a
        status, health = await call(server.request, "GET", "/v1/health")
        assert status == 200 and health["status"] == "ok", health
        # the next job goes on; cancelled, its worker stops and its temporary files and checkpoint go
        b = await call(until, server, b, running_at(100), "checkpointed")
        tmp, checkpoint, worker = job_dir(served, b) / "tmp", Path(b["checkpoint"]), b["pid"]
        assert tmp.is_dir() and checkpoint.is_file() and alive(worker)
        status, b = await call(server.request, "DELETE", f"/v1/jobs/{b['id']}")
        assert status == 200 and b["state"] == "cancelled", b
        assert not tmp.exists() and not checkpoint.exists() and not alive(worker)
        assert b["checkpoint"] is None and b["error"] is None
        await asyncio.sleep(1.0)  # a second of audio after it all
    finally:
        stop.set()
        audio = await recording
        await listener.close()
    status, health = server.request("GET", "/v1/health")
    assert status == 200 and health["status"] == "ok" and health["failed_streams"] == [], health
    stream = server.request("GET", f"/v1/streams/{sid}")[1]
    assert stream["state"] != "failed", stream
    server.request("DELETE", f"/v1/streams/{sid}")
    return audio


def test_a_killed_worker_fails_its_job_alone_and_the_next_job_goes_on(served: Served) -> None:
    audio = asyncio.run(kill_a_worker_while_a_stream_plays(served))
    blocks = audio[: len(audio) // 4800 * 4800].reshape(-1, 4800)
    assert len(blocks) >= 20
    levels = 20 * np.log10(np.sqrt(np.mean(blocks**2, axis=1)) + 1e-12)
    assert levels.min() > -45, levels.min()  # no 100 ms block fell silent: no dropout


def test_a_restart_keeps_the_records_and_the_running_job_resumes(served: Served) -> None:
    server = served.server
    y = server.request("POST", "/v1/jobs", {"kind": "composer", "config": LONG | {"name": "y"}})[1]
    x = server.request("POST", "/v1/jobs", {"kind": "composer", "config": LONG | {"name": "x"}})[1]
    assert server.request("DELETE", f"/v1/jobs/{x['id']}")[1]["state"] == "cancelled"  # it never ran
    y = until(server, y, running_at(100), "checkpointed")
    jobs = server.request("GET", "/v1/jobs")[1]["jobs"]
    models = server.request("GET", "/v1/models")[1]["models"]
    server.process.kill()  # no drain: the record still says running
    server.process.wait(timeout=30)
    deadline = time.monotonic() + 60
    while alive(y["pid"]) and time.monotonic() < deadline:  # the worker sees its stdin close and stops
        time.sleep(0.2)
    assert not alive(y["pid"]), "the worker outlived its daemon"

    served.restart()
    server = served.server
    after = {j["id"]: j for j in server.request("GET", "/v1/jobs")[1]["jobs"]}
    for job in jobs:  # every ended job as it was
        if job["state"] in ("succeeded", "failed", "cancelled"):
            assert {k: after[job["id"]][k] for k in ("state", "result", "error", "ended")} == \
                {k: job[k] for k in ("state", "result", "error", "ended")}
    assert after[x["id"]]["state"] == "cancelled"
    interrupted = after[y["id"]]
    assert interrupted["state"] == "interrupted" and interrupted["pid"] is None, interrupted
    assert f"POST /v1/jobs/{y['id']}/resume" in interrupted["error"]
    assert not (job_dir(served, y) / "tmp").exists()
    assert server.request("GET", "/v1/models")[1]["models"] == models  # the store is intact

    status, resumed = server.request("POST", f"/v1/jobs/{y['id']}/resume")
    assert status == 202 and resumed["state"] in ("queued", "running"), resumed
    resumed = until(server, resumed, lambda j: j["state"] == "running" and j["resumed_from"] is not None,
                    "resumed")
    assert resumed["resumed_from"] >= interrupted["checkpoint_step"] >= 100, resumed
    assert resumed["attempts"] == interrupted["attempts"] + 1
    status, cancelled = server.request("DELETE", f"/v1/jobs/{y['id']}?keep_checkpoint=true")
    assert status == 200 and cancelled["state"] == "cancelled", cancelled
    assert Path(cancelled["checkpoint"]).is_file()  # kept for a later resume
