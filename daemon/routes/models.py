"""Models: what can play (instruments and composers), with their controls, provenance and verification."""

from __future__ import annotations

import asyncio

from aiohttp import web

from wavecast.daemon.api import ApiError, route
from wavecast.models.store import ModelStore
from wavecast.streaming.composer import ACTIONS, describe_controls

MODEL = {
    "type": "object", "required": ["name", "version", "kind", "controls"],
    "properties": {"name": {"type": "string"}, "version": {"type": "integer"},
                   "kind": {"enum": ["instrument", "composer"]},
                   "controls": {"type": "array", "items": {"type": "object", "required": ["name", "default"]}},
                   "actions": {"type": "array"}, "sample_rate": {"type": "integer"}, "hop": {"type": "integer"}},
}


def model_info(manifest) -> dict:
    info = {"name": manifest.name, "version": manifest.version, "kind": manifest.kind}
    if manifest.kind == "composer":
        info |= {"controls": describe_controls(), "actions": list(ACTIONS), "vocabulary": manifest.vocabulary}
    else:
        info |= {"sample_rate": manifest.sample_rate, "hop": manifest.hop,
                 "controls": [c.__dict__ for c in manifest.controls]}
    return info | {"source": manifest.source, "verification": manifest.verification}


@route("GET", "/v1/models", "The newest version of every model",
       returns={"type": "object", "required": ["models"], "properties": {"models": {"type": "array",
                                                                                    "items": MODEL}}})
async def list_models(request: web.Request) -> web.Response:
    store: ModelStore = request.app["daemon"].store
    entries = await asyncio.get_running_loop().run_in_executor(None, store.latest)
    return web.json_response({"models": [model_info(e.manifest) for e in entries.values()]})


@route("GET", "/v1/models/{name}", "A model: controls, provenance, verification, training",
       returns=MODEL, errors={404: "no model has that name"})
async def get_model(request: web.Request) -> web.Response:
    store: ModelStore = request.app["daemon"].store
    try:
        entry = await asyncio.get_running_loop().run_in_executor(None, store.resolve, request.match_info["name"])
    except KeyError as e:
        raise ApiError(404, "unknown_model", str(e.args[0])) from None
    return web.json_response(model_info(entry.manifest) | {"training": entry.manifest.training,
                                                             "shipped": entry.shipped})
