"""Shared fixtures: the shipped default model, a real `wavecast serve` subprocess, HTTP helpers; strict skips."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from wavecast.models.store import SHIPPED
from wavecast.streaming.model import FrameModel

ROOT = Path(__file__).resolve().parent.parent


def wavecast_command() -> list[str]:
    """The installed console script where there is one, else the same entry point through python -m."""
    exe = shutil.which("wavecast")
    return [exe] if exe else [sys.executable, "-m", "wavecast.daemon"]


@pytest.fixture(scope="session")
def default_dir() -> Path:
    return SHIPPED / "default"


@pytest.fixture(scope="session")
def default_model(default_dir: Path) -> FrameModel:
    return FrameModel(default_dir, device="cpu")


@pytest.fixture(scope="session")
def violin() -> FrameModel:
    return FrameModel(SHIPPED / "violin", device="cpu")


@pytest.fixture(scope="session")
def cello() -> FrameModel:
    return FrameModel(SHIPPED / "cello", device="cpu")


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    log: Path

    def request(self, method: str, path: str, body: object = None, raw: bytes | None = None,
                headers: dict | None = None) -> tuple[int, dict]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def text(self, path: str) -> str:
        with urllib.request.urlopen(self.url + path, timeout=30) as resp:
            return resp.read().decode()


def start_server(tmp: Path, extra_env: dict | None = None, args: tuple[str, ...] = ()) -> Server:
    log = tmp / "serve.log"
    env = {**os.environ, **(extra_env or {}), "PYTHONUNBUFFERED": "1"}
    cmd = [*wavecast_command(), "--log-level", "info", "serve", "--host", "127.0.0.1", "--port", "0",
           "--ice-host", "127.0.0.1", "--store", str(tmp / "store"), *args]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    deadline = time.time() + 60
    while time.time() < deadline:
        m = re.search(r"serving (http://127\.0\.0\.1:\d+)", log.read_text())
        if m:
            return Server(proc, m.group(1), log)
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"wavecast serve did not start:\n{log.read_text()}")


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.process.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(tmp_path_factory.mktemp("serve"))
    yield s
    stop_server(s)


# Strict skips (WAVECAST_STRICT_SKIPS=1, set by .ci/run). CI installs everything the tests need but a GPU, so any
# other skip means a test quietly stopped testing (torch installed and a torch test skipped, fluidsynth installed
# and a data test skipped...): it fails the run and is listed. A skip the environment may cause says "no CUDA" or
# "no GPU" in its reason.
EXPECTED_SKIP = re.compile(r"\bno (CUDA|GPU)\b")
unexpected_skips: list[str] = []


def strict_skips() -> bool:
    return os.environ.get("WAVECAST_STRICT_SKIPS", "0") not in ("", "0")


def note_skip(report: pytest.CollectReport | pytest.TestReport) -> None:
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    reason = reason.removeprefix("Skipped: ")
    if not EXPECTED_SKIP.search(reason):
        unexpected_skips.append(f"{report.nodeid}: {reason}")


def pytest_collectreport(report: pytest.CollectReport) -> None:
    note_skip(report)  # a module that skips itself while it is collected (importorskip at module level)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    note_skip(report)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if strict_skips() and unexpected_skips and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not (strict_skips() and unexpected_skips):
        return
    terminalreporter.section("unexpected skips (WAVECAST_STRICT_SKIPS is set: they fail the run)", red=True)
    for line in unexpected_skips:
        terminalreporter.line(line)
    terminalreporter.line("Install what they need (./install train,bench,test; as root .ci/run also installs the "
                          "Debian packages) and run again; a skip that only a missing GPU may cause must say "
                          "'no CUDA' or 'no GPU' in its reason.")
