"""Publishing a stream into a Janus server's Streaming plugin (daemon/janus.py): start, inspect, stop.

Janus then serves the stream's WebRTC listeners, however many, from one RTP stream the daemon sends.
"""

from __future__ import annotations

import time

from aiohttp import web

from wavecast.daemon.api import ApiError, route
from wavecast.daemon.janus import Handover, JanusError, JanusUnreachable, MountpointUnusable, Publisher
from wavecast.daemon.peers import PACKET_SAMPLES
from wavecast.daemon.service import Daemon
from wavecast.streaming.engine import RETRY_AFTER_SECONDS, Stream

MAX_MOUNTPOINT = 2**53 - 1  # Janus's own ids stay below this, as JSON numbers every client reads exactly
MAX_HANDOVER_S = 60.0  # a handover's first packet is due within this long, and this much audio ahead at most
HANDOVER = {
    "type": "object", "required": ["sample", "at", "ssrc", "seq", "timestamp"], "additionalProperties": False,
    "description": "go on with another daemon's RTP stream to the mountpoint (a move, POST /v1/streams/{id}/move "
                   "sends it): this stream, resumed from that daemon's snapshot and not listened to yet, is read up "
                   "to 'sample' at once, and its packet that reads from 'sample' on is sent at 'at' with these RTP "
                   "numbers, the next ones counting on. The mountpoint is then this daemon's: DELETE destroys it",
    "properties": {
        "sample": {"type": "integer", "minimum": 0, "maximum": 2**62,
                   "description": "the stream sample (counting from its first) the first packet reads from"},
        "at": {"type": "number", "minimum": 0, "maximum": 1e11,
               "description": "when that packet is due: Unix time in seconds (the daemons' clocks must agree: one "
                              "host, or NTP)"},
        "ssrc": {"type": "integer", "minimum": 0, "maximum": 2**32 - 1},
        "seq": {"type": "integer", "minimum": 0, "maximum": 2**16 - 1, "description": "its RTP sequence number"},
        "timestamp": {"type": "integer", "minimum": 0, "maximum": 2**32 - 1, "description": "its RTP timestamp"},
    },
}
PUBLISH = {
    "type": "object", "required": ["janus"], "additionalProperties": False,
    "properties": {
        "janus": {"type": "string", "pattern": r"^https?://[^\s/?#]+(/[^\s?#]*)?$", "maxLength": 2000,
                  "description": "the URL of Janus's HTTP API, e.g. http://127.0.0.1:8088/janus"},
        "mountpoint": {"type": "integer", "minimum": 1, "maximum": MAX_MOUNTPOINT,
                       "description": "the Streaming plugin mountpoint's id: an Opus RTP mountpoint of that id is "
                                      "used if it exists, else made; omitted, Janus picks the id of a new one"},
        "handover": HANDOVER,
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
        "handover": {"type": ["object", "null"], "description": "the handover it began with, and late_ms: how late "
                                                             "its first packet was sent (null until then)"},
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
    handover = _handover(d, stream, body)
    publisher = Publisher(stream, body["janus"], body.get("mountpoint"), handover)
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


def _handover(d: Daemon, stream: Stream, body: dict) -> Handover | None:
    """The body's handover, checked against the stream: one nobody listens to, behind the handover's sample."""
    if "handover" not in body:
        return None
    handover = Handover(**body["handover"])
    if "mountpoint" not in body:
        raise ApiError(422, "invalid_handover", "a 'handover' goes on with a mountpoint's RTP stream; give its "
                                                "'mountpoint'")
    if stream.id in d.encoders:
        raise ApiError(409, "stream_listened", "a handover needs a stream nobody listens to yet (this one has "
                                               "WebRTC listeners or a publisher); resume the snapshot again")
    at = stream.frames * stream.manifest.hop
    ahead = handover.sample - PACKET_SAMPLES - at
    if not 0 <= ahead <= MAX_HANDOVER_S * stream.manifest.sample_rate:
        raise ApiError(422, "invalid_handover", f"handover 'sample' {handover.sample} must be a packet "
                       f"({PACKET_SAMPLES} samples) to {MAX_HANDOVER_S:g} s past the stream's sample {at}; take "
                       "a new snapshot")
    if abs(handover.at - time.time()) > MAX_HANDOVER_S:
        raise ApiError(422, "invalid_handover", f"handover 'at' is {handover.at - time.time():+.1f} s from this "
                       f"daemon's clock (at most {MAX_HANDOVER_S:g} s either way); synchronise the daemons' clocks "
                       "(NTP)")
    return handover


def _publisher(d: Daemon, stream: Stream) -> Publisher:
    publisher = d.publishers.get(stream.id)
    if publisher is None:
        raise ApiError(404, "not_published", f"stream {stream.id} is not published to Janus; POST "
                                             f"/v1/streams/{stream.id}/publish to publish it")
    return publisher
