"""Moving streams to another daemon: one (POST /v1/streams/{id}/move), or all of them before this daemon stops
(POST /v1/drain). The logic is daemon/migrate.py's; docs/snapshot.md says what listeners see."""

from __future__ import annotations

from aiohttp import web

from wavecast.daemon.api import ApiError, route
from wavecast.daemon.migrate import drain, move
from wavecast.daemon.service import Daemon

DAEMON_URL = {"type": "string", "pattern": r"^https?://[^\s/?#]+/?$", "maxLength": 2000,
              "description": "the daemon to move to: its API's base URL, e.g. http://10.0.0.2:8765"}
TOKEN = {"type": "string", "pattern": "^[!-~]+$", "maxLength": 4096,
         "description": "that daemon's bearer token, when it needs one (printable ASCII, no spaces)"}
MOVE = {"type": "object", "required": ["to"], "additionalProperties": False,
        "properties": {"to": DAEMON_URL, "token": TOKEN}}
MOVED = {
    "type": "object", "required": ["stream", "to", "id", "url", "snapshot_frame"],
    "properties": {
        "stream": {"type": "string", "description": "the stream's id here (it is gone now)"},
        "to": {"type": "string"}, "id": {"type": "string", "description": "the stream's id on the other daemon"},
        "url": {"type": "string", "description": "the stream on the other daemon: GET it, or offer WebRTC to it"},
        "snapshot_frame": {"type": "integer", "description": "the frame the other daemon resumed the stream at"},
        "janus": {"type": "object", "description": "a published stream's handover: janus, mountpoint, cut_frame and "
                                                   "cut_sample (the first sample the other daemon's RTP carries), "
                                                   "at (Unix time it was due) and late_ms (how late it was sent; "
                                                   "null if the other daemon did not say)"},
    },
}
MOVE_ERRORS = {404: "no stream has that id", 409: "the stream is moving already, or cannot be snapshotted now",
               502: "the other daemon cannot be reached (move_target_unreachable) or refused (move_refused, its "
                    "error in the message); the stream plays on here",
               503: "the engine took no snapshot in time, or this daemon is stopping"}


@route("POST", "/v1/streams/{id}/move", "Move a live stream to another daemon; listeners through Janus stay "
       "connected, WebRTC listeners here are told where it went", body=MOVE, returns=MOVED, errors=MOVE_ERRORS)
async def move_stream(request: web.Request, body: dict) -> web.Response:
    d: Daemon = request.app["daemon"]
    return web.json_response(await move(d, d.stream(request), body["to"], body.get("token")))


@route("POST", "/v1/drain", "Refuse new streams and move every stream to another daemon, before this one stops",
       body=MOVE, errors={502: "the other daemon cannot be reached, is not a wavecast daemon, or drains itself: "
                                "nothing was drained, this daemon serves on", 503: "the daemon is stopping"},
       returns={"type": "object", "required": ["to", "streams", "moved", "failed"], "properties": {
           "to": {"type": "string"}, "moved": {"type": "integer"}, "failed": {"type": "integer"},
           "streams": {"type": "array", "description": "each stream's move: as POST /v1/streams/{id}/move answers "
                                                       "with moved: true, or {stream, moved: false, error}"}}})
async def drain_streams(request: web.Request, body: dict) -> web.Response:
    d: Daemon = request.app["daemon"]
    if d.draining:
        raise ApiError(503, "shutting_down", "the daemon is stopping; its streams cannot move now")
    return web.json_response(await drain(d, body["to"], body.get("token")))
