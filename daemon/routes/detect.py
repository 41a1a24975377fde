"""Watermark detection: is an audio file marked by this daemon's key, and what carries the mark?

The file is the raw body (audio/* or application/octet-stream, never a form or JSON: see daemon/api.py on
why that keeps cross-site pages out). Decoding and detection take a core for a second or two per file, so they
run in the daemon's detector process (`Daemon.detector`), DETECTIONS accepted at once; a daemon busy detecting
answers 503 before it reads the body.
"""

from __future__ import annotations

import asyncio
from concurrent.futures.process import BrokenProcessPool

from aiohttp import web

from wavecast.daemon.api import ApiError, Upload, read_upload, route
from wavecast.daemon.marks import KeyFileError, Unreadable, examine, load_key
from wavecast.daemon.service import Daemon
from wavecast.streaming.watermark import Key

UPLOAD = Upload(("audio/*", "application/octet-stream"), 16 * 1024 * 1024,
                "an audio file PyAV reads (WAV, FLAC, Ogg/Opus, WebM, ...), at least 2 s long, at most 16 MiB")
DETECTION = {
    "type": "object", "required": ["marked", "confidence", "payload", "ranges", "score", "source"],
    "properties": {
        "marked": {"type": "boolean"},
        "confidence": {"type": "number", "description": "that the file is marked: 1 - the chance that unmarked "
                                                           "audio scores this high; 0 when not marked"},
        "payload": {"type": ["string", "null"], "description": "'kkkk-ssss': the key's id and the serial, in hex"},
        "ranges": {"type": "array", "items": {"type": "array", "items": {"type": "number"}},
                   "description": "[start, end] seconds of the file where the mark is found"},
        "score": {"type": "number", "description": "the detector's z-score; a mark scores 7 or more"},
        "source": {"type": ["object", "null"], "description": "the registry's record of the payload: what was "
                                                              "marked with it (kind stream or render, model, "
                                                              "version, composer, seed, when)"},
    },
}


@route("POST", "/v1/detect", "Is this audio marked by this daemon's watermark key, and by which stream or render?",
       returns=DETECTION, upload=UPLOAD, errors={
           400: "an empty body", 409: "this daemon has no watermark key", 413: "the file is larger than 16 MiB",
           415: "the body is not sent as audio/* or application/octet-stream",
           422: "the file is not audio PyAV reads, or shorter than 2 s",
           500: "the detector process died on the file (the streams play on)",
           503: "the daemon is busy detecting (Retry-After)"})
async def detect(request: web.Request) -> web.Response:
    d: Daemon = request.app["daemon"]
    if d.detections.locked():
        raise ApiError(503, "detector_busy", "the daemon is detecting in other files already; retry in a second",
                       {"Retry-After": "1"})
    async with d.detections:
        audio = await read_upload(request, UPLOAD)
        loop = asyncio.get_running_loop()
        keys = await loop.run_in_executor(None, _keys, d)
        try:
            result = await loop.run_in_executor(d.detector(), examine, audio, keys, d.marks)
        except Unreadable as e:
            raise ApiError(422, "unreadable_audio", str(e)) from None
        except BrokenProcessPool:  # the detector process died (killed, out of memory, a decoder crash)
            d.detector(restart=True)
            raise ApiError(500, "detector_failed", "the detector process died on this file; the streams are "
                           "unaffected. Try again, or check the file with 'wavecast detect FILE'") from None
    return web.json_response(result)


def _keys(d: Daemon) -> list[Key]:
    """The key the daemon marks with, or (--watermark off) the one in its data directory from earlier runs."""
    if d.engine.watermark is not None:
        return [d.engine.watermark]
    try:
        key = load_key(d.marks.directory, create=False)
    except KeyFileError as e:
        raise ApiError(409, "no_watermark_key", str(e)) from None
    if key is None:
        raise ApiError(409, "no_watermark_key", f"this daemon has no watermark key (none in {d.marks.directory}): "
                       "it never marked anything. Detect on the machine whose daemon marked the audio, or with "
                       "'wavecast detect --key FILE'")
    return [key]
