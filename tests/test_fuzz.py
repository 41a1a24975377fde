"""Fuzzing the two ways in. The HTTP API from its own OpenAPI description: schemathesis makes requests for every
route, valid and invalid, against a real `wavecast serve` and holds each answer to the document (no 5xx, only
documented statuses and content types, bodies that match their schemas, invalid input refused, errors in words).
The data channel with hypothesis: `Peer.reply` in process on a real engine's streams, then a sample over a real
aiortc data channel."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import schemathesis
from aiortc import RTCConfiguration, RTCPeerConnection
from hypothesis import HealthCheck, Phase, event, example, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from tests.conftest import Server, start_server, stop_server
from wavecast.daemon.client import Listener
from wavecast.daemon.limits import Limits
from wavecast.daemon.peers import use_ice_host
from wavecast.daemon.routes.webrtc import MAX_MESSAGE_BYTES, Peer
from wavecast.daemon.service import Daemon
from wavecast.models.store import ModelStore
from wavecast.streaming.composer import ACTIONS, CHOICES, METRES, NUMBERS, REGISTERS, Scale
from wavecast.streaming.engine import Stream

# Limits generous enough that the fuzzer meets validation, not only 429s; --max-streams still caps what it makes.
SERVE_ARGS = ("--max-streams", "8", "--stream-rate", "1000", "--stream-burst", "1000",
              "--message-rate", "1000", "--message-burst", "1000", "--max-jobs", "1")  # a fuzzed job really trains
EXAMPLES = 40  # generated cases per route and mode (valid, invalid), besides schemathesis' boundary cases
TONE = {"seed": 1, "controls": {"f0": 440, "loudness": -20}}
PIECE = {"model": "violin", "composer": "folk", "seed": 2}
REPR = re.compile(r"\bNone\b|got '|Traceback|Error\(|object at 0x")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("fuzz")
    s = start_server(tmp, extra_env={"XDG_CACHE_HOME": str(tmp / "cache")}, args=SERVE_ARGS)
    yield s
    stop_server(s)


def leaked_reprs(text: str, sent: str) -> list[str]:
    """Python reprs in a message for people, leaving out those that only repeat what the client sent."""
    return [m.group() for m in REPR.finditer(text) if m.group() not in sent]


# -- what the fuzzers send: JSON of every shape, odd text, and patches that mean something ---------------------
ODD_TEXT = ["NaN", "Infinity", "-Infinity", "nan", "1e999", "-0", "None", "null", "true", "", " ", "\x00", "0x1F",
            "D dorian", "H major", "C", "low", "3/4", "7/8", "play", "PAUSE", "\u202e", "\U0001f3bb", "'; --"]
HUGE = st.integers(min_value=10**300, max_value=10**400) | st.integers(max_value=-(10**300), min_value=-(10**400))
scalars = (st.none() | st.booleans() | st.integers() | HUGE | st.floats() | st.text(max_size=20)
           | st.sampled_from(ODD_TEXT))
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=16)
CONTROL_NAMES = ["f0", "loudness", *NUMBERS, *CHOICES]
patches = st.fixed_dictionaries({}, optional={
    "controls": st.dictionaries(st.sampled_from(CONTROL_NAMES) | st.text(max_size=12), json_values, max_size=6),
    "action": st.sampled_from([*ACTIONS, None, "", "stop", "PLAY"]) | json_values,
    "id": st.text(max_size=80) | st.integers() | json_values,
    "colour": json_values,
})
# in range for the instrument or the composer, so that a share of the patches apply and the streams really move
tone = st.fixed_dictionaries({}, optional={"f0": st.floats(40, 1900), "loudness": st.floats(-80, 0)})
piece = st.fixed_dictionaries({}, optional={
    "tempo": st.floats(40, 240), "temperature": st.floats(0.1, 2), "legato": st.floats(0, 1),
    "scale": st.sampled_from(["D dorian", "C major", "A minor", "F# lydian"]),
    "register": st.sampled_from(sorted(REGISTERS)), "metre": st.sampled_from(sorted(METRES))})
steering = st.fixed_dictionaries({"controls": tone}) | st.fixed_dictionaries(
    {"controls": piece}, optional={"action": st.sampled_from(ACTIONS)})
new_streams = st.fixed_dictionaries({"model": st.sampled_from(["default", "violin"])}, optional={
    "composer": st.just("folk"), "seed": st.integers(0, 2**63 - 1), "controls": tone | piece})
with_id = st.just({}) | st.fixed_dictionaries({"id": st.integers(0, 10**6) | st.text(max_size=64)})
nested = st.integers(1, 10_000).flatmap(
    lambda n: st.sampled_from(["[" * n, "[" * n + "]" * n, '{"a":' * n + "1" + "}" * n, '{"controls":' * n]))
messages = st.one_of(patches.map(json.dumps), st.tuples(steering, with_id).map(lambda p: json.dumps(p[0] | p[1])),
                     json_values.map(json.dumps), st.text(), st.binary(), nested)

# -- the HTTP API, from its OpenAPI description -----------------------------------------------------------
# A share of the generated cases name a stream or model that exists, so PATCH, notes, webrtc and device
# requests reach their handlers, not only the 404. The stand-ins below are swapped for live ids per case.
LIVE = {"live-tone": TONE, "live-piece": PIECE}


class LiveStreams:
    """Streams for the fuzzer's path ids, made again when a fuzzed DELETE has ended one."""

    def __init__(self, server: Server) -> None:
        self.server, self.ids = server, {}

    def id(self, stand_in: str) -> str:
        sid = self.ids.get(stand_in)
        if sid is None or self.server.request("GET", f"/v1/streams/{sid}")[0] != 200:
            status, info = self.server.request("POST", "/v1/streams", LIVE[stand_in])
            assert status == 201, info
            sid = self.ids[stand_in] = info["id"]
        return sid


async def real_offer() -> dict:
    """An SDP offer as a browser or the client makes one: a receive-only audio line and a data channel."""
    use_ice_host("127.0.0.1")
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("audio", direction="recvonly")
    pc.createDataChannel("controls")
    await pc.setLocalDescription(await pc.createOffer())
    offer = {"type": "offer", "sdp": pc.localDescription.sdp}
    await pc.close()
    return offer


def mutated(offer: dict) -> st.SearchStrategy[dict]:
    """A real offer with a few lines dropped, repeated, cut short or garbled."""
    lines = offer["sdp"].strip().split("\r\n")

    def apply(edits: list[tuple[str, int, str]]) -> dict:
        out = list(lines)
        for kind, at, text in edits:
            if not out:
                break
            i = at % len(out)
            if kind == "drop":
                del out[i]
            elif kind == "repeat":
                out.insert(i, out[i])
            elif kind == "cut":
                out[i] = out[i][: len(text)]
            else:
                out[i] = out[i].split("=", 1)[0] + "=" + text
        return {"type": "offer", "sdp": "\r\n".join(out) + "\r\n"}

    edit = st.tuples(st.sampled_from(["drop", "repeat", "cut", "garble"]), st.integers(0, 10_000), st.text(max_size=30))
    return st.lists(edit, max_size=4).map(apply)


def moved(case: schemathesis.Case, path_parameters: dict, body: object) -> schemathesis.Case:
    case.path_parameters, case.body = path_parameters, body
    return case


@pytest.fixture(scope="module")
def api(served: Server) -> schemathesis.BaseSchema:
    offer = asyncio.run(real_offer())
    config = schemathesis.Config.from_dict({
        "generation": {"max-examples": EXAMPLES, "database": "none"},
        # how this API refuses invalid input: 413 too, for a body past 256 KiB (an SDP may take 64 KiB of text)
        "checks": {"negative_data_rejection": {"expected-statuses": ["400", "404", "409", "413", "415", "422"]},
                   # POST .../publish names a Janus, which the fuzzer's URLs never reach: 502 janus_unreachable
                   "not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", "502"]}},
    })
    # POST /v1/drain, fuzzed too, asks its 'to' first: the fuzzer's URLs reach no daemon, so it never starts
    schema = schemathesis.openapi.from_url(f"{served.url}/v1/openapi.json", config=config)

    @schema.hook
    def flatmap_case(context, case: schemathesis.Case) -> st.SearchStrategy[schemathesis.Case]:
        """Most cases with an {id} or {name} get one that exists (a stand-in for a live stream), and a share of
        the valid bodies are ones that mean something: a stream of a real model, controls in range, a real or
        mutated SDP offer. Invalid cases keep their invalid parts."""
        given = case.path_parameters or {}
        positive = case.meta is not None and case.meta.generation.mode.is_positive
        if positive and case.method == "POST" and case.path == "/v1/streams":
            return (st.just(case.body) | new_streams).map(lambda body: moved(case, case.path_parameters, body))
        if isinstance(given.get("name"), str):
            return st.sampled_from(["default", "violin", "folk", given["name"]]).map(
                lambda name: moved(case, given | {"name": name}, case.body))
        if not isinstance(given.get("id"), str):
            return st.just(case)
        body = st.just(case.body)
        if positive:
            if case.method == "PATCH":
                body |= steering
            elif case.path.endswith("/webrtc"):
                body |= mutated(offer)
        return st.tuples(st.sampled_from([*LIVE, given["id"]]), body).map(
            lambda chosen: moved(case, given | {"id": chosen[0]}, chosen[1]))

    return schema


@pytest.fixture(scope="module")
def live(served: Server) -> LiveStreams:
    return LiveStreams(served)


def errors_for_people(ctx, response, case) -> None:
    """An error body is {"error": {"code", "message"}} whose message has no Python repr in it."""
    if response.status_code < 400:
        return
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return  # response_schema_conformance reports a body of the wrong shape
    request = response.request
    sent = f"{request.url} {request.body!s}"
    assert message and not leaked_reprs(message, sent), f"a Python repr in the message: {message}"


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection, unsupported_method, errors_for_people]
fuzzed = schemathesis.pytest.from_fixture("api")


@fuzzed.parametrize()
@settings(deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_every_route_keeps_to_its_openapi_description(case, served: Server, live: LiveStreams) -> None:
    if case.path_parameters and case.path_parameters.get("id") in LIVE:
        case.path_parameters["id"] = live.id(case.path_parameters["id"])
    response = case.call_and_validate(checks=CHECKS, timeout=30)
    if case.method == "POST" and case.path == "/v1/streams" and response.status_code == 201:
        served.request("DELETE", f"/v1/streams/{response.json()['id']}")  # stay under --max-streams


# -- the data channel, with hypothesis ------------------------------------------------------------------------
UNREAD = ("malformed_json", "message_too_large", "rate_limited")  # replies to messages the daemon did not read


def valid_id(body: object) -> object:
    """The client's `id` in a message, if it has one the reply must carry back (text up to 64, or a whole number)."""
    if not isinstance(body, dict) or "id" not in body:
        return None
    sid = body["id"]
    ok = (isinstance(sid, str) and len(sid) <= 64) or (isinstance(sid, int) and not isinstance(sid, bool))
    return sid if ok else None


def parsed(message: str | bytes) -> object:
    try:
        return json.loads(message)
    except (ValueError, RecursionError):
        return None


def check_reply(reply: dict, message: str | bytes) -> None:
    """One reply as the protocol promises it: strict JSON, controls or an error in words."""
    json.dumps(reply, allow_nan=False)  # what the channel sends: JSON a browser's JSON.parse takes
    sent = message if isinstance(message, str) else message.decode("utf-8", "replace")
    code = None
    if reply["type"] == "controls":
        assert isinstance(reply["controls"], dict), reply
    else:
        assert reply["type"] == "error" and set(reply["error"]) == {"code", "message"}, reply
        code, text = reply["error"]["code"], reply["error"]["message"]
        assert isinstance(code, str) and code != "internal" and isinstance(text, str) and text, reply
        assert not leaked_reprs(text, sent), text
    sid = valid_id(parsed(message))
    if sid is not None and code not in UNREAD:
        assert reply.get("id") == sid, (reply, message[:200])


def controls_in_range(stream: Stream) -> None:
    if stream.voice is None:
        values = stream.controls()
        for c in stream.manifest.controls:
            assert c.min <= values[c.name] <= c.max, (c.name, values)
        return
    s = stream.voice.settings
    for name, c in NUMBERS.items():
        assert c.min <= s[name] <= c.max, (name, s)
    Scale.parse(s["scale"])
    assert s["register"] in REGISTERS and s["metre"] in METRES, s


@dataclass
class InProcessPeers:
    """A daemon in this process (no HTTP, no engine thread): two streams of real models, one peer on each, and
    a reader per stream; `render` runs the engine's own ticks."""

    loop: asyncio.AbstractEventLoop
    daemon: Daemon
    peers: list[Peer]

    def __post_init__(self) -> None:
        self.readers = [p.stream.listen() for p in self.peers]

    def render(self, frames: int) -> list[np.ndarray]:
        audio = [np.zeros(frames * r.rings.hop, np.float32) for r in self.readers]
        for i in range(frames):
            self.daemon.engine.tick()
            for r, out in zip(self.readers, audio, strict=True):
                assert r.read(out[i * r.rings.hop : (i + 1) * r.rings.hop]) == r.rings.hop
        return audio


async def open_peers(d: Daemon) -> list[Peer]:
    tone = d.engine.create_stream(await d.group("default"), 1, {"f0": 440.0, "loudness": -20.0})
    piece = d.engine.create_stream(await d.group("violin"), 2, {}, await d.composer("folk"))
    return [Peer(d, s, d.encoder(s).track()) for s in (tone, piece)]


@pytest.fixture(scope="module")
def in_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessPeers]:
    loop = asyncio.new_event_loop()
    limits = Limits(message_rate=1e9, message_burst=10**9)  # rate limits have their test in test_hardening.py
    d = Daemon(ModelStore(tmp_path_factory.mktemp("fuzz-store")), limits=limits)
    peers = loop.run_until_complete(open_peers(d))
    yield InProcessPeers(loop, d, peers)
    loop.run_until_complete(d.shutdown())
    loop.close()


@settings(max_examples=400, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(message=messages)
@example(message='{"action": null}')
@example(message='{"id": 7, "controls": {"f0": 1' + "0" * 400 + "}}")
@example(message='{"id": "x", "controls": {"f0": ' + "9" * 5000 + "}}")
@example(message='{"id": "x", "controls": {"f0": 1e400}}')
@example(message='{"controls": {"f0": 1e999}}')
@example(message='{"controls": {"f0": NaN}}')
@example(message=" " * (MAX_MESSAGE_BYTES + 1))
@example(message="\u00e9" * (MAX_MESSAGE_BYTES // 2 + 1))
@example(message=b"\xff\xfe{}")
@example(message="[" * 100_000)
def test_every_data_channel_message_gets_one_reply(in_process: InProcessPeers, message: str | bytes) -> None:
    for peer in in_process.peers:
        reply = in_process.loop.run_until_complete(peer.reply(message))
        check_reply(reply, message)
        event(f"{'composed' if peer.stream.voice else 'instrument'}: {reply.get('error', {}).get('code', 'applied')}")
        controls_in_range(peer.stream)
    for audio in in_process.render(2):
        assert np.all(np.isfinite(audio)) and np.abs(audio).max() <= 1.0


def test_the_fuzzed_streams_still_play(in_process: InProcessPeers) -> None:
    assert all(p.stream.failure is None for p in in_process.peers)
    for audio in in_process.render(100):  # a second
        assert np.all(np.isfinite(audio)) and np.abs(audio).max() <= 1.0
    tone = in_process.peers[0]
    reply = in_process.loop.run_until_complete(tone.reply('{"controls": {"f0": 440, "loudness": -20}}'))
    assert reply["type"] == "controls"
    audio = in_process.render(50)[0]
    assert np.sqrt(np.mean(audio[-2400:] ** 2)) > 1e-3  # audible again


async def steer_at_random(server: Server, sample: list[str | bytes]) -> None:
    sid = server.request("POST", "/v1/streams", TONE)[1]["id"]
    listener = await Listener.connect(server.url, sid)
    try:
        await listener.collect(0.2)
        for message in sample:
            listener.channel.send(message)
            reply = await asyncio.wait_for(listener.replies.get(), 10)
            check_reply(reply, message)
        await asyncio.sleep(0.2)
        assert listener.replies.empty()  # one reply per message, no more
        audio = await listener.collect(0.5)
        assert listener.pc.connectionState == "connected" and np.all(np.isfinite(audio))
    finally:
        await listener.close()
        server.request("DELETE", f"/v1/streams/{sid}")


@settings(max_examples=1, phases=[Phase.generate], deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(sample=st.lists(messages, min_size=50, max_size=50))
def test_a_real_data_channel_answers_a_random_sample(served: Server, sample: list[str | bytes]) -> None:
    asyncio.run(steer_at_random(served, sample))


def test_the_fuzzed_daemon_logged_no_unhandled_error(served: Server) -> None:
    status, health = served.request("GET", "/v1/health")
    assert status == 200 and health["status"] == "ok", health
    log = served.log.read_text()
    for sign in ("unhandled error", "data-channel message failed", "Task exception was never retrieved",
                 "Exception in callback"):
        assert sign not in log, log[-4000:]
