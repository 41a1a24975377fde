"""Provenance on every output: stream info, the data channel's first message, rendered WAV/FLAC/Ogg tags and MIDI
text, each read back with a library (PyAV, mido), not with our own parser."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import av
import pytest

from tests.conftest import ROOT, Server, wavecast_command
from wavecast.daemon.client import Listener
from wavecast.daemon.marks import Registry, watermark_dir
from wavecast.models.store import SHIPPED
from wavecast.streaming.model import Manifest
from wavecast.streaming.provenance import generator_version, provenance

VERSION = generator_version()
STATEMENT = f"AI-generated music, made by wavecast {VERSION} with the 'violin' v1 instrument and the 'folk' v1 " \
            "composer, seed 7."


def render(tmp: Path, out: str, *extra: str) -> subprocess.CompletedProcess:
    result = subprocess.run([*wavecast_command(), "render", "--model", "violin", "--composer", "folk", "--seconds",
                             "2", "--seed", "7", "--store", str(tmp / "store"), "--out", str(tmp / out), *extra],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result


def tags(path: Path) -> dict[str, str]:
    """The file's tags as ffmpeg reads them (Ogg keeps them on the stream, WAV and FLAC on the container)."""
    with av.open(str(path)) as container:
        return dict(container.metadata) | dict(container.streams.audio[0].metadata)


def assert_complete(about: dict, mark: str | None) -> None:
    """`about` is the provenance of violin v1 composed by folk v1 from seed 7, marked with `mark` (None: off)."""
    assert about["ai_generated"] is True and about["statement"] == STATEMENT and about["seed"] == 7
    assert about["generator"] == {"name": "wavecast", "version": VERSION}
    assert [(m["name"], m["version"], m["kind"]) for m in about["models"]] == [("violin", 1, "instrument"),
                                                                                ("folk", 1, "composer")]
    violin, folk = about["models"]
    assert violin["trained_by"].startswith("wavecast train instrument")
    assert violin["data"][0] == {"source": "FluidR3_GM.sf2 SoundFont, GM program 40",
                                 "licence": "MIT (Frank Wen; Debian package fluid-soundfont-gm)"}
    sources = {d["source"]: d["licence"] for d in folk["data"]}
    assert set(sources) == {f"{c} (music21 10.5.1 corpus)" for c in ("ryansMammoth", "oneills1850", "airdsAirs",
                                                                       "miscFolk")}
    assert all("public-domain" in licence for licence in sources.values())
    assert len(violin["data"]) == 5 and all(d["licence"] for d in violin["data"])
    if mark is None:
        assert about["watermark"]["on"] is False and "--watermark off" in about["watermark"]["why"]
    else:
        assert about["watermark"] == {"on": True, "key_id": mark[:4], "payload": mark}


def test_provenance_without_a_composer_or_a_watermark() -> None:
    violin = Manifest.read(SHIPPED / "violin" / "model.json")
    about = provenance(violin, None, 3, None)
    assert about["statement"] == f"AI-generated music, made by wavecast {VERSION} with the 'violin' v1 instrument, " \
                                 "seed 3."
    assert [m["name"] for m in about["models"]] == ["violin"]
    assert about["watermark"] == {"on": False, "why": "the daemon runs with --watermark off"}
    about["models"][0]["data"].clear()  # a caller's copy: the next stream's provenance is whole
    assert len(provenance(violin, None, 3, None)["models"][0]["data"]) == 5
    assert json.loads(json.dumps(about)) == about


def test_a_rendered_wav_and_its_midi_say_what_made_them(tmp_path: Path) -> None:
    result = render(tmp_path, "piece.wav", "--midi", str(tmp_path / "piece.mid"))
    sidecar = json.loads((tmp_path / "piece.wav.provenance.json").read_text())
    mark = sidecar["watermark"]["payload"]
    assert_complete(sidecar, mark)
    assert f"watermark {mark}" in result.stderr
    record = Registry(watermark_dir(tmp_path / "store")).lookup(int(mark.replace("-", ""), 16))
    assert record is not None and (record["kind"], record["model"], record["seed"]) == ("render", "violin", 7)

    wav = tags(tmp_path / "piece.wav")  # the LIST/INFO chunk: INAM, IART, ICMT, ISFT, ICRD
    assert wav["title"] == "violin v1, folk v1, seed 7" and wav["artist"] == "wavecast (AI-generated)"
    assert wav["comment"] == STATEMENT and wav["encoder"] == f"wavecast {VERSION}" and len(wav["date"]) == 10

    mido = pytest.importorskip("mido")
    texts = [m.text for m in mido.MidiFile(tmp_path / "piece.mid").tracks[0] if m.type == "text"]
    assert texts[0] == STATEMENT and json.loads(texts[1]) == sidecar


@pytest.mark.parametrize("out", ["piece.flac", "piece.ogg"])
def test_flac_and_ogg_carry_the_provenance_in_their_tags(tmp_path: Path, out: str) -> None:
    result = render(tmp_path, out, "--watermark", "off")
    assert "no watermark (--watermark off)" in result.stderr
    found = tags(tmp_path / out)
    assert found["artist"] == "wavecast (AI-generated)" and found["comment"] == STATEMENT
    about = json.loads(found["provenance"])
    assert_complete(about, None)
    assert about["watermark"]["why"] == "wavecast render ran with --watermark off"
    assert not (tmp_path / f"{out}.provenance.json").exists() and not (tmp_path / "watermark").exists()
    with av.open(str(tmp_path / out)) as container:
        assert container.streams.audio[0].codec_context.name == ("flac" if out.endswith("flac") else "opus")


def test_render_refuses_a_format_it_cannot_tag(tmp_path: Path) -> None:
    result = subprocess.run([*wavecast_command(), "render", "--seconds", "1", "--out", str(tmp_path / "x.mp3")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and ".wav, .flac or .ogg" in result.stderr and not (tmp_path / "x.mp3").exists()


class Recording(Listener):
    """A Listener that also keeps the type of every data-channel message, in the order they came."""

    def __init__(self) -> None:
        super().__init__()
        self.heard: list[str] = []
        self.channel.on("message", lambda message: self.heard.append(json.loads(message)["type"]))


async def first_messages(server: Server, sid: str) -> tuple[list[str], dict | None]:
    listener = await Recording.connect(server.url, sid)
    try:
        for _ in range(100):
            if len(listener.heard) >= 3:
                break
            await asyncio.sleep(0.05)
        return listener.heard, listener.provenance
    finally:
        await listener.close()


def test_stream_info_and_the_data_channel_carry_provenance(server: Server) -> None:
    status, created = server.request("POST", "/v1/streams", {"model": "violin", "composer": "folk", "seed": 7})
    assert status == 201, created
    sid = created["id"]
    status, info = server.request("GET", f"/v1/streams/{sid}")
    assert status == 200 and info["provenance"] == created["provenance"]
    about = info["provenance"]
    assert_complete(about, about["watermark"].get("payload"))
    assert about["watermark"]["on"] is True  # serve's default
    heard, told = asyncio.run(first_messages(server, sid))
    assert heard[0] == "provenance" and len(heard) >= 3, heard  # then now_playing and telemetry
    assert told == {"type": "provenance", **about}
    server.request("DELETE", f"/v1/streams/{sid}")
