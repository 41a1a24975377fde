"""Events that steer a stream's own audio, so every listener and device hears them: stings, ducks and moods.

- A **sting** is a short phrase played on top of the piece by a second voice of the stream's instrument (a
  slot of its own in the stream's model group, mixed into the stream's frame before the output guard). It is
  written in scale degrees and quarter notes, and played in the stream's current key, register, tempo and
  level; a composed stream starts it on the piece's next eighth note. Its tempo is doubled or halved until
  the phrase lasts STING_SECONDS.
- A **duck** lowers the whole stream by `db` for `seconds` with smooth ramps (down in DUCK_DOWN_SECONDS, up
  in DUCK_UP_SECONDS), then restores it; a duck during a duck takes the new depth and ends at the later end.
- A **mood** sets several composer controls at once (a named preset).

Stings and moods are data: `events.json` beside this file ships follow, donation and raid, and calm, tense,
triumphant, playful and dreamy; `wavecast serve --events FILE` adds to or replaces them by name.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wavecast.streaming.composer import ControlError, validate_controls
from wavecast.streaming.notes import MODES, REGISTERS, Scale, midi_hz
from wavecast.streaming.performer import FLOOR_DB

SHIPPED_EVENTS = Path(__file__).with_name("events.json")
STING_SECONDS = (1.0, 3.0)  # a sting's phrase lasts this long, whatever the tempo
STING_ARTICULATION = 0.85  # share of each note that sounds before its release
ATTACK_SECONDS, RELEASE_SECONDS = 0.03, 0.05  # a sting's notes are crisp on any instrument: it punctuates
STING_LEAD_FRAMES = 3  # silent frames a sting's voice runs before its first note (its LSTM settles)
DUCK_DOWN_SECONDS, DUCK_UP_SECONDS = 0.08, 0.4
DUCK_DB = (-60.0, 0.0)
DUCK_SECONDS = (0.1, 600.0)
MAX_STING_NOTES = 32
NAME = "^[a-z0-9][a-z0-9_-]{0,31}$"


class EventError(ValueError):
    """An event or a presets file that cannot be used; the message names the field."""


@dataclass(frozen=True)
class Sting:
    name: str
    description: str
    notes: tuple[tuple[int | None, float], ...]  # (scale degree from the tonic or None for a rest, quarter notes)

    @property
    def quarters(self) -> float:
        return sum(q for _, q in self.notes)

    def tempo_for(self, tempo: float) -> float:
        """`tempo`, doubled or halved until the phrase lasts within STING_SECONDS."""
        while self.quarters * 60.0 / tempo > STING_SECONDS[1]:
            tempo *= 2.0
        while self.quarters * 60.0 / tempo < STING_SECONDS[0]:
            tempo /= 2.0
        return tempo

    def curve(self, scale: Scale, around: float, tempo: float, level: float, f0_range: tuple[float, float],
              frame_seconds: float, delay: float = 0.0) -> np.ndarray:
        """The sting's f0 (Hz) and loudness (dB) for every frame, [frames, 2]: `delay` seconds of silence, then
        the phrase with its tonic in the octave nearest MIDI `around`, each note folded into `f0_range`."""
        steps = MODES[scale.mode]
        tonic = scale.tonic + 12 * round((around - scale.tonic) / 12)
        tempo = self.tempo_for(tempo)
        lead = STING_LEAD_FRAMES + round(delay / frame_seconds)
        tail = round(RELEASE_SECONDS / frame_seconds) + 2
        lengths = [max(1, round(q * 60.0 / tempo / frame_seconds)) for _, q in self.notes]
        out = np.empty((lead + sum(lengths) + tail, 2), np.float32)
        out[:, 0] = midi_hz(tonic)
        out[:, 1] = FLOOR_DB
        attack = max(1, round(ATTACK_SECONDS / frame_seconds))
        release = max(1, round(RELEASE_SECONDS / frame_seconds))
        start = lead
        for (degree, _), length in zip(self.notes, lengths, strict=True):
            if degree is not None:
                midi = tonic + 12 * (degree // len(steps)) + steps[degree % len(steps)]
                f0 = midi_hz(midi)
                while f0 > f0_range[1] and f0 / 2 >= f0_range[0]:
                    f0 /= 2
                while f0 < f0_range[0] and f0 * 2 <= f0_range[1]:
                    f0 *= 2
                sounding = max(attack, round(length * STING_ARTICULATION))
                ramp = np.minimum(1.0, np.arange(1, sounding + 1) / attack)
                out[start : start + length, 0] = f0
                out[start : start + sounding, 1] = FLOOR_DB + (level - FLOOR_DB) * ramp
                fall = np.arange(1, length - sounding + release + 1)
                end = min(start + sounding + len(fall), len(out))
                out[start + sounding : end, 1] = np.maximum(FLOOR_DB, level - (level - FLOOR_DB) * fall / release
                                                            )[: end - start - sounding]
                out[end:, 0] = f0  # the release holds its pitch
            start += length
        return out


@dataclass(frozen=True)
class Mood:
    name: str
    description: str
    controls: dict[str, Any]  # composer controls; "scale" may be a mode alone, which keeps the stream's tonic

    def apply_to(self, settings: dict[str, Any]) -> dict[str, Any]:
        """The controls this mood sets on a stream whose controls are `settings`."""
        out = dict(self.controls)
        if "scale" in out and " " not in out["scale"]:
            out["scale"] = f"{settings['scale'].split()[0]} {out['scale']}"
        return out


@dataclass(frozen=True)
class Events:
    stings: dict[str, Sting]
    moods: dict[str, Mood]

    def describe(self) -> dict:
        """The presets as `GET /v1/events` lists them (a sting's seconds at 96 quarter notes a minute)."""
        return {
            "stings": [{"name": s.name, "description": s.description, "quarters": s.quarters,
                        "seconds": round(s.quarters * 60.0 / s.tempo_for(96.0), 2)} for s in self.stings.values()],
            "moods": [{"name": m.name, "description": m.description, "controls": m.controls}
                      for m in self.moods.values()],
        }


def load_events(path: Path | None = None) -> Events:
    """The shipped stings and moods, with those of `path` (same format) added or replacing them by name.
    Raises EventError naming the file and field of anything unusable."""
    stings, moods = _read(SHIPPED_EVENTS)
    if path is not None:
        more_stings, more_moods = _read(Path(path))
        stings |= more_stings
        moods |= more_moods
    return Events(stings, moods)


def _read(path: Path) -> tuple[dict[str, Sting], dict[str, Mood]]:
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise EventError(f"{path}: cannot read it ({e.strerror}); name a JSON file of stings and moods") from None
    except ValueError as e:
        raise EventError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or set(data) - {"stings", "moods"}:
        raise EventError(f"{path}: must be an object with 'stings' and/or 'moods' (see {SHIPPED_EVENTS.name})")
    stings = {n: _sting(path, n, v) for n, v in _named(path, data, "stings").items()}
    moods = {n: _mood(path, n, v) for n, v in _named(path, data, "moods").items()}
    return stings, moods


def _named(path: Path, data: dict, kind: str) -> dict:
    items = data.get(kind, {})
    if not isinstance(items, dict):
        raise EventError(f"{path}: field '{kind}' must be an object of name: definition")
    for name, value in items.items():
        if not isinstance(name, str) or not re.fullmatch(NAME, name):
            raise EventError(f"{path}: '{kind}' name '{str(name)[:40]}' must be 1-32 lower-case letters, digits, "
                             "'-' or '_'")
        if not isinstance(value, dict) or not isinstance(value.get("description", ""), str):
            raise EventError(f"{path}: field '{kind}.{name}' must be an object with an optional 'description' text")
    return items


def _sting(path: Path, name: str, value: dict) -> Sting:
    where = f"{path}: field 'stings.{name}.notes"
    notes = value.get("notes")
    if not isinstance(notes, list) or not 1 <= len(notes) <= MAX_STING_NOTES:
        raise EventError(f"{where}' must be a list of 1 to {MAX_STING_NOTES} [degree, quarters] pairs")
    out = []
    for i, note in enumerate(notes):
        ok = isinstance(note, list) and len(note) == 2
        degree, quarters = note if ok else (None, None)
        ok = ok and (degree is None or (isinstance(degree, int) and not isinstance(degree, bool)
                                        and -14 <= degree <= 21))
        ok = ok and isinstance(quarters, int | float) and not isinstance(quarters, bool) and 0.125 <= quarters <= 8
        if not ok:
            raise EventError(f"{where}[{i}]' must be [degree, quarters]: a scale degree from -14 to 21 (0 = the "
                             "tonic, 7 = its octave in a seven-note mode) or null for a rest, and a length of 0.125 "
                             "to 8 quarter notes")
        out.append((degree, float(quarters)))
    return Sting(name, value.get("description", ""), tuple(out))


def _mood(path: Path, name: str, value: dict) -> Mood:
    controls = value.get("controls")
    if not isinstance(controls, dict) or not controls:
        raise EventError(f"{path}: field 'moods.{name}.controls' must be an object of composer controls")
    check = dict(controls)
    if isinstance(check.get("scale"), str) and " " not in check["scale"]:
        check["scale"] = f"C {check['scale']}"  # a mode alone: checked with any tonic
    try:
        validate_controls(check)
    except ControlError as e:
        raise EventError(f"{path}: field 'moods.{name}.controls': {e}") from None
    return Mood(name, value.get("description", ""), dict(controls))


class Duck:
    """Per-slot gain of a model group's streams: the depth and end of each one's duck and the gain now, in
    dB, applied to whole batches with a per-sample ramp (`apply`). Sized up front; written by `start` from
    any thread (two element writes), read and advanced on the inference thread."""

    def __init__(self, capacity: int, hop: int, frame_seconds: float) -> None:
        self.depth = np.zeros(capacity, np.float32)  # dB, <= 0
        self.until = np.zeros(capacity, np.int64)  # the stream frame the duck ends at
        self.gain = np.zeros(capacity, np.float32)  # dB now
        self.down = frame_seconds / DUCK_DOWN_SECONDS  # share of the depth moved per frame
        self.up = frame_seconds / DUCK_UP_SECONDS
        self.frame_seconds = frame_seconds
        self.ramp = (np.arange(1, hop + 1, dtype=np.float32) / hop)[None, :]
        self.busy = False  # some slot is ducked or not yet back at 0 dB: `apply` has work

    def start(self, slot: int, frame: int, db: float, seconds: float) -> None:
        """Duck `slot` by `db` from stream frame `frame` for `seconds` (extending a duck under way)."""
        end = frame + round(seconds / self.frame_seconds)
        self.until[slot] = max(int(self.until[slot]), end) if self.depth[slot] < 0 else end
        self.depth[slot] = db
        self.busy = True

    def reset(self, slot: int) -> None:
        self.depth[slot] = self.gain[slot] = 0.0
        self.until[slot] = 0

    def move(self, slot: int, other: Duck, other_slot: int) -> None:
        """Carry `slot`'s duck to `other_slot` of `other` (a stream moving to another version)."""
        other.depth[other_slot], other.until[other_slot] = self.depth[slot], self.until[slot]
        other.gain[other_slot] = self.gain[slot]
        other.busy = other.busy or self.depth[slot] < 0 or self.gain[slot] < 0
        self.reset(slot)

    def apply(self, slots: np.ndarray, written: np.ndarray, audio: np.ndarray) -> None:
        """Scale the rows of `audio` (streams `slots`; `written`: every slot's frame count) by their gain, which
        moves one frame's step toward the duck's depth (or back to 0 dB after its end), ramped across the frame."""
        if not self.busy:
            return
        frames = written[slots]
        target = np.where(frames < self.until[slots], self.depth[slots], 0.0)
        before = self.gain[slots]
        rows = np.flatnonzero((target < 0) | (before < 0))
        if not len(rows):
            self.busy = bool((self.depth < 0).any() or (self.gain < 0).any())
            return
        slots, before, target = slots[rows], before[rows], target[rows]
        size = np.maximum(-self.depth[slots], -before)  # dB a whole ramp moves
        falling = target < before
        after = np.where(falling, np.maximum(before - self.down * size, target),
                         np.minimum(before + self.up * size, target))
        self.gain[slots] = after
        self.depth[slots[(after >= 0) & (target >= 0)]] = 0.0  # over: back at 0 dB after its end
        g0, g1 = 10.0 ** (before / 20.0), 10.0 ** (after / 20.0)
        audio[rows] *= (g0[:, None] + (g1 - g0)[:, None] * self.ramp).astype(np.float32)


def sting_key(seed: int, count: int) -> int:
    """The noise seed of a stream's `count`-th sting: its own, so a sting never doubles the piece's noise."""
    return (seed * 1_000_003 + 7919 * (count + 1)) & (2**63 - 1)


def midi_of(hz: float) -> float:
    return 69.0 + 12.0 * math.log2(max(hz, 1e-3) / 440.0)


def register_midi(register: str) -> float:
    """The MIDI pitch at the middle of a composer register (55 low .. 79 high)."""
    return 55.0 + 24.0 * REGISTERS[register]


def nearest_scale(hz: float) -> Scale:
    """A major scale on the pitch class nearest `hz` (a plain stream has no key: its sting uses its pitch)."""
    return Scale(round(midi_of(hz)) % 12, "major")

