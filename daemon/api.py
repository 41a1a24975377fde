"""What every route shares: JSON errors, the route table (each route with its body, query and response
schemas, from which `GET /v1/openapi.json` is made), the request guard and per-client rate limits.

The guard makes the API safe to run next to a browser: a page on another site can neither read nor drive it.
- `Host` must name this daemon (loopback names, the bound address, `--allow-host` names; any IP literal when
  bound to all interfaces), so a DNS-rebinding page (evil.example resolving to 127.0.0.1) is refused.
- `Origin`, where a browser sends one, must be the daemon's own or one given with `--allow-origin`; only
  those get CORS headers.
- A body is parsed only when it comes as `Content-Type: application/json`, which a cross-site form or a
  `text/plain` fetch cannot send without a CORS preflight. A route that takes a file (an `Upload`, e.g. audio
  to detect a watermark in) takes it only with an explicit Content-Type of its own (audio/*,
  application/octet-stream), none of which a form can send or a fetch can send without a preflight.
- With a token (always when bound off loopback), every route but `/v1/health` needs `Authorization: Bearer`.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from yarl import URL

from wavecast.daemon.schema import MAX_DIGITS, Invalid, check, parse_json

log = logging.getLogger("wavecast.api")
MAX_BODY_BYTES = 256 * 1024  # an SDP offer is a few KiB
JSON = "application/json"

ERROR = {
    "type": "object", "required": ["error"], "additionalProperties": False,
    "properties": {"error": {
        "type": "object", "required": ["code", "message"],
        "properties": {"code": {"type": "string", "description": "stable, for programs"},
                       "message": {"type": "string", "description": "for people: what is wrong, what to do"}},
    }},
}
HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
              405: "method_not_allowed", 413: "body_too_large", 415: "unsupported_media_type"}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status, headers=headers)


# -- the route table --------------------------------------------------------------------------------
Handler = Callable[..., Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Upload:
    """A route's raw (not JSON) body: a file of one of `types` ('audio/*': any audio type) of at most
    `max_bytes`. The handler reads it with `read_upload` when it is ready to (after taking a slot, say)."""

    types: tuple[str, ...]
    max_bytes: int
    description: str


@dataclass(frozen=True)
class Route:
    """One route: its handler and everything the OpenAPI document says of it."""

    method: str
    path: str
    summary: str
    handler: Handler
    returns: dict  # schema of the success response
    status: int = 200
    body: dict | None = None  # schema of the JSON body; the handler gets it checked
    query: dict[str, dict] = field(default_factory=dict)  # name -> schema of each query parameter
    errors: dict[int, str] = field(default_factory=dict)  # status -> when, besides the ones every route has
    content_type: str = JSON
    public: bool = False  # answered without the token (health only)
    upload: Upload | None = None  # a raw body the handler reads itself


ROUTES: list[Route] = []


def route(method: str, path: str, summary: str, *, returns: dict, status: int = 200, body: dict | None = None,
          query: dict[str, dict] | None = None, errors: dict[int, str] | None = None, content_type: str = JSON,
          public: bool = False, upload: Upload | None = None) -> Callable[[Handler], Handler]:
    """Register a handler with its schemas. A handler with a `body` schema is called as
    `handler(request, body)` with the body already parsed and checked; others as `handler(request)`."""

    def register(handler: Handler) -> Handler:
        ROUTES.append(Route(method, path, summary, handler, returns, status, body, query or {}, errors or {},
                            content_type, public, upload))
        return handler

    return register


def adapt(r: Route) -> Handler:
    """The aiohttp handler for `r`: reads and checks its body first, if it takes one."""
    if r.body is None:
        return r.handler

    async def handle(request: web.Request) -> web.StreamResponse:
        return await r.handler(request, await read_body(request, r.body))

    return handle


async def read_body(request: web.Request, schema: dict) -> Any:
    if request.content_type != JSON:
        raise ApiError(415, "unsupported_media_type",
                       f"send the body as JSON with the header 'Content-Type: {JSON}'")
    if (request.content_length or 0) > MAX_BODY_BYTES:
        raise ApiError(413, "body_too_large", f"request bodies are limited to {MAX_BODY_BYTES} bytes")
    raw = await request.read()  # aiohttp stops at client_max_size with 413
    if not raw.strip():
        raise ApiError(400, "malformed_json", "the body is empty; send a JSON object ({} takes every default)")
    try:
        return check(schema, parse_json(raw))
    except Invalid as e:
        raise ApiError(e.status, e.code, e.message) from None


async def read_upload(request: web.Request, upload: Upload) -> bytes:
    """The raw body of an `Upload` route, checked: an explicit Content-Type of the upload's (aiohttp reports a
    missing one as application/octet-stream, which a cross-site fetch could then send without a preflight), and
    at most `upload.max_bytes` (read in chunks past the JSON routes' MAX_BODY_BYTES)."""
    given = request.content_type if "Content-Type" in request.headers else None
    if not any(given == t or (t.endswith("/*") and (given or "").startswith(t[:-1])) for t in upload.types):
        raise ApiError(415, "unsupported_media_type", f"send the file as the raw body with a 'Content-Type' of "
                       f"{' or '.join(upload.types)} (e.g. audio/ogg), not {given or 'none'}")
    too_large = ApiError(413, "body_too_large", f"the file is limited to {upload.max_bytes} bytes")
    if (request.content_length or 0) > upload.max_bytes:
        raise too_large
    raw = bytearray()
    async for chunk in request.content.iter_chunked(1 << 16):
        raw += chunk
        if len(raw) > upload.max_bytes:
            raise too_large
    if not raw:
        raise ApiError(400, "empty_body", f"the body is empty; send the file itself ({upload.description})")
    return bytes(raw)


def query_value(request: web.Request, name: str, schema: dict) -> Any:
    """A query parameter, checked against its schema (integers parsed first); its default when absent."""
    text = request.query.get(name)
    if text is None:
        return schema.get("default")
    value: Any = text
    if schema.get("type") == "integer":
        if not re.fullmatch(rf"-?[0-9]{{1,{MAX_DIGITS}}}", text):  # int() would also take ' 1', '1_0' and '١'
            raise ApiError(422, "invalid_query", f"query parameter '{name}' must be a whole number, e.g. {name}=0")
        value = int(text)
    try:
        return check(schema, value, name)
    except Invalid as e:
        raise ApiError(422, "invalid_query", f"query parameter {e.message}") from None


# -- rate limits ------------------------------------------------------------------------------------
class RateLimit:
    """A token bucket per client: `rate` a second, bursts of `burst`. Buckets that have refilled are dropped
    when the table grows, so a stream of new clients costs no memory for long."""

    MAX_CLIENTS = 10_000

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, when)
        self.refused = 0

    def take(self, client: str) -> float:
        """0 when `client` may go on now, else the seconds until it may."""
        now = time.monotonic()
        tokens, when = self.buckets.get(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - when) * self.rate)
        if tokens < 1:
            self.refused += 1
            self.buckets[client] = (tokens, now)
            return (1 - tokens) / self.rate
        self.buckets[client] = (tokens - 1, now)
        if len(self.buckets) > self.MAX_CLIENTS:
            full = [c for c, (t, w) in self.buckets.items() if t + (now - w) * self.rate >= self.burst]
            for c in full:
                del self.buckets[c]
        return 0.0

    def check(self, client: str, what: str) -> None:
        wait = self.take(client)
        if wait:
            raise ApiError(429, "rate_limited", f"too many {what}: at most {self.rate:g} a second "
                           f"(bursts of {self.burst}) per client; retry in {math.ceil(wait)} s",
                           {"Retry-After": str(math.ceil(wait))})


# -- the guard --------------------------------------------------------------------------------------
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


@dataclass(frozen=True)
class Guard:
    """Who may talk to the daemon: which Host names, which Origins, which token."""

    bound: str = "127.0.0.1"  # the --host the daemon listens on
    hosts: frozenset[str] = frozenset()  # --allow-host
    origins: frozenset[str] = frozenset()  # --allow-origin, as scheme://host[:port]
    token: str | None = None

    def host_ok(self, host: str | None) -> bool:
        if host is None:
            return True  # HTTP/1.0 without Host: no browser sends that
        if host in LOOPBACK_NAMES or host == self.bound or host in self.hosts:
            return True
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        return ip.is_loopback or self.bound in ("0.0.0.0", "::", "")  # an IP literal cannot be rebound

    def origin_ok(self, origin: str, request_host: str) -> bool:
        if origin in self.origins:
            return True
        try:
            url = URL(origin)
        except ValueError:
            return False
        return url.scheme in ("http", "https") and url.host is not None and \
            f"{url.host}:{url.port}".lower() == request_host.lower()


def split_host(header: str | None) -> tuple[str | None, str]:
    """(host name, 'host:port') from a Host header, the port defaulting to 80; (None, '') for no header."""
    if not header:
        return None, ""
    try:
        url = URL(f"http://{header}")
        if url.host is None or url.path not in ("", "/") or url.user is not None:
            raise ValueError(header)
    except ValueError:
        return "", header
    return url.host.lower(), f"{url.host}:{url.port}"


CORS_HEADERS = {"Access-Control-Allow-Methods": "GET, POST, PATCH, DELETE, OPTIONS",
                "Access-Control-Allow-Headers": "Content-Type, Authorization", "Access-Control-Max-Age": "600"}


def guard_middleware(guard: Guard, public: frozenset[str], count_error: Callable[[], None]):
    @web.middleware
    async def guarded(request: web.Request, handler: Handler) -> web.StreamResponse:
        cors: dict[str, str] = {}
        try:
            host, host_port = split_host(request.headers.get("Host"))
            if not guard.host_ok(host):
                raise ApiError(403, "forbidden_host", "this daemon does not serve that Host name; use its address "
                               "(e.g. 127.0.0.1) or start it with --allow-host NAME")
            origin = request.headers.get("Origin")
            if origin is not None:
                if not guard.origin_ok(origin, host_port):
                    raise ApiError(403, "forbidden_origin", "requests from other web pages are refused; start the "
                                   "daemon with --allow-origin ORIGIN to let that page use the API")
                if origin in guard.origins:
                    cors = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
            if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
                if not cors:
                    raise ApiError(403, "forbidden_origin", "CORS is allowed only for --allow-origin origins")
                return web.Response(status=204, headers=cors | CORS_HEADERS)
            if guard.token and request.path not in public:
                given = request.headers.get("Authorization", "")
                if not hmac.compare_digest(given.encode(), f"Bearer {guard.token}".encode()):
                    raise ApiError(401, "unauthorized", "send the header 'Authorization: Bearer TOKEN' with the "
                                   "daemon's token (WAVECAST_TOKEN or --token-file)")
            response = await handler(request)
        except ApiError as e:
            count_error()
            response = error_response(e.status, e.code, e.message, e.headers)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            count_error()
            if e.status == 413:
                response = error_response(413, "body_too_large", f"request bodies are limited to {MAX_BODY_BYTES} "
                                          "bytes")
            elif e.status == 405:
                response = error_response(405, "method_not_allowed", f"{request.method} is not a method of "
                                          "this route; see GET /v1/openapi.json", {"Allow": e.headers["Allow"]})
            else:
                response = error_response(e.status, HTTP_CODES.get(e.status, "http_error"),
                                          "no such route; see GET /v1/openapi.json" if e.status == 404 else e.reason)
        except Exception:
            count_error()
            log.exception("unhandled error path=%s", request.path)
            response = error_response(500, "internal", "internal error; the daemon log has the details")
        response.headers.update(cors)
        return response

    return guarded
