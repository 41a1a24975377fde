"""Each shipped instrument is trained on the real instrument's range (its GM program's usual sounding range)
and its f0 control covers every note it was trained on, no more."""

from __future__ import annotations

import pytest

from tests.conftest import SHIPPED_INSTRUMENTS
from wavecast.models.data import INSTRUMENTS
from wavecast.models.store import SHIPPED
from wavecast.streaming.model import Manifest
from wavecast.streaming.notes import midi_hz


def test_the_instruments_ship() -> None:
    assert {"violin", "cello", "clarinet", "trumpet", "flute"} == set(INSTRUMENTS) <= set(SHIPPED_INSTRUMENTS)


@pytest.mark.parametrize("name", sorted(INSTRUMENTS))
def test_a_shipped_instrument_plays_the_real_instrument_s_range(name: str) -> None:
    manifest = Manifest.read(SHIPPED / name / "model.json")
    program, low, high = INSTRUMENTS[name]
    trained = manifest.training["data"]
    assert (trained["program"], trained["low_note"], trained["high_note"]) == (program, low, high)
    f0 = manifest.control("f0")
    assert f0.min <= midi_hz(low) * 1.0001 and f0.max >= midi_hz(high) * 0.9999  # every trained note
    assert f0.min >= midi_hz(low - 1) and f0.max <= midi_hz(high + 1)  # and not a semitone past them
