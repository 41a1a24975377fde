"""The watermark end to end (issue 21): renders and live streams carry their key's mark and serial through real
libopus (PyAV) and a real WebRTC peer; unmarked FluidSynth audio and another key's marks read as not marked;
`wavecast detect` and `POST /v1/detect` name what was marked from the registry.

Each detection takes a core for 1-3 s on a busy 2-core machine; the live test receives 8 s of a stream in real
time. The whole file takes about a minute there.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import shutil
import subprocess
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import av
import mido
import numpy as np
import pytest

from tests.conftest import Server, start_server, stop_server, wavecast_command
from wavecast.daemon.cli import write_wav
from wavecast.daemon.client import Listener
from wavecast.daemon.marks import KeyFileError, Registry, decode, load_key
from wavecast.models import data
from wavecast.models.store import SHIPPED
from wavecast.streaming.composer import ComposerModel
from wavecast.streaming.engine import Engine, compose, render
from wavecast.streaming.model import FrameModel
from wavecast.streaming.watermark import DELAY, THRESHOLD, Key, detect

SR = 48_000
KEY = Key(bytes(range(32)))
OTHER = Key(bytes(range(100, 132)))
TONE = {"f0": 440.0, "loudness": -20.0}


def opus_round_trip(audio: np.ndarray, path: Path) -> tuple[np.ndarray, int]:
    """`audio` encoded by libopus at 64 kb/s into `path` (Ogg or WebM by its suffix), then read back as the
    detector reads files."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libopus", rate=SR, layout="stereo")
        stream.bit_rate = 64_000
        pcm = np.round(np.clip(audio, -1, 1) * 32767).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(np.repeat(pcm[None, :], 2, axis=0).T.reshape(1, -1), format="s16",
                                           layout="stereo")
        frame.sample_rate = SR
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    return decode(path)


def test_a_marked_render_survives_opus_with_its_payload_and_no_other_key_reads_it(tmp_path: Path,
                                                                                 violin: FrameModel) -> None:
    composed, _ = compose(violin, 10.0, 3, {"tempo": 120}, composer=ComposerModel(SHIPPED / "folk"), watermark=KEY,
                          serial=0x2A)
    plain = render(violin, 10.0, 5, TONE, watermark=KEY, serial=0x2A)
    for audio, name in ((composed, "composed.ogg"), (plain, "plain.webm")):
        heard, rate = opus_round_trip(audio, tmp_path / name)
        assert rate == SR and abs(len(heard) - len(audio)) < SR // 10
        found = detect(heard, rate, [KEY])
        assert found.marked and found.payload == KEY.id << 16 | 0x2A, (name, found)
        assert found.as_dict()["payload"] == f"{KEY.id:04x}-002a"
        assert found.ranges[0][0] < 1.0 and found.ranges[-1][1] > 9.0, found.ranges  # marked throughout
    other = detect(heard, rate, [OTHER])
    assert not other.marked and other.score < THRESHOLD and other.as_dict()["payload"] is None


@pytest.mark.skipif(shutil.which("fluidsynth") is None or not data.SOUNDFONT.exists(),
                    reason="needs the fluidsynth binary and the GM soundfont (Debian: fluidsynth fluid-soundfont-gm)")
def test_an_unmarked_fluidsynth_clip_is_not_marked() -> None:
    events, t = [], 0
    for i in range(40):  # a violin (GM 41) playing a scale up and down in eighths at 120 bpm: 10 s
        note = 62 + [0, 2, 4, 5, 7, 9, 11, 12, 11, 9][i % 10]
        events += [(t, mido.Message("note_on", note=note, velocity=90)), (t + 240, mido.Message("note_off", note=note))]
        t += 250
    audio = data._render(data._midi(events, 40, t + 300), (t + 300) * SR // 1000, gain=0.5)
    assert np.abs(audio).max() > 0.05  # it plays
    found = detect(audio, SR, [KEY])
    assert not found.marked and found.as_dict() == {"marked": False, "confidence": found.as_dict()["confidence"],
                                                    "score": found.as_dict()["score"], "payload": None, "ranges": []}


def test_render_equals_the_live_engine_with_the_mark_on(violin: FrameModel) -> None:
    """A marked stream batched with another marked and an unmarked one, ticked like the live engine, plays its
    render's samples; the mark is its own serial's, 30 dB under the audio."""
    engine = Engine(buffer_frames=3, max_streams=4, budget=None, watermark=KEY)
    group = engine.add_model(violin)
    streams = [engine.create_stream(group, 7, TONE, serial=0x2A),
               engine.create_stream(group, 8, {"f0": 300.0, "loudness": -25.0}, serial=0x2B),
               engine.create_stream(group, 9, TONE)]
    assert [s.mark for s in streams] == [KEY.payload(0x2A), KEY.payload(0x2B), None]
    readers = [s.listen() for s in streams]
    live, chunk = np.zeros(2 * SR, np.float32), np.zeros(480, np.float32)
    for i in range(len(live) // len(chunk)):
        engine.tick()
        for j, reader in enumerate(readers):
            reader.read(chunk)
            if j == 0:
                live[i * len(chunk) : (i + 1) * len(chunk)] = chunk
    marked = render(violin, 2.0, 7, TONE, watermark=KEY, serial=0x2A)
    assert np.array_equal(marked, render(violin, 2.0, 7, TONE, watermark=KEY, serial=0x2A))  # bit-reproducible
    assert np.abs(live - marked).max() < 1e-4  # batching may change the last bits only
    other_serial = render(violin, 2.0, 7, TONE, watermark=KEY, serial=0x2B)
    assert np.abs(live - other_serial).max() > 1e-3
    plain = render(violin, 2.0, 7, TONE)
    mark = marked[DELAY:] - plain[:-DELAY]  # the marked audio is the plain one, DELAY samples late, plus the mark
    ratio_db = 10 * np.log10(np.mean(mark**2) / np.mean(plain**2))
    assert -36 < ratio_db < -25, ratio_db


def run_cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([*wavecast_command(), *args], capture_output=True, text=True, env=env, timeout=120)


def test_cli_render_then_detect_names_the_render(tmp_path: Path) -> None:
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data")}  # a data directory of its own: a fresh key
    out = tmp_path / "x.wav"
    made = run_cli("render", "--model", "violin", "--seconds", "5", "--seed", "11", "--control", "f0=440",
                   "--control", "loudness=-20", "--out", str(out), env=env)
    assert made.returncode == 0, made.stderr
    key_file = tmp_path / "data" / "wavecast" / "watermark" / "key.json"
    assert key_file.stat().st_mode & 0o777 == 0o600
    noise = tmp_path / "noise.wav"
    write_wav(noise, np.random.default_rng(0).normal(0, 0.1, 3 * SR).astype(np.float32), SR)

    both = run_cli("detect", "--json", str(out), str(noise), env=env)
    assert both.returncode == 1, both.stderr  # one file is not marked
    marked, unmarked = (json.loads(line) for line in both.stdout.splitlines())
    key = load_key(key_file.parent, create=False)
    assert marked["file"] == str(out) and marked["marked"] and marked["confidence"] > 0.99
    assert marked["payload"] == f"{key.id:04x}-0000" and marked["ranges"][0][0] < 1.0
    assert marked["source"]["kind"] == "render" and marked["source"]["model"] == "violin"
    assert marked["source"]["seed"] == 11 and marked["source"]["out"] == str(out)
    assert unmarked == {"file": str(noise), "marked": False, "confidence": unmarked["confidence"],
                        "score": unmarked["score"], "payload": None, "ranges": [], "source": None}

    elsewhere = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "elsewhere")}  # a machine without the key ...
    keyless = run_cli("detect", str(out), env=elsewhere)
    assert keyless.returncode == 2 and "no watermark key" in keyless.stderr and "--key FILE" in keyless.stderr
    notes = tmp_path / "notes.txt"
    notes.write_text("not audio\n")
    words = run_cli("detect", "--key", str(key_file), str(out), str(notes), env=elsewhere)  # ... given the key
    assert words.returncode == 2  # one file cannot be read
    assert words.stdout.startswith(f"{out}: marked (confidence 1.000000, score ")
    assert f"key {key.id:04x}, serial 0000 = " in words.stdout
    assert "not in this machine's registry" in words.stdout  # the registry stayed on the machine that rendered
    assert f"{notes}: not an audio file" in words.stderr and "Traceback" not in words.stderr


def test_registry_serials_count_up_and_records_are_found_by_payload(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "watermark", KEY)
    first = registry.issue({"kind": "stream", "model": "violin", "seed": 1})
    second = registry.issue({"kind": "render", "model": "cello", "seed": 2})
    registry.amend(first, {"stream": "abc123"})
    assert (first, second) == (0, 1)
    assert registry.lookup(KEY.payload(first)) | {"at": None} == {
        "serial": 0, "payload": f"{KEY.id:04x}-0000", "at": None, "kind": "stream", "model": "violin", "seed": 1,
        "stream": "abc123"}
    assert registry.lookup(KEY.payload(second))["model"] == "cello"
    assert registry.lookup(KEY.payload(2)) is None and registry.lookup(OTHER.payload(first)) is None
    with ThreadPoolExecutor(4) as pool:  # concurrent issuers never share a serial
        issued = list(pool.map(lambda i: registry.issue({"kind": "render", "seed": i}), range(40)))
    assert sorted(issued) == list(range(2, 42))


def test_a_corrupt_key_file_is_explained(tmp_path: Path) -> None:
    (tmp_path / "key.json").write_text('{"version": 1, "id": "0000", "secret": "zz"}')
    with pytest.raises(KeyFileError, match=r"key.json cannot be used.*Move it away"):
        load_key(tmp_path, create=False)


# -- a live daemon ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def marked_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    tmp = tmp_path_factory.mktemp("watermark")
    s = start_server(tmp)
    yield s, tmp
    stop_server(s)


def post_audio(server: Server, body: bytes, content_type: str | None = "audio/wav") -> tuple[int, dict]:
    """POST /v1/detect with exactly these headers (urllib would add a form Content-Type of its own)."""
    url = urllib.parse.urlsplit(server.url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=180)
    try:
        connection.request("POST", "/v1/detect", body, {"Content-Type": content_type} if content_type else {})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


async def receive(server: Server, sid: str, seconds: float) -> np.ndarray:
    listener = await Listener.connect(server.url, sid)
    try:
        return await listener.collect(seconds)
    finally:
        await listener.close()


def test_a_live_stream_received_over_webrtc_carries_its_payload(marked_server: tuple[Server, Path]) -> None:
    server, tmp = marked_server
    status, created = server.request("POST", "/v1/streams", {"model": "violin", "seed": 5, "controls": TONE})
    assert status == 201 and created["mark"] is not None, created
    key = load_key(tmp / "watermark", create=False)  # made at the daemon's start, in its data directory
    assert created["mark"] == {"key_id": f"{key.id:04x}", "payload": f"{key.id:04x}-0000"}  # its first serial
    audio = asyncio.run(receive(server, created["id"], 8.0))  # real time: 8 s
    wav = tmp / "live.wav"
    write_wav(wav, audio, SR)
    # the daemon detects the audio as its peer heard it (after Opus), three files at once: it takes two and turns
    # the third away
    with ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(lambda _: post_audio(server, wav.read_bytes()), range(3)))
    assert sorted(status for status, _ in replies) == [200, 200, 503], replies
    busy = next(reply for status, reply in replies if status == 503)
    assert busy["error"]["code"] == "detector_busy"
    for status, reply in replies:
        if status == 200:
            assert reply["marked"] and reply["payload"] == created["mark"]["payload"]
            assert reply["source"]["kind"] == "stream" and reply["source"]["stream"] == created["id"]
            assert reply["source"]["model"] == "violin" and reply["source"]["seed"] == 5
            assert set(reply) == {"marked", "confidence", "payload", "ranges", "score", "source"}


def test_detect_route_refuses_what_it_cannot_judge(marked_server: tuple[Server, Path]) -> None:
    server, tmp = marked_server
    short = tmp / "short.wav"
    write_wav(short, np.zeros(SR, np.float32), SR)
    cases = [
        (b"RIFF not really", "audio/wav", 422, "unreadable_audio", "not an audio file"),
        (short.read_bytes(), "audio/wav", 422, "unreadable_audio", "at least 2 s"),
        (b'{"audio": 1}', "application/json", 415, "unsupported_media_type", "audio/*"),
        (b"abc", "text/plain", 415, "unsupported_media_type", "text/plain"),
        (b"abc", None, 415, "unsupported_media_type", "not none"),  # aiohttp would call it octet-stream
        (b"", "audio/ogg", 400, "empty_body", "send the file"),
        (bytes(16 * 1024 * 1024 + 1), "application/octet-stream", 413, "body_too_large", "16777216 bytes"),
    ]
    for body, content_type, status, code, words in cases:
        got, reply = post_audio(server, body, content_type)
        assert (got, reply["error"]["code"]) == (status, code), (content_type, reply)
        assert words in reply["error"]["message"], reply
    spec = server.request("GET", "/v1/openapi.json")[1]["paths"]["/v1/detect"]["post"]
    assert {"audio/*", "application/octet-stream"} == set(spec["requestBody"]["content"])
    assert {"413", "415", "422", "503"} <= set(spec["responses"])


def test_serve_with_the_watermark_off_marks_nothing(tmp_path: Path) -> None:
    server = start_server(tmp_path, args=("--watermark", "off"))
    try:
        status, created = server.request("POST", "/v1/streams", {"model": "violin"})
        assert status == 201 and created["mark"] is None
        assert "the watermark is off" in server.log.read_text()
        assert not (tmp_path / "watermark").exists()  # no key made
        status, reply = post_audio(server, b"anything")
        assert status == 409 and reply["error"]["code"] == "no_watermark_key", reply
    finally:
        stop_server(server)
