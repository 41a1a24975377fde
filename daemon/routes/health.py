"""Health, Prometheus metrics (with every limit), and the OpenAPI document made from the route table."""

from __future__ import annotations

import math
import time

from aiohttp import web

from wavecast.daemon.api import ERROR, ROUTES, route
from wavecast.daemon.schema import MAX_DIGITS
from wavecast.daemon.service import Daemon

HEALTH = {
    "type": "object", "required": ["status", "failed_streams", "failed_models", "uptime_seconds", "streams",
                                   "admission", "draining"],
    "properties": {"status": {"enum": ["ok", "degraded"]}, "failed_streams": {"type": "array"},
                   "failed_models": {"type": "array"}, "uptime_seconds": {"type": "number"},
                   "streams": {"type": "integer"}, "admission": {"type": "object"},
                   "draining": {"type": ["object", "null"], "description": "{to}: POST /v1/drain moves the streams to "
                                "that daemon and new ones are refused; null when not draining"}},
}


@route("GET", "/v1/health", "Liveness, failed streams and models, admission figures (no token needed)",
       returns=HEALTH, public=True)
async def health(request: web.Request) -> web.Response:
    d: Daemon = request.app["daemon"]
    return web.json_response({**d.engine.health(), "uptime_seconds": round(time.time() - d.started, 1),
                              "streams": len(d.engine.streams), "admission": d.engine.admission(),
                              "draining": {"to": d.drain_to} if d.drain_to is not None else None})


@route("GET", "/metrics", "Prometheus text: engine, encoding, peers, errors and limits",
       returns={"type": "string"}, content_type="text/plain")
async def metrics(request: web.Request) -> web.Response:
    d: Daemon = request.app["daemon"]
    st = d.engine.stats
    streams = list(d.engine.streams.values())
    lines = [
        ("wavecast_streams", "gauge", "streams that exist", len(streams)),
        ("wavecast_listeners", "gauge", "readers (WebRTC tracks, devices) across streams",
         sum(len(s.readers) for s in streams)),
        ("wavecast_peers", "gauge", "WebRTC peer connections", sum(len(p) for p in d.peers.values())),
        ("wavecast_devices", "gauge", "streams playing on sound devices", len(d.outputs)),
        ("wavecast_models_loaded", "gauge", "model versions loaded, instruments and composers", d.loaded_models()),
        ("wavecast_encoders", "gauge", "Opus encoders running, one per stream with WebRTC listeners", len(d.encoders)),
        ("wavecast_packets_encoded_total", "counter", "Opus packets encoded (20 ms each, shared by a stream's peers)",
         d.encoding.packets),
        ("wavecast_encoding_load", "gauge", "share of the last half second the Opus encoding thread was busy",
         d.encoding.load),
        ("wavecast_underruns_total", "counter", "reads that found too little audio (live streams)",
         sum(s.underruns for s in streams)),
        ("wavecast_engine_ticks_total", "counter", "ticks that generated audio", st.ticks),
        ("wavecast_engine_frames_total", "counter", "frames generated", st.frames),
        ("wavecast_engine_batches_total", "counter", "batched ONNX Runtime calls", st.batches),
        ("wavecast_engine_busy_seconds_total", "counter", "seconds spent generating", st.busy_seconds),
        ("wavecast_engine_tick_max_seconds", "gauge", "longest tick so far", st.max_tick_seconds),
        ("wavecast_engine_last_batch", "gauge", "streams in the last tick", st.last_batch),
        ("wavecast_composed_streams", "gauge", "streams a composer writes", sum(s.voice is not None for s in streams)),
        ("wavecast_composer_steps_total", "counter", "batched composer calls", st.composer_steps),
        ("wavecast_composer_notes_total", "counter", "notes and rests composed", st.notes),
        ("wavecast_limited_frames_total", "counter", "stream-frames the limiter turned down (they would have peaked "
         "above -1 dBFS)", st.limited_frames),
        ("wavecast_stings_total", "counter", "stings played on top of streams (POST /v1/streams/{id}/events)",
         st.stings),
        ("wavecast_ducks_total", "counter", "ducks asked for", st.ducks),
        ("wavecast_http_errors_total", "counter", "requests answered with an error", d.errors),
        ("wavecast_rate_limited_total", "counter", "stream creations refused by the per-client rate limit",
         d.stream_rate.refused),
        ("wavecast_streams_refused_total", "counter", "streams refused by admission control", st.refused),
        ("wavecast_stream_failures_total", "counter", "streams failed by a fault of their model", st.stream_failures),
        ("wavecast_nonfinite_frames_total", "counter", "stream-frames silenced: the model made NaN or inf",
         st.nonfinite_frames),
        ("wavecast_guarded_frames_total", "counter", "stream-frames the output guard clipped or silenced",
         sum(g.guarded_frames for g in list(d.engine.groups.values()))),
        ("wavecast_stream_swaps_total", "counter", "streams moved to a new current version of their model",
         st.swaps),
        ("wavecast_models_unloaded_total", "counter", "model versions unloaded: not current and no stream used them",
         st.unloaded),
        ("wavecast_versions_refused_total", "counter", "new versions refused (checksum, contract or gate)",
         len(d.follower.refused)),
        ("wavecast_models_failed", "gauge", "models and composers quarantined after a fault", len(st.failures)),
        ("wavecast_engine_predicted_tick_seconds", "gauge", "tick time admission control predicts for the streams",
         d.engine.predicted_seconds()),
        ("wavecast_engine_last_tick_seconds", "gauge", "time the last tick took", st.last_tick_seconds),
    ]
    text = []
    for name, kind, help_, value in lines:
        value = float(value)
        text += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value if math.isfinite(value) else 0}"]
    text += ["# HELP wavecast_limit what the daemon takes at most (its serve flags)", "# TYPE wavecast_limit gauge"]
    text += [f'wavecast_limit{{name="{name}"}} {float(value)}' for name, value in d.limit_metrics().items()]
    text.append("# TYPE wavecast_model_loaded gauge")
    for (name, version), group in list(d.engine.groups.items()):  # a model may be loading meanwhile
        provider = group.model.providers[0]
        text.append(f'wavecast_model_loaded{{name="{name}",version="{version}",provider="{provider}"}} 1')
    for name, version in list(d.engine.composers):
        text.append(f'wavecast_model_loaded{{name="{name}",version="{version}",provider="CPUExecutionProvider"}} 1')
    return web.Response(text="\n".join(text) + "\n", content_type="text/plain", charset="utf-8")


# Statuses any route may answer besides its own (see daemon/api.py's guard).
COMMON_ERRORS = {401: "no or a wrong token (when the daemon has one)",
                 403: "a foreign Host or Origin header (another web page)"}
BODY_ERRORS = {400: f"the body is not JSON, not UTF-8, nests too deeply or has a number of over {MAX_DIGITS} digits",
               413: "the body is larger than 256 KiB", 415: "the body is not sent as application/json",
               422: "the body does not fit the schema (the message names the field)"}


def openapi(version: str) -> dict:
    """The OpenAPI 3.1 document of every route in ROUTES, from the same schemas the validator uses."""
    paths: dict[str, dict] = {}
    for r in ROUTES:
        errors = COMMON_ERRORS | (BODY_ERRORS if r.body is not None else {}) | r.errors
        if r.public:
            errors.pop(401)
        op: dict = {
            "summary": r.summary, "operationId": r.handler.__name__,
            "responses": {str(r.status): {"description": r.summary,
                                          "content": {r.content_type: {"schema": r.returns}}}}
                         | {str(code): {"description": why, "content": {"application/json": {"schema": ERROR}}}
                            for code, why in sorted(errors.items())},
        }
        params = [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}] \
            if "{id}" in r.path else []
        params += [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}] \
            if "{name}" in r.path else []
        params += [{"name": "version", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 1}}] \
            if "{version}" in r.path else []
        params += [{"name": name, "in": "query", "required": False, "schema": schema}
                   for name, schema in r.query.items()]
        if params:
            op["parameters"] = params
        if r.body is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": r.body}}}
        if r.upload is not None:
            op["requestBody"] = {"required": True, "description": r.upload.description,
                                 "content": {t: {"schema": {"type": "string", "format": "binary",
                                                            "maxLength": r.upload.max_bytes}}
                                             for t in r.upload.types}}
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "wavecast", "version": version,
                 "description": "Real-time generative audio. Errors are {\"error\": {\"code\", \"message\"}}."},
        "components": {"securitySchemes": {"token": {"type": "http", "scheme": "bearer"}}},
        "security": [{"token": []}, {}],
        "paths": paths,
    }


@route("GET", "/v1/openapi.json", "This API's OpenAPI 3.1 description", returns={"type": "object"})
async def openapi_document(request: web.Request) -> web.Response:
    return web.json_response(request.app["openapi"])
