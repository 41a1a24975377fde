"""Packaging: `wavecast serve` never loads torch, and the wheel installs one `wavecast` namespace with its models."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from importlib.util import find_spec
from pathlib import Path

import pytest

from tests.conftest import ROOT, Server, start_server, stop_server
from wavecast.daemon.client import Listener

# torch's Python extension and native libraries (libtorch*, libc10*), wherever torch is installed.
TORCH_FILE = re.compile(r"/(torch|functorch)/|/lib(torch|c10)[^/]*\.so")
# ALSA's default PCM as a file, so a device output can be opened on a machine without a sound card.
ASOUNDRC = 'pcm.!default { type plug slave { pcm { type file slave.pcm "null" file "%s" format "raw" } } }\n'


def mapped_files(pid: int) -> set[str]:
    """The files mapped into a process's memory: every shared library and Python extension it has loaded."""
    fields = (line.split(maxsplit=5) for line in Path(f"/proc/{pid}/maps").read_text().splitlines())
    return {f[5] for f in fields if len(f) == 6 and f[5].startswith("/")}


def torch_files(pid: int) -> list[str]:
    return sorted(f for f in mapped_files(pid) if TORCH_FILE.search(f))


@pytest.mark.skipif(find_spec("torch") is None, reason="torch is not installed (the 'train' extra: ./install train)")
def test_the_check_finds_torch_in_a_process_that_imports_it() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import sys, torch; print('ready', flush=True); sys.stdin.read()"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        assert any("libtorch" in f for f in torch_files(proc.pid))
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)


async def exercise(server: Server) -> None:
    """Everything a client does to a running daemon, except training: models, streams, WebRTC, a device."""
    for path in ("/v1/health", "/v1/models", "/v1/models/default", "/v1/models/folk", "/v1/streams"):
        status, _ = server.request("GET", path)
        assert status == 200, path
    assert "wavecast" in server.text("/metrics")
    status, flute = server.request("POST", "/v1/streams", {"seed": 1, "controls": {"f0": 440, "loudness": -20}})
    assert status == 201, flute
    status, piece = server.request("POST", "/v1/streams", {"model": "violin", "composer": "folk", "seed": 7})
    assert status == 201, piece
    listener = await Listener.connect(server.url, piece["id"])
    try:
        assert len(await listener.collect(0.5)) == 24_000
        assert (await listener.send_controls({"tempo": 140}))["type"] == "controls"
    finally:
        await listener.close()
    assert server.request("GET", f"/v1/streams/{piece['id']}/notes?since=0")[0] == 200
    status, body = server.request("POST", f"/v1/streams/{flute['id']}/device", {"device": "default"})
    assert status == 201, body
    deadline = time.time() + 60
    while time.time() < deadline and server.request("GET", f"/v1/streams/{flute['id']}")[1]["frames"] < 50:
        await asyncio.sleep(0.1)  # the device has pulled audio, so its output path has run
    assert server.request("DELETE", f"/v1/streams/{flute['id']}/device")[0] == 200
    for sid in (flute["id"], piece["id"]):
        assert server.request("DELETE", f"/v1/streams/{sid}")[0] == 200


def test_serve_never_loads_torch(tmp_path: Path) -> None:
    """The daemon imports only streaming/, daemon/ and the torch-free parts of models/, whatever a client does."""
    (tmp_path / "alsa").mkdir()
    (tmp_path / "alsa" / "asoundrc").write_text(ASOUNDRC % (tmp_path / "played.raw"))
    server = start_server(tmp_path, extra_env={"XDG_CONFIG_HOME": str(tmp_path)})
    try:
        asyncio.run(exercise(server))
        assert server.process.poll() is None
        files = mapped_files(server.process.pid)
        assert any("onnxruntime" in f for f in files)  # the right process: it has run the models
        assert torch_files(server.process.pid) == []
    finally:
        stop_server(server)


def test_wheel_holds_one_wavecast_namespace_with_the_shipped_models(tmp_path: Path) -> None:
    # Built from a copy, so the build leaves nothing (build/, egg-info) in the working tree.
    src, dist, target = tmp_path / "src", tmp_path / "dist", tmp_path / "site"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for folder in ("daemon", "streaming", "models"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = dist.glob("wavecast-*.whl")
    with zipfile.ZipFile(wheel) as z:
        sizes = {i.filename: i.file_size for i in z.infolist()}
        entry_points = next(z.read(n).decode() for n in sizes if n.endswith(".dist-info/entry_points.txt"))
    tops = {n.split("/")[0] for n in sizes}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"wavecast"}, tops
    assert len(tops) == 2  # and its one dist-info
    assert {n.split("/")[1] for n in sizes if n.startswith("wavecast/")} == {"daemon", "streaming", "models"}
    shipped = sorted((ROOT / "models" / "shipped").glob("*/*"))
    assert len(shipped) >= 10 and all(
        sizes.get(f"wavecast/models/shipped/{f.parent.name}/{f.name}") == f.stat().st_size for f in shipped)
    assert re.search(r"^wavecast = wavecast\.daemon\.cli:main$", entry_points, re.M)
    data = {"streaming/events.json": ROOT / "streaming" / "events.json"} | {  # the stings and moods, the pages
        f"daemon/static/{f.name}": f for f in (ROOT / "daemon" / "static").iterdir()}
    assert len(data) >= 4 and all(sizes.get(f"wavecast/{name}") == f.stat().st_size for name, f in data.items())

    # Installed (not editable), it runs from where it was installed and finds its models there.
    installed = subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
                               capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": str(target)}
    probe = ("import wavecast.daemon.cli, wavecast.models.store as s; "
             "print(s.__file__); print(s.SHIPPED / 'default' / 'model.json')")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    module, manifest = out.stdout.split()
    assert module.startswith(str(target)) and manifest.startswith(str(target)) and Path(manifest).is_file()
    help_text = subprocess.run([sys.executable, "-m", "wavecast.daemon", "--help"], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=120)
    assert help_text.returncode == 0 and "serve" in help_text.stdout, help_text.stderr[-3000:]
