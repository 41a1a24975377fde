"""Each shipped instrument is trained on the real instrument's range (its GM program's usual sounding range)
and its f0 control covers every note it was trained on, no more; those whose timbre moves with how hard a note
is played have a brightness control that moves it."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import SHIPPED_INSTRUMENTS
from wavecast.models.data import INSTRUMENTS, LEVEL_DB, loudness_db
from wavecast.models.export import render_constant
from wavecast.models.quality import MELS, log_mel
from wavecast.models.store import SHIPPED
from wavecast.streaming.model import FrameModel, Manifest
from wavecast.streaming.notes import midi_hz


def test_the_instruments_ship() -> None:
    assert {"violin", "cello", "clarinet", "trumpet", "flute"} == set(INSTRUMENTS) <= set(SHIPPED_INSTRUMENTS)


@pytest.mark.parametrize("name", sorted(INSTRUMENTS))
def test_a_shipped_instrument_plays_the_real_instrument_s_range(name: str) -> None:
    manifest = Manifest.read(SHIPPED / name / "model.json")
    program, low, high = INSTRUMENTS[name]
    trained = manifest.training["data"]
    assert (trained["program"], trained["low_note"], trained["high_note"]) == (program, low, high)
    assert trained.get("level_db", 0.0) == LEVEL_DB.get(name, 0.0)  # the trumpet's data raised to the others'
    f0 = manifest.control("f0")
    assert f0.min <= midi_hz(low) * 1.0001 and f0.max >= midi_hz(high) * 0.9999  # every trained note
    assert f0.min >= midi_hz(low - 1) and f0.max <= midi_hz(high + 1)  # and not a semitone past them


BRIGHT = [n for n in SHIPPED_INSTRUMENTS if any(c.name == "brightness" for c in
                                                Manifest.read(SHIPPED / n / "model.json").controls)]


def test_the_trumpet_and_clarinet_have_a_brightness_control() -> None:
    """The two whose FluidSynth timbre moves most with velocity at one level (bench/musicality.py's steady fits)."""
    assert {"trumpet", "clarinet"} <= set(BRIGHT)


@pytest.mark.parametrize("name", BRIGHT)
def test_brightness_moves_the_timbre_not_the_level(name: str) -> None:
    """The same note at the same loudness played soft (brightness 0.05) and hard (0.95): the hard one's spectrum
    leans higher (log-mel centroid), its level stays where the loudness control puts it."""
    model = FrameModel(SHIPPED / name, device="cpu")
    centroid, level = {}, {}
    for bright in (0.05, 0.95):
        audio = render_constant(model, 392.0, -25.0, 1.0, others={"brightness": bright})[-24_000:]
        power = 10.0 ** log_mel(audio)[2:-2]
        centroid[bright] = float(np.mean(power @ np.arange(MELS) / power.sum(1)))
        level[bright] = float(np.mean(loudness_db(audio)))
    assert centroid[0.95] > centroid[0.05] + 0.5, centroid
    assert abs(level[0.95] - level[0.05]) < 2.0 and abs(level[0.95] + 25.0) < 3.0, level
