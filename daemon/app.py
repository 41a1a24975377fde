"""The HTTP API (v1) assembled: the routes of `daemon/routes/`, the guard, and the OpenAPI document.

Errors are JSON, ``{"error": {"code", "message"}}``, with a 4xx/5xx status; a bad request never touches
the streams that are playing.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version

from aiohttp import web

from wavecast.daemon.api import MAX_BODY_BYTES, ROUTES, adapt, guard_middleware
from wavecast.daemon.routes import (  # noqa: F401  (they register routes)
    detect,
    devices,
    events,
    health,
    jobs,
    migrate,
    models,
    pages,
    publish,
    streams,
    webrtc,
)
from wavecast.daemon.service import Daemon


def wavecast_version() -> str:
    try:
        return package_version("wavecast")
    except PackageNotFoundError:
        return "0+unknown"


def make_app(daemon: Daemon) -> web.Application:
    def count_error() -> None:
        daemon.errors += 1

    public = frozenset(r.path for r in ROUTES if r.public)
    app = web.Application(middlewares=[guard_middleware(daemon.guard, public, count_error)],
                          client_max_size=MAX_BODY_BYTES)
    app["daemon"] = daemon
    app["openapi"] = health.openapi(wavecast_version())
    for r in ROUTES:
        app.router.add_route(r.method, r.path, adapt(r))

    async def on_cleanup(app: web.Application) -> None:
        await daemon.shutdown()

    app.on_cleanup.append(on_cleanup)
    return app
