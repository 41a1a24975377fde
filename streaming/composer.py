"""The composer: a note-level LSTM that writes a melody live, and the performer that plays it.

`ComposerModel` is a checked ONNX graph: inputs ``tokens [B,T,2]`` (previous pitch and duration token),
``features [B,T,FEATURES]`` (streaming.notes) and ``state_in.h/c``; outputs ``pitch_logits``,
``duration_logits`` and ``state_out.h/c``. A `Voice` is one stream's composing state: its controls, a
seeded generator for sampling (separate from the audio noise), the bar position and the note being played;
its performer turns notes into the instrument's per-frame f0 and loudness (attack and release envelopes,
portamento between slurred notes, vibrato on long notes). The engine runs one batched composer call per
tick for every voice whose next note starts at that frame, so composing costs one step per note.
"""

from __future__ import annotations

import functools
import json
import math
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from wavecast.streaming.controls import ControlError
from wavecast.streaming.model import MANIFEST, Manifest, ModelError, StatePool, checked_graph, session_options
from wavecast.streaming.notes import (
    DURATIONS,
    FEATURES,
    MODES,
    PITCH_HIGH,
    PITCH_LOW,
    PITCH_TOKENS,
    REGISTERS,
    START,
    Scale,
    features,
    note_name,
    scale_mask,
    token_midi,
)

FLOOR_DB = -80.0  # loudness of silence
ATTACK_SECONDS = 0.03
RELEASE_SECONDS = 0.05
GLIDE_SECONDS = 0.04  # portamento between slurred notes
VIBRATO_HZ, VIBRATO_CENTS, VIBRATO_AFTER_SECONDS = 5.5, 30.0, 0.25
REARTICULATE_DB = 9.0  # dip between two slurred notes of the same pitch, so the second one is heard
METRES = {"4/4": (4.0, False), "2/4": (2.0, False), "3/4": (3.0, True), "6/8": (3.0, True)}  # bar, triple
ACTIONS = ("play", "pause", "reset")


@dataclass(frozen=True)
class NumberControl:
    min: float
    max: float
    default: float
    unit: str
    integer: bool = False


NUMBERS = {
    "tempo": NumberControl(20.0, 300.0, 96.0, "quarter notes per minute"),
    "temperature": NumberControl(0.05, 2.0, 0.9, "softmax temperature"),
    "top_k": NumberControl(1, PITCH_TOKENS, 8, "candidates", integer=True),
    "density": NumberControl(0.0, 1.0, 0.5, "0 sparse .. 1 busy"),
    "legato": NumberControl(0.0, 1.0, 0.6, "0 staccato .. 1 slurred"),
    "vibrato": NumberControl(0.0, 1.0, 0.3, "depth, 1 = 30 cents"),
    "volume": NumberControl(-60.0, 0.0, -20.0, "dB"),
}
CHOICES = {"scale": "D major", "register": "mid", "metre": "4/4"}


def control_defaults() -> dict[str, Any]:
    return {**{k: c.default for k, c in NUMBERS.items()}, **CHOICES}


def validate_controls(values: object) -> dict[str, Any]:
    """Checked composer controls by name; raises ControlError naming the first bad one."""
    if not isinstance(values, Mapping):
        raise ControlError("'controls' must be an object of name: value, e.g. {\"tempo\": 96}")
    checked: dict[str, Any] = {}
    for name, value in values.items():
        if name in NUMBERS:
            c = NUMBERS[name]
            if isinstance(value, bool) or not isinstance(value, int | float) or \
                    (isinstance(value, float) and not math.isfinite(value)):
                raise ControlError(f"control '{name}' must be a finite number ({c.min:g} to {c.max:g}, {c.unit})")
            if not c.min <= value <= c.max:
                raise ControlError(f"control '{name}' is outside [{c.min:g}, {c.max:g}] ({c.unit}); send a value in "
                                   "that range")
            if c.integer and value != int(value):
                raise ControlError(f"control '{name}' must be a whole number from {c.min:g} to {c.max:g}")
            checked[name] = int(value) if c.integer else float(value)
        elif name == "scale":
            try:
                if not isinstance(value, str):
                    raise ValueError("it must be text: a tonic and a mode, e.g. 'D dorian'")
                checked[name] = str(Scale.parse(value))
            except ValueError as e:
                raise ControlError(f"control 'scale': {e}") from None
        elif name in ("register", "metre"):
            allowed = REGISTERS if name == "register" else METRES
            if not isinstance(value, str) or value not in allowed:
                raise ControlError(f"control '{name}' must be one of {', '.join(allowed)}")
            checked[name] = value
        else:
            known = ", ".join([*NUMBERS, *CHOICES])
            raise ControlError(f"unknown control '{name}'; a composed stream takes {known}")
    return checked


def describe_controls() -> list[dict]:
    """The composer controls as the API lists them."""
    out = [{"name": k, "unit": c.unit, "min": c.min, "max": c.max, "default": c.default} for k, c in NUMBERS.items()]
    modes = ", ".join(MODES)
    out.append({"name": "scale", "default": CHOICES["scale"], "choices": f"<tonic> <mode>, mode one of {modes}"})
    out.append({"name": "register", "default": CHOICES["register"], "choices": list(REGISTERS)})
    out.append({"name": "metre", "default": CHOICES["metre"], "choices": list(METRES)})
    return out


@functools.lru_cache(maxsize=256)
def _scale(text: str) -> Scale:
    return Scale.parse(text)


@functools.lru_cache(maxsize=256)
def _mask(scale: str, low_hz: float, high_hz: float) -> np.ndarray:
    mask = scale_mask(_scale(scale))
    for token in range(1, PITCH_TOKENS):
        mask[token] &= low_hz <= 440.0 * 2.0 ** ((token_midi(token) - 69) / 12) <= high_hz
    mask.flags.writeable = False
    return mask


class ComposerModel:
    """A checked composer graph: `run` advances B voices by T events."""

    def __init__(self, directory: Path, device: str = "cpu", threads: int = 1) -> None:
        self.directory = Path(directory)
        self.manifest = Manifest.read(self.directory / MANIFEST)
        m = self.manifest
        if m.kind != "composer":
            raise ModelError(f"{self.directory / MANIFEST}: field 'kind' is '{m.kind}', a composer is needed")
        want = {"pitch_low": PITCH_LOW, "pitch_high": PITCH_HIGH, "durations": list(DURATIONS), "features": FEATURES}
        for key, value in want.items():
            have = m.vocabulary.get(key)
            if have != value and not (key == "durations" and np.allclose(have or [0], value)):
                raise ModelError(f"{self.directory / MANIFEST}: field 'vocabulary.{key}' is {json.dumps(have)}, this "
                                 f"wavecast expects {json.dumps(value)} (streaming/notes.py); retrain with 'wavecast "
                                 "train composer'")
        graph = checked_graph(self.directory, m)
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(graph), session_options(threads), providers=providers)
        except Exception as e:  # onnxruntime raises several unrelated types for a corrupt graph
            raise ModelError(f"{graph}: ONNX Runtime cannot load it ({e})") from None
        names = [s.name for s in m.states]
        inputs = {i.name for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        want_in = {"tokens", "features", *(f"state_in.{n}" for n in names)}
        want_out = {"pitch_logits", "duration_logits", *(f"state_out.{n}" for n in names)}
        if inputs != want_in or outputs != want_out:
            raise ModelError(f"{graph}: graph inputs {sorted(inputs)} / outputs {sorted(outputs)} do not match the "
                             f"composer contract {sorted(want_in)} / {sorted(want_out)}")
        self.state_names = names
        self.output_names = ["pitch_logits", "duration_logits", *(f"state_out.{n}" for n in names)]

    def run(self, tokens: np.ndarray, feats: np.ndarray, states: dict[str, np.ndarray]
            ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        feeds = {"tokens": tokens, "features": feats, **{f"state_in.{n}": states[n] for n in self.state_names}}
        pitch, duration, *outs = self.session.run(self.output_names, feeds)
        return pitch, duration, dict(zip(self.state_names, outs, strict=True))


@dataclass
class Note:
    frame: int  # the stream's frame the note starts at
    frames: int  # its length in frames (to the next note's start)
    midi: int | None  # None = rest
    quarters: float
    bar: int  # 1-based
    beat: float  # quarter notes into the bar, 1-based
    scale: str
    tempo: float
    metre: str = "4/4"

    def to_dict(self) -> dict:
        return {"frame": self.frame, "frames": self.frames, "midi": self.midi,
                "note": note_name(self.midi) if self.midi else "rest", "quarters": round(self.quarters, 4),
                "bar": self.bar, "beat": round(self.beat, 3), "key": self.scale, "tempo": self.tempo,
                "metre": self.metre}


class ComposerGroup:
    """The voices of one composer version: their LSTM states and one batched step for those that need it."""

    def __init__(self, model: ComposerModel, capacity: int) -> None:
        self.model = model
        self.manifest = model.manifest
        self.pool = StatePool(model.manifest, capacity)
        self.failure: str | None = None  # set when the engine quarantines this composer
        self.tokens = np.zeros((0, 1, 2), np.int64)
        self.features = np.zeros((0, 1, FEATURES), np.float32)

    def step(self, voices: list[Voice]) -> None:
        """Sample the next note of every voice in `voices` (one ORT call)."""
        n = len(voices)
        if len(self.tokens) < n:
            self.tokens = np.zeros((max(n, 2 * len(self.tokens)), 1, 2), np.int64)
            self.features = np.zeros((len(self.tokens), 1, FEATURES), np.float32)
        for i, v in enumerate(voices):
            self.tokens[i, 0] = v.previous
            v.write_features(self.features[i, 0])
        slots = np.array([v.slot for v in voices], np.intp)
        pitch, duration, states = self.model.run(self.tokens[:n], self.features[:n], self.pool.gather(slots))
        self.pool.scatter(slots, states)
        for i, v in enumerate(voices):
            v.accept(pitch[i, -1], duration[i, -1])


class Voice:
    """One stream's composer and performer. Controls and actions may come from any thread; everything
    else runs on the inference thread."""

    def __init__(self, group: ComposerGroup, seed: int, controls: Mapping[str, Any], f0_range: tuple[float, float],
                 frame_seconds: float, keep_notes: int | None = 2000, loudness_max: float = 0.0) -> None:
        self.group = group
        self.seed = seed
        self.settings = {**control_defaults(), **controls}
        self.f0_range = f0_range
        self.loudness_max = loudness_max  # the instrument's top: an accent never asks for more
        self.frame_seconds = frame_seconds
        self.slot: int | None = None
        self.notes: list[Note] = []  # the last `keep_notes` at least (all with None)
        self.keep_notes = keep_notes
        self.count = 0  # notes (and rests) started
        self.paused = False
        self._actions: list[str] = []
        self._lock = threading.Lock()
        self._restart()
        self.frame = 0  # the frame being made
        self.note: Note | None = None  # the note sounding or resting now
        self.start_frame = self.off_frame = 0  # where the current note starts and its release starts
        self.level = FLOOR_DB  # loudness target of the current note
        self.glide_from: float | None = None  # f0 a slurred note glides from
        self.rearticulate = False  # slurred onto the same pitch: dip and attack again
        self.out = np.array([f0_range[0], FLOOR_DB], np.float32)  # f0, loudness of the current frame

    def _restart(self) -> None:
        self.rng = np.random.Generator(np.random.PCG64([self.seed, 1]))
        self.previous = np.array([START, START], np.int64)
        self.position = 0.0  # quarter notes since the piece began
        self.next_time: float | None = None  # seconds of the next note's start; None = the next frame made

    # -- any thread ----------------------------------------------------------------------------------
    def set(self, values: Mapping[str, Any]) -> None:
        """New (validated) controls; they apply from the next note."""
        self.settings = {**self.settings, **values}

    def act(self, action: str) -> None:
        if action not in ACTIONS:
            raise ControlError(f"unknown action '{action}'; one of {', '.join(ACTIONS)}")
        with self._lock:
            self._actions.append(action)

    def now_playing(self) -> dict:
        note, s = self.note, self.settings
        playing = note.to_dict() if note is not None else None
        return {"state": "paused" if self.paused else "playing", "note": playing, "key": s["scale"],
                "tempo": s["tempo"], "notes_played": self.count}

    def played(self, since: int = 0) -> tuple[int, list[Note]]:
        """How many notes were ever started, and those kept from index `since` on (oldest first)."""
        with self._lock:
            first = self.count - len(self.notes)
            return self.count, self.notes[max(0, since - first) :]

    # -- inference thread ----------------------------------------------------------------------------
    def export(self) -> dict[str, Any]:
        """Every field the next sample depends on, as JSON-able values (a stream snapshot's 'voice'; between
        ticks). The notes played before are left out: they are history, only their count is kept."""
        with self._lock:
            actions, count = list(self._actions), self.count
        note = self.note
        return {"settings": dict(self.settings), "rng": self.rng.bit_generator.state,
                "previous": [int(t) for t in self.previous], "position": self.position, "next_time": self.next_time,
                "frame": self.frame, "note": None if note is None else asdict(note),
                "start_frame": int(self.start_frame), "off_frame": int(self.off_frame), "level": float(self.level),
                "glide_from": None if self.glide_from is None else float(self.glide_from),
                "rearticulate": bool(self.rearticulate), "out": [float(v) for v in self.out], "paused": self.paused,
                "actions": actions, "count": count}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Take up where `export` left off (its fields checked by streaming/snapshot.py), before the voice's
        first frame. glide_from was one of `out`'s float32 values and is again, so the glide's arithmetic is
        the same to the bit."""
        self.settings = dict(state["settings"])
        self.rng = np.random.Generator(np.random.PCG64())
        self.rng.bit_generator.state = state["rng"]
        self.previous = np.array(state["previous"], np.int64)
        self.position, self.next_time, self.frame = state["position"], state["next_time"], state["frame"]
        self.note = None if state["note"] is None else Note(**state["note"])
        self.start_frame, self.off_frame, self.level = state["start_frame"], state["off_frame"], state["level"]
        self.glide_from = None if state["glide_from"] is None else np.float32(state["glide_from"])
        self.rearticulate, self.paused = state["rearticulate"], state["paused"]
        self.out = np.array(state["out"], np.float32)
        with self._lock:
            self._actions, self.count = list(state["actions"]), state["count"]

    def use(self, group: ComposerGroup, slot: int) -> None:
        """Compose with `group` (state slot `slot`, reset) from the next note on: its melody starts afresh,
        while the key, metre and bar position carry on."""
        self.group, self.slot = group, slot
        self.previous = np.array([START, START], np.int64)

    def begin_frame(self, frame: int) -> bool:
        """Apply queued actions; True when the next note is to be composed at this frame."""
        with self._lock:
            actions, self._actions = self._actions, []
        for action in actions:
            if action == "pause" and not self.paused:
                self.paused = True
                self.off_frame = min(self.off_frame, frame)
            elif action == "play" and self.paused:
                self.paused = False
                self.next_time = None
            elif action == "reset":  # release the note, then begin the piece again from the seed
                self.off_frame = min(self.off_frame, frame)
                self._restart()
                self.next_time = (frame + round(RELEASE_SECONDS / self.frame_seconds)) * self.frame_seconds
                if self.slot is not None:
                    self.group.pool.reset(self.slot)
        self.frame = frame
        if self.paused:
            return False
        if self.next_time is None:
            self.next_time = frame * self.frame_seconds
        return frame >= round(self.next_time / self.frame_seconds)

    def write_features(self, out: np.ndarray) -> None:
        s = self.settings
        bar, triple = METRES[s["metre"]]
        features(out, self.position, bar, _scale(s["scale"]), s["density"], REGISTERS[s["register"]], triple)

    def _mask(self) -> np.ndarray:
        """Tokens the scale allows that the instrument can play (and rests)."""
        return _mask(self.settings["scale"], *self.f0_range)

    def _sample(self, logits: np.ndarray, mask: np.ndarray | None) -> int:
        s = self.settings
        z = logits.astype(np.float64) / s["temperature"]
        if mask is not None:
            z = np.where(mask, z, -np.inf)
        k = min(int(s["top_k"]), int(np.isfinite(z).sum()))
        if k < len(z):
            z = np.where(z >= np.partition(z, -k)[-k], z, -np.inf)
        p = np.exp(z - z.max())
        cdf = np.cumsum(p / p.sum())
        return int(min(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"), len(z) - 1))

    def accept(self, pitch_logits: np.ndarray, duration_logits: np.ndarray) -> None:
        """Sample the note the model proposes and start playing it at this frame."""
        s = self.settings
        pitch = self._sample(pitch_logits, self._mask())
        duration = self._sample(duration_logits, None)
        quarters = DURATIONS[duration]
        bar, _ = METRES[s["metre"]]
        previous = self.note
        beat = self.position % bar + 1.0
        self.next_time += quarters * 60.0 / s["tempo"]
        end = round(self.next_time / self.frame_seconds)
        note = Note(self.frame, end - self.frame, token_midi(pitch), quarters, int(self.position // bar) + 1, beat,
                    s["scale"], s["tempo"], s["metre"])
        self.previous = np.array([pitch, duration], np.int64)
        self.position += quarters
        sounding = max(1, round((end - self.frame) * (0.5 + 0.5 * s["legato"])))
        slurred = previous is not None and previous.midi is not None and self.off_frame >= self.frame
        self.glide_from = self.out[0] if slurred and note.midi is not None else None
        self.rearticulate = slurred and previous.midi == note.midi
        self.note, self.start_frame, self.off_frame = note, self.frame, self.frame + sounding
        accent = 2.0 if note.beat == 1.0 else 0.0
        self.level = min(s["volume"] + accent + self.rng.uniform(-1.5, 1.5), self.loudness_max)
        with self._lock:
            self.notes.append(note)
            self.count += 1
            if self.keep_notes is not None and len(self.notes) > 2 * self.keep_notes:
                del self.notes[: -self.keep_notes]

    def frame_controls(self, frame: int) -> np.ndarray:
        """f0 (Hz) and loudness (dB) for this frame."""
        note, fs = self.note, self.frame_seconds
        if note is None or note.midi is None:
            self.out[1] = max(FLOOR_DB, self.out[1] - 60.0 * fs / RELEASE_SECONDS)  # release into the rest
            return self.out
        target = 440.0 * 2.0 ** ((note.midi - 69) / 12)
        since = (frame - self.start_frame) * fs
        f0 = target
        if self.glide_from is not None and since < GLIDE_SECONDS:
            f0 = self.glide_from * (target / self.glide_from) ** (since / GLIDE_SECONDS)
        depth = self.settings["vibrato"] * VIBRATO_CENTS
        if depth and since > VIBRATO_AFTER_SECONDS:
            ramp = min(1.0, (since - VIBRATO_AFTER_SECONDS) / 0.2)
            f0 *= 2.0 ** (ramp * depth / 1200 * math.sin(2 * math.pi * VIBRATO_HZ * (since - VIBRATO_AFTER_SECONDS)))
        self.out[0] = min(max(f0, self.f0_range[0]), self.f0_range[1])
        if frame >= self.off_frame:  # release
            self.out[1] = max(FLOOR_DB, self.out[1] - 60.0 * fs / RELEASE_SECONDS)
        elif self.glide_from is not None and not self.rearticulate:
            self.out[1] = self.level  # slurred: no new attack
        else:
            start = self.level - REARTICULATE_DB if self.rearticulate else FLOOR_DB
            self.out[1] = start + (self.level - start) * min(1.0, (since + fs) / ATTACK_SECONDS)
        return self.out
