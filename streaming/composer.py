"""The composer: a note-level LSTM that writes a melody live, handing each note to its performer.

`ComposerModel` is a checked ONNX graph: inputs ``tokens [B,T,2]`` (previous pitch and duration token),
``features [B,T,FEATURES]`` (streaming.notes) and ``state_in.h/c``; outputs ``pitch_logits``,
``duration_logits`` and ``state_out.h/c``. A `Voice` is one stream's composing state: its controls, a
seeded generator for sampling (separate from the audio noise), the bar position and the note being played;
its `Performer` (streaming.performer) turns the notes into the instrument's per-frame f0, loudness and
brightness. The engine runs one batched composer call per tick for every voice whose next note starts at that
frame, so composing costs one step per note.

Sampling shapes what the model proposes: `form` replays earlier bars note for note (forced through the
model, which still steps on them, so its state follows the melody) and makes phrase endings cadence by
masking the pitch; log-priors on the durations and pitches make `density` and `register` act from the next
note, where the model's conditioning alone takes bars to turn.
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
    REST,
    START,
    Scale,
    density_rate,
    features,
    midi_hz,
    note_name,
    register_median,
    scale_mask,
    token_midi,
    velocity_of,
)
from wavecast.streaming.performer import DEFAULT_ARTICULATION, STOP_SECONDS, Articulation, Performer, Phrasing

METRES = {"4/4": (4.0, False), "2/4": (2.0, False), "3/4": (3.0, True), "6/8": (3.0, True)}  # bar, triple
ACTIONS = ("play", "pause", "reset")
# Form: 8-bar periods (a question and an answer phrase of 4 bars) of four 2-bar motifs, one letter each; a motif
# whose letter came before replays that motif's bars. "free" samples every bar afresh, without cadences. The
# default "aabb" (each motif played twice) comes nearest the corpus's figures (bars repeated, recurring 4-note
# shapes; see bench/composer.py); "abac" is its commonest layout bar by bar (bar 5 repeats bar 1 in 43 % of its
# 8-bar periods, bar 6 bar 2 in 32 %) but repeats too little over a minute.
FORMS = ("aabb", "abac", "abab", "aaba", "free")
PERIOD_BARS, PHRASE_BARS = 8, 4
MOVE_CHANCE = 0.25  # a replayed bar moves by one scale step (toward the register) this often
# Sampling priors that make density and register act from the next note, added to the logits: a Gaussian over
# log duration around the asked note length, steeper on the short side (the model leans to eighth notes, and a
# few short notes pull the rate up most); over MIDI pitch, none within REGISTER_BAND of the register's median
# and a Gaussian beyond, so a melody keeps an octave or so to move in.
DENSITY_SIGMA = (0.18, 0.22)  # natural-log units of duration, shorter / longer than asked
REGISTER_BAND, REGISTER_SIGMA = 4.0, 2.0  # semitones
EPS = 1e-6  # quarter notes: positions are sums of exact durations, up to float rounding


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
CHOICES = {"scale": "D major", "register": "mid", "metre": "4/4", "form": "aabb"}


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
        elif name in ("register", "metre", "form"):
            allowed = {"register": REGISTERS, "metre": METRES, "form": FORMS}[name]
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
    out.append({"name": "form", "default": CHOICES["form"], "choices": list(FORMS)})
    return out


@functools.lru_cache(maxsize=len(FORMS))
def _sources(form: str) -> tuple[int | None, ...]:
    """For each bar of an 8-bar period, the earlier bar it replays (None: sampled afresh)."""
    if form == "free":
        return (None,) * PERIOD_BARS
    out: list[int | None] = []
    for motif, letter in enumerate(form):
        first = form.index(letter)
        out += [None, None] if first == motif else [2 * first, 2 * first + 1]
    return tuple(out)


@functools.lru_cache(maxsize=64)
def _cadence(scale: str, answer: bool) -> frozenset[int]:
    """Pitch classes a phrase may end on: the tonic after an answer; after a question, a half cadence on the
    mode's dominant triad (5th, 7th and 2nd degrees), so that only answers close on the tonic."""
    sc = _scale(scale)
    steps = MODES[sc.mode]
    return frozenset({sc.tonic} if answer else {(sc.tonic + steps[i]) % 12 for i in (4, 6, 1)})


@functools.lru_cache(maxsize=32)
def _duration_prior(density: float) -> np.ndarray:
    """Log-prior over DURATIONS toward 1 / (asked notes a quarter), the rate streaming.notes maps density to."""
    x = np.log(DURATIONS) + math.log(density_rate(density))  # log of (duration / asked length)
    prior = -0.5 * (x / np.where(x < 0, *DENSITY_SIGMA)) ** 2
    prior.flags.writeable = False
    return prior


@functools.lru_cache(maxsize=8)
def _pitch_prior(register: str) -> np.ndarray:
    """Log-prior over pitch tokens toward the register's median (none on the rest)."""
    away = np.abs(np.arange(PITCH_LOW, PITCH_HIGH + 1) - register_median(REGISTERS[register]))
    prior = np.concatenate([[0.0], -0.5 * (np.maximum(0.0, away - REGISTER_BAND) / REGISTER_SIGMA) ** 2])
    prior.flags.writeable = False
    return prior


@functools.lru_cache(maxsize=256)
def _scale(text: str) -> Scale:
    return Scale.parse(text)


@functools.lru_cache(maxsize=256)
def _mask(scale: str, low_hz: float, high_hz: float) -> np.ndarray:
    mask = scale_mask(_scale(scale))
    for token in range(1, PITCH_TOKENS):
        mask[token] &= low_hz <= midi_hz(token_midi(token)) <= high_hz
    mask.flags.writeable = False
    return mask


@functools.lru_cache(maxsize=256)
def _cadence_mask(scale: str, answer: bool, low_hz: float, high_hz: float) -> np.ndarray:
    """The playable pitches a phrase may end on (no rest); the scale's mask if the range holds none."""
    mask = _mask(scale, low_hz, high_hz).copy()
    classes = _cadence(scale, answer)
    mask[REST] = False
    mask[1:] &= [(PITCH_LOW + k) % 12 in classes for k in range(PITCH_TOKENS - 1)]
    if not mask.any():
        return _mask(scale, low_hz, high_hz)
    mask.flags.writeable = False
    return mask


def _copy_bar(bar: Mapping[str, Any]) -> dict[str, Any]:
    return {"events": [[int(p), int(d)] for p, d in bar["events"]], "density": float(bar["density"]),
            "register": str(bar["register"])}


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
    velocity: int = 96  # how hard the performer played it (MIDI; `notes.velocity_of` its brightness)
    # frames it sounded before the performer released it (`frames` when slurred into the next note); None: a
    # note from a snapshot taken before notes recorded it, held to the next start
    sounding: int | None = None

    def to_dict(self) -> dict:
        return {"frame": self.frame, "frames": self.frames, "midi": self.midi,
                "note": note_name(self.midi) if self.midi else "rest", "quarters": round(self.quarters, 4),
                "bar": self.bar, "beat": round(self.beat, 3), "key": self.scale, "tempo": self.tempo,
                "metre": self.metre, "velocity": self.velocity, "sounding": self.sounding}


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
    """One stream's composer: its clock, sampling, form and history, and the `Performer` that plays its notes.
    Controls and actions may come from any thread; everything else runs on the inference thread."""

    def __init__(self, group: ComposerGroup, seed: int, controls: Mapping[str, Any], f0_range: tuple[float, float],
                 frame_seconds: float, keep_notes: int | None = 2000, loudness_max: float = 0.0,
                 articulation: Articulation = DEFAULT_ARTICULATION) -> None:
        self.group = group
        self.seed = seed
        self.settings = {**control_defaults(), **controls}
        self.f0_range = f0_range
        self.frame_seconds = frame_seconds
        self.performer = Performer(seed, articulation, f0_range, loudness_max, frame_seconds)
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

    def _restart(self) -> None:
        self.rng = np.random.Generator(np.random.PCG64([self.seed, 1]))
        self.previous = np.array([START, START], np.int64)
        self.position = 0.0  # quarter notes since the piece began
        self.next_time: float | None = None  # seconds of the next note's start; None = the next frame made
        # This period's bars as played, by bar of the period: {"events": [[pitch, duration token], ...], and the
        # density and register they were played with}, or None where a bar did not start and end on its barlines.
        self.bars: list[dict[str, Any] | None] = [None] * PERIOD_BARS
        self.recording: dict[str, Any] | None = None  # the bar being played, the same way
        self.recording_bar = -1  # its index in the piece, from 0
        self.replay: list[list[int]] = []  # what is left of the bar being replayed

    def instrument(self, f0_range: tuple[float, float], loudness_max: float, articulation: Articulation) -> None:
        """Write and play for another instrument from the next note on (inference thread)."""
        self.f0_range = f0_range
        self.performer.instrument(articulation, f0_range, loudness_max)

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
                "performer": self.performer.export(), "paused": self.paused,
                "actions": actions, "count": count, "bars": [None if b is None else _copy_bar(b) for b in self.bars],
                "recording": None if self.recording is None else _copy_bar(self.recording),
                "recording_bar": self.recording_bar, "replay": [list(e) for e in self.replay]}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Take up where `export` left off (its fields checked by streaming/snapshot.py), before the voice's
        first frame."""
        self.settings = dict(state["settings"])
        self.rng = np.random.Generator(np.random.PCG64())
        self.rng.bit_generator.state = state["rng"]
        self.previous = np.array(state["previous"], np.int64)
        self.position, self.next_time, self.frame = state["position"], state["next_time"], state["frame"]
        self.note = None if state["note"] is None else Note(**state["note"])
        self.performer.restore(state["performer"])
        self.paused = state["paused"]
        self.bars = [None if b is None else _copy_bar(b) for b in state["bars"]]
        self.recording = None if state["recording"] is None else _copy_bar(state["recording"])
        self.recording_bar, self.replay = state["recording_bar"], [list(e) for e in state["replay"]]
        with self._lock:
            self._actions, self.count = list(state["actions"]), state["count"]

    def use(self, group: ComposerGroup, slot: int) -> None:
        """Compose with `group` (state slot `slot`, reset) from the next note on: its melody starts afresh,
        while the key, metre and bar position carry on."""
        self.group, self.slot = group, slot
        self.previous = np.array([START, START], np.int64)

    def _stop(self, frame: int) -> None:
        """The performer stops the note sounding at `frame` (pause, reset); the note records it."""
        self.performer.stop(frame)
        note = self.note
        if note is not None and note.sounding is not None:
            note.sounding = max(0, min(note.sounding, frame - note.frame))

    def begin_frame(self, frame: int) -> bool:
        """Apply queued actions; True when the next note is to be composed at this frame."""
        with self._lock:
            actions, self._actions = self._actions, []
        for action in actions:
            if action == "pause" and not self.paused:
                self.paused = True
                self._stop(frame)
            elif action == "play" and self.paused:
                self.paused = False
                self.next_time = None
            elif action == "reset":  # stop the note, then begin the piece again from the seed
                self._restart()
                self.performer.reset()
                self._stop(frame)
                self.next_time = (frame + round(STOP_SECONDS / self.frame_seconds)) * self.frame_seconds
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

    def _sample(self, logits: np.ndarray, mask: np.ndarray | None, prior: np.ndarray) -> int:
        s = self.settings
        z = (logits.astype(np.float64) + prior) / s["temperature"]  # temperature spreads the priors too
        if mask is not None:
            z = np.where(mask, z, -np.inf)
        k = min(int(s["top_k"]), int(np.isfinite(z).sum()))
        if k < len(z):
            z = np.where(z >= np.partition(z, -k)[-k], z, -np.inf)
        p = np.exp(z - z.max())
        cdf = np.cumsum(p / p.sum())
        return int(min(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"), len(z) - 1))

    def _bar_begins(self, s: Mapping[str, Any], index: int, on_barline: bool, bar: float) -> None:
        """A new bar (piece bar `index`, from 0): keep the one that ended if it filled its bar, and queue a
        replay when the form says this bar repeats an earlier one. A bar entered by a note tied over the
        barline is neither kept nor replayed. `s`: the settings this note is made with."""
        same_period = index // PERIOD_BARS == self.recording_bar // PERIOD_BARS
        if self.recording is not None and on_barline and index == self.recording_bar + 1 and same_period:
            self.bars[self.recording_bar % PERIOD_BARS] = self.recording
        if not same_period:
            self.bars = [None] * PERIOD_BARS
        self.recording_bar, self.replay = index, []
        self.recording = {"events": [], "density": s["density"], "register": s["register"]} if on_barline else None
        source = _sources(s["form"])[index % PERIOD_BARS]
        if on_barline and source is not None:
            self.replay = self._replayable(s, self.bars[source], bar)

    def _replayable(self, s: Mapping[str, Any], kept: dict[str, Any] | None, bar: float) -> list[list[int]]:
        """A kept bar's events to replay now, exactly or moved by one scale step; none if the bar was played
        with another density or register, does not fill this metre's bar or leaves the scale or range."""
        if kept is None or (kept["density"], kept["register"]) != (s["density"], s["register"]):
            return []
        events = kept["events"]
        if abs(sum(DURATIONS[d] for _, d in events) - bar) > EPS:
            return []
        mask = self._mask()
        if self.rng.random() < MOVE_CHANCE:
            allowed = np.flatnonzero(mask[1:]) + 1  # the pitches playable here, one scale step apart
            pitched = [p for p, _ in events if p != REST]
            step = 1 if pitched and token_midi(int(np.median(pitched))) < register_median(
                REGISTERS[s["register"]]) else -1
            where = {int(t): i for i, t in enumerate(allowed)}
            if all(p == REST or 0 <= where.get(p, -2) + step < len(allowed) for p, _ in events):
                events = [[p if p == REST else int(allowed[where[p] + step]), d] for p, d in events]
        if not all(mask[p] for p, _ in events):
            return []
        return [list(e) for e in events]

    def _pitch_mask(self, s: Mapping[str, Any], index: int, end: float, bar: float) -> np.ndarray:
        """The scale's mask, or at the end of a 4-bar phrase (with a form) the cadence's: the dominant triad
        after the question, the tonic after the answer."""
        if s["form"] == "free" or index % PHRASE_BARS != PHRASE_BARS - 1 or end < bar - EPS:
            return self._mask()
        answer = index % PERIOD_BARS == PERIOD_BARS - 1
        return _cadence_mask(s["scale"], answer, *self.f0_range)

    def accept(self, pitch_logits: np.ndarray, duration_logits: np.ndarray) -> None:
        """Play the next note at this frame: the form's replay, if a bar is being replayed, else the note the
        model proposes, sampled (duration first, so the note that ends a phrase is known and can cadence)."""
        s = self.settings
        bar, _ = METRES[s["metre"]]
        index = math.floor(self.position / bar + EPS)
        offset = max(0.0, self.position - index * bar)
        if index != self.recording_bar:
            self._bar_begins(s, index, offset < EPS, bar)
        if self.replay:
            pitch, duration = self.replay[0]
            if not self._mask()[pitch] or offset + DURATIONS[duration] > bar + EPS or \
                    (self.recording["density"], self.recording["register"]) != (s["density"], s["register"]):
                self.replay = []  # the scale, range, metre, density or register changed under it
        if self.replay:
            pitch, duration = self.replay.pop(0)
            cadence = self._pitch_mask(s, index, offset + DURATIONS[duration], bar)
            if not cadence[pitch]:
                pitch = self._sample(pitch_logits, cadence, _pitch_prior(s["register"]))
        else:
            fits = offset + np.array(DURATIONS) <= bar + EPS  # with a form, notes end on the barline
            duration = self._sample(duration_logits, fits if s["form"] != "free" and fits.any() else None,
                                    _duration_prior(s["density"]))
            pitch = self._sample(pitch_logits, self._pitch_mask(s, index, offset + DURATIONS[duration], bar),
                                 _pitch_prior(s["register"]))
        if self.recording is not None:
            self.recording["events"].append([pitch, duration])
        quarters = DURATIONS[duration]
        beat = self.position % bar + 1.0
        self.next_time += quarters * 60.0 / s["tempo"]
        end = round(self.next_time / self.frame_seconds)
        note = Note(self.frame, end - self.frame, token_midi(pitch), quarters, int(self.position // bar) + 1, beat,
                    s["scale"], s["tempo"], s["metre"])
        phrase = (index % PHRASE_BARS + offset / bar) / PHRASE_BARS
        self.performer.play(Phrasing(note.frame, note.frames, note.midi, quarters, offset < EPS, phrase),
                            s["volume"], s["legato"])
        if note.midi is not None:
            note.velocity = velocity_of(float(self.performer.out[2]))
            note.sounding = min(note.frames, self.performer.off_frame - note.frame)
        self.previous = np.array([pitch, duration], np.int64)
        self.position += quarters
        self.note = note
        with self._lock:
            self.notes.append(note)
            self.count += 1
            if self.keep_notes is not None and len(self.notes) > 2 * self.keep_notes:
                del self.notes[: -self.keep_notes]

    def frame_controls(self, frame: int) -> np.ndarray:
        """f0 (Hz), loudness (dB) and brightness (0..1) for this frame."""
        return self.performer.frame(frame, self.settings["vibrato"])


def compose_notes(composer: ComposerModel, seconds: float, seed: int, controls: Mapping[str, Any],
                  timeline: list[tuple[float, Mapping[str, Any]]] = (), f0_range: tuple[float, float] = (30.0, 2000.0),
                  frame_seconds: float = 0.01) -> list[Note]:
    """The notes a composed stream plays, without its audio: the engine's composer steps alone (the performer
    never feeds back into the notes), `timeline` as `streaming.engine.compose` takes it. Fast enough to
    measure composed minutes."""
    group = ComposerGroup(composer, 1)
    voice = Voice(group, seed, controls, f0_range, frame_seconds, keep_notes=None)
    voice.slot = group.pool.allocate()
    pending = sorted(timeline, key=lambda c: c[0])
    for frame in range(int(round(seconds / frame_seconds))):
        while pending and pending[0][0] <= frame * frame_seconds + 1e-9:
            change = dict(pending.pop(0)[1])
            if "action" in change:
                voice.act(change.pop("action"))
            voice.set(change)
        if voice.begin_frame(frame):
            group.step([voice])
    return voice.notes
