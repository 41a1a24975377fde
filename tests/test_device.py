"""A real PortAudio device: ALSA's default PCM is a file, so what the daemon played can be read back."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, start_server, stop_server, wavecast_command
from wavecast.streaming.analysis import estimate_f0

SR = 48_000
ASOUNDRC = """pcm.!default {{
  type plug
  slave {{
    pcm {{ type file slave.pcm "null" file "{out}" format "raw" }}
    format S16_LE
    rate 48000
    channels 1
  }}
}}
"""


@pytest.fixture
def alsa_file(tmp_path: Path) -> tuple[dict, Path]:
    try:
        import sounddevice  # noqa: F401  (PortAudio itself must load)
    except OSError as e:
        pytest.skip(f"PortAudio missing ({e}); apt-get install libportaudio2")
    out = tmp_path / "played.raw"
    (tmp_path / "alsa").mkdir()
    (tmp_path / "alsa" / "asoundrc").write_text(ASOUNDRC.format(out=out))
    return {"XDG_CONFIG_HOME": str(tmp_path)}, out


def test_devices_lists_the_file_backed_default(alsa_file: tuple[dict, Path]) -> None:
    env, _ = alsa_file
    result = subprocess.run([*wavecast_command(), "devices", "--json"], env={**os.environ, **env}, cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    outputs = json.loads(result.stdout)
    assert any(d["name"] == "default" and d["channels"] > 0 for d in outputs)


def test_stream_plays_on_a_sound_device(alsa_file: tuple[dict, Path], tmp_path: Path) -> None:
    env, played = alsa_file
    server = start_server(tmp_path, extra_env=env)
    try:
        sid = server.request("POST", "/v1/streams", {"seed": 3, "controls": {"f0": 440, "loudness": -20}})[1]["id"]
        status, body = server.request("POST", f"/v1/streams/{sid}/device", {"device": "default"})
        assert status == 201 and body["device"]["name"] == "default"
        assert server.request("POST", f"/v1/streams/{sid}/device", {"device": "default"})[0] == 409
        deadline = time.time() + 60
        while time.time() < deadline and server.request("GET", f"/v1/streams/{sid}")[1]["frames"] < 200:
            time.sleep(0.1)  # 2 s of generated audio, however fast the unpaced file PCM pulls
        info = server.request("GET", f"/v1/streams/{sid}")[1]
        assert info["listeners"] == 1 and info["device"]["name"] == "default"
        assert server.request("DELETE", f"/v1/streams/{sid}/device")[0] == 200
        status, body = server.request("POST", f"/v1/streams/{sid}/device", {"device": "no such card"})
        assert status == 404 and body["error"]["code"] == "unknown_device"
    finally:
        stop_server(server)
    pcm = np.frombuffer(played.read_bytes(), "<i2")
    # A file PCM is not paced in real time, so the callback often finds the buffer empty and plays
    # exact zeros; no generated sample is lost, so cutting the zero runs out gives the stream back whole.
    zero = np.concatenate([[False], pcm == 0, [False]])
    edges = np.flatnonzero(np.diff(zero.astype(int)))
    keep = np.ones(len(pcm), bool)
    for a, b in zip(edges[::2], edges[1::2], strict=True):
        if b - a >= 32:  # underrun silence, not a zero crossing of the signal
            keep[a:b] = False
    audio = pcm[keep].astype(np.float32) / 32768.0
    assert len(audio) >= SR, f"only {len(audio)} samples of real audio were played"
    middle = audio[len(audio) // 2 - SR // 4 : len(audio) // 2 + SR // 4]
    assert estimate_f0(middle, SR, fmin=100.0) == pytest.approx(440, rel=0.01)

