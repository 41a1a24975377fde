"""Streams: create, list, inspect, steer (PATCH, and the same message over a data channel), notes, delete."""

from __future__ import annotations

import logging
import secrets
from typing import Any

from aiohttp import web

from wavecast.daemon.api import ApiError, query_value, route
from wavecast.daemon.service import Daemon
from wavecast.streaming.composer import ACTIONS, validate_controls
from wavecast.streaming.controls import ControlError, validate
from wavecast.streaming.engine import EngineSaturated, Group, ModelFailed, Stream

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


CONTROLS = {
    "type": "object", "maxProperties": 32,
    # each model checks its own ranges; this bound keeps numbers no float can hold from reaching those checks
    "additionalProperties": {"type": ["number", "string"], "maxLength": 100, "minimum": -1e9, "maximum": 1e9},
    "description": "controls by name. An instrument's (e.g. f0, loudness) are numbers; a composed stream's are "
                   "tempo, temperature, top_k, density, legato, vibrato, volume, scale, register and metre. "
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
    },
}
PATCH = {
    "type": "object", "additionalProperties": False, "minProperties": 1,
    "properties": {"controls": CONTROLS,
                   "action": {"enum": list(ACTIONS), "description": "composed streams: pause, play or reset"}},
}
NOTE = {
    "type": "object", "required": ["frame", "frames", "midi", "note", "quarters", "bar", "beat", "key", "tempo"],
    "properties": {"frame": {"type": "integer"}, "frames": {"type": "integer"},
                   "midi": {"type": ["integer", "null"], "description": "null for a rest"},
                   "note": {"type": "string", "description": "e.g. D5, or rest"}, "quarters": {"type": "number"},
                   "bar": {"type": "integer"}, "beat": {"type": "number"}, "key": {"type": "string"},
                   "tempo": {"type": "number"}},
}
NOW_PLAYING = {
    "type": "object", "required": ["state", "note", "key", "tempo", "notes_played"],
    "properties": {"state": {"enum": ["playing", "paused"]}, "note": {"anyOf": [NOTE, {"type": "null"}]},
                   "key": {"type": "string"}, "tempo": {"type": "number"}, "notes_played": {"type": "integer"}},
}
STREAM = {
    "type": "object",
    "required": ["id", "model", "version", "follows", "seed", "controls", "state", "underruns", "listeners", "frames",
                 "seconds", "buffered_ms", "latency_ms", "peers", "encoders", "device"],
    "properties": {
        "id": {"type": "string"}, "model": {"type": "string"}, "version": {"type": "integer"},
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
    },
}
SINCE = {"type": "integer", "minimum": 0, "default": 0,
         "description": "skip the first N notes ever played, to poll for new ones"}


def _controls(stream_or_group: Stream | Group | None, raw: Any, composed: bool) -> dict[str, Any]:
    try:
        return validate_controls(raw) if composed else validate(stream_or_group.manifest, raw)
    except ControlError as e:
        raise ApiError(422, "invalid_control", str(e)) from None


def apply_patch(stream: Stream, body: dict) -> dict:
    """Controls and (composed streams) an action, from PATCH or the data channel, already checked against
    PATCH's schema; all are checked against the stream before any is applied. Returns the stream's controls
    (and now-playing)."""
    voice = stream.voice
    action = body.get("action")
    if voice is None:
        if action is not None:
            raise ApiError(422, "invalid_action", "'action' applies to composed streams only; this one plays "
                                                  "controls (send only 'controls')")
        stream.set_controls(_controls(stream, body.get("controls", {}), composed=False))
        return {"controls": stream.controls()}
    voice.set(_controls(stream, body.get("controls", {}), composed=True))
    if action is not None:
        voice.act(action)
    return {"controls": voice.settings, "now_playing": voice.now_playing()}


@route("POST", "/v1/streams", "Start a stream", body=CREATE, returns=STREAM, status=201, errors={
    404: "unknown model or composer", 422: "a control out of range, or a model of the wrong kind",
    429: "too many streams, or stream creations too fast (Retry-After)",
    503: "the engine or the model cannot take another stream now (Retry-After)"})
async def create_stream(request: web.Request, body: dict) -> web.Response:
    d: Daemon = request.app["daemon"]
    d.stream_rate.check(request.remote or "", "streams created")
    if len(d.engine.streams) >= d.limits.max_streams:
        raise ApiError(429, "too_many_streams", f"this daemon runs at most {d.limits.max_streams} streams "
                       "(--max-streams); delete one first")
    name, composer_name = body.get("model", "default"), body.get("composer")
    seed = body["seed"] if "seed" in body else secrets.randbits(32)
    if composer_name is not None:  # a composer's controls are known without loading it
        controls = _controls(None, body.get("controls", {}), composed=True)
    group = await d.group(name)
    composer = await d.composer(composer_name) if composer_name is not None else None
    if composer is None:
        controls = _controls(group, body.get("controls", {}), composed=False)
    try:
        stream = d.engine.create_stream(group, seed, controls, composer, follows="@" not in name)
    except EngineSaturated as e:
        raise ApiError(503, "engine_saturated", str(e), {"Retry-After": str(e.retry_after)}) from None
    except ModelFailed as e:
        raise ApiError(503, "model_failed", f"{e}; see GET /v1/health (a new version of the model or a daemon "
                                            "restart brings it back)") from None
    log.info("stream created id=%s model=%s composer=%s seed=%s", stream.id, name, composer_name, seed)
    return web.json_response(d.stream_info(stream), status=201)


@route("GET", "/v1/streams", "List the streams",
       returns={"type": "object", "required": ["streams"], "properties": {"streams": {"type": "array",
                                                                                      "items": STREAM}}})
async def list_streams(request: web.Request) -> web.Response:
    d: Daemon = request.app["daemon"]
    return web.json_response({"streams": [d.stream_info(s) for s in list(d.engine.streams.values())]})


@route("GET", "/v1/streams/{id}", "A stream: model, controls, state, latency, listeners", returns=STREAM,
       errors={404: "no stream has that id"})
async def get_stream(request: web.Request) -> web.Response:
    d: Daemon = request.app["daemon"]
    return web.json_response(d.stream_info(d.stream(request)))


@route("PATCH", "/v1/streams/{id}", "Steer a stream: new controls (smoothed), or an action", body=PATCH,
       returns=STREAM, errors={404: "no stream has that id", 422: "a control out of range, or an unknown one"})
async def patch_stream(request: web.Request, body: dict) -> web.Response:
    d: Daemon = request.app["daemon"]
    stream = d.stream(request)
    apply_patch(stream, body)
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
