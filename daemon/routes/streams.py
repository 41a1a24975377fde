"""Streams: create (or resume from a snapshot), list, inspect, steer (PATCH, and the same message over a data
channel), notes, snapshot, delete."""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
from typing import Any

from aiohttp import web

from wavecast.daemon.api import MAX_BODY_BYTES, ApiError, query_value, route
from wavecast.daemon.janus import publish_new
from wavecast.daemon.service import Daemon
from wavecast.streaming.composer import ACTIONS, ComposerGroup, validate_controls
from wavecast.streaming.controls import ControlError, validate
from wavecast.streaming.engine import EngineSaturated, Group, ModelFailed, Stream, describe
from wavecast.streaming.snapshot import MEDIA_TYPE, Mismatch, Snapshot, SnapshotError, decode, encode

log = logging.getLogger("wavecast.api")

def model_name(what: str) -> dict:
    return {"type": "string", "pattern": "^[a-z0-9][a-z0-9_-]{0,63}$",
            "description": f"{what}: a model name of lower-case letters, digits, '-' and '_' (GET /v1/models "
                           "lists them)"}


PINNABLE = {"type": "string", "pattern": "^[a-z0-9][a-z0-9_-]{0,63}(@[1-9][0-9]{0,8})?$", "default": "default",
            "description": "the instrument that plays: a model name of lower-case letters, digits, '-' and '_' "
                           "(GET /v1/models lists them). By name alone the stream follows the model: it moves to "
                           "each new current version (a publish or a rollback) with a crossfade; 'name@N' (e.g. "
                           "violin@3) pins version N, which the stream keeps"}


NAME = {"type": "string", "pattern": "^[a-z0-9][a-z0-9_-]{0,63}$",
        "description": "the stream's name, unique among the daemon's streams: lower-case letters, digits, '-' and "
                       "'_' (an overlay and its dock find the stream by it)"}
CONTROLS = {
    "type": "object", "maxProperties": 32,
    # each model checks its own ranges; this bound keeps numbers no float can hold from reaching those checks
    "additionalProperties": {"type": ["number", "string"], "maxLength": 100, "minimum": -1e9, "maximum": 1e9},
    "description": "controls by name. An instrument's (e.g. f0, loudness) are numbers; a composed stream's are "
                   "tempo, temperature, top_k, density, legato, vibrato, volume, scale, register, metre and form. "
                   "GET /v1/models/{name} lists each control with its unit, range and default",
}
CREATE = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "model": PINNABLE,
        "composer": model_name("a composer that writes the notes (omit it for a stream steered by controls)"),
        "seed": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1,
                 "description": "the same seed and controls give the same audio; random when omitted"},
        "controls": CONTROLS,
        "name": NAME,
        "snapshot": {"type": "string", "minLength": 1, "maxLength": MAX_BODY_BYTES, "contentEncoding": "base64",
                     "description": "resume a stream from another daemon (or this one): the bytes of GET "
                                    "/v1/streams/{id}/snapshot in base64. The new stream (a new id) goes on from the "
                                    "sample the snapshot was taken at, with the snapshot's model, composer, seed and "
                                    "controls (so leave those fields out) and its name if no stream here has it; "
                                    "this daemon needs that exact model version (and composer version)"},
    },
}
PATCH = {
    "type": "object", "additionalProperties": False, "minProperties": 1,
    "properties": {
        "controls": CONTROLS,
        "action": {"enum": list(ACTIONS), "description": "composed streams: pause, play or reset"},
        "model": PINNABLE | {"description": "another instrument (or version) to play the stream: it takes over "
                                            "with a crossfade, same stream, same listeners. It must take the same "
                                            "controls (the shipped instruments all do)"},
        "composer": model_name("composed streams: another composer, which writes from the next note on"),
    },
}
NOTE = {
    "type": "object", "required": ["frame", "frames", "midi", "note", "quarters", "bar", "beat", "key", "tempo"],
    "properties": {"frame": {"type": "integer"}, "frames": {"type": "integer"},
                   "midi": {"type": ["integer", "null"], "description": "null for a rest"},
                   "note": {"type": "string", "description": "e.g. D5, or rest"}, "quarters": {"type": "number"},
                   "bar": {"type": "integer"}, "beat": {"type": "number"}, "key": {"type": "string"},
                   "tempo": {"type": "number"}, "metre": {"type": "string"},
                   "velocity": {"type": "integer", "description": "how hard the performer played it, 1-127"},
                   "sounding": {"type": ["integer", "null"],
                                "description": "frames it sounded before its release (frames when slurred)"}},
}
NOW_PLAYING = {
    "type": "object", "required": ["state", "note", "key", "tempo", "notes_played"],
    "properties": {"state": {"enum": ["playing", "paused"]}, "note": {"anyOf": [NOTE, {"type": "null"}]},
                   "key": {"type": "string"}, "tempo": {"type": "number"}, "notes_played": {"type": "integer"}},
}
MARK = {"type": "object", "required": ["key_id", "payload"],
        "description": "the watermark every sample of the stream carries (docs/watermark.md)",
        "properties": {"key_id": {"type": "string", "description": "the daemon's key, 4 hex digits"},
                       "payload": {"type": "string", "description": "key id and the stream's serial, 'kkkk-ssss'"}}}
PROVENANCE = {
    "type": "object", "required": ["ai_generated", "statement", "generator", "models", "seed", "watermark"],
    "description": "what made the audio (docs/provenance.md)",
    "properties": {
        "ai_generated": {"const": True}, "statement": {"type": "string"}, "generator": {"type": "object"},
        "models": {"type": "array", "description": "instrument, then composer: name, version, kind, trained_by and "
                                                  "the training data's sources and licences"},
        "seed": {"type": "integer"},
        "watermark": {"type": "object", "required": ["on"], "properties": {
            "on": {"type": "boolean"}, "key_id": {"type": "string"}, "payload": {"type": "string"},
            "why": {"type": "string", "description": "when off: why"}}},
    },
}
STREAM = {
    "type": "object",
    "required": ["id", "model", "version", "follows", "seed", "controls", "state", "underruns", "listeners", "frames",
                 "seconds", "buffered_ms", "latency_ms", "peers", "encoders", "device", "mark", "provenance"],
    "properties": {
        "id": {"type": "string"}, "name": {"type": ["string", "null"]}, "model": {"type": "string"},
        "version": {"type": "integer"},
        "follows": {"type": "boolean", "description": "true: it moves to each new current version of its model; "
                                                      "false: it is pinned to its version"},
        "seed": {"type": "integer"}, "controls": {"type": "object"},
        "state": {"enum": ["idle", "playing", "failed"], "description": "idle: nobody listens, so nothing is made"},
        "failure": {"type": "string"},
        "underruns": {"type": "integer"}, "listeners": {"type": "integer"}, "frames": {"type": "integer"},
        "seconds": {"type": "number"}, "buffered_ms": {"type": ["number", "null"]},
        "latency_ms": {"type": "object"}, "peers": {"type": "integer"}, "encoders": {"type": "integer"},
        "device": {"type": ["object", "null"]}, "composer": {"type": "string"},
        "composer_version": {"type": "integer"}, "now_playing": NOW_PLAYING,
        "events": {"type": "object", "properties": {
            "stings": {"type": "array", "description": "the stings playing now"},
            "duck_db": {"type": "number", "description": "the stream's gain now: below 0 while a duck lowers it"}}},
        "mark": {"anyOf": [MARK, {"type": "null"}], "description": "null: the daemon runs with --watermark off"},
        "provenance": PROVENANCE,
    },
}
SINCE = {"type": "integer", "minimum": 0, "default": 0,
         "description": "skip the first N notes ever played, to poll for new ones"}


def saturated(e: EngineSaturated) -> ApiError:
    """The 503 for a stream, sting or switch the engine has no room for now."""
    return ApiError(503, "engine_saturated", str(e), {"Retry-After": str(e.retry_after)})


def _controls(stream_or_group: Stream | Group | None, raw: Any, composed: bool) -> dict[str, Any]:
    try:
        return validate_controls(raw) if composed else validate(stream_or_group.manifest, raw)
    except ControlError as e:
        raise ApiError(422, "invalid_control", str(e)) from None


async def apply_patch(d: Daemon, stream: Stream, body: dict) -> dict:
    """Controls, an instrument, and (composed streams) a composer and an action, from PATCH or the data
    channel, already checked against PATCH's schema; all are checked against the stream before any is applied.
    Returns the stream's controls (and now-playing)."""
    d.steerable(stream)
    voice = stream.voice
    action, model, composer_name = body.get("action"), body.get("model"), body.get("composer")
    if voice is None and (action is not None or composer_name is not None):
        field = "action" if action is not None else "composer"
        raise ApiError(422, f"invalid_{field}", f"'{field}' applies to composed streams only; this one plays "
                                                "controls (create a stream with a 'composer' for notes)")
    controls = _controls(stream, body.get("controls", {}), composed=voice is not None)
    composer = await d.composer(composer_name) if composer_name is not None else None
    if model is not None:
        await _switch_model(d, stream, model)
    if composer is not None and composer is not voice.group:
        try:
            d.engine.recompose(stream, composer)
        except EngineSaturated as e:
            raise saturated(e) from None
    if voice is None:
        stream.set_controls(controls)
        return {"controls": stream.controls()}
    voice.set(controls)
    if action is not None:
        voice.act(action)
    return {"controls": voice.settings, "now_playing": voice.now_playing()}


async def _switch_model(d: Daemon, stream: Stream, name: str) -> None:
    """Move `stream` to instrument `name` (or 'name@N') with a crossfade, as a publish would (daemon/swap.py)."""
    group = await d.group(name)
    if stream.moving is not None:
        raise ApiError(409, "stream_moving", "the stream is moving to another instrument or version already; "
                                             "send this again in a moment")
    old = stream.manifest
    if [c.name for c in old.controls] != [c.name for c in group.manifest.controls]:
        raise ApiError(422, "incompatible_model", f"'{group.manifest.name}' takes other controls than "
                       f"'{old.name}' ({', '.join(c.name for c in group.manifest.controls)}); create a new stream "
                       "to play it")
    if group is not stream.group:
        states = await asyncio.get_running_loop().run_in_executor(None, d.engine.warm, stream, group)
        try:
            d.engine.swap(stream, group, states)
        except EngineSaturated as e:
            raise saturated(e) from None
        except ValueError as e:  # it began moving while it warmed
            raise ApiError(409, "stream_moving", f"{describe(e)}; send this again in a moment") from None
        for _ in range(100):  # the move happens at the next tick boundary: answer with the stream as it plays then
            if stream.group is group:
                break
            await asyncio.sleep(0.01)
    stream.follows = "@" not in name


@route("POST", "/v1/streams", "Start a stream, or resume one from a snapshot", body=CREATE, returns=STREAM,
       status=201, errors={
    400: "a snapshot that is not base64, corrupt, truncated or of an unknown format version",
    404: "unknown model or composer (or the snapshot's version of it)",
    409: "another stream has that name; a snapshot of another graph than this daemon's of that name and version",
    422: "a control out of range, or a model of the wrong kind; a snapshot with model, composer, seed or controls",
    429: "too many streams, or stream creations too fast (Retry-After)",
    503: "the engine or the model cannot take another stream now (Retry-After)"})
async def create_stream(request: web.Request, body: dict) -> web.Response:
    d: Daemon = request.app["daemon"]
    d.open_for_streams()
    d.stream_rate.check(request.remote or "", "streams created")
    if "name" in body:
        _name_free(d, body["name"])
    if len(d.engine.streams) >= d.limits.max_streams:
        raise ApiError(429, "too_many_streams", f"this daemon runs at most {d.limits.max_streams} streams "
                       "(--max-streams); delete one first")
    if "snapshot" in body:
        return await _resume(d, body)
    name, composer_name = body.get("model", "default"), body.get("composer")
    seed = body["seed"] if "seed" in body else secrets.randbits(32)
    if composer_name is not None:  # a composer's controls are known without loading it
        controls = _controls(None, body.get("controls", {}), composed=True)
    group = await d.group(name)
    composer = await d.composer(composer_name) if composer_name is not None else None
    if composer is None:
        controls = _controls(group, body.get("controls", {}), composed=False)
    if "name" in body:
        _name_free(d, body["name"])  # again: another request may have taken it while the models loaded
    serial = await _issue_serial(d, group, composer, seed, body.get("name"))
    try:
        stream = d.engine.create_stream(group, seed, controls, composer, follows="@" not in name, serial=serial)
    except EngineSaturated as e:
        raise saturated(e) from None
    except ModelFailed as e:
        raise ApiError(503, "model_failed", f"{e}; see GET /v1/health (a new version of the model or a daemon "
                                            "restart brings it back)") from None
    stream.name = body.get("name")
    log.info("stream created id=%s model=%s composer=%s seed=%s", stream.id, name, composer_name, seed)
    if d.janus is not None:
        publish_new(d, stream, d.janus)
    await _record_stream(d, serial, stream)
    return web.json_response(d.stream_info(stream), status=201)


async def _resume(d: Daemon, body: dict) -> web.Response:
    """POST /v1/streams with a snapshot: the same stream, going on here with a new id (and this daemon's mark)."""
    given = sorted({"model", "composer", "seed", "controls"} & set(body))
    if given:
        raise ApiError(422, "invalid_request", f"a resumed stream plays the snapshot's model, composer, seed and "
                       f"controls; leave out {', '.join(repr(g) for g in given)} (PATCH the stream afterwards)")
    try:
        raw = base64.b64decode(body["snapshot"], validate=True)
    except ValueError:  # binascii.Error, or text that is not even ASCII
        raise ApiError(400, "invalid_snapshot", "field 'snapshot' is not base64; send the bytes of GET "
                                                "/v1/streams/{id}/snapshot in standard base64") from None
    try:
        snapshot = decode(raw)
    except SnapshotError as e:
        raise ApiError(400, "invalid_snapshot", f"field 'snapshot': {e}") from None
    group = await _snapshot_model(d, snapshot, "model")
    composer = await _snapshot_model(d, snapshot, "composer") if snapshot.composer is not None else None
    name = body.get("name", snapshot.name)
    if name is not None and d.named(name) is not None:
        if "name" in body:
            _name_free(d, name)
        name = None  # the snapshot's name is taken here: the stream goes on without one
    serial = await _issue_serial(d, group, composer, snapshot.seed, name)
    try:
        stream = d.engine.resume(group, snapshot, composer, serial=serial)
    except Mismatch as e:
        raise ApiError(409, "snapshot_mismatch", str(e)) from None
    except SnapshotError as e:
        raise ApiError(400, "invalid_snapshot", f"field 'snapshot': {e}") from None
    except EngineSaturated as e:
        raise saturated(e) from None
    except ModelFailed as e:
        raise ApiError(503, "model_failed", f"{e}; see GET /v1/health") from None
    stream.name = name
    log.info("stream resumed id=%s model=%s v%d composer=%s seed=%s frame=%d", stream.id, snapshot.model.name,
             snapshot.model.version, snapshot.composer.name if snapshot.composer else None, snapshot.seed,
             snapshot.frames)
    await _record_stream(d, serial, stream)
    return web.json_response(d.stream_info(stream), status=201)


async def _snapshot_model(d: Daemon, snapshot: Snapshot, kind: str) -> Group | ComposerGroup:
    """The loaded group of the snapshot's exact model (or composer) version; 404 when this daemon lacks it."""
    ref = snapshot.model if kind == "model" else snapshot.composer
    try:
        return await (d.group if kind == "model" else d.composer)(f"{ref.name}@{ref.version}")
    except ApiError as e:
        if e.status != 404:
            raise
        raise ApiError(404, e.code, f"the snapshot's {kind} is '{ref.name}' version {ref.version}, which this daemon "
                       "does not have; install or publish that exact version here (the same model.onnx) and send "
                       "the snapshot again") from None


async def _record_stream(d: Daemon, serial: int | None, stream: Stream) -> None:
    """The registry learns the new stream's id, which it gets only now."""
    if serial is None:
        return
    try:
        await asyncio.get_running_loop().run_in_executor(None, d.marks.amend, serial, {"stream": stream.id})
    except OSError as e:  # the stream plays and is marked; only its id is missing from the record
        log.warning("watermark registry: cannot add stream id=%s to serial %d (%s)", stream.id, serial, e)


async def _issue_serial(d: Daemon, group: Group, composer: ComposerGroup | None, seed: int,
                        name: str | None) -> int | None:
    """The serial the new stream's mark carries, recorded in the registry (None: the watermark is off)."""
    if d.engine.watermark is None:
        return None
    record = {"kind": "stream", "model": group.manifest.name, "version": group.manifest.version,
              "composer": composer.manifest.name if composer else None,
              "composer_version": composer.manifest.version if composer else None, "seed": seed, "name": name}
    try:
        return await asyncio.get_running_loop().run_in_executor(None, d.marks.issue, record)
    except OSError as e:
        raise ApiError(500, "watermark_registry", f"cannot record the stream's watermark serial in "
                       f"{d.marks.directory} ({e.strerror}); check that directory, or restart the daemon with "
                       "--watermark off") from None


def _name_free(d: Daemon, name: str) -> None:
    taken = d.named(name)
    if taken is not None:
        raise ApiError(409, "name_taken", f"stream {taken.id} is already called '{name}'; use it (GET "
                                          f"/v1/streams?name={name}), delete it, or choose another name")


@route("GET", "/v1/streams", "List the streams (or the one of a name)", query={"name": NAME},
       errors={422: "a 'name' that no stream could have"},
       returns={"type": "object", "required": ["streams"], "properties": {"streams": {"type": "array",
                                                                                      "items": STREAM}}})
async def list_streams(request: web.Request) -> web.Response:
    d: Daemon = request.app["daemon"]
    name = query_value(request, "name", NAME)
    streams = list(d.engine.streams.values()) if name is None else [s for s in [d.named(name)] if s is not None]
    return web.json_response({"streams": [d.stream_info(s) for s in streams]})


@route("GET", "/v1/streams/{id}", "A stream: model, controls, state, latency, listeners", returns=STREAM,
       errors={404: "no stream has that id"})
async def get_stream(request: web.Request) -> web.Response:
    d: Daemon = request.app["daemon"]
    return web.json_response(d.stream_info(d.stream(request)))


@route("PATCH", "/v1/streams/{id}", "Steer a stream: new controls (smoothed), an action, another instrument or "
       "composer", body=PATCH, returns=STREAM, errors={
           404: "no stream has that id, or no such model", 409: "the stream is moving to another instrument already",
           422: "a control out of range, or an unknown one; an instrument that takes other controls",
           503: "no slot for the new instrument or composer now (Retry-After)"})
async def patch_stream(request: web.Request, body: dict) -> web.Response:
    d: Daemon = request.app["daemon"]
    stream = d.stream(request)
    await apply_patch(d, stream, body)
    return web.json_response(d.stream_info(stream))


@route("DELETE", "/v1/streams/{id}", "End a stream (its listeners are told, its device output closes)",
       returns={"type": "object", "required": ["id", "deleted"]}, errors={404: "no stream has that id"})
async def delete_stream(request: web.Request) -> web.Response:
    d: Daemon = request.app["daemon"]
    stream = d.stream(request)
    await d.close_stream(stream)
    return web.json_response({"id": stream.id, "deleted": True})


@route("GET", "/v1/streams/{id}/notes", "A composed stream's notes, oldest first (the last 2000 at least)",
       query={"since": SINCE},
       returns={"type": "object", "required": ["count", "notes"],
                "properties": {"count": {"type": "integer"}, "notes": {"type": "array", "items": NOTE}}},
       errors={404: "no stream has that id", 422: "the stream has no composer, or a bad 'since'"})
async def stream_notes(request: web.Request) -> web.Response:
    d: Daemon = request.app["daemon"]
    stream = d.stream(request)
    if stream.voice is None:
        raise ApiError(422, "not_composed", "this stream plays controls, not notes; create it with a 'composer'")
    count, notes = stream.voice.played(query_value(request, "since", SINCE))
    return web.json_response({"count": count, "notes": [n.to_dict() for n in notes]})


@route("GET", "/v1/streams/{id}/snapshot", "The stream as bytes another daemon resumes it from (POST /v1/streams "
       "with 'snapshot')", returns={"type": "string", "format": "binary"}, content_type=MEDIA_TYPE,
       errors={404: "no stream has that id",
               409: "the stream cannot be snapshotted now: it is crossfading to another version or playing a sting "
                    "(retry in a moment), or it has failed",
               503: "the engine did not take the snapshot in time (Retry-After)"})
async def stream_snapshot(request: web.Request) -> web.Response:
    d: Daemon = request.app["daemon"]
    stream = d.stream(request)
    snapshot = await d.snapshot(stream)
    return web.Response(body=encode(snapshot), content_type=MEDIA_TYPE,
                        headers={"Content-Disposition": f'attachment; filename="stream-{stream.id}.wcsnap"'})
