"""The watermark as an engine stage: what it does to the audio, and that a stream keeps its mark through what
the engine does to it (a move to another version, a sting). Detection after real codecs is in test_watermark.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from wavecast.streaming import watermark
from wavecast.streaming.engine import LIMIT, Engine, render
from wavecast.streaming.events import load_events
from wavecast.streaming.model import FrameModel
from wavecast.streaming.watermark import DELAY, Key, band_weights, detect

SR = 48_000
HOP = 480
KEY = Key(b"test-key-of-the-marker-stage")
OTHER = Key(b"another-key-nobody-marked-with")


def band_levels(x: np.ndarray) -> np.ndarray:
    """Energy of `x` in each watermark band, over the whole clip."""
    spectrum = np.abs(np.fft.rfft(x.astype(np.float64))) ** 2
    return band_weights(np.fft.rfftfreq(len(x), 1 / SR)) @ spectrum


def test_the_mark_is_30_db_under_the_audio_in_every_band_and_found_again(violin: FrameModel) -> None:
    timeline = [(t, {"f0": f, "loudness": db}) for t, f, db in
                [(0.0, 330.0, -20.0), (1.0, 440.0, -12.0), (2.0, 262.0, -30.0), (3.0, 587.0, -6.0)]]
    plain = render(violin, 4.0, 3, {}, timeline)
    marked = render(violin, 4.0, 3, {}, timeline, watermark=KEY, serial=0x2A)
    assert np.array_equal(marked, render(violin, 4.0, 3, {}, timeline, watermark=KEY, serial=0x2A))  # a seed replays
    # the marked stream is the audio DELAY samples late (before that only the band filters' faint pre-ring) ...
    assert np.abs(marked[:DELAY]).max() < 1e-3 * np.abs(plain).max()
    mark = marked[DELAY:] - plain[:-DELAY]  # ... plus the mark
    audio = band_levels(plain[:-DELAY])
    used = audio > 1e-6 * audio.max()
    assert used.sum() >= 8
    assert np.all(10 * np.log10(band_levels(mark)[used] / audio[used]) <= -30.0)
    assert np.abs(marked).max() <= LIMIT  # after the limiter: the mark never costs headroom

    found = detect(marked, SR, [OTHER, KEY])
    assert found.marked and found.key_id == KEY.id and found.serial == 0x2A and found.payload == KEY.payload(0x2A)
    assert found.ranges and found.ranges[0][0] == 0.0 and found.ranges[-1][1] == pytest.approx(4.0, abs=0.05)
    assert not detect(marked, SR, [OTHER]).marked  # another key's chips do not match
    assert not detect(plain, SR, [KEY]).marked


def test_a_stream_keeps_its_mark_when_it_moves_to_another_version(violin: FrameModel, cello: FrameModel) -> None:
    engine = Engine(buffer_frames=1, max_streams=2, budget=None, watermark=KEY)
    old, new = engine.add_model(violin), engine.add_model(cello)
    stream = engine.create_stream(old, 5, {"f0": 220.0, "loudness": -18.0}, serial=0x1234)
    assert stream.mark == KEY.payload(0x1234)
    assert stream.info()["mark"] == {"key_id": f"{KEY.id:04x}", "payload": f"{KEY.id:04x}-1234"}
    assert stream.info()["provenance"]["watermark"]["payload"] == f"{KEY.id:04x}-1234"
    reader = stream.listen()
    frames = 600
    out = np.zeros(frames * HOP, np.float32)
    for i in range(frames):
        if i == 300:
            engine.swap(stream, new, engine.warm(stream, new))
        engine.tick()
        assert reader.read(out[i * HOP : (i + 1) * HOP]) == HOP
    assert stream.group is new and engine.stats.swaps == 1
    edge = slice(290 * HOP, 320 * HOP)  # no step at the move beyond the audio's own
    assert np.abs(np.diff(out[edge])).max() <= 2 * np.abs(np.diff(out[: 280 * HOP])).max()
    found = detect(out, SR, [KEY])
    assert found.marked and found.serial == 0x1234
    assert found.ranges == [(0.0, pytest.approx(6.0, abs=0.05))]  # both versions, one unbroken mark


def test_a_sting_is_mixed_in_before_the_mark_and_its_own_slot_is_not_marked(violin: FrameModel) -> None:
    engine = Engine(buffer_frames=1, max_streams=4, budget=None, watermark=KEY)
    group = engine.add_model(violin)
    stream = engine.create_stream(group, 2, {"f0": 294.0, "loudness": -20.0}, serial=7)
    reader = stream.listen()
    sting = load_events().stings["follow"]
    out = np.zeros(400 * HOP, np.float32)
    for i in range(400):
        if i == 100:
            engine.sting(stream, sting)
        engine.tick()
        reader.read(out[i * HOP : (i + 1) * HOP])
        if group.layers:
            assert not group.marker.chips[group.layers[0].slot].any()
    assert engine.stats.stings == 1
    found = detect(out, SR, [KEY])
    assert found.marked and found.serial == 7


def test_without_a_key_nothing_is_marked_or_delayed(violin: FrameModel) -> None:
    engine = Engine(buffer_frames=1, max_streams=2, budget=None)
    stream = engine.create_stream(engine.add_model(violin), 3, {}, serial=5)  # a serial without a key: no mark
    assert stream.mark is None and stream.group.marker is None
    info = stream.info()
    assert info["mark"] is None and info["provenance"]["watermark"]["on"] is False
    a = render(violin, 0.5, 3, {})
    assert a[:DELAY].any()  # not delayed


def test_the_detector_refuses_a_clip_too_short_to_judge() -> None:
    with pytest.raises(ValueError, match="at least"):
        detect(np.zeros(SR), SR, [KEY])
    assert watermark.MIN_SECONDS == 2.0
