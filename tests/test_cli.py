"""The `wavecast` command line: render files, list models, refuse bad input with a usable message."""

from __future__ import annotations

import subprocess
import wave
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, wavecast_command
from wavecast.streaming.analysis import estimate_f0


def wavecast(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*wavecast_command(), *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (48_000, 1, 2)
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768.0


def test_render_is_bit_identical_per_seed(tmp_path: Path) -> None:
    def render(seed: int, name: str) -> Path:
        out = tmp_path / name
        result = wavecast("render", "--model", "default", "--seconds", "1.5", "--seed", str(seed),
                          "--control", "f0=440", "--control", "loudness=-20", "--watermark", "off", "--out", str(out))
        assert result.returncode == 0, result.stderr
        return out

    a, b, c = render(7, "a.wav"), render(7, "b.wav"), render(8, "c.wav")
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    audio = read_wav(a)
    assert len(audio) == 72_000
    assert abs(estimate_f0(audio[-48_000:], 48_000) / 440 - 1) < 0.01


def test_render_refuses_bad_controls_and_models(tmp_path: Path) -> None:
    out = tmp_path / "x.wav"
    result = wavecast("render", "--seconds", "1", "--control", "f0=9000", "--out", str(out))
    assert result.returncode == 2 and "outside [32.7, 1975.53] Hz" in result.stderr
    result = wavecast("render", "--model", "nope", "--seconds", "1", "--out", str(out))
    assert result.returncode == 2 and "unknown model 'nope'" in result.stderr and "wavecast train" in result.stderr
    result = wavecast("render", "--seconds", "1", "--control", "f0", "--out", str(out))
    assert result.returncode == 2 and "expected NAME=VALUE" in result.stderr
    result = wavecast("render", "--seconds", "1", "--control", "f0=high", "--out", str(out))
    assert result.returncode == 2 and "control 'f0' must be a number" in result.stderr
    result = wavecast("render", "--seconds", "1", "--midi", str(tmp_path / "x.mid"), "--out", str(out))
    assert result.returncode == 2 and "add --composer" in result.stderr
    result = wavecast("render", "--model", "folk", "--seconds", "1", "--out", str(out))
    assert result.returncode == 2 and "an instrument is needed" in result.stderr
    result = wavecast("render", "--model", "violin", "--composer", "folk", "--seconds", "1",
                      "--control", "scale=D blues", "--out", str(out))
    assert result.returncode == 2 and "the mode one of" in result.stderr
    result = wavecast("render", "--model", "violin", "--composer", "folk", "--seconds", "1",
                      "--change", "0.5:tempo=999", "--out", str(out))
    assert result.returncode == 2 and "'tempo' is outside [20, 300]" in result.stderr
    assert not out.exists()


def test_render_a_composed_piece_with_its_notes(tmp_path: Path) -> None:
    args = ["render", "--model", "violin", "--composer", "folk", "--seconds", "4", "--seed", "7",
            "--control", "scale=G major", "--control", "tempo=150", "--change", "2:action=reset", "--watermark", "off"]
    first = wavecast(*args, "--out", str(tmp_path / "a.wav"), "--midi", str(tmp_path / "a.mid"))
    assert first.returncode == 0, first.stderr
    again = wavecast(*args, "--out", str(tmp_path / "b.wav"), "--midi", str(tmp_path / "b.mid"))
    assert again.returncode == 0 and (tmp_path / "a.wav").read_bytes() == (tmp_path / "b.wav").read_bytes()
    midi = (tmp_path / "a.mid").read_bytes()
    assert midi == (tmp_path / "b.mid").read_bytes() and midi.startswith(b"MThd")
    mido = pytest.importorskip("mido")
    notes = [m for m in mido.MidiFile(tmp_path / "a.mid") if m.type == "note_on"]
    assert len(notes) >= 6 and all(m.note % 12 in (7, 9, 11, 0, 2, 4, 6) for m in notes)  # G major
    assert f"{len(notes)} notes" in first.stderr


def test_models_lists_the_shipped_default() -> None:
    result = wavecast("models")
    assert result.returncode == 0 and "default" in result.stdout and "shipped" in result.stdout


@pytest.mark.parametrize("flag, value, expected", [
    ("--buffer-frames", "1", "argument --buffer-frames: 1 is out of range; give a whole number from 2 to 12"),
    ("--tick-budget", "1.5", "argument --tick-budget: 1.5 is out of range; give a number from 0.05 to 1"),
    ("--port", "99999", "argument --port: 99999 is out of range; give a whole number from 0 to 65535"),
    ("--port", "http", "argument --port: 'http' is not a whole number; give a whole number from 0 to 65535"),
    ("--max-peers", "0", "argument --max-peers: 0 is out of range"),
    ("--stream-rate", "nan", "argument --stream-rate: nan is out of range"),
])
def test_serve_checks_the_range_of_its_flags(flag: str, value: str, expected: str) -> None:
    result = wavecast("serve", flag, value)
    assert result.returncode == 2 and expected in result.stderr, result.stderr


def test_serve_takes_no_token_on_the_command_line(tmp_path: Path) -> None:
    """A token in argv shows in `ps`: it comes from WAVECAST_TOKEN or a file."""
    result = wavecast("serve", "--token", "secret-secret-secret")
    assert result.returncode == 2 and "unrecognized arguments: --token" in result.stderr
    short = tmp_path / "token"
    short.write_text("abc\n")
    result = wavecast("serve", "--port", "0", "--token-file", str(short))
    assert result.returncode != 0 and "shorter than 16 characters" in result.stderr
    result = wavecast("serve", "--port", "0", "--host", "0.0.0.0")
    assert result.returncode == 2 and "needs a token" in result.stderr


def test_serve_refuses_to_start_on_an_unknown_model() -> None:
    result = wavecast("serve", "--port", "0", "--model", "nope")
    assert result.returncode == 2 and "no instrument is called 'nope'" in result.stderr
