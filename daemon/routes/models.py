"""Models: what can play (instruments and composers), with their controls, provenance and verification; each
model's versions, which one is current, rollback and delete, and each version's training log and loss curve."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from aiohttp import web

from wavecast.daemon.api import ApiError, route
from wavecast.daemon.service import Daemon
from wavecast.models.store import (
    EXTRAS,
    MAX_VERSION,
    VERSION,
    Entry,
    ModelStore,
    UnknownVersion,
    VersionRefused,
    real_file,
    shown,
)
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


@route("GET", "/v1/models/{name}", "A model (NAME, or NAME@VERSION for that version): controls, provenance, "
       "verification, training, links to its versions and its training log and curve",
       returns=MODEL, errors={404: "no model has that name, or no such version"})
async def get_model(request: web.Request) -> web.Response:
    store: ModelStore = request.app["daemon"].store
    entry, files = await off_loop(lambda: with_files(store.resolve(request.match_info["name"])))
    m = entry.manifest
    return web.json_response(model_info(m) | {"training": m.training, "shipped": entry.shipped, "links": {
        "versions": f"/v1/models/{m.name}/versions", **file_links(m.name, m.version, files)}})


# -- versions ---------------------------------------------------------------------------------------
MEDIA = {"training.json": "application/json", "curve.png": "image/png"}
LINKS = {"training.json": "training_log", "curve.png": "curve"}
VERSION_INFO = {
    "type": "object", "required": ["version", "kind", "current", "shipped", "training", "files", "links"],
    "properties": {"version": {"type": "integer"}, "kind": {"enum": ["instrument", "composer"]},
                   "current": {"type": "boolean", "description": "the version that plays by name"},
                   "shipped": {"type": "boolean"},
                   "training": {"type": "object", "description": "command, steps, seconds, final_loss, heldout_loss"},
                   "files": {"type": "array", "items": {"enum": list(EXTRAS)}},
                   "links": {"type": "object", "description": "curve and training_log, where the version has them"}},
}
VERSIONS = {"type": "object", "required": ["name", "current", "versions"],
            "properties": {"name": {"type": "string"}, "current": {"type": "integer"},
                           "versions": {"type": "array", "items": VERSION_INFO}}}
ROLLBACK = {
    "type": "object", "additionalProperties": False,
    "properties": {"version": {"type": "integer", "minimum": 1, "maximum": MAX_VERSION,
                               "description": "the version to make current; omitted ({}): the one before the "
                                              "current one"}},
}
ROLLED = {"type": "object", "required": ["name", "version", "previous"],
          "properties": {"name": {"type": "string"}, "version": {"type": "integer", "description": "now current"},
                         "previous": {"type": "integer", "description": "current before"}}}
DELETED = {"type": "object", "required": ["name", "version", "deleted"],
           "properties": {"name": {"type": "string"}, "version": {"type": "integer"}, "deleted": {"const": True}}}


async def off_loop(work: Callable[[], Any]) -> Any:
    """Run store work (file reads, renames) in the executor; the store's refusals become API errors."""
    try:
        return await asyncio.get_running_loop().run_in_executor(None, work)
    except UnknownVersion as e:
        raise ApiError(404, "unknown_version", f"{e.args[0]}; GET /v1/models/NAME/versions lists them") from None
    except KeyError as e:
        raise ApiError(404, "unknown_model", str(e.args[0])) from None
    except VersionRefused as e:
        raise ApiError(409, e.code, e.message) from None


def with_files(entry: Entry) -> tuple[Entry, list[str]]:
    return entry, [f for f in EXTRAS if real_file(entry.directory / f)]


def file_links(name: str, version: int, files: list[str]) -> dict[str, str]:
    return {LINKS[f]: f"/v1/models/{name}/versions/{version}/{f}" for f in files}


def version_param(request: web.Request) -> int:
    """The {version} of the path: a whole number from 1 (a 404 otherwise, as for a version that is not there)."""
    text = request.match_info["version"]
    if not (VERSION.fullmatch(text) and len(text) <= 9 and int(text) >= 1):
        raise ApiError(404, "unknown_version", f"{shown(text)} is not a version: versions are whole numbers from 1; "
                       f"GET /v1/models/NAME/versions lists them")
    return int(text)


@route("GET", "/v1/models/{name}/versions", "Every version of a model, shipped or trained, and which one is current",
       returns=VERSIONS, errors={404: "no model has that name"})
async def list_versions(request: web.Request) -> web.Response:
    store: ModelStore = request.app["daemon"].store
    name = request.match_info["name"]
    versions = await off_loop(lambda: store.versions(name))
    listed = [v.summary() for v in versions]
    return web.json_response({
        "name": name, "current": next(v.entry.manifest.version for v in versions if v.current),
        "versions": [s | {"links": file_links(name, s["version"], s["files"])} for s in listed]})


@route("POST", "/v1/models/{name}/rollback", "Make an earlier version current again (new streams of the name "
       "play it)", body=ROLLBACK, returns=ROLLED,
       errors={404: "no model has that name, or no such version", 409: "no version is older than the current one"})
async def rollback(request: web.Request, body: dict) -> web.Response:
    store: ModelStore = request.app["daemon"].store
    name = request.match_info["name"]

    def roll() -> tuple[int, int]:
        previous = store.resolve(name).manifest.version
        return store.rollback(name, body.get("version")).manifest.version, previous

    version, previous = await off_loop(roll)
    return web.json_response({"name": name, "version": version, "previous": previous})


def streams_of(d: Daemon, name: str, version: int) -> list[str]:
    """The ids of the streams that play version `version` of `name`, as their instrument or their composer."""
    ids = []
    for s in list(d.engine.streams.values()):
        models = [s.manifest, s.voice.group.manifest] if s.voice else [s.manifest]
        if any((m.name, m.version) == (name, version) for m in models):
            ids.append(s.id)
    return ids


@route("DELETE", "/v1/models/{name}/versions/{version}", "Delete a trained version that no stream plays and that "
       "is not current", returns=DELETED,
       errors={404: "no model has that name, or no such version",
               409: "the version is current, shipped, or played by a stream (the message says what to do)"})
async def delete_version(request: web.Request) -> web.Response:
    d: Daemon = request.app["daemon"]
    name, version = request.match_info["name"], version_param(request)
    playing = streams_of(d, name, version)
    if playing:
        raise ApiError(409, "version_in_use", f"version {version} of '{name}' is playing in {len(playing)} "
                       f"stream(s) ({', '.join(playing[:5])}{', ...' if len(playing) > 5 else ''}); end them "
                       "(DELETE /v1/streams/ID), then delete it")
    await off_loop(lambda: d.store.delete(name, version))
    return web.json_response({"name": name, "version": version, "deleted": True})


async def version_file(request: web.Request, file: str) -> web.Response:
    store: ModelStore = request.app["daemon"].store
    name, version = request.match_info["name"], version_param(request)

    def read() -> bytes | None:
        directory = store.resolve(f"{name}@{version}").directory
        return (directory / file).read_bytes() if real_file(directory / file) else None

    body = await off_loop(read)
    if body is None:
        raise ApiError(404, "no_training_record", f"version {version} of '{name}' has no {file}: it was trained before "
                       "wavecast kept training logs and curves, or published without them")
    return web.Response(body=body, content_type=MEDIA[file])


@route("GET", "/v1/models/{name}/versions/{version}/curve.png", "A version's training loss curve",
       returns={"type": "string", "format": "binary"}, content_type="image/png",
       errors={404: "no such model or version, or it has no curve (trained before curves were kept)"})
async def training_curve(request: web.Request) -> web.Response:
    return await version_file(request, "curve.png")


@route("GET", "/v1/models/{name}/versions/{version}/training.json", "A version's training log: the loss of every "
       "step, timings, the run's settings", returns={"type": "object", "required": ["loss", "settings", "timings"]},
       errors={404: "no such model or version, or it has no log (trained before logs were kept)"})
async def training_log(request: web.Request) -> web.Response:
    return await version_file(request, "training.json")
