"""Shared fixtures: the shipped default model, a real `wavecast serve` subprocess, HTTP helpers."""

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
