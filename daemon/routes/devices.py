"""Device outputs: play a stream on a local sound card (PortAudio), and stop."""

from __future__ import annotations

import asyncio

from aiohttp import web

from wavecast.daemon.api import ApiError, route
from wavecast.daemon.device import DeviceError, DeviceOutput
from wavecast.daemon.service import Daemon

START = {
    "type": "object", "additionalProperties": False,
    "properties": {"device": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 4096},
                                        {"type": "string", "minLength": 1, "maxLength": 200}],
                              "description": "an output's index or name ('wavecast devices' lists them); the "
                                             "system's default output when omitted"}},
}
PLAYING = {"type": "object", "required": ["stream", "device"],
           "properties": {"stream": {"type": "string"}, "device": {"type": ["object", "null"]}}}


@route("POST", "/v1/streams/{id}/device", "Play the stream on a sound device", body=START, returns=PLAYING,
       status=201, errors={404: "no such stream or device", 409: "the stream already plays on a device",
                           429: "as many devices play as --max-devices allows"})
async def start_device(request: web.Request, body: dict) -> web.Response:
    d: Daemon = request.app["daemon"]
    stream = d.stream(request)
    if stream.id in d.outputs:
        raise ApiError(409, "device_in_use", "this stream already plays on a device; DELETE it first")
    if len(d.outputs) >= d.limits.max_devices:
        raise ApiError(429, "too_many_devices", f"at most {d.limits.max_devices} streams play on devices at once "
                       "(--max-devices); stop one first")
    loop = asyncio.get_running_loop()
    try:
        out = await loop.run_in_executor(None, DeviceOutput, stream, d.engine, body.get("device"))
    except DeviceError as e:
        raise ApiError(404, "unknown_device", str(e)) from None
    if stream.id not in d.engine.streams or stream.id in d.outputs:  # deleted, or another opened, meanwhile
        await loop.run_in_executor(None, out.close)
        raise ApiError(409, "device_in_use", "the stream was deleted or given a device meanwhile")
    d.outputs[stream.id] = out
    return web.json_response({"stream": stream.id, "device": out.info()}, status=201)


@route("DELETE", "/v1/streams/{id}/device", "Stop playing the stream on its device", returns=PLAYING,
       errors={404: "no such stream, or it plays on no device"})
async def stop_device(request: web.Request) -> web.Response:
    d: Daemon = request.app["daemon"]
    stream = d.stream(request)
    out = d.outputs.pop(stream.id, None)
    if out is None:
        raise ApiError(404, "no_device", "this stream plays on no device")
    await asyncio.get_running_loop().run_in_executor(None, out.close)
    return web.json_response({"stream": stream.id, "device": None})
