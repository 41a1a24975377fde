"""Shared fixtures: the shipped default model, a real `wavecast serve` subprocess, HTTP helpers, a real Janus and
its listeners (tests/test_janus.py, tests/test_migrate.py); strict skips."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from string import Template

import aiohttp
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from wavecast.daemon.janus import NO_SUCH_MOUNTPOINT, Janus, JanusError
from wavecast.daemon.peers import use_ice_host
from wavecast.models.store import SHIPPED
from wavecast.streaming.model import FrameModel

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_INSTRUMENTS = tuple(sorted(p.parent.name for p in SHIPPED.glob("*/model.json")
                                   if json.loads(p.read_text())["kind"] == "instrument"))


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


# -- a real Janus (Debian's janus; tests/janus/ configures it) in the test's network namespace ----------
JANUS = Path("/usr/bin/janus")
CONFIGS = Path(__file__).parent / "janus"
INTERFACE, ADDRESS = "wc0", "192.0.2.1"
JANUS_SR = 48_000


def run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NoInterface(Exception):
    """The Janus set-up cannot run here; the message says why."""


@contextmanager
def janus_interface() -> Iterator[str]:
    """An interface with ADDRESS for Janus's ICE and the listeners (Janus's ICE leaves loopback out): a dummy, or a
    bridge without ports (the same for local traffic) where the kernel has no dummy module. Removed on exit."""
    if not JANUS.exists():
        raise NoInterface(f"no {JANUS}: install Debian's janus package")
    if os.geteuid() != 0 or shutil.which("ip") is None:
        raise NoInterface("the Janus set-up adds a network interface: it needs root and `ip` (iproute2), as in .ci/run")
    run("ip", "link", "del", INTERFACE)  # left by a run that was killed
    errors = []
    for kind in ("dummy", "bridge"):
        done = run("ip", "link", "add", INTERFACE, "type", kind)
        if done.returncode == 0:
            break
        errors.append(f"{kind}: {done.stderr.strip()}")
    else:
        raise NoInterface(f"cannot add a network interface for Janus ({'; '.join(errors)})")
    try:
        for cmd in (("addr", "add", f"{ADDRESS}/24", "dev", INTERFACE), ("link", "set", INTERFACE, "up")):
            done = run("ip", *cmd)
            if done.returncode != 0:
                raise NoInterface(f"cannot set up {INTERFACE}: {done.stderr.strip()}")
        yield INTERFACE
    finally:
        run("ip", "link", "del", INTERFACE)


@pytest.fixture(scope="module")
def interface() -> Iterator[str]:
    with ExitStack() as stack:
        try:
            name = stack.enter_context(janus_interface())
        except NoInterface as e:
            pytest.skip(str(e))
        yield name


class JanusServer:
    """Janus with tests/janus/'s configuration (HTTP port and RTP ports filled in), started and killed at will."""

    def __init__(self, tmp: Path) -> None:
        self.dir, self.port = tmp, free_port()
        self.url = f"http://127.0.0.1:{self.port}/janus"
        values = {"configs": str(tmp), "address": ADDRESS, "interface": INTERFACE, "http_port": self.port,
                  "rtp_ports": "40000-40999", "ice_ports": "41000-41999"}
        for path in CONFIGS.glob("*.jcfg"):
            (tmp / path.name).write_text(Template(path.read_text()).substitute(values))
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with (self.dir / "janus.log").open("a") as log:
            self.process = subprocess.Popen([str(JANUS), "-C", str(self.dir / "janus.jcfg"), "-F", str(self.dir)],
                                            stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log()
            try:
                with urllib.request.urlopen(f"{self.url}/info", timeout=2) as resp:
                    if json.loads(resp.read()).get("janus") == "server_info":
                        return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"Janus did not start:\n{self.log()}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def log(self) -> str:
        return (self.dir / "janus.log").read_text()[-4000:]


@dataclass
class JanusSetup:
    """A Janus and a daemon beside it, for the tests that publish into Janus."""

    janus: JanusServer
    daemon: Server


@pytest.fixture(scope="module")
def janus_setup(interface: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[JanusSetup]:
    janus = JanusServer(tmp_path_factory.mktemp("janus"))
    janus.start()
    daemon = start_server(tmp_path_factory.mktemp("daemon"))
    try:
        yield JanusSetup(janus, daemon)
    finally:
        stop_server(daemon)
        janus.kill()


async def janus_request(url: str, body: dict) -> dict:
    """One request to the Streaming plugin in a session of its own (the plugin's answer; JanusError if refused)."""
    async with aiohttp.ClientSession() as http:
        janus = Janus(url, http)
        await janus.connect()
        try:
            return await janus.request(body)
        finally:
            await janus.close()


async def mountpoint_info(url: str, mountpoint: int) -> dict | None:
    try:
        return (await janus_request(url, {"request": "info", "id": mountpoint}))["info"]
    except JanusError as e:
        assert e.code == NO_SUCH_MOUNTPOINT, e
        return None


class Watcher:
    """A WebRTC listener of a Janus mountpoint, through Janus only: attach, watch, Janus's offer from the long
    poll, our answer with `start`; then the audio track, drained into `audio` by `drain()`."""

    def __init__(self, http: aiohttp.ClientSession, url: str) -> None:
        self.janus = Janus(url, http)
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.frames = 0

    @classmethod
    async def watch(cls, http: aiohttp.ClientSession, url: str, mountpoint: int) -> Watcher:
        use_ice_host(ADDRESS)
        self = cls(http, url)
        await self.janus.connect()
        await self.janus.request({"request": "watch", "id": mountpoint})
        offer = (await self.event(lambda e: "jsep" in e))["jsep"]
        track = asyncio.get_running_loop().create_future()
        self.pc.on("track", lambda t: track.done() or track.set_result(t))
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=offer["sdp"], type=offer["type"]))
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        await self.janus.request({"request": "start"}, {"type": "answer", "sdp": self.pc.localDescription.sdp})
        self.track = await asyncio.wait_for(track, 10)
        return self

    async def event(self, wanted, seconds: float = 10) -> dict:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for event in await asyncio.wait_for(self.janus.events(), deadline - time.monotonic()):
                if wanted(event):
                    return event
        raise AssertionError("no such event from Janus")

    async def collect(self, seconds: float) -> tuple[np.ndarray, list[int], list[float]]:
        """`seconds` of audio (left channel), each frame's RTP timestamp and arrival time."""
        chunks, stamps, arrivals, need = [], [], [], int(seconds * JANUS_SR)
        while sum(map(len, chunks)) < need:
            frame = await asyncio.wait_for(self.track.recv(), 10)
            stamps.append(frame.pts)
            arrivals.append(time.monotonic())
            chunks.append(frame.to_ndarray().reshape(-1, len(frame.layout.channels))[:, 0].astype(np.float32) / 32768)
        return np.concatenate(chunks)[:need], stamps, arrivals

    async def drain(self) -> None:
        """Take every frame as it comes (aiortc would queue them otherwise), counting them."""
        while True:
            await self.track.recv()
            self.frames += 1

    async def close(self) -> None:
        await self.pc.close()
        await self.janus.close()


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
