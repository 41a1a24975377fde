"""The browser pages: `/overlay` (an OBS browser source that plays a stream and shows it) and `/dock` (its
control panel), and the scripts and style they load from `/static/`.

The pages are public (answered without the token): an OBS browser source cannot send headers, so a page takes
the token from its `token=` query parameter and sends it with each API call it makes. Every file is served
from daemon/static by a route of its own, made from a fixed list, so no request can name another file; each
answer carries a Content-Security-Policy that allows this daemon's own scripts, styles and connections only
(no inline script, nothing from another host) and `Cache-Control: no-cache`, so an upgraded daemon's pages
are never mixed with a cached old script.

One exception to "connections to this daemon only": an overlay that plays a Janus mountpoint
(`/overlay?janus=http://HOST:8088/janus&mountpoint=N`) must talk to that Janus, so its page's policy also allows
connections to the origin of the `janus` URL it was opened with, and to no other. That origin is the one the page
is told to use anyway, so allowing it per request lets nothing else in; a daemon-wide setting would have to be
kept in step with every overlay URL by hand.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import web

from wavecast.daemon.api import route

STATIC = Path(__file__).resolve().parent.parent / "static"
# 'self' covers fetch() to this daemon; media-src blob: and mediastream: for the <audio> playing the WebRTC
# stream; img-src data: for the canvas; frame-ancestors is left open so a dock can be embedded.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "media-src 'self' blob: mediastream:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
       "form-action 'none'")
HEADERS = {"Content-Security-Policy": CSP, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "no-referrer"}
TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
SCRIPTS = ("client.js", "overlay.js", "dock.js", "janus.js", "wavecast.css")  # what /static/ serves, and nothing else
# A host as it may stand in a CSP source: a name or IPv4 address, or an IPv6 address in brackets.
HOST = re.compile(r"[a-z0-9.-]+|\[[0-9a-f:.]+\]")


def janus_origin(url: str) -> str | None:
    """`scheme://host:port` of an http(s) URL, or None for anything else (the page then reports the URL)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    host = parts.hostname or ""  # lower-case, an IPv6 address without its brackets
    host = f"[{host}]" if ":" in host else host
    if parts.scheme not in ("http", "https") or parts.username is not None or not HOST.fullmatch(host):
        return None
    return f"{parts.scheme}://{host}" + (f":{port}" if port else "")


def overlay_headers(request: web.Request) -> dict[str, str]:
    """The overlay's headers: with `?janus=URL`, its policy also allows connections to that URL's origin."""
    origin = janus_origin(request.query.get("janus", ""))
    if origin is None:
        return HEADERS
    return {**HEADERS, "Content-Security-Policy": CSP.replace("connect-src 'self'", f"connect-src 'self' {origin}")}


def page_route(path: str, filename: str, summary: str,
               headers: Callable[[web.Request], dict[str, str]] = lambda _: HEADERS) -> None:
    """Register `GET path` answering daemon/static/filename (read at each request: a few KiB) with `headers`."""
    content_type = TYPES[Path(filename).suffix]

    async def serve_file(request: web.Request) -> web.Response:
        return web.Response(body=(STATIC / filename).read_bytes(), content_type=content_type, charset="utf-8",
                            headers=headers(request))

    # a unique name per route: the OpenAPI document makes its operationId from it
    serve_file.__name__ = serve_file.__qualname__ = "page_" + filename.replace(".", "_")
    route("GET", path, summary, returns={"type": "string"}, content_type=content_type, public=True)(serve_file)


page_route("/overlay", "overlay.html", "The overlay page: an OBS browser source that plays a stream and shows it "
           "(query: stream or name, model, composer, seed, controls, theme; token when the daemon has one; or "
           "janus and mountpoint to play a Janus Streaming mountpoint)", overlay_headers)
page_route("/dock", "dock.html", "The dock page: controls and events for the overlay's stream (query: stream or "
           "name; token when the daemon has one)")
for _name in SCRIPTS:
    page_route(f"/static/{_name}", _name, f"{_name}, loaded by the overlay and dock pages")
