"""Stream snapshots: a stream snapshotted on one engine and resumed on another makes the very samples the first
would have made next (plain and composed, a control ramp and a duck under way); bad bytes are refused with
reasons; and the HTTP round trip from one daemon to another."""

from __future__ import annotations

import base64
import dataclasses
import re
import struct
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import Server, start_server, stop_server
from tests.test_device import ASOUNDRC
from wavecast.models.store import SHIPPED
from wavecast.streaming.composer import ComposerGroup, ComposerModel
from wavecast.streaming.engine import Engine, Group, SnapshotRefused, Stream
from wavecast.streaming.events import load_events
from wavecast.streaming.model import FrameModel
from wavecast.streaming.performer import FLOOR_DB
from wavecast.streaming.ring import Reader
from wavecast.streaming.snapshot import (
    MAGIC,
    MEDIA_TYPE,
    Mismatch,
    ModelRef,
    Snapshot,
    SnapshotError,
    decode,
    encode,
)
from wavecast.streaming.watermark import DELAY, Key

N, M = 150, 350  # frames before the snapshot, frames after it (3.5 s: several notes at tempo 150)
COMPOSED = {"tempo": 150.0, "scale": "A dorian", "legato": 0.9}


@pytest.fixture(scope="module")
def folk() -> ComposerModel:
    return ComposerModel(SHIPPED / "folk")


def engine(model: FrameModel, composer: ComposerModel | None = None, watermark: Key | None = None
           ) -> tuple[Engine, Group, ComposerGroup | None]:
    e = Engine(buffer_frames=1, max_streams=4, budget=None, watermark=watermark)
    return e, e.add_model(model), e.add_composer(composer) if composer is not None else None


def play(e: Engine, stream: Stream, frames: int, reader: Reader | None = None) -> np.ndarray:
    """`frames` frames of `stream`, ticking `e` by hand (the inference thread is not started)."""
    reader = reader or stream.listen()
    hop = stream.manifest.hop
    out = np.zeros((frames, hop), np.float32)
    for i in range(frames):
        e.tick()
        assert reader.read(out[i]) == hop
    return out


def take(e: Engine, stream: Stream) -> Snapshot:
    future = e.snapshot(stream)
    e.tick()  # the snapshot is taken at the tick boundary
    return future.result(timeout=0)


def steer(e: Engine, stream: Stream, at: int) -> None:
    """At frame `at`: a new f0 (its smoothing ramp still under way N frames in) and a duck that outlasts N, shallow
    enough that the limiter still holds the stream down (at 0 dB loudness it peaks over -1 dBFS)."""
    stream.set_controls({"f0": 440.0})
    e.duck(stream, -2.0, 1.0)
    assert stream.frames == at


def test_plain_stream_resumes_sample_exact(violin: FrameModel) -> None:
    controls = {"f0": 330.0, "loudness": 0.0}
    ref_engine, group, _ = engine(violin)
    ref = ref_engine.create_stream(group, 7, controls)
    reader = ref.listen()
    first = play(ref_engine, ref, N - 3, reader)
    steer(ref_engine, ref, N - 3)
    reference = np.concatenate([first, play(ref_engine, ref, 3 + M, reader)])

    a, group_a, _ = engine(violin)
    stream = a.create_stream(group_a, 7, controls)
    reader_a = stream.listen()
    play(a, stream, N - 3, reader_a)
    steer(a, stream, N - 3)
    play(a, stream, 3, reader_a)
    snap = take(a, stream)
    assert snap.frames == N and snap.targets["f0"] == pytest.approx(440.0)
    assert abs(snap.current["f0"] - 440.0) > 1.0, "the f0 ramp should still be under way at the snapshot"
    assert -2.0 < snap.duck[2] < 0.0 and snap.duck[1] > N, "the duck should be under way at the snapshot"
    assert snap.limit_gain < 1.0, "the limiter should be holding the stream down at the snapshot"

    b, group_b, _ = engine(violin)
    resumed = b.resume(group_b, decode(encode(snap)))
    assert resumed.frames == N and resumed.id != stream.id
    after = play(b, resumed, M)
    np.testing.assert_array_equal(after, reference[N:])  # bit-exact: the same arithmetic on the same inputs


@pytest.mark.parametrize("name", ["violin", "clarinet"])  # the clarinet's voice also plays its brightness
def test_composed_stream_resumes_sample_exact_across_notes(name: str, folk: ComposerModel) -> None:
    violin = FrameModel(SHIPPED / name, device="cpu")
    ref_engine, group, composer = engine(violin, folk)
    ref = ref_engine.create_stream(group, 11, COMPOSED, composer)
    reference = play(ref_engine, ref, N + M)

    a, group_a, composer_a = engine(violin, folk)
    stream = a.create_stream(group_a, 11, COMPOSED, composer_a)
    reader_a = stream.listen()
    play(a, stream, N, reader_a)
    snap = take(a, stream)
    assert snap.composer == ModelRef.of(folk.manifest) and snap.voice["count"] >= 3
    stream.voice.set({"tempo": 60.0})  # after the snapshot: the resumed stream must not see it
    play(a, stream, 5, reader_a)

    b, group_b, composer_b = engine(violin, folk)
    resumed = b.resume(group_b, decode(encode(snap)), composer_b)
    after = play(b, resumed, M)
    np.testing.assert_array_equal(after, reference[N:])
    notes = [n for n in ref.voice.notes if n.frame >= N]
    assert len(notes) >= 4, "the test should span several notes after the resume"
    assert resumed.voice.notes == notes and resumed.voice.count == ref.voice.count


def test_marked_stream_keeps_its_audio_across_the_seam(violin: FrameModel) -> None:
    """The mark is not carried (the resuming engine marks with its serial) but the marker's delay line, audio not
    yet played, is: with the same key and serial the resumed stream is the reference but for the mark's first
    block, and exactly it from the second block on."""
    key, controls = Key.generate(), {"f0": 392.0, "loudness": -20.0}
    ref_engine, group, _ = engine(violin, watermark=key)
    reference = play(ref_engine, ref_engine.create_stream(group, 3, controls, serial=5), N + 20)
    a, group_a, _ = engine(violin, watermark=key)
    stream = a.create_stream(group_a, 3, controls, serial=5)
    play(a, stream, N)
    snap = take(a, stream)
    assert snap.delay is not None and snap.delay.shape == (1, DELAY) and np.abs(snap.delay).max() > 0
    b, group_b, _ = engine(violin, watermark=key)
    after = play(b, b.resume(group_b, decode(encode(snap)), serial=5), 20)
    assert np.abs(after[:4] - reference[N : N + 4]).max() < 0.01  # the mark alone differs (-30 dB)
    np.testing.assert_array_equal(after[6:], reference[N + 6 :])


def test_a_moving_or_stinging_stream_is_refused_then_taken(violin: FrameModel, cello: FrameModel) -> None:
    e, group, _ = engine(violin)
    other = e.add_model(cello)
    stream = e.create_stream(group, 1, {"f0": 300.0})
    reader = stream.listen()
    play(e, stream, 10, reader)
    e.swap(stream, other, e.warm(stream, other))
    with pytest.raises(SnapshotRefused, match="crossfading"):
        take(e, stream)
    play(e, stream, 5, reader)  # the crossfade is over
    assert take(e, stream).model == ModelRef.of(cello.manifest)
    e.sting(stream, load_events().stings["follow"])
    with pytest.raises(SnapshotRefused, match="sting"):
        take(e, stream)
    assert stream.failure is None  # a refusal leaves the stream playing
    e.delete_stream(stream.id)
    with pytest.raises(SnapshotRefused, match="deleted"):
        take(e, stream)


def test_bad_bytes_are_refused_with_reasons(violin: FrameModel, cello: FrameModel, folk: ComposerModel) -> None:
    e, group, composer = engine(violin, folk)
    stream = e.create_stream(group, 2, COMPOSED, composer)
    play(e, stream, 20)
    data = encode(take(e, stream))
    assert data.startswith(MAGIC)

    def refused(raw: bytes, words: str) -> None:
        with pytest.raises(SnapshotError, match=words) as info:
            decode(raw)
        assert not re.search(r"Error|\bb'|\\x", str(info.value))  # words for people, not reprs

    refused(b"RIFF....WAVEfmt " * 8, "not a wavecast snapshot")
    refused(data[:20], "truncated")
    refused(data[:-5], "truncated: its body has")
    flipped = bytearray(data)
    flipped[-100] ^= 0x01
    refused(bytes(flipped), "checksum")
    refused(MAGIC + struct.pack("<I", 9) + data[12:], "format version 9; this wavecast reads version 2 only")
    refused(data + b"\0", "after its end")

    # sound bytes, wrong contents: a header field of the wrong type, a tensor of the wrong shape
    snap = decode(data)
    bad = dataclasses.replace(snap, states={**snap.states, "h": snap.states["h"][..., :64]})
    with pytest.raises(SnapshotError, match=r"tensor 'state.h' has shape \[1, 1, 64\].*gives \[1, 1, 128\]"):
        e.resume(group, decode(encode(bad)), composer)
    with pytest.raises(Mismatch, match="'violin' v1 .*'cello' v1"):
        e.resume(e.add_model(cello), snap, composer)
    with pytest.raises(Mismatch, match="composer"):
        e.resume(group, snap)
    bad = dataclasses.replace(snap, voice={**snap.voice, "position": "two"})
    with pytest.raises(SnapshotError, match="'voice.position' has the wrong type"):
        decode(encode(bad))
    performer = snap.voice["performer"]
    bad = dataclasses.replace(snap, voice={**snap.voice, "performer": {**performer, "out": [440.0, -20.0, 1.5]}})
    with pytest.raises(SnapshotError, match="'voice.performer.out' must be .*brightness from 0 to 1"):
        decode(encode(bad))
    # a snapshot from before brightness (f0 and loudness alone) still resumes, at the middle brightness
    old = dataclasses.replace(snap, voice={**snap.voice, "performer": {**performer, "out": performer["out"][:2]}})
    assert e.resume(group, decode(encode(old)), composer).voice.performer.out[2] == 0.5
    # and one from before the previous note's tail rang on under the next attack, as from silence
    old = dataclasses.replace(snap, voice={**snap.voice, "performer": {
        k: v for k, v in performer.items() if k != "tail"}})
    assert e.resume(group, decode(encode(old)), composer).voice.performer.tail == FLOOR_DB
    bad = dataclasses.replace(snap, voice={**snap.voice, "performer": {**performer, "tail": 1e6}})
    with pytest.raises(SnapshotError, match="'voice.performer.tail' is outside"):
        decode(encode(bad))
    # and one from before notes carried their velocity and how long they sounded
    assert snap.voice["note"]["sounding"] is not None
    note = {k: v for k, v in snap.voice["note"].items() if k not in ("velocity", "sounding")}
    old = dataclasses.replace(snap, voice={**snap.voice, "note": note})
    assert e.resume(group, decode(encode(old)), composer).voice.note.sounding is None
    bad = dataclasses.replace(snap, voice={**snap.voice, "note": {**note, "sounding": -3}})
    with pytest.raises(SnapshotError, match="'voice.note.sounding' is outside"):
        decode(encode(bad))
    assert len(e.streams) == 4  # nothing refused took a slot (the old snapshots' streams did)


# -- HTTP: one daemon to another ---------------------------------------------------------------------------
def raw_get(server: Server, path: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(server.url + path, timeout=30) as resp:
        return resp.status, resp.headers["Content-Type"], resp.read()


def resume(server: Server, data: bytes, **fields: object) -> tuple[int, dict]:
    return server.request("POST", "/v1/streams", {"snapshot": base64.b64encode(data).decode(), **fields})


def test_http_snapshot_moves_a_stream_to_another_daemon(tmp_path: Path) -> None:
    pytest.importorskip("sounddevice")  # the first daemon's stream plays on a file-backed ALSA device
    out = tmp_path / "played.raw"
    (tmp_path / "alsa").mkdir()
    (tmp_path / "alsa" / "asoundrc").write_text(ASOUNDRC.format(out=out))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = start_server(tmp_path / "a", extra_env={"XDG_CONFIG_HOME": str(tmp_path)})
    b = start_server(tmp_path / "b")
    try:
        status, made = a.request("POST", "/v1/streams", {"model": "violin", "composer": "folk", "seed": 11,
                                                         "controls": COMPOSED, "name": "duet"})
        assert status == 201
        sid = made["id"]
        assert a.request("POST", f"/v1/streams/{sid}/device", {"device": "default"})[0] == 201
        deadline = time.time() + 60
        while time.time() < deadline and a.request("GET", f"/v1/streams/{sid}")[1]["frames"] < 100:
            time.sleep(0.1)
        assert a.request("DELETE", f"/v1/streams/{sid}/device")[0] == 200  # nobody listens: the stream holds still
        status, kind, data = raw_get(a, f"/v1/streams/{sid}/snapshot")
        assert status == 200 and kind == MEDIA_TYPE
        before = a.request("GET", f"/v1/streams/{sid}")[1]
        snap = decode(data)
        assert snap.frames == before["frames"] >= 100 and snap.name == "duet"

        status, there = resume(b, data)
        assert status == 201, there
        assert there["id"] != sid and there["name"] == "duet"
        for field in ("model", "version", "seed", "composer", "composer_version", "frames", "controls"):
            assert there[field] == before[field], field
        assert there["now_playing"]["notes_played"] == before["now_playing"]["notes_played"]
        assert there["mark"]["payload"] != before["mark"]["payload"]  # b marks it with its own key and serial

        status, again = resume(b, data)  # the name is taken there now: the copy goes on without it
        assert status == 201 and again["name"] is None
        assert b.request("POST", f"/v1/streams/{again['id']}/events", {"type": "sting", "name": "follow"})[0] < 300
        status, body = b.request("GET", f"/v1/streams/{again['id']}/snapshot")  # the sting waits for a listener
        assert status == 409 and body["error"]["code"] == "stream_busy" and "sting" in body["error"]["message"]

        assert a.request("GET", "/v1/streams/nope/snapshot")[0] == 404
        flipped = bytearray(data)
        flipped[-7] ^= 0x10
        status, body = resume(b, bytes(flipped))
        assert status == 400 and "checksum" in body["error"]["message"]
        status, body = b.request("POST", "/v1/streams", {"snapshot": "not base64!"})
        assert status == 400 and "base64" in body["error"]["message"]
        status, body = resume(b, data, model="violin")
        assert status == 422 and "'model'" in body["error"]["message"]
        lacking = dataclasses.replace(snap, model=dataclasses.replace(snap.model, version=7))
        status, body = resume(b, encode(lacking))
        assert status == 404 and "'violin' version 7" in body["error"]["message"]
        other = dataclasses.replace(snap, model=dataclasses.replace(snap.model, sha256="0" * 64))
        status, body = resume(b, encode(other))
        assert status == 409 and body["error"]["code"] == "snapshot_mismatch"
    finally:
        stop_server(a)
        stop_server(b)
