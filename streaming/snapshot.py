"""Stream snapshots: everything a stream's next sample depends on, as bytes another daemon can resume from.

All of a stream's memory is explicit (the model's state tensors, the smoother's values, the noise's frame
index, the composer's state and its performer's fields, the duck and the limiter), so a stream snapshotted
between two ticks and resumed elsewhere makes the very samples the first daemon would have made next. The
watermark is not carried: the resuming daemon marks with its own key and a serial of its own. What is carried of
it is audio: the marker's delay line, the last DELAY samples the model made and the marked output has not played
yet (none when the snapshotted stream was not marked).

The format (version 2), all integers little-endian:

    MAGIC (8 bytes)  format version (u32)  body length (u64)  sha256 of the body (32 bytes)
    body: header length (u32), the header (UTF-8 JSON), then each tensor's raw bytes in the header's order

The header names every field; its "tensors" list gives each tensor's name, dtype ('<f4'), shape and byte
offset into the tensor data, so a reader needs nothing but this docstring. Tensor names: 'state.NAME' for each
of the instrument's state tensors and 'composer.NAME' for the composer's (batch axis of size 1, the manifest's
shape otherwise), 'delay' for the marker's delay line.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from wavecast.streaming.composer import ACTIONS, PERIOD_BARS, ControlError, control_defaults, validate_controls
from wavecast.streaming.model import Manifest
from wavecast.streaming.notes import DURATIONS, PITCH_TOKENS, REGISTERS, START
from wavecast.streaming.performer import FLOOR_DB
from wavecast.streaming.watermark import DELAY

MAGIC = b"\x89WCSNAP\n"  # the high byte and the newline catch a file mangled as text
FORMAT_VERSION = 2  # 2: the performer's fields (streaming/performer.py) in their own object
PREFIX = struct.Struct("<8sIQ32s")  # magic, format version, body length, sha256 of the body
HEADER_LENGTH = struct.Struct("<I")
MEDIA_TYPE = "application/vnd.wavecast.snapshot"
STREAM_NAME = "[a-z0-9][a-z0-9_-]{0,63}"  # as the API's
DTYPES = {"<f4": np.dtype("<f4")}
NUMBER = (int, float)
NOTE_FIELDS = {"frame": int, "frames": int, "midi": (int, type(None)), "quarters": NUMBER, "bar": int,
               "beat": NUMBER, "scale": str, "tempo": NUMBER, "metre": str}
VOICE_FIELDS = {"settings": dict, "rng": dict, "previous": list, "position": NUMBER,
                "next_time": (*NUMBER, type(None)), "frame": int, "note": (dict, type(None)), "performer": dict,
                "paused": bool, "actions": list, "count": int, "bars": list,
                "recording": (dict, type(None)), "recording_bar": int, "replay": list}
PERFORMER_FIELDS = {"rng": dict, "note": (dict, type(None)), "off_frame": int, "level": NUMBER, "onset": NUMBER,
                    "attack": NUMBER, "glide_from": (*NUMBER, type(None)), "fall": NUMBER, "out": list}
PHRASING_FIELDS = {"frame": int, "frames": int, "midi": (int, type(None)), "quarters": NUMBER, "downbeat": bool,
                   "phrase": NUMBER}
FRAMES = (0, 2**62)
CONTROL_BOUND = 1e9  # as the API's: no control takes more, and float32 holds it
# what a sound voice holds, generously: a value outside makes no music (and float32 infinities, not sound)
VOICE_BOUNDS = {"position": (0.0, 1e9), "next_time": (0.0, 1e12), "frame": FRAMES, "count": FRAMES,
                "recording_bar": (-1, 2**62)}
PERFORMER_BOUNDS = {"off_frame": FRAMES, "level": (-200.0, 20.0), "onset": (-200.0, 20.0), "attack": (1e-4, 10.0),
                    "glide_from": (1e-3, 1e5), "fall": (0.0, 200.0), "tail": (-200.0, 20.0)}
PHRASING_BOUNDS = {"frame": FRAMES, "frames": FRAMES, "midi": (0, 127), "quarters": (1e-3, 64.0), "phrase": (0.0, 1.0)}
BAR_EVENTS = 64  # a bar's notes at most (a 4/4 bar holds 16 sixteenths)
NOTE_BOUNDS = {"frame": FRAMES, "frames": FRAMES, "midi": (0, 127), "quarters": (1e-3, 64.0), "bar": (1, 2**62),
               "beat": (1.0, 64.0)}


class SnapshotError(ValueError):
    """Bytes that are not a usable snapshot; the message names what is wrong."""


class Mismatch(SnapshotError):
    """A sound snapshot of a model (or composer) other than the one offered to resume it with."""


@dataclass(frozen=True)
class ModelRef:
    """The exact model a snapshot was taken of: a resume refuses another graph of the same name and version."""

    name: str
    version: int
    sha256: str  # the manifest's onnx.sha256

    @classmethod
    def of(cls, manifest: Manifest) -> ModelRef:
        return cls(manifest.name, manifest.version, manifest.onnx["sha256"])

    def __str__(self) -> str:
        return f"'{self.name}' v{self.version} (graph sha256 {self.sha256[:12]}…)"


@dataclass
class Snapshot:
    """One stream between two ticks. `frames`: frames generated so far, so a resumed stream's next frame is
    frame `frames` (counting from 0) of the original; its noise is that frame's of `noise_key`."""

    model: ModelRef
    seed: int
    frames: int
    noise_key: int  # the 64-bit key its noise is drawn with (streaming/noise.py)
    targets: dict[str, float]  # control targets by name ...
    current: dict[str, float]  # ... and the smoother's values now, so a ramp under way goes on
    states: dict[str, np.ndarray]  # the instrument's state tensors, batch axis of size 1
    duck: tuple[float, int, float] = (0.0, 0, 0.0)  # depth (dB), the frame it ends at, the gain now (dB)
    limit_gain: float = 1.0  # the limiter's gain at the end of the last frame
    name: str | None = None
    follows: bool = True  # it moves to each new current version of its model
    composer: ModelRef | None = None
    composer_states: dict[str, np.ndarray] = field(default_factory=dict)
    voice: dict[str, Any] | None = None  # `Voice.export()`
    delay: np.ndarray | None = None  # the marker's delay line, when the stream was marked


def encode(snapshot: Snapshot) -> bytes:
    """The snapshot's bytes (see the module's docstring)."""
    tensors = {f"state.{k}": v for k, v in snapshot.states.items()}
    tensors |= {f"composer.{k}": v for k, v in snapshot.composer_states.items()}
    if snapshot.delay is not None:
        tensors["delay"] = snapshot.delay
    table, data, offset = [], [], 0
    for name, array in tensors.items():
        raw = np.ascontiguousarray(array, DTYPES["<f4"]).tobytes()
        table.append({"name": name, "dtype": "<f4", "shape": list(array.shape), "offset": offset, "nbytes": len(raw)})
        data.append(raw)
        offset += len(raw)
    s = snapshot
    header = {
        "format": "wavecast stream snapshot",
        "stream": {"name": s.name, "seed": s.seed, "frames": s.frames, "follows": s.follows},
        "model": _ref(s.model), "composer": _ref(s.composer) if s.composer is not None else None,
        "noise": {"key": s.noise_key, "frame": s.frames},
        "controls": {"targets": s.targets, "current": s.current},
        "duck": {"depth_db": s.duck[0], "until_frame": s.duck[1], "gain_db": s.duck[2]},
        "limiter": {"gain": s.limit_gain},
        "voice": s.voice,
        "tensors": table,
    }
    text = json.dumps(header, separators=(",", ":")).encode()
    body = HEADER_LENGTH.pack(len(text)) + text + b"".join(data)
    return PREFIX.pack(MAGIC, FORMAT_VERSION, len(body), hashlib.sha256(body).digest()) + body


def decode(data: bytes) -> Snapshot:
    """A snapshot from `encode`'s bytes; raises SnapshotError naming what is wrong (not a snapshot, a format
    version this wavecast does not read, truncated, corrupt, a field missing or of the wrong kind)."""
    if len(data) < PREFIX.size:
        if not MAGIC.startswith(bytes(data[: len(MAGIC)])):
            raise SnapshotError("not a wavecast snapshot (it does not start with the snapshot magic bytes); send the "
                                "bytes of GET /v1/streams/{id}/snapshot unchanged")
        raise SnapshotError(f"the snapshot is truncated: {len(data)} bytes, fewer than its {PREFIX.size}-byte "
                            "prefix; send all of it")
    magic, version, length, digest = PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise SnapshotError("not a wavecast snapshot (it does not start with the snapshot magic bytes); send the "
                            "bytes of GET /v1/streams/{id}/snapshot unchanged")
    if version != FORMAT_VERSION:
        raise SnapshotError(f"the snapshot has format version {version}; this wavecast reads version "
                            f"{FORMAT_VERSION} only: resume it with a wavecast of the same version as the one that "
                            "took it")
    body = memoryview(data)[PREFIX.size :]
    if len(body) < length:
        raise SnapshotError(f"the snapshot is truncated: its body has {len(body)} of {length} bytes; send all of it")
    if len(body) > length:
        raise SnapshotError(f"the snapshot has {len(body) - length} bytes after its end; send it alone")
    if hashlib.sha256(body).digest() != digest:
        raise SnapshotError("the snapshot is corrupt: its body does not match its sha256 checksum; take a new one")
    if length < HEADER_LENGTH.size or HEADER_LENGTH.unpack_from(body)[0] > length - HEADER_LENGTH.size:
        raise SnapshotError("the snapshot's header length runs past its end; take a new one")
    end = HEADER_LENGTH.size + HEADER_LENGTH.unpack_from(body)[0]
    try:
        header = json.loads(bytes(body[HEADER_LENGTH.size : end]).decode("utf-8"))
    except (ValueError, RecursionError):  # not UTF-8, not JSON, a number too long to read, nested too deeply
        raise SnapshotError("the snapshot's header is not JSON in UTF-8; take a new one") from None
    return _snapshot(header, body[end:])


def check(snapshot: Snapshot, manifest: Manifest, composer: Manifest | None) -> None:
    """Raise Mismatch unless `snapshot` is of exactly `manifest`'s model (name, version, graph) and, when it is
    composed, `composer`'s; SnapshotError when a tensor or control is not the manifest's."""
    for what, ref, m in (("model", snapshot.model, manifest), ("composer", snapshot.composer, composer)):
        if ref is None:
            continue
        if m is None or ModelRef.of(m) != ref:
            have = f"{ModelRef.of(m)}" if m is not None else "none"
            raise Mismatch(f"the snapshot's {what} is {ref}; the one offered is {have}: resume it where that exact "
                           "version (the same model.onnx) is installed")
    if (snapshot.composer is None) != (composer is None):
        raise Mismatch("the snapshot is of a stream " + ("without" if snapshot.composer is None else "with") +
                       " a composer; resume it as it was taken")
    _shapes("state", snapshot.states, manifest)
    if snapshot.delay is not None and snapshot.delay.shape != (1, DELAY):
        raise SnapshotError(f"tensor 'delay' has shape {list(snapshot.delay.shape)}; the marker's delay line is "
                            f"{[1, DELAY]}")
    if composer is not None:
        _shapes("composer", snapshot.composer_states, composer)
    names = [c.name for c in manifest.controls]
    for what in ("targets", "current"):
        values = getattr(snapshot, what)
        if sorted(values) != sorted(names):
            raise SnapshotError(f"field 'controls.{what}' names {', '.join(sorted(values)) or 'no controls'}; "
                                f"model '{manifest.name}' takes {', '.join(names)}")
        for name in names:  # (not the manifest's range: a stream moved to another instrument keeps its values)
            if not -CONTROL_BOUND <= values[name] <= CONTROL_BOUND:
                raise SnapshotError(f"field 'controls.{what}.{name}' is {values[name]:g}, beyond +-{CONTROL_BOUND:g}; "
                                    "take a new snapshot")


def _shapes(prefix: str, states: dict[str, np.ndarray], manifest: Manifest) -> None:
    want = {s.name: s.concrete(1) for s in manifest.states}
    if sorted(states) != sorted(want):
        raise SnapshotError(f"the snapshot's {prefix} tensors are {', '.join(sorted(states)) or 'none'}; "
                            f"'{manifest.name}' v{manifest.version} has {', '.join(sorted(want))}")
    for name, shape in want.items():
        if states[name].shape != shape:
            raise SnapshotError(f"tensor '{prefix}.{name}' has shape {list(states[name].shape)}; the manifest of "
                                f"'{manifest.name}' v{manifest.version} gives {list(shape)}")


def _ref(ref: ModelRef) -> dict[str, Any]:
    return {"name": ref.name, "version": ref.version, "onnx_sha256": ref.sha256}


def _need(obj: Any, key: str, kind: type | tuple[type, ...], at: str) -> Any:
    """`obj[key]` if it is of `kind` (bool is no number here), else SnapshotError naming the field."""
    if not isinstance(obj, dict) or key not in obj:
        raise SnapshotError(f"the snapshot's field '{at}{key}' is missing; take a new one")
    value = obj[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        raise SnapshotError(f"the snapshot's field '{at}{key}' has the wrong type ({_kind(value)}); take a new one")
    if isinstance(value, float) and not math.isfinite(value):
        raise SnapshotError(f"the snapshot's field '{at}{key}' is not a finite number; take a new one")
    return value


def _kind(value: Any) -> str:
    return {bool: "true or false", int: "a whole number", float: "a number", str: "text", list: "a list",
            dict: "an object", type(None): "null"}.get(type(value), "unknown")


def _model(header: dict, key: str) -> ModelRef:
    raw = _need(header, key, dict, "")
    return ModelRef(_need(raw, "name", str, f"{key}."), _need(raw, "version", int, f"{key}."),
                    _need(raw, "onnx_sha256", str, f"{key}."))


def _numbers(raw: dict, at: str) -> dict[str, float]:
    return {str(k): float(_need(raw, k, NUMBER, at)) for k in raw}


def _snapshot(header: Any, data: memoryview) -> Snapshot:
    if not isinstance(header, dict):
        raise SnapshotError("the snapshot's header is not a JSON object; take a new one")
    stream = _need(header, "stream", dict, "")
    controls = _need(header, "controls", dict, "")
    duck = _need(header, "duck", dict, "")
    noise = _need(header, "noise", dict, "")
    frames = _need(stream, "frames", int, "stream.")
    key = _need(noise, "key", int, "noise.")
    if not 0 <= frames < 2**62 or not 0 <= key < 2**64 or _need(noise, "frame", int, "noise.") != frames:
        raise SnapshotError("the snapshot's fields 'stream.frames' and 'noise' do not agree (a frame count from 0, "
                            "a 64-bit key); take a new one")
    name = stream.get("name")
    if name is not None and not (isinstance(name, str) and re.fullmatch(STREAM_NAME, name)):
        raise SnapshotError("the snapshot's field 'stream.name' is not a stream name (lower-case letters, digits, "
                            "'-' and '_'); take a new one")
    tensors = _tensors(_need(header, "tensors", list, ""), data)
    composer = _model(header, "composer") if header.get("composer") is not None else None
    voice = header.get("voice")
    if (voice is None) != (composer is None):
        raise SnapshotError("the snapshot's fields 'composer' and 'voice' must both be there or both be null; "
                            "take a new one")
    seed = _need(stream, "seed", int, "stream.")
    if not 0 <= seed < 2**64:
        raise SnapshotError("the snapshot's field 'stream.seed' is outside 0 .. 2^64 - 1; take a new one")
    limit_gain = float(_need(_need(header, "limiter", dict, ""), "gain", NUMBER, "limiter."))
    if not 0.0 < limit_gain <= 1.0:
        raise SnapshotError("the snapshot's field 'limiter.gain' is outside (0, 1]; take a new one")
    depth, until, gain = (float(_need(duck, "depth_db", NUMBER, "duck.")), _need(duck, "until_frame", int, "duck."),
                          float(_need(duck, "gain_db", NUMBER, "duck.")))
    if not (-200.0 <= depth <= 0.0 and -200.0 <= gain <= 0.0 and 0 <= until < 2**62):
        raise SnapshotError("the snapshot's field 'duck' is out of range (depth and gain in dB at most 0, a frame "
                            "from 0); take a new one")
    return Snapshot(
        model=_model(header, "model"), seed=seed, frames=frames, noise_key=key,
        targets=_numbers(_need(controls, "targets", dict, "controls."), "controls.targets."),
        current=_numbers(_need(controls, "current", dict, "controls."), "controls.current."),
        states={k.removeprefix("state."): v for k, v in tensors.items() if k.startswith("state.")},
        duck=(depth, until, gain),
        limit_gain=limit_gain, name=name, follows=_need(stream, "follows", bool, "stream."), composer=composer,
        composer_states={k.removeprefix("composer."): v for k, v in tensors.items() if k.startswith("composer.")},
        voice=_voice(voice) if voice is not None else None, delay=tensors.get("delay"),
    )


def _tensors(table: list, data: memoryview) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for i, t in enumerate(table):
        at = f"tensors[{i}]."
        name, dtype = _need(t, "name", str, at), _need(t, "dtype", str, at)
        shape, offset, nbytes = _need(t, "shape", list, at), _need(t, "offset", int, at), _need(t, "nbytes", int, at)
        if not (name.startswith(("state.", "composer.")) or name == "delay") or name in out:
            raise SnapshotError(f"the snapshot's tensor {i} is called '{name[:64]}': each name once, 'state.NAME', "
                                "'composer.NAME' or 'delay'; take a new one")
        if dtype not in DTYPES:
            raise SnapshotError(f"tensor '{name}' has dtype '{dtype[:16]}'; snapshots hold {', '.join(DTYPES)}")
        if not all(isinstance(d, int) and not isinstance(d, bool) and 0 < d <= 1 << 20 for d in shape) or \
                len(shape) > 8:
            raise SnapshotError(f"tensor '{name}' has an impossible shape; take a new snapshot")
        if nbytes != math.prod(shape) * DTYPES[dtype].itemsize:
            raise SnapshotError(f"tensor '{name}' has shape {shape} but {nbytes} bytes; take a new snapshot")
        if offset < 0 or offset + nbytes > len(data):
            raise SnapshotError(f"tensor '{name}' runs past the snapshot's end; take a new one")
        out[name] = np.frombuffer(data[offset : offset + nbytes], DTYPES[dtype]).reshape(shape).astype(np.float32)
        if not np.isfinite(out[name]).all():
            raise SnapshotError(f"tensor '{name}' holds values that are not finite; take a new snapshot")
    return out


def _events(events: Any, at: str) -> None:
    if not isinstance(events, list) or len(events) > BAR_EVENTS or not all(
            isinstance(e, list) and len(e) == 2 and all(isinstance(t, int) and not isinstance(t, bool) for t in e)
            and 0 <= e[0] < PITCH_TOKENS and 0 <= e[1] < len(DURATIONS) for e in events):
        raise SnapshotError(f"the snapshot's field '{at}' must be a list of at most {BAR_EVENTS} [pitch token, "
                            "duration token]; take a new snapshot")


def _bar(raw: Any, at: str) -> None:
    """A bar the composer's voice remembers: its events and the density and register they were played with."""
    if not isinstance(raw, dict) or sorted(raw) != ["density", "events", "register"]:
        raise SnapshotError(f"the snapshot's field '{at}' must be an object of events, density and register")
    _events(raw["events"], f"{at}.events")
    density = raw["density"]
    if isinstance(density, bool) or not isinstance(density, NUMBER) or not 0.0 <= density <= 1.0:
        raise SnapshotError(f"the snapshot's field '{at}.density' must be a number from 0 to 1")
    if not isinstance(raw["register"], str) or raw["register"] not in REGISTERS:
        raise SnapshotError(f"the snapshot's field '{at}.register' must be one of {', '.join(REGISTERS)}")


def _bounded(fields: dict[str, Any], bounds: dict[str, tuple[float, float]], at: str) -> None:
    for key, (low, high) in bounds.items():
        if fields[key] is not None and not low <= fields[key] <= high:
            raise SnapshotError(f"the snapshot's field '{at}{key}' is outside [{low:g}, {high:g}]; take a new one")


def _voice(raw: Any) -> dict[str, Any]:
    """The composer's voice as `Voice.restore` takes it, every field checked."""
    voice = {k: _need(raw, k, kind, "voice.") for k, kind in VOICE_FIELDS.items()}
    try:
        settings = validate_controls(voice["settings"])
    except ControlError as e:
        raise SnapshotError(f"the snapshot's field 'voice.settings': {e}") from None
    if sorted(settings) != sorted(control_defaults()):
        raise SnapshotError(f"the snapshot's field 'voice.settings' must set every composer control "
                            f"({', '.join(control_defaults())})")
    voice["settings"] = settings
    _bounded(voice, VOICE_BOUNDS, "voice.")
    voice["performer"] = _performer(voice["performer"])
    previous = voice["previous"]
    if len(previous) != 2 or not all(isinstance(t, int) and not isinstance(t, bool) for t in previous) or \
            not (0 <= previous[0] < PITCH_TOKENS or previous[0] == START) or \
            not (0 <= previous[1] < len(DURATIONS) or previous[1] == START):
        raise SnapshotError("the snapshot's field 'voice.previous' must be [pitch token, duration token]")
    if len(voice["bars"]) != PERIOD_BARS:
        raise SnapshotError(f"the snapshot's field 'voice.bars' must hold {PERIOD_BARS} bars (each null or a bar)")
    for i, bar in enumerate(voice["bars"]):
        if bar is not None:
            _bar(bar, f"voice.bars[{i}]")
    if voice["recording"] is not None:
        _bar(voice["recording"], "voice.recording")
    _events(voice["replay"], "voice.replay")
    if voice["replay"] and voice["recording"] is None:
        raise SnapshotError("the snapshot's field 'voice.replay' holds notes but 'voice.recording' is null: a bar is "
                            "replayed only from its barline; take a new snapshot")
    if not all(a in ACTIONS for a in voice["actions"]):
        raise SnapshotError(f"the snapshot's field 'voice.actions' may hold only {', '.join(ACTIONS)}")
    if voice["note"] is not None:
        note = {k: _need(voice["note"], k, kind, "voice.note.") for k, kind in NOTE_FIELDS.items()}
        for key, kind, bounds in (("velocity", int, (1, 127)), ("sounding", (int, type(None)), FRAMES)):
            if key in voice["note"]:  # snapshots from before notes recorded it leave it out
                note[key] = _need(voice["note"], key, kind, "voice.note.")
                _bounded(note, {key: bounds}, "voice.note.")
        _bounded(note, NOTE_BOUNDS, "voice.note.")
        try:
            validate_controls({k: note[k] for k in ("scale", "tempo", "metre")})
        except ControlError as e:
            raise SnapshotError(f"the snapshot's field 'voice.note': {e}") from None
        voice["note"] = note
    _generator(voice["rng"], "voice.rng")
    return voice


def _performer(raw: Any) -> dict[str, Any]:
    """The voice's performer as `Performer.restore` takes it, every field checked."""
    performer = {k: _need(raw, k, kind, "voice.performer.") for k, kind in PERFORMER_FIELDS.items()}
    # a snapshot from before the ringing tail has none: the note then attacks as from silence
    performer["tail"] = _need(raw, "tail", NUMBER, "voice.performer.") if "tail" in raw else FLOOR_DB
    _bounded(performer, PERFORMER_BOUNDS, "voice.performer.")
    out = performer["out"]
    if len(out) not in (2, 3) or not all(isinstance(v, NUMBER) and not isinstance(v, bool) for v in out) or \
            not (1e-3 <= out[0] <= 1e5 and -200.0 <= out[1] <= 20.0 and all(0.0 <= v <= 1.0 for v in out[2:])):
        raise SnapshotError("the snapshot's field 'voice.performer.out' must be [f0, loudness, brightness]: Hz from "
                            "0.001 to 100000, dB from -200 to 20, brightness from 0 to 1 (snapshots from before "
                            "brightness leave it out)")
    if performer["note"] is not None:
        note = {k: _need(performer["note"], k, kind, "voice.performer.note.") for k, kind in PHRASING_FIELDS.items()}
        _bounded(note, PHRASING_BOUNDS, "voice.performer.note.")
        performer["note"] = note
    _generator(performer["rng"], "voice.performer.rng")
    return performer


def _generator(state: dict, at: str) -> None:
    try:
        np.random.PCG64().state = state
    except (TypeError, ValueError, KeyError, OverflowError):
        raise SnapshotError(f"the snapshot's field '{at}' is not a PCG64 generator's state") from None
