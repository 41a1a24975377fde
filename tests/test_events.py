"""Events in the stream's own audio (stings, ducks, moods), stream names, and switching a stream's instrument or
composer in place: on the real engine with the shipped models, and over a real `wavecast serve`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import start_server, wavecast_command
from wavecast.models.store import SHIPPED
from wavecast.streaming.composer import ComposerModel
from wavecast.streaming.engine import Engine, Stream
from wavecast.streaming.events import DUCK_DOWN_SECONDS, DUCK_UP_SECONDS, EventError, load_events
from wavecast.streaming.model import FrameModel

HOP = 480
SR = 48_000
EVENTS = load_events()


@pytest.fixture(scope="module")
def folk() -> ComposerModel:
    return ComposerModel(SHIPPED / "folk")


def play(engine: Engine, stream: Stream, frames: int) -> np.ndarray:
    """`frames` frames of `stream`, as a listener reads them, one tick each."""
    reader = stream.listen()
    out = np.empty(frames * HOP, np.float32)
    for i in range(frames):
        engine.tick()
        reader.read(out[i * HOP : (i + 1) * HOP])
    stream.unlisten(reader)
    return out


def db(x: np.ndarray) -> float:
    return float(10 * np.log10(np.mean(np.square(x, dtype=np.float64)) + 1e-20))


def frame_db(x: np.ndarray) -> np.ndarray:
    return 10 * np.log10(np.mean(x.reshape(-1, HOP).astype(np.float64) ** 2, axis=1) + 1e-20)


def tone(engine: Engine, model: FrameModel, f0: float = 330.0) -> Stream:
    return engine.create_stream(engine.add_model(model), 7, {"f0": f0, "loudness": -20.0})


def test_a_duck_lowers_the_stream_by_its_depth_with_ramps_and_restores_it(violin: FrameModel) -> None:
    engine = Engine(buffer_frames=1, budget=None)
    stream = tone(engine, violin)
    before = play(engine, stream, 100)
    engine.duck(stream, -12.0, 1.0)
    during = play(engine, stream, 250)
    level = frame_db(during)
    base = db(before[-50 * HOP :])
    assert base - db(during[30 * HOP : 90 * HOP]) == pytest.approx(12.0, abs=1.0)
    assert db(during[-50 * HOP :]) == pytest.approx(base, abs=1.0)  # restored
    down = round(DUCK_DOWN_SECONDS / 0.01)
    assert level[0] > level[down + 2] + 8  # it went down within its ramp ...
    assert np.abs(np.diff(level[: down + 4])).max() < 6  # ... smoothly, not in one step
    up = np.diff(level[100 : 100 + round(DUCK_UP_SECONDS / 0.01)])
    assert np.abs(up).max() < 3 and level[100 + round(DUCK_UP_SECONDS / 0.01) + 5] > base - 1.5
    assert np.abs(np.diff(during)).max() < 0.2  # no click at the ramps' joins
    assert stream.info()["events"]["duck_db"] == 0.0 and engine.stats.ducks == 1


def test_a_duck_during_a_duck_takes_the_new_depth_and_ends_at_the_later_end(violin: FrameModel) -> None:
    engine = Engine(buffer_frames=1, budget=None)
    stream = tone(engine, violin)
    base = db(play(engine, stream, 60)[-30 * HOP :])
    engine.duck(stream, -6.0, 0.5)
    play(engine, stream, 20)
    engine.duck(stream, -18.0, 0.2)  # ends before the first would: the first's end holds
    level = frame_db(play(engine, stream, 120))
    assert base - level[20:28].mean() == pytest.approx(18.0, abs=1.5)
    assert base - level[25:28].mean() > 15  # still down past the second duck's own end (20 frames)
    assert level[-20:].mean() == pytest.approx(base, abs=1.0)


def test_a_sting_plays_on_top_in_the_key_and_at_the_level_of_the_piece(violin: FrameModel,
                                                                        folk: ComposerModel) -> None:
    """The piece is the same with or without the sting (the sting is a second voice, added), so their difference
    is the sting alone: its notes are the scale's, its level the piece's within 3 dB, and the piece's notes go
    on unchanged."""
    runs = {}
    for with_sting in (False, True):
        engine = Engine(buffer_frames=1, budget=None)
        group, composer = engine.add_model(violin), engine.add_composer(folk)
        stream = engine.create_stream(group, 11, {"tempo": 120, "scale": "A minor", "volume": -20.0}, composer)
        head = play(engine, stream, 150)
        seconds = engine.sting(stream, EVENTS.stings["follow"]) if with_sting else 0.0
        runs[with_sting] = (np.concatenate([head, play(engine, stream, 400)]), [n.to_dict() for n in
                                                                                  stream.voice.notes], seconds, group)
    (piece, notes, _, _), (mixed, notes_with, seconds, group) = runs[False], runs[True]
    assert notes_with == notes and len(notes) > 10  # the piece's notes go on, the same ones
    assert 1.0 <= seconds <= 3.0
    sting = (mixed - piece)[150 * HOP :]
    assert np.abs(sting[: 3 * HOP]).max() < 1e-4  # silent until the next eighth note of the piece (or its lead-in)
    loud = frame_db(sting) > frame_db(sting).max() - 20
    assert abs(db(sting.reshape(-1, HOP)[loud]) - db(piece[piece != 0])) <= 3.0
    spectrum = np.abs(np.fft.rfft(sting[: int(seconds * SR)] * np.hanning(int(seconds * SR))))
    freqs = np.fft.rfftfreq(int(seconds * SR), 1 / SR)
    peaks = freqs[spectrum > spectrum.max() / 4]
    a_minor = {9, 11, 0, 2, 4, 5, 7}
    classes = {round(69 + 12 * np.log2(f / 440)) % 12 for f in peaks if f > 150}
    assert classes and classes <= a_minor, classes
    assert {9, 0, 4} <= classes  # 'follow' climbs the tonic triad: A, C, E
    assert group.layers == [] and group.admitted == 1  # its voice's slot is given back when it ends


def test_a_sting_on_a_plain_stream_builds_on_its_pitch_and_is_released(violin: FrameModel) -> None:
    engine = Engine(buffer_frames=1, budget=None)
    stream = tone(engine, violin, 220.0)
    play(engine, stream, 50)
    seconds = engine.sting(stream, EVENTS.stings["raid"])
    assert stream.info()["events"]["stings"] == []  # it starts at the next tick
    audio = play(engine, stream, int(seconds * 100) + 30)
    assert stream.info()["events"]["stings"] == []
    spectrum = np.abs(np.fft.rfft(audio[: int(seconds * SR)]))
    freqs = np.fft.rfftfreq(int(seconds * SR), 1 / SR)
    a_major_above = [440 * 2 ** (k / 12) for k in (0, 2, 4, 5, 7, 9, 11, 12)]  # the raid runs up A major
    heard = [spectrum[np.abs(freqs - f) < 4].max() for f in a_major_above]
    assert min(heard) > spectrum.max() / 200, heard
    assert engine.stats.stings == 1 and stream.group.admitted == 1


def test_two_stings_at_once_and_no_third(violin: FrameModel) -> None:
    from wavecast.streaming.engine import TooManyStings

    engine = Engine(buffer_frames=1, budget=None)
    stream = tone(engine, violin)
    engine.sting(stream, EVENTS.stings["follow"])
    engine.tick()
    engine.sting(stream, EVENTS.stings["raid"])
    engine.tick()
    assert sorted(stream.info()["events"]["stings"]) == ["follow", "raid"]
    assert [layer.done for layer in stream.group.layers] == [0, 0]  # nobody listens: no frame is made yet
    play(engine, stream, 5)
    assert [layer.done for layer in stream.group.layers] == [5, 5]
    with pytest.raises(TooManyStings):
        engine.sting(stream, EVENTS.stings["donation"])
    engine.delete_stream(stream.id)
    engine.tick()
    assert stream.group.layers == [] and stream.group.admitted == 0 and len(stream.group.pool.free) == \
        stream.group.pool.capacity


def test_presets_files_are_checked_by_field(tmp_path: Path) -> None:
    good = tmp_path / "mine.json"
    good.write_text(json.dumps({"stings": {"sub": {"notes": [[0, 1], [None, 0.5], [4, 1]]}},
                                "moods": {"calm": {"controls": {"tempo": 60}}}}))
    events = load_events(good)
    assert "sub" in events.stings and "follow" in events.stings and events.moods["calm"].controls == {"tempo": 60}
    for bad, field in [({"stings": {"x": {"notes": [[0, 99]]}}}, "stings.x.notes[0]"),
                       ({"moods": {"x": {"controls": {"tempo": 999}}}}, "moods.x.controls"),
                       ({"moods": {"Bad Name": {"controls": {"tempo": 60}}}}, "Bad Name"),
                       ({"sting": {}}, "'stings' and/or 'moods'")]:
        good.write_text(json.dumps(bad))
        with pytest.raises(EventError, match=field.replace("[", r"\[").replace("]", r"\]")):
            load_events(good)


def test_events_over_http(tmp_path: Path) -> None:
    custom = tmp_path / "events.json"
    custom.write_text(json.dumps({"stings": {"hello": {"description": "two notes", "notes": [[0, 1], [4, 2]]}}}))
    server = start_server(tmp_path, args=("--events", str(custom)))
    try:
        r = server.request
        listed = r("GET", "/v1/events")[1]
        assert {s["name"] for s in listed["stings"]} == {"follow", "donation", "raid", "hello"}
        assert {"calm", "tense", "triumphant"} <= {m["name"] for m in listed["moods"]}
        code, piece = r("POST", "/v1/streams", {"model": "violin", "composer": "folk", "name": "overlay",
                                                "controls": {"scale": "G major"}})
        assert code == 201 and piece["name"] == "overlay"
        sid = piece["id"]
        # one name, one stream; the list finds it by name
        code, body = r("POST", "/v1/streams", {"model": "violin", "name": "overlay"})
        assert code == 409 and body["error"]["code"] == "name_taken" and sid in body["error"]["message"]
        assert [s["id"] for s in r("GET", "/v1/streams?name=overlay")[1]["streams"]] == [sid]
        assert r("GET", "/v1/streams?name=other")[1]["streams"] == []
        events = f"/v1/streams/{sid}/events"
        code, body = r("POST", events, {"type": "sting", "name": "hello"})
        assert code == 200 and body["event"]["seconds"] > 0 and body["stream"]["id"] == sid
        code, body = r("POST", events, {"type": "duck"})
        assert code == 200 and body["event"] == {"type": "duck", "db": -12.0, "seconds": 3.0}
        code, body = r("POST", events, {"type": "mood", "name": "tense"})
        assert code == 200 and body["event"]["controls"]["scale"] == "G phrygian"  # a mode: the tonic stays
        assert body["stream"]["controls"]["tempo"] == 138
        refused = {
            "sting_unknown": ({"type": "sting", "name": "nope"}, "'name' must be one of follow"),
            "no_name": ({"type": "mood"}, "missing field 'name'"),
            "bad_type": ({"type": "party"}, "'type' must be one of"),
            "no_type": ({}, "missing field 'type'"),
            "too_deep": ({"type": "duck", "db": -90}, "'db' must be within [-60, 0]"),
            "too_long": ({"type": "duck", "seconds": 1e6}, "'seconds' must be within"),
            "extra": ({"type": "sting", "name": "follow", "volume": 3}, "unknown field 'volume'"),
            "nan": (None, "JSON has no NaN"),
        }
        for case, (body, words) in refused.items():
            raw = b'{"type": "duck", "db": NaN}' if body is None else None
            code, reply = r("POST", events, body, raw=raw)
            assert code in (400, 422) and words in reply["error"]["message"], (case, reply)
        code, plain = r("POST", "/v1/streams", {"model": "default", "controls": {"f0": 300, "loudness": -20}})
        code, reply = r("POST", f"/v1/streams/{plain['id']}/events", {"type": "mood", "name": "calm"})
        assert code == 422 and reply["error"]["code"] == "not_composed"
        assert r("POST", "/v1/streams/nope/events", {"type": "duck"})[0] == 404
        # the instrument and the composer change in place: same stream, a crossfade, the composer's range
        code, moved = r("PATCH", f"/v1/streams/{sid}", {"model": "cello"})
        assert code == 200 and moved["model"] == "cello" and moved["id"] == sid and moved["follows"]
        code, moved = r("PATCH", f"/v1/streams/{sid}", {"composer": "folk", "controls": {"tempo": 90}})
        assert code == 200 and moved["composer"] == "folk" and moved["controls"]["tempo"] == 90
        code, reply = r("PATCH", f"/v1/streams/{plain['id']}", {"composer": "folk"})
        assert code == 422 and reply["error"]["code"] == "invalid_composer"
        code, reply = r("PATCH", f"/v1/streams/{sid}", {"model": "folk"})
        assert code == 422 and reply["error"]["code"] == "wrong_model_kind"
        metrics = server.text("/metrics")
        assert "wavecast_stings_total 1" in metrics and "wavecast_ducks_total 1" in metrics
    finally:
        server.process.terminate()
        server.process.wait(timeout=10)


def test_a_bad_events_file_stops_serve_with_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "events.json"
    bad.write_text(json.dumps({"moods": {"calm": {"controls": {"tempo": "fast"}}}}))
    done = subprocess.run([*wavecast_command(), "serve", "--port", "0", "--events", str(bad)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert "moods.calm.controls" in done.stderr and "'tempo' must be a finite number" in done.stderr
