"""The performer: notes in, per-frame f0, loudness and brightness out, phrased (tails that reach into the next
attack, slurs that glide, short rests that ring on, louder notes played harder), and a composed stream that
keeps sounding inside its phrases and plays its instrument's brightness."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from wavecast.models.data import loudness_db
from wavecast.models.quality import in_phrase
from wavecast.models.store import SHIPPED
from wavecast.streaming.composer import ComposerModel
from wavecast.streaming.engine import Engine, compose
from wavecast.streaming.model import FrameModel, Manifest
from wavecast.streaming.notes import midi_hz
from wavecast.streaming.performer import (
    ARTICULATIONS,
    FAST_ATTACK,
    FLOOR_DB,
    LIFT_DB,
    ROOM_DB,
    Performer,
    Phrasing,
    articulation_of,
)

FS = 0.01
VIOLIN, CELLO, CLARINET = ARTICULATIONS[40], ARTICULATIONS[42], ARTICULATIONS[71]


def play(notes: list[tuple[int | None, int]], legato: float, articulation=VIOLIN, volume: float = -20.0
         ) -> tuple[np.ndarray, list[int]]:
    """[frames, 3] controls for (midi or None, frames) notes played back to back, and each note's first frame."""
    performer = Performer(3, articulation, (30.0, 4000.0), 0.0, FS)
    out, starts, frame = [], [], 0
    for midi, frames in notes:
        starts.append(frame)
        performer.play(Phrasing(frame, frames, midi, frames * FS / 0.625, False, 0.0), volume, legato)
        for f in range(frame, frame + frames):
            out.append(performer.frame(f, vibrato=0.0).copy())
        frame += frames
    return np.array(out), starts


def test_slurred_notes_glide_without_a_new_attack() -> None:
    curve, starts = play([(67, 40), (69, 40), (71, 40)], legato=1.0)
    between = curve[starts[1] - 2 : starts[1] + 6]
    assert between[:, 1].min() > -20.0 - 4.0  # no dip: the level moves only by the dynamics' few dB
    f0 = curve[starts[1] : starts[1] + 4, 0]
    assert f0[0] == pytest.approx(midi_hz(67), rel=1e-6)  # portamento from G to A over a few frames
    assert f0[0] < f0[1] < f0[2] < f0[3] < midi_hz(69)
    assert curve[starts[1] + 10, 0] == pytest.approx(midi_hz(69), rel=1e-6)


def test_detached_notes_release_into_the_next_attack() -> None:
    curve, starts = play([(67, 40), (69, 40)], legato=0.0)
    gap = curve[starts[1] - 5 : starts[1], 1]
    assert np.all(np.diff(gap) < 0)  # released before the next start
    assert gap[-1] < -20.0 - 6.0
    # a lift, not a stop: the next attack rises from what the tail still sounds
    assert curve[starts[1], 1] > gap[-1] >= curve[starts[1] - 16, 1] - LIFT_DB - 1e-3
    assert curve[starts[1] + 20, 1] == pytest.approx(curve[20, 1], abs=2.5)


def test_a_detached_clarinet_note_stops_before_the_next() -> None:
    """Its release falls silent at once (a violin's lifts LIFT_DB), and the next attack starts from there."""
    curve, starts = play([(67, 40), (69, 40)], legato=0.0, articulation=CLARINET)
    assert curve[starts[1] - 16, 1] > -20.0 - 4.0  # played to the gap (15 frames at legato 0)
    assert np.all(curve[starts[1] - 14 : starts[1], 1] == FLOOR_DB)  # silent from the gap's second frame
    assert curve[starts[1] + 20, 1] == pytest.approx(curve[20, 1], abs=2.5)


def test_a_short_rest_rings_on_and_a_long_one_falls_silent() -> None:
    short, starts = play([(67, 40), (None, 30), (69, 40)], legato=0.5)
    assert short[starts[1] : starts[2], 1].min() >= short[20, 1] - ROOM_DB - 2.5  # 2.5: the dynamics' spread
    long, starts = play([(67, 40), (None, 200), (69, 40)], legato=0.0)
    assert long[starts[2] - 1, 1] == FLOOR_DB


def test_each_instrument_attacks_along_its_own_onset_contour() -> None:
    """Out of silence a note's level follows its instrument's measured contour a frame at a time; a note too
    short for the whole contour takes it within FAST_ATTACK of its length; the previous note's tail rings on
    under the attack at its release rate, the two summed in power, so the level dips where the tail falls
    faster than the attack rises."""
    for articulation in ARTICULATIONS.values():
        curve, _ = play([(67, 200)], legato=1.0, articulation=articulation)
        steps, level = len(articulation.onset_db), curve[100, 1]
        np.testing.assert_allclose(curve[:steps, 1] - level, articulation.onset_db, atol=1e-4)
        assert np.all(curve[steps:200, 1] == level)
    assert len(CELLO.onset_db) > 5 * len(CLARINET.onset_db)  # a bow takes 0.3 s, a tongued reed 0.05 s
    short, _ = play([(67, 20)], legato=1.0, articulation=CELLO)
    assert short[round(FAST_ATTACK * 20), 1] == short[19, 1] > short[0, 1] + 20.0
    fall = 60.0 * FS / CELLO.release_seconds
    for legato in (0.0, 0.7):  # at 0.7 a short gap: a note detached, the tail close under it
        curve, starts = play([(67, 100), (69, 100)], legato=legato, articulation=CELLO)
        steps, level, tail = len(CELLO.onset_db), curve[starts[1] + 50, 1], curve[starts[1] - 1, 1]
        rise = curve[starts[1] : starts[1] + steps, 1]
        ring = tail - fall * np.arange(1, steps + 1)
        attack = level + np.array(CELLO.onset_db)
        np.testing.assert_allclose(rise, 10 * np.log10(10 ** (attack / 10) + 10 ** (ring / 10)), atol=1e-3)
    assert rise[0] > tail - fall - 0.1 > attack[0] + 5.0  # the tail still sounded
    assert rise.argmin() > 0 and rise.min() < rise[0] - 0.5  # ... and fell faster than the attack rose


def test_each_key_sounds_as_its_instrument_s_does() -> None:
    """The same phrase with and without the cello's key levels (same seed, so the same dynamics): each note
    sounds its key's level over or under the other, at the same brightness (the same effort)."""
    notes = [(52, 60), (61, 60), (67, 60), (None, 30), (52, 60)]
    flat = dataclasses.replace(CELLO, key_db=(0.0,))
    keyed, starts = play(notes, legato=0.0, articulation=CELLO)
    plain, _ = play(notes, legato=0.0, articulation=flat)
    for start, (midi, _) in zip(starts, notes, strict=True):
        if midi is not None:
            assert keyed[start + 40, 1] - plain[start + 40, 1] == pytest.approx(CELLO.key_level(midi), abs=1e-4)
    assert CELLO.key_level(52) - CELLO.key_level(61) > 5.0
    np.testing.assert_array_equal(keyed[:, 2], plain[:, 2])
    assert CELLO.key_level(20) == CELLO.key_db[0] and CELLO.key_level(120) == CELLO.key_db[-1]


def test_a_louder_note_is_played_harder_so_brighter() -> None:
    """Brightness is a velocity: set at each note's start (slurred or not), held through the note and its
    release, higher for a louder note, as the instrument's data plays such notes on average."""
    soft, _ = play([(67, 40), (69, 40)], legato=0.0, articulation=CLARINET, volume=-40.0)
    loud, starts = play([(67, 40), (69, 40), (None, 30), (71, 40)], legato=1.0, articulation=CLARINET, volume=-10.0)
    assert 0.0 <= soft[:, 2].max() < 0.4 < 0.8 < loud[:, 2].min() <= 1.0
    changes = np.flatnonzero(np.diff(loud[:, 2])) + 1
    assert set(changes) <= set(starts[1:]) and len(changes) >= 2  # new notes only; the rest keeps the last
    for start, midi in zip(starts, (67, 69, None, 71), strict=True):
        if midi is not None:  # the note's level, past its attack, less its key's: how hard it was played
            level = loud[start + 30, 1] - CLARINET.key_level(midi)
            assert loud[start, 2] == pytest.approx(CLARINET.brightness(level), abs=0.01)
    assert ARTICULATIONS[56].brightness(-30.0) > CLARINET.brightness(-30.0)  # the trumpet is played harder there


def test_a_composed_stream_plays_the_brightness_where_its_instrument_has_it() -> None:
    """Through the engine: each frame of a composed stream on a model with a brightness control takes the
    performer's brightness, which steps at note starts and follows the volume; a model without the control
    plays as before."""
    folk = ComposerModel(SHIPPED / "folk")
    seen = {}
    for volume in (-40.0, -10.0):
        engine = Engine(buffer_frames=1, max_streams=1, budget=None)
        group = engine.add_model(FrameModel(SHIPPED / "clarinet", device="cpu"))
        stream = engine.create_stream(group, 4, {"tempo": 140, "volume": volume}, engine.add_composer(folk))
        reader, column = stream.listen(), group.controls.index["brightness"]
        frame, values = np.empty(group.manifest.hop, np.float32), []
        for _ in range(600):
            engine.tick()
            reader.read(frame)
            values.append(float(group.controls.current[stream.slot, column]))
            assert values[-1] == pytest.approx(float(stream.voice.performer.out[2]))
        starts = {n.frame for n in stream.voice.notes}
        changes = np.flatnonzero(np.diff(values)) + 1
        assert len(changes) > 10 and set(changes.tolist()) <= starts
        seen[volume] = np.mean(values[100:])
    assert seen[-40.0] + 0.4 < seen[-10.0]
    violin = Engine(buffer_frames=1, max_streams=1, budget=None).add_model(FrameModel(SHIPPED / "violin"))
    assert violin.performed == violin.played and "brightness" not in violin.controls.index


def test_the_articulation_comes_from_the_instrument_s_program() -> None:
    assert articulation_of(Manifest.read(SHIPPED / "violin" / "model.json")) == VIOLIN
    assert articulation_of(Manifest.read(SHIPPED / "clarinet" / "model.json")) == CLARINET


@pytest.mark.parametrize("name", ["violin", "clarinet"])
def test_a_composed_stream_keeps_sounding_inside_its_phrases(name: str) -> None:
    """Silent only where a note was released: never for the violin, whose notes lift and ring on; in most of
    the clarinet's release gaps, where its reed stops as FluidSynth's does."""
    model = FrameModel(SHIPPED / name, device="cpu")
    folk = ComposerModel(SHIPPED / "folk")
    audio, notes = compose(model, 20.0, 2, {"tempo": 112}, composer=folk)
    phrase = in_phrase(notes, len(audio) // 480)
    silent = loudness_db(audio) < -60.0
    released = np.zeros(len(phrase), bool)  # from a detached note's release to the next note's start
    for note in notes:
        if note.midi is not None and note.sounding is not None:
            released[note.frame + note.sounding : note.frame + note.frames] = True
    assert phrase.sum() > 1000 and released.sum() > 50
    assert (phrase & silent & ~released).sum() / phrase.sum() <= 0.02
    stopped = (phrase & silent & released).sum() / released.sum()
    assert stopped > 0.3 if name == "clarinet" else stopped == 0.0
    # and a detached (legato 0) piece still separates its notes: the level dips before most note starts
    audio, notes = compose(model, 20.0, 2, {"tempo": 112, "legato": 0.0}, composer=folk)
    level = loudness_db(audio)
    starts = [n.frame for n in notes if n.midi is not None]
    dips = [level[s - 1] < level[a : s - 2].max() - 3.0 for a, s in zip(starts, starts[1:], strict=False)]
    assert np.mean(dips) > 0.7
