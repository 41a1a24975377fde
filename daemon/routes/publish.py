"""Publishing a stream into a Janus server's Streaming plugin (daemon/janus.py): start, inspect, stop.

Janus then serves the stream's WebRTC listeners, however many, from one RTP stream the daemon sends.
"""

from __future__ import annotations

from aiohttp import web

from wavecast.daemon.api import ApiError, route
from wavecast.daemon.janus import JanusError, JanusUnreachable, MountpointUnusable, Publisher
from wavecast.daemon.service import Daemon
from wavecast.streaming.engine import RETRY_AFTER_SECONDS, Stream

MAX_MOUNTPOINT = 2**53 - 1  # Janus's own ids stay below this, as JSON numbers every client reads exactly
PUBLISH = {
    "type": "object", "required": ["janus"], "additionalProperties": False,
    "properties": {
        "janus": {"type": "string", "pattern": r"^https?://[^\s/?#]+(/[^\s?#]*)?$", "maxLength": 2000,
                  "description": "the URL of Janus's HTTP API, e.g. http://127.0.0.1:8088/janus"},
        "mountpoint": {"type": "integer", "minimum": 1, "maximum": MAX_MOUNTPOINT,
                       "description": "the Streaming plugin mountpoint's id: an Opus RTP mountpoint of that id is "
                                      "used if it exists, else made; omitted, Janus picks the id of a new one"},
    },
}
PUBLICATION = {
    "type": "object", "required": ["stream", "janus", "mountpoint", "state"],
    "properties": {
        "stream": {"type": "string"}, "janus": {"type": "string"},
        "mountpoint": {"type": ["integer", "null"], "description": "the id listeners 'watch' on Janus"},
        "created": {"type": "boolean", "description": "the daemon made the mountpoint (DELETE destroys it)"},
        "state": {"enum": ["connecting", "publishing", "retrying", "stopped"],
                  "description": "retrying: Janus went away; the session and mountpoint are being made again"},
        "error": {"type": ["string", "null"], "description": "why it is retrying or stopped"},
        "packets": {"type": "integer", "description": "RTP packets sent"},
        "retries": {"type": "integer"},
        "rtp": {"type": ["object", "null"], "description": "{host, port} the RTP goes to"},
    },
}


@route("POST", "/v1/streams/{id}/publish", "Publish a stream into a Janus Streaming mountpoint", body=PUBLISH,
       returns=PUBLICATION, status=201, errors={
           404: "no stream has that id", 409: "the stream is published already, or the mountpoint asked for "
                                              "cannot take an Opus RTP stream",
           422: "the stream's audio cannot be sent as Opus",
           502: "Janus cannot be reached (janus_unreachable) or refused a request (janus_error)",
           503: "the Opus encoding thread is saturated (Retry-After) or the daemon is stopping"})
async def publish(request: web.Request, body: dict) -> web.Response:
    d: Daemon = request.app["daemon"]
    stream = d.stream(request)
    if d.draining:
        raise ApiError(503, "shutting_down", "the daemon is stopping; retry when it is back")
    current = d.publishers.get(stream.id)
    if current is not None and current.state != "stopped":
        raise ApiError(409, "already_publishing", f"this stream is published to {current.url} mountpoint "
                       f"{current.mountpoint} already; DELETE /v1/streams/{stream.id}/publish first")
    if stream.id not in d.encoders and d.encoding.load > d.encode_budget:
        raise ApiError(503, "encoder_saturated", f"the Opus encoding thread is {100 * d.encoding.load:.0f} % busy "
                       f"(limit {100 * d.encode_budget:.0f} %): another stream's encoder would make every stream "
                       "late; retry later", {"Retry-After": str(RETRY_AFTER_SECONDS)})
    publisher = Publisher(stream, body["janus"], body.get("mountpoint"))
    try:
        await publisher.connect()
    except MountpointUnusable as e:
        await publisher.stop()
        raise ApiError(409, "mountpoint_unusable", f"{e}; give the id of an Opus RTP audio mountpoint, a free id, or "
                                                   "no 'mountpoint' to let Janus pick one") from None
    except JanusUnreachable as e:
        await publisher.stop()
        raise ApiError(502, "janus_unreachable", f"{e}; check that Janus runs with its HTTP transport there, and "
                                                 "the 'janus' URL (e.g. http://HOST:8088/janus)") from None
    except JanusError as e:
        await publisher.stop()
        raise ApiError(502, "janus_error", f"Janus refused to set up the mountpoint: {e}; see the Janus log, or "
                                           "check 'janus' and 'mountpoint'") from None
    if d.engine.streams.get(stream.id) is not stream:  # deleted while Janus answered
        await publisher.stop()
        raise ApiError(404, "unknown_stream", "the stream was deleted meanwhile; GET /v1/streams lists them")
    if d.publishers.get(stream.id) is not current:  # another request published it while Janus answered
        await publisher.stop()
        raise ApiError(409, "already_publishing", f"this stream was published by another request meanwhile; see "
                                                  f"GET /v1/streams/{stream.id}/publish")
    try:
        encoder = d.encoder(stream)
    except ValueError as e:
        await publisher.stop()
        raise ApiError(422, "unsupported_model", str(e)) from None
    d.publishers[stream.id] = publisher
    publisher.attach(encoder)
    return web.json_response(publisher.info(), status=201)


@route("GET", "/v1/streams/{id}/publish", "Where and how a stream is published into Janus", returns=PUBLICATION,
       errors={404: "no stream has that id, or it is not published"})
async def publication(request: web.Request) -> web.Response:
    d: Daemon = request.app["daemon"]
    return web.json_response(_publisher(d, d.stream(request)).info())


@route("DELETE", "/v1/streams/{id}/publish", "Stop publishing a stream into Janus (a mountpoint the daemon made "
       "is destroyed)", returns={"type": "object", "required": ["stream", "deleted", "mountpoint_destroyed"]},
       errors={404: "no stream has that id, or it is not published"})
async def unpublish(request: web.Request) -> web.Response:
    d: Daemon = request.app["daemon"]
    stream = d.stream(request)
    publisher = _publisher(d, stream)
    del d.publishers[stream.id]
    destroyed = await publisher.stop()
    return web.json_response({"stream": stream.id, "deleted": True, "mountpoint": publisher.mountpoint,
                              "mountpoint_destroyed": destroyed})


def _publisher(d: Daemon, stream: Stream) -> Publisher:
    publisher = d.publishers.get(stream.id)
    if publisher is None:
        raise ApiError(404, "not_published", f"stream {stream.id} is not published to Janus; POST "
                                             f"/v1/streams/{stream.id}/publish to publish it")
    return publisher
