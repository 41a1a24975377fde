"""The HTTP API (v1): models, streams, WebRTC offers, device outputs, health and metrics.

Errors are JSON, ``{"error": {"code", "message"}}``, with a 4xx/5xx status; a bad request never touches
the streams that are playing. The event loop only schedules: model loading and device opening run in the
default executor, inference in the engine's thread.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import secrets
import time
from typing import Any

from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from daemon.device import DeviceError, DeviceOutput
from daemon.peers import ENCODER_DELAY_SAMPLES, PACKET_SAMPLES, SAMPLE_RATE, Encoding, StreamEncoder
from models.store import ModelStore
from streaming.composer import ACTIONS, ComposerGroup, ComposerModel, describe_controls, validate_controls
from streaming.controls import ControlError, validate
from streaming.engine import (
    BUDGET,
    BUFFER_FRAMES,
    MAX_STREAMS,
    RETRY_AFTER_SECONDS,
    Engine,
    EngineSaturated,
    Group,
    ModelFailed,
    Stream,
)
from streaming.model import FrameModel, ModelError

log = logging.getLogger("wavecast.api")
MAX_BODY_BYTES = 256 * 1024  # an SDP offer is a few KiB
TELEMETRY_SECONDS = 1.0
TELEMETRY_KEYS = ("id", "state", "latency_ms", "buffered_ms", "underruns", "listeners", "peers", "frames")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status, headers=headers)


HTTP_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
              413: "body_too_large", 415: "unsupported_media_type"}


class Daemon:
    """Everything `wavecast serve` holds: the engine, loaded models, peers and device outputs."""

    def __init__(self, store: ModelStore, *, buffer_frames: int = BUFFER_FRAMES, max_streams: int = MAX_STREAMS,
                 budget: float = BUDGET, encode_budget: float = BUDGET, max_peers_per_stream: int = 64,
                 token: str | None = None) -> None:
        self.store = store
        self.engine = Engine(buffer_frames=buffer_frames, max_streams=max_streams, budget=budget)
        self.max_streams = max_streams
        self.max_peers_per_stream = max_peers_per_stream
        self.encode_budget = encode_budget  # busy share of the encoding thread past which no new encoder starts
        self.token = token
        self.peers: dict[str, set[RTCPeerConnection]] = {}
        self.encoders: dict[str, StreamEncoder] = {}  # one per stream with WebRTC peers: packets fan out
        self.encoding = Encoding()  # the thread that runs them
        self.outputs: dict[str, DeviceOutput] = {}
        self.started = time.time()
        self.errors = 0
        self._loading: dict[str, asyncio.Lock] = {}

    # -- models -------------------------------------------------------------------------------------
    async def group(self, name: str) -> Group:
        """The loaded group for the newest version of instrument `name`, loading it off the loop if needed."""
        return await self._load(name, "instrument", self.engine.groups, FrameModel, self.engine.add_model)

    async def composer(self, name: str) -> ComposerGroup:
        """The loaded group for the newest version of composer `name`."""
        return await self._load(name, "composer", self.engine.composers, ComposerModel, self.engine.add_composer)

    async def _load(self, name: str, kind: str, loaded: dict, loader, add):
        try:
            entry = self.store.resolve(name)
        except KeyError as e:
            raise ApiError(404, "unknown_model", str(e.args[0])) from None
        if entry.manifest.kind != kind:
            field = "composer" if entry.manifest.kind == "composer" else "model"
            raise ApiError(422, "wrong_model_kind", f"'{name}' is a {entry.manifest.kind}, not a {kind}; "
                                                    f"name it in '{field}' (see GET /v1/models)")
        key = (entry.manifest.name, entry.manifest.version)
        async with self._loading.setdefault(name, asyncio.Lock()):
            if key not in loaded:
                loop = asyncio.get_running_loop()
                try:
                    model = await loop.run_in_executor(None, loader, entry.directory)
                except ModelError as e:
                    raise ApiError(500, "model_unusable", str(e)) from None
                await loop.run_in_executor(None, add, model)  # an instrument is timed here for admission
                log.info("model loaded name=%s version=%s kind=%s", *key, kind)
        return loaded[key]

    def stream(self, request: web.Request) -> Stream:
        sid = request.match_info["id"]
        stream = self.engine.streams.get(sid)
        if stream is None:
            raise ApiError(404, "unknown_stream", f"no stream '{sid}'; list them with GET /v1/streams")
        return stream

    def stream_info(self, stream: Stream) -> dict:
        info = stream.info()
        info["peers"] = len(self.peers.get(stream.id, ()))
        info["encoders"] = int(stream.id in self.encoders)
        # a WebRTC listener also waits for a whole Opus packet and the encoder's lookahead
        info["latency_ms"] |= {"packet": 1000 * PACKET_SAMPLES / SAMPLE_RATE,
                               "encoder": round(1000 * ENCODER_DELAY_SAMPLES / SAMPLE_RATE, 1)}
        out = self.outputs.get(stream.id)
        info["device"] = out.info() if out else None
        return info

    def encoder(self, stream: Stream) -> StreamEncoder:
        """The stream's Opus encoder, started for its first WebRTC peer; it ends with its last."""
        encoder = self.encoders.get(stream.id)
        if encoder is None or encoder.closed:
            encoder = self.encoders[stream.id] = StreamEncoder(stream, self.engine, self.encoding)
            encoder.on_close(lambda e: self.encoders.pop(stream.id) if self.encoders.get(stream.id) is e else None)
        return encoder

    async def close_stream(self, stream: Stream) -> None:
        encoder = self.encoders.pop(stream.id, None)
        if encoder:
            encoder.close("stream_deleted", "the stream was deleted")
        for pc in list(self.peers.pop(stream.id, ())):
            await pc.close()
        out = self.outputs.pop(stream.id, None)
        if out:
            await asyncio.get_running_loop().run_in_executor(None, out.close)
        self.engine.delete_stream(stream.id)

    async def shutdown(self) -> None:
        for stream in list(self.engine.streams.values()):
            await self.close_stream(stream)
        self.engine.stop()


async def read_json(request: web.Request) -> dict:
    try:
        body = await request.json()
    except json.JSONDecodeError as e:
        raise ApiError(400, "malformed_json", f"request body is not valid JSON: {e}") from None
    except UnicodeDecodeError:
        raise ApiError(400, "malformed_json", "request body is not UTF-8 JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "malformed_json", "request body must be a JSON object")
    return body


def parse_controls(stream_or_group: Stream | Group, raw: Any) -> dict[str, float]:
    try:
        return validate(stream_or_group.manifest, raw)
    except ControlError as e:
        raise ApiError(422, "invalid_control", str(e)) from None


def model_info(manifest) -> dict:
    info = {"name": manifest.name, "version": manifest.version, "kind": manifest.kind}
    if manifest.kind == "composer":
        info |= {"controls": describe_controls(), "actions": list(ACTIONS), "vocabulary": manifest.vocabulary}
    else:
        info |= {"sample_rate": manifest.sample_rate, "hop": manifest.hop,
                 "controls": [c.__dict__ for c in manifest.controls]}
    return info | {"source": manifest.source, "verification": manifest.verification}


# -- middleware -------------------------------------------------------------------------------------
@web.middleware
async def json_errors(request: web.Request, handler) -> web.StreamResponse:
    daemon: Daemon = request.app["daemon"]
    try:
        if daemon.token and request.path != "/v1/health":
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {daemon.token}".encode()):
                raise ApiError(401, "unauthorized", "send 'Authorization: Bearer <token>' (the daemon's --token)")
        return await handler(request)
    except ApiError as e:
        daemon.errors += 1
        return error_response(e.status, e.code, e.message, e.headers)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        daemon.errors += 1
        if e.status == 413:
            return error_response(413, "body_too_large", f"request bodies are limited to {MAX_BODY_BYTES} bytes")
        return error_response(e.status, HTTP_CODES.get(e.status, "http_error"), e.reason)
    except Exception:
        daemon.errors += 1
        log.exception("unhandled error path=%s", request.path)
        return error_response(500, "internal", "internal error; the daemon log has the details")


# -- handlers ---------------------------------------------------------------------------------------
routes = web.RouteTableDef()


@routes.get("/v1/health")
async def health(request: web.Request) -> web.Response:
    d: Daemon = request.app["daemon"]
    return web.json_response({**d.engine.health(), "uptime_seconds": round(time.time() - d.started, 1),
                              "streams": len(d.engine.streams), "admission": d.engine.admission()})


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    store: ModelStore = request.app["daemon"].store
    entries = await asyncio.get_running_loop().run_in_executor(None, store.latest)
    return web.json_response({"models": [model_info(e.manifest) for e in entries.values()]})


@routes.get("/v1/models/{name}")
async def get_model(request: web.Request) -> web.Response:
    store: ModelStore = request.app["daemon"].store
    try:
        entry = await asyncio.get_running_loop().run_in_executor(None, store.resolve, request.match_info["name"])
    except KeyError as e:
        raise ApiError(404, "unknown_model", str(e.args[0])) from None
    return web.json_response(model_info(entry.manifest) | {"training": entry.manifest.training,
                                                             "shipped": entry.shipped})


@routes.post("/v1/streams")
async def create_stream(request: web.Request) -> web.Response:
    d: Daemon = request.app["daemon"]
    body = await read_json(request)
    name = body.get("model", "default")
    if not isinstance(name, str):
        raise ApiError(422, "invalid_model", "'model' must be a model name (see GET /v1/models)")
    seed = body.get("seed")
    if seed is None:
        seed = secrets.randbits(32)
    elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ApiError(422, "invalid_seed", "'seed' must be an integer in [0, 2^63)")
    if len(d.engine.streams) >= d.max_streams:
        raise ApiError(429, "too_many_streams", f"this daemon runs at most {d.max_streams} streams; delete one first")
    composer_name = body.get("composer")
    if composer_name is not None and not isinstance(composer_name, str):
        raise ApiError(422, "invalid_composer", "'composer' must be a composer model name (see GET /v1/models)")
    group = await d.group(name)
    composer = await d.composer(composer_name) if composer_name is not None else None
    if composer is not None:
        controls = parse_composer_controls(body.get("controls", {}))
    else:
        controls = parse_controls(group, body.get("controls", {}))
    try:
        stream = d.engine.create_stream(group, seed, controls, composer)
    except EngineSaturated as e:
        raise ApiError(503, "engine_saturated", str(e), {"Retry-After": str(e.retry_after)}) from None
    except ModelFailed as e:
        raise ApiError(503, "model_failed", f"{e}; see GET /v1/health (a new version of the model or a daemon "
                                            "restart brings it back)") from None
    log.info("stream created id=%s model=%s composer=%s seed=%s", stream.id, name, composer_name, seed)
    return web.json_response(d.stream_info(stream), status=201)


@routes.get("/v1/streams")
async def list_streams(request: web.Request) -> web.Response:
    d: Daemon = request.app["daemon"]
    return web.json_response({"streams": [d.stream_info(s) for s in list(d.engine.streams.values())]})


@routes.get("/v1/streams/{id}")
async def get_stream(request: web.Request) -> web.Response:
    d: Daemon = request.app["daemon"]
    return web.json_response(d.stream_info(d.stream(request)))


@routes.get("/v1/streams/{id}/notes")
async def stream_notes(request: web.Request) -> web.Response:
    """The notes a composed stream played (the last 2000 at least), oldest first; ?since=N skips the first N
    ever played, so a client can poll for new ones."""
    d: Daemon = request.app["daemon"]
    stream = d.stream(request)
    if stream.voice is None:
        raise ApiError(422, "not_composed", "this stream plays controls, not notes; create it with a 'composer'")
    try:
        since = int(request.query.get("since", "0"))
    except ValueError:
        raise ApiError(422, "invalid_query", "'since' must be a whole number of notes") from None
    count, notes = stream.voice.played(since)
    return web.json_response({"count": count, "notes": [n.to_dict() for n in notes]})


def parse_composer_controls(raw: Any) -> dict[str, Any]:
    try:
        return validate_controls(raw)
    except ControlError as e:
        raise ApiError(422, "invalid_control", str(e)) from None


def apply_patch(stream: Stream, body: Any) -> dict:
    """Controls and (composed streams) an action, from PATCH or the data channel; all checked before any
    is applied. Returns the stream's controls (and now-playing)."""
    voice = stream.voice
    if not isinstance(body, dict) or not ({"controls", "action"} & set(body)) or set(body) - {"controls", "action"}:
        what = '{"controls": {...}} and/or {"action": "play" | "pause" | "reset"}' if voice else '{"controls": {...}}'
        raise ApiError(422, "invalid_patch", f"send {what}")
    action = body.get("action")
    if action is not None and (voice is None or action not in ACTIONS):
        raise ApiError(422, "invalid_action", f"actions {list(ACTIONS)} apply to composed streams"
                                              if voice is None else f"'action' must be one of {list(ACTIONS)}")
    if voice is None:
        stream.set_controls(parse_controls(stream, body["controls"]))
        return {"controls": stream.controls()}
    controls = parse_composer_controls(body.get("controls", {}))
    voice.set(controls)
    if action is not None:
        voice.act(action)
    return {"controls": voice.settings, "now_playing": voice.now_playing()}


@routes.patch("/v1/streams/{id}")
async def patch_stream(request: web.Request) -> web.Response:
    d: Daemon = request.app["daemon"]
    stream = d.stream(request)
    apply_patch(stream, await read_json(request))
    return web.json_response(d.stream_info(stream))


@routes.delete("/v1/streams/{id}")
async def delete_stream(request: web.Request) -> web.Response:
    d: Daemon = request.app["daemon"]
    stream = d.stream(request)
    await d.close_stream(stream)
    return web.json_response({"id": stream.id, "deleted": True})


async def announce(d: Daemon, stream: Stream, channel, period: float = 0.02) -> None:
    """What a listener is told without asking, on its data channel: `now_playing` whenever a composed stream
    starts a note, `stream_failed` once if the stream's model fails, and every TELEMETRY_SECONDS a
    `telemetry` message with the stream's latency parts, fill and underruns."""
    voice, sent, failed, told = stream.voice, -1, False, -math.inf
    while channel.readyState != "closed":
        if channel.readyState == "open":
            if voice is not None and voice.count != sent:
                sent = voice.count
                channel.send(json.dumps({"type": "now_playing", **voice.now_playing()}))
            if stream.failure and not failed:
                failed = True
                channel.send(json.dumps({"type": "stream_failed", "id": stream.id, "reason": stream.failure}))
            if time.monotonic() - told >= TELEMETRY_SECONDS:
                told = time.monotonic()
                info = d.stream_info(stream)
                channel.send(json.dumps({"type": "telemetry", **{k: info[k] for k in TELEMETRY_KEYS}}))
        await asyncio.sleep(period)


@routes.post("/v1/streams/{id}/webrtc")
async def webrtc_offer(request: web.Request) -> web.Response:
    d: Daemon = request.app["daemon"]
    stream = d.stream(request)
    body = await read_json(request)
    if body.get("type") != "offer" or not isinstance(body.get("sdp"), str):
        raise ApiError(400, "malformed_offer", 'send {"type": "offer", "sdp": "<SDP text>"}')
    peers = d.peers.setdefault(stream.id, set())
    if len(peers) >= d.max_peers_per_stream:
        raise ApiError(429, "too_many_peers", f"a stream takes at most {d.max_peers_per_stream} WebRTC peers")
    if stream.id not in d.encoders and d.encoding.load > d.encode_budget:
        raise ApiError(503, "encoder_saturated", f"the Opus encoding thread is {100 * d.encoding.load:.0f} % busy "
                       f"(limit {100 * d.encode_budget:.0f} %): another stream's encoder would make every WebRTC "
                       "stream late; join a stream that already has listeners or retry later",
                       {"Retry-After": str(RETRY_AFTER_SECONDS)})
    try:
        track = d.encoder(stream).track()  # the stream's one Opus encoder; this peer gets its packets
    except ValueError as e:
        raise ApiError(422, "unsupported_model", str(e)) from None
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    peers.add(pc)

    tasks: set[asyncio.Task] = set()
    channels: list = []
    closing = False

    async def close(reason: dict | None = None) -> None:
        nonlocal closing
        if closing:
            return
        closing = True
        track.stop()
        peers.discard(pc)
        for task in tasks:
            task.cancel()
        if reason is not None:  # the encoder ended (failed, or the stream went): say why before hanging up
            log.warning("closing peer stream=%s: %s", stream.id, reason["message"])
            open_ = [ch for ch in channels if ch.readyState == "open"]
            for channel in open_:
                channel.send(json.dumps({"type": "error", "error": reason}))
            if open_:
                await asyncio.sleep(0.1)  # let SCTP send it
        await pc.close()

    @track.on("ended")
    def on_ended() -> None:
        if track.ended is not None:
            asyncio.ensure_future(close(track.ended))

    @pc.on("connectionstatechange")
    async def on_state() -> None:
        log.info("peer stream=%s state=%s", stream.id, pc.connectionState)
        if pc.connectionState in ("failed", "closed"):
            await close()

    @pc.on("datachannel")
    def on_channel(channel) -> None:
        if channel.label != "controls":
            return
        channels.append(channel)
        tasks.add(asyncio.ensure_future(announce(d, stream, channel)))

        @channel.on("message")
        def on_message(message: str | bytes) -> None:
            try:
                body = json.loads(message)
                reply = {"type": "controls", **apply_patch(stream, body)}
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                reply = {"type": "error", "error": {"code": "malformed_json", "message": str(e)}}
            except ApiError as e:
                reply = {"type": "error", "error": {"code": e.code, "message": e.message}}
            channel.send(json.dumps(reply))

    try:
        pc.addTrack(track)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=body["sdp"], type="offer"))
        await pc.setLocalDescription(await pc.createAnswer())
    except Exception as e:  # aiortc raises ValueError and others for SDP it cannot use
        await close()
        raise ApiError(400, "malformed_sdp", f"cannot answer this offer: {e}") from None
    return web.json_response({"sdp": pc.localDescription.sdp, "type": pc.localDescription.type})


@routes.post("/v1/streams/{id}/device")
async def start_device(request: web.Request) -> web.Response:
    d: Daemon = request.app["daemon"]
    stream = d.stream(request)
    body = await read_json(request)
    device = body.get("device")
    if device is not None and (isinstance(device, bool) or not isinstance(device, int | str)):
        raise ApiError(422, "invalid_device", "'device' must be an output index or name (see 'wavecast devices')")
    if stream.id in d.outputs:
        raise ApiError(409, "device_in_use", "this stream already plays on a device; DELETE it first")
    loop = asyncio.get_running_loop()
    try:
        out = await loop.run_in_executor(None, DeviceOutput, stream, d.engine, device)
    except DeviceError as e:
        raise ApiError(404, "unknown_device", str(e)) from None
    if stream.id not in d.engine.streams:  # deleted while the device opened
        await loop.run_in_executor(None, out.close)
        raise ApiError(404, "unknown_stream", "the stream was deleted meanwhile")
    d.outputs[stream.id] = out
    return web.json_response({"stream": stream.id, "device": out.info()}, status=201)


@routes.delete("/v1/streams/{id}/device")
async def stop_device(request: web.Request) -> web.Response:
    d: Daemon = request.app["daemon"]
    stream = d.stream(request)
    out = d.outputs.pop(stream.id, None)
    if out is None:
        raise ApiError(404, "no_device", "this stream plays on no device")
    await asyncio.get_running_loop().run_in_executor(None, out.close)
    return web.json_response({"stream": stream.id, "device": None})


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    d: Daemon = request.app["daemon"]
    st = d.engine.stats
    streams = list(d.engine.streams.values())
    lines = [
        ("wavecast_streams", "gauge", "streams that exist", len(streams)),
        ("wavecast_listeners", "gauge", "readers (WebRTC tracks, devices) across streams",
         sum(len(s.readers) for s in streams)),
        ("wavecast_peers", "gauge", "WebRTC peer connections", sum(len(p) for p in d.peers.values())),
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
        ("wavecast_http_errors_total", "counter", "requests answered with an error", d.errors),
        ("wavecast_streams_refused_total", "counter", "streams refused by admission control", st.refused),
        ("wavecast_stream_failures_total", "counter", "streams failed by a fault of their model", st.stream_failures),
        ("wavecast_nonfinite_frames_total", "counter", "stream-frames silenced: the model made NaN or inf",
         st.nonfinite_frames),
        ("wavecast_guarded_frames_total", "counter", "stream-frames the output guard clipped or silenced",
         sum(g.guarded_frames for g in list(d.engine.groups.values()))),
        ("wavecast_models_failed", "gauge", "models and composers quarantined after a fault", len(st.failures)),
        ("wavecast_engine_predicted_tick_seconds", "gauge", "tick time admission control predicts for the streams",
         d.engine.predicted_seconds()),
        ("wavecast_engine_last_tick_seconds", "gauge", "time the last tick took", st.last_tick_seconds),
    ]
    text = []
    for name, kind, help_, value in lines:
        value = float(value)
        text += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value if math.isfinite(value) else 0}"]
    text.append("# TYPE wavecast_model_loaded gauge")
    for (name, version), group in list(d.engine.groups.items()):  # a model may be loading meanwhile
        provider = group.model.providers[0]
        text.append(f'wavecast_model_loaded{{name="{name}",version="{version}",provider="{provider}"}} 1')
    for name, version in list(d.engine.composers):
        text.append(f'wavecast_model_loaded{{name="{name}",version="{version}",provider="CPUExecutionProvider"}} 1')
    return web.Response(text="\n".join(text) + "\n", content_type="text/plain", charset="utf-8")


def not_yet(message: str):
    async def handler(request: web.Request) -> web.Response:
        raise ApiError(501, "not_implemented", message)

    return handler


def make_app(daemon: Daemon) -> web.Application:
    app = web.Application(middlewares=[json_errors], client_max_size=MAX_BODY_BYTES)
    app["daemon"] = daemon
    app.add_routes(routes)
    jobs = not_yet("training jobs over HTTP are not available yet; run 'wavecast train instrument' instead")
    app.router.add_route("*", "/v1/jobs", jobs)
    app.router.add_route("*", "/v1/jobs/{id}", jobs)
    app.router.add_get("/overlay", not_yet("the overlay page is not available yet"))

    async def on_cleanup(app: web.Application) -> None:
        await daemon.shutdown()

    app.on_cleanup.append(on_cleanup)
    return app
