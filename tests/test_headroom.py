"""Headroom: no documented control value clips. The engine's limiter keeps every sample within -1 dBFS, is
bit-transparent below it, recovers at its release rate without clicks, and a composer's accents never ask an
instrument for more than its loudness range."""

from __future__ import annotations

import numpy as np
import pytest

from wavecast.models.quality import count_clicks
from wavecast.models.store import SHIPPED
from wavecast.streaming.composer import ComposerModel
from wavecast.streaming.engine import LIMIT, LIMIT_RELEASE_DB_PER_S, Engine, Group, render
from wavecast.streaming.model import FrameModel

INSTRUMENTS = ("default", "violin", "cello", "clarinet", "trumpet", "flute")


@pytest.fixture(scope="module")
def folk() -> ComposerModel:
    return ComposerModel(SHIPPED / "folk")


@pytest.mark.parametrize("name", INSTRUMENTS)
def test_the_loudest_documented_settings_do_not_clip(name: str, folk: ComposerModel) -> None:
    model = FrameModel(SHIPPED / name, device="cpu")
    loudness = model.manifest.control("loudness")
    engine = Engine(buffer_frames=1, budget=None)
    group = engine.add_model(model)
    piece = engine.create_stream(group, 5, {"volume": 0.0, "tempo": 160, "density": 1.0, "vibrato": 1.0},
                                 engine.add_composer(folk))
    reader, out = piece.listen(), np.zeros(8 * 100 * 480, np.float32)
    asked = []
    for i in range(800):
        engine.tick()
        reader.read(out[i * 480 : (i + 1) * 480])
        asked.append(group.controls.current[piece.slot, group.controls.index["loudness"]])
    assert max(asked) <= loudness.max  # accents and their randomness stay inside the instrument's range
    assert np.abs(out).max() <= LIMIT and engine.stats.limited_frames > 0, engine.stats.limited_frames
    f0 = model.manifest.control("f0")
    hardest = {c.name: c.max for c in model.manifest.controls[2:]}  # brightness 1, where the model has it
    for hz in (f0.min, np.sqrt(f0.min * f0.max), f0.max):
        tone = render(model, 2.0, 1, {"f0": float(hz), "loudness": loudness.max, **hardest})
        assert np.abs(tone).max() <= LIMIT and not (np.abs(tone) >= 0.999).any(), hz


def test_the_limiter_is_transparent_below_its_ceiling(folk: ComposerModel, monkeypatch: pytest.MonkeyPatch) -> None:
    model = FrameModel(SHIPPED / "violin", device="cpu")
    controls = {"tempo": 120, "scale": "G major"}  # the default volume, -20 dB
    limited = render(model, 10.0, 3, controls, composer=folk)
    monkeypatch.setattr(Group, "limit", lambda self, slots, audio: None)
    plain = render(model, 10.0, 3, controls, composer=folk)
    assert np.abs(plain).max() < LIMIT and np.array_equal(limited, plain)


def test_the_limiter_turns_a_loud_burst_down_and_releases_without_clicks() -> None:
    model = FrameModel(SHIPPED / "default", device="cpu")
    group = Group(model, 2, 1, 1, (0.0, 0.0))
    hop, sr = model.manifest.hop, model.manifest.sample_rate
    t = np.arange(200 * hop) / sr
    loud = np.where(t < 0.5, 4.0, 0.5) * np.sin(2 * np.pi * 220 * t)  # +12 dBFS for 0.5 s, then -6 dBFS
    x = np.stack([loud, 0.25 * np.sin(2 * np.pi * 330 * t)]).astype(np.float32)
    out = np.empty_like(x)
    slots = np.array([0, 1])
    for i in range(200):
        frame = x[:, i * hop : (i + 1) * hop].copy()
        group.limit(slots, frame)
        out[:, i * hop : (i + 1) * hop] = frame
    assert np.abs(out).max() <= LIMIT
    assert np.array_equal(out[1], x[1])  # the quiet stream in the same batch is untouched
    assert count_clicks(out[0]) == 0
    released = np.abs(out[0, int(0.5 * sr) :]).reshape(-1, hop).max(axis=1) / 0.5  # gain after the burst
    back = int(np.argmax(released > 0.999))  # frames to full gain again
    expected = 20 * np.log10(4.0 / LIMIT) / LIMIT_RELEASE_DB_PER_S  # the dB it had to come back / its rate
    assert abs(back * hop / sr - expected) < 0.03, (back, expected)
    assert group.limit_gain[0] == 1.0 and not group.limiting
