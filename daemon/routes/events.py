"""Events: stings, ducks and moods sent to a stream (by the dock, a chat bot or an alert service's webhook), and
the list of the stings and moods this daemon knows. What each does is in streaming/events.py."""

from __future__ import annotations

import logging

from aiohttp import web

from wavecast.daemon.api import ApiError, route
from wavecast.daemon.routes.streams import STREAM, _controls, saturated
from wavecast.daemon.service import Daemon
from wavecast.streaming.engine import EngineSaturated, TooManyStings
from wavecast.streaming.events import DUCK_DB, DUCK_SECONDS, NAME

log = logging.getLogger("wavecast.api")


def _preset(kind: str) -> dict:
    return {"type": "string", "pattern": NAME,
            "description": f"a {kind}'s name: 1-32 lower-case letters, digits, '-' or '_' (GET /v1/events lists "
                           f"the {kind}s)"}


EVENT = {
    "oneOf": [
        {"type": "object", "required": ["type", "name"], "additionalProperties": False,
         "description": "a short phrase on top of the piece, in its key, tempo and level",
         "properties": {"type": {"enum": ["sting"]}, "name": _preset("sting")}},
        {"type": "object", "required": ["type"], "additionalProperties": False,
         "description": "lower the stream under speech, with smooth ramps, then restore it; a duck during a duck "
                        "takes the new depth and ends at the later end",
         "properties": {"type": {"enum": ["duck"]},
                        "db": {"type": "number", "minimum": DUCK_DB[0], "maximum": DUCK_DB[1], "default": -12,
                               "description": "how far down, in dB"},
                        "seconds": {"type": "number", "minimum": DUCK_SECONDS[0], "maximum": DUCK_SECONDS[1],
                                    "default": 3, "description": "how long it stays down"}}},
        {"type": "object", "required": ["type", "name"], "additionalProperties": False,
         "description": "composed streams: set several controls at once to a named preset",
         "properties": {"type": {"enum": ["mood"]}, "name": _preset("mood")}},
    ],
    "discriminator": {"propertyName": "type"},
}
ACCEPTED = {"type": "object", "required": ["event", "stream"],
            "properties": {"event": {"type": "object", "description": "the event as applied, defaults filled in "
                                                                      "(a sting's length in seconds)"},
                           "stream": STREAM}}
PRESETS = {"type": "object", "required": ["stings", "moods"],
           "properties": {"stings": {"type": "array", "items": {"type": "object"}},
                          "moods": {"type": "array", "items": {"type": "object"}}}}


@route("POST", "/v1/streams/{id}/events", "Send an event to a stream: a sting, a duck or a mood; every listener and "
       "device hears it", body=EVENT, returns=ACCEPTED, errors={
           404: "no stream has that id", 429: "the stream plays as many stings as it may at once",
           422: "an unknown sting or mood, a field out of range, a mood for a stream without a composer",
           503: "no slot for a sting's voice now (Retry-After)"})
async def send_event(request: web.Request, body: dict) -> web.Response:
    d: Daemon = request.app["daemon"]
    stream = d.stream(request)
    d.steerable(stream)
    kind = body["type"]
    event = dict(body)
    if kind == "duck":
        event = {"type": "duck", "db": float(body.get("db", -12)), "seconds": float(body.get("seconds", 3))}
        d.engine.duck(stream, event["db"], event["seconds"])
    elif kind == "sting":
        sting = d.events.stings.get(body["name"])
        if sting is None:
            raise ApiError(422, "unknown_sting", f"no sting is called '{body['name']}'; 'name' must be one of "
                           f"{', '.join(d.events.stings)} (GET /v1/events)")
        try:
            event["seconds"] = round(d.engine.sting(stream, sting), 3)
        except TooManyStings as e:
            raise ApiError(429, "too_many_stings", str(e)) from None
        except ValueError as e:
            raise ApiError(422, "sting_refused", str(e)) from None
        except EngineSaturated as e:
            raise saturated(e) from None
    else:
        mood = d.events.moods.get(body["name"])
        if mood is None:
            raise ApiError(422, "unknown_mood", f"no mood is called '{body['name']}'; 'name' must be one of "
                           f"{', '.join(d.events.moods)} (GET /v1/events)")
        if stream.voice is None:
            raise ApiError(422, "not_composed", "a mood sets composer controls, and this stream plays controls; "
                                                "send it to a stream created with a 'composer'")
        controls = _controls(stream, mood.apply_to(stream.voice.settings), composed=True)
        stream.voice.set(controls)
        event["controls"] = controls
    log.info("event stream=%s %s", stream.id, " ".join(f"{k}={v}" for k, v in event.items() if k != "controls"))
    return web.json_response({"event": event, "stream": d.stream_info(stream)})


@route("GET", "/v1/events", "The stings and moods streams can be sent (shipped, plus serve --events FILE)",
       returns=PRESETS)
async def list_events(request: web.Request) -> web.Response:
    d: Daemon = request.app["daemon"]
    return web.json_response(d.events.describe())
