"""The API as a web page, an attacker or a careless client would use it, against a real `wavecast serve`:
foreign Origin and Host, the wrong Content-Type, a missing or wrong token, deep nesting, misspelled keys,
null actions, limits and rate limits; and each time, the stream that plays keeps playing."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, Server, start_server, stop_server
from wavecast.daemon.client import Listener

TONE = {"seed": 1, "controls": {"f0": 440, "loudness": -20}}
REPR = re.compile(r"\bNone\b|got '|!r|Traceback|\bnot a instrument\b|wavecast train instrument")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(tmp_path_factory.mktemp("serve"), args=(
        "--allow-origin", "http://localhost:3000", "--allow-host", "wavecast.test",
        "--max-peers", "2", "--stream-rate", "0.5", "--stream-burst", "6",
        "--message-rate", "1", "--message-burst", "4", "--max-models", "2"))
    yield s
    stop_server(s)


def streams(server: Server) -> int:
    return len(server.request("GET", "/v1/streams")[1]["streams"])


def assert_error(status: int, body: dict, want_status: int, code: str, *words: str) -> str:
    assert status == want_status and body["error"]["code"] == code, (status, body)
    message = body["error"]["message"]
    assert not REPR.search(message), message
    for word in words:
        assert word in message, message
    return message


def test_other_web_pages_cannot_drive_the_daemon(server: Server) -> None:
    before = streams(server)
    # a cross-site "simple" request: text/plain, no preflight in a browser
    status, body = server.request("POST", "/v1/streams", raw=json.dumps(TONE).encode(),
                                  headers={"Content-Type": "text/plain", "Origin": "http://evil.example"})
    assert_error(status, body, 403, "forbidden_origin", "--allow-origin")
    status, body = server.request("POST", "/v1/streams", TONE, headers={"Origin": "http://evil.example"})
    assert_error(status, body, 403, "forbidden_origin")
    status, body = server.request("POST", "/v1/streams", TONE, headers={"Origin": "null"})
    assert_error(status, body, 403, "forbidden_origin")
    # same origin without an Origin header, but the body is not declared JSON
    status, body = server.request("POST", "/v1/streams", raw=json.dumps(TONE).encode(),
                                  headers={"Content-Type": "text/plain"})
    assert_error(status, body, 415, "unsupported_media_type", "Content-Type: application/json")
    # DNS rebinding: evil.example resolves to 127.0.0.1, the browser sends its own name as Host
    status, body = server.request("POST", "/v1/streams", TONE, headers={"Host": "evil.example:8765"})
    assert_error(status, body, 403, "forbidden_host", "--allow-host")
    status, body = server.request("GET", "/v1/streams", headers={"Host": "evil.example"})
    assert_error(status, body, 403, "forbidden_host")
    assert streams(server) == before


def test_own_and_allowed_origins_work(server: Server) -> None:
    port = server.url.rsplit(":", 1)[1]
    status, body = server.request("GET", "/v1/health", headers={"Origin": server.url})
    assert status == 200 and body["status"] == "ok"
    status, body = server.request("GET", "/v1/models", headers={"Host": f"wavecast.test:{port}",
                                                                "Origin": f"http://wavecast.test:{port}"})
    assert status == 200 and body["models"]
    # an --allow-origin page: preflight answered, CORS headers on the answer
    req = urllib.request.Request(server.url + "/v1/streams", method="OPTIONS", headers={
        "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 204
        assert resp.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
        assert "POST" in resp.headers["Access-Control-Allow-Methods"]
    req = urllib.request.Request(server.url + "/v1/health", headers={"Origin": "http://localhost:3000"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    req = urllib.request.Request(server.url + "/v1/streams", method="OPTIONS", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=10)
    assert refused.value.code == 403 and "Access-Control-Allow-Origin" not in refused.value.headers


@pytest.mark.parametrize("raw, code, words", [
    (b"[" * 100_000, "malformed_json", ("deeper than 16",)),
    (b'{"a":' * 5000 + b"1" + b"}" * 5000, "malformed_json", ("deeper than 16",)),
    (b"", "malformed_json", ("empty",)),
    (b'{"controls": {"f0": Infinity}}', "malformed_json", ("Infinity",)),
    (b"\xff\xfe{}", "malformed_json", ("UTF-8",)),
])
def test_bodies_that_are_not_json_are_400(server: Server, raw: bytes, code: str, words: tuple[str, ...]) -> None:
    status, body = server.request("POST", "/v1/streams", raw=raw)
    assert_error(status, body, 400, code, *words)


def test_unknown_and_mistyped_fields_are_named(server: Server) -> None:
    status, body = server.request("POST", "/v1/streams", {"model": "default", "control": {"f0": 440}})
    assert_error(status, body, 422, "invalid_request", "'control'", "model, composer, seed, controls")
    sid = server.request("POST", "/v1/streams", TONE)[1]["id"]
    try:
        status, body = server.request("PATCH", f"/v1/streams/{sid}", {"controls": {"f0": 300}, "colour": "red"})
        assert_error(status, body, 422, "invalid_request", "'colour'")
        status, body = server.request("PATCH", f"/v1/streams/{sid}", {"action": None})
        assert_error(status, body, 422, "invalid_request", "'action'", '"pause"')
        status, body = server.request("PATCH", f"/v1/streams/{sid}", {"action": "pause"})
        assert_error(status, body, 422, "invalid_action", "composed streams")
        status, body = server.request("PATCH", f"/v1/streams/{sid}", {})
        assert_error(status, body, 422, "invalid_request", "controls, action")
        status, body = server.request("POST", "/v1/streams", {"seed": -1})
        assert_error(status, body, 422, "invalid_request", "'seed'")
        status, body = server.request("POST", "/v1/streams", {"model": "../../etc/passwd"})
        assert_error(status, body, 422, "invalid_request", "'model'", "GET /v1/models")
        status, body = server.request("POST", "/v1/streams", {"composer": "nope"})
        message = assert_error(status, body, 404, "unknown_model", "composers here: folk", "train composer")
        assert "instrument" not in message
        status, body = server.request("POST", "/v1/streams", {"model": "folk"})
        assert_error(status, body, 422, "wrong_model_kind", "'composer'")
        status, body = server.request("POST", "/v1/streams", {"composer": "folk", "controls": {"scale": 5}})
        message = assert_error(status, body, 422, "invalid_control", "scale")
        assert "''" not in message
        status, body = server.request("POST", f"/v1/streams/{sid}/device", {"device": None})
        assert_error(status, body, 422, "invalid_request", "'device'")
        status, body = server.request("GET", f"/v1/streams/{sid}/notes?since=x")
        assert_error(status, body, 422, "not_composed")
        status, body = server.request("PUT", f"/v1/streams/{sid}", TONE)
        assert_error(status, body, 405, "method_not_allowed", "PUT")
    finally:
        server.request("DELETE", f"/v1/streams/{sid}")


async def steer_badly(server: Server) -> None:
    sid = server.request("POST", "/v1/streams", TONE)[1]["id"]
    listener = await Listener.connect(server.url, sid)
    try:
        await listener.collect(0.3)
        playing = asyncio.create_task(listener.collect(2.0))
        replies = []
        for message in ['{"action": null}', "[" * 10_000, "{" * 3 + "}", '{"controls": {"f0": 5000}}', "null",
                        '{"id": 7, "controls": {"f0": 440}}']:
            listener.channel.send(message)
            replies.append(await asyncio.wait_for(listener.replies.get(), 10))
            await asyncio.sleep(1.1)  # under --message-rate 1
        assert [r["type"] for r in replies] == ["error"] * 5 + ["controls"]
        assert [r["error"]["code"] for r in replies[:5]] == [
            "invalid_request", "malformed_json", "malformed_json", "invalid_control", "invalid_request"]
        assert replies[5]["id"] == 7
        for r in replies[:5]:
            assert not REPR.search(r["error"]["message"]), r
        # a burst past --message-burst 4: every message answered, the excess refused, the peer stays up
        for _ in range(8):
            listener.channel.send('{"controls": {"f0": 440}}')
        burst = [await asyncio.wait_for(listener.replies.get(), 10) for _ in range(8)]
        codes = [r.get("error", {}).get("code", r["type"]) for r in burst]
        assert codes.count("rate_limited") >= 3 and codes[0] == "controls", codes
        audio = await playing
        assert listener.pc.connectionState == "connected"
    finally:
        await listener.close()
        server.request("DELETE", f"/v1/streams/{sid}")
    blocks = audio[: len(audio) // 4800 * 4800].reshape(-1, 4800)
    assert min(20 * np.log10(np.sqrt(np.mean(b**2)) + 1e-12) for b in blocks) > -45  # no dropout


def test_data_channel_answers_every_message_and_stays_open(server: Server) -> None:
    asyncio.run(steer_badly(server))


async def too_many_peers(server: Server) -> None:
    sid = server.request("POST", "/v1/streams", TONE)[1]["id"]
    first = await Listener.connect(server.url, sid)
    second = await Listener.connect(server.url, sid)
    try:
        with pytest.raises(RuntimeError, match="429.*too_many_peers.*--max-peers"):
            await Listener.connect(server.url, sid)
        await first.collect(0.2)
    finally:
        await first.close()
        await second.close()
        server.request("DELETE", f"/v1/streams/{sid}")


def test_peer_limit(server: Server) -> None:
    asyncio.run(too_many_peers(server))


def test_loaded_model_versions_are_capped(server: Server) -> None:
    """--max-models 2: the default instrument and one more load; a third is refused, the others go on."""
    status, body = server.request("POST", "/v1/streams", {"model": "violin", "seed": 1})
    assert status == 201, body
    server.request("DELETE", f"/v1/streams/{body['id']}")
    status, body = server.request("POST", "/v1/streams", {"model": "cello", "seed": 1})
    assert_error(status, body, 503, "too_many_models", "--max-models")
    status, body = server.request("POST", "/v1/streams", {"model": "violin", "seed": 2})
    assert status == 201, body
    server.request("DELETE", f"/v1/streams/{body['id']}")


def test_stream_creation_is_rate_limited_and_the_limits_are_in_metrics(server: Server) -> None:
    made, refused = [], None
    for _ in range(12):
        status, body = server.request("POST", "/v1/streams", TONE)
        if status == 429:
            refused = body
            break
        assert status == 201, body
        made.append(body["id"])
    try:
        assert refused is not None and refused["error"]["code"] == "rate_limited", refused
        assert "retry in" in refused["error"]["message"]
        assert len(made) <= 6
    finally:
        for sid in made:
            server.request("DELETE", f"/v1/streams/{sid}")
    metrics = server.text("/metrics")
    assert 'wavecast_limit{name="max_peers"} 2.0' in metrics
    assert 'wavecast_limit{name="stream_rate"} 0.5' in metrics
    assert re.search(r"^wavecast_rate_limited_total [1-9]", metrics, re.M)


def test_openapi_describes_every_route(server: Server) -> None:
    status, doc = server.request("GET", "/v1/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.1")
    create = doc["paths"]["/v1/streams"]["post"]
    schema = create["requestBody"]["content"]["application/json"]["schema"]
    assert schema["additionalProperties"] is False and set(schema["properties"]) == {
        "model", "composer", "seed", "controls", "name", "snapshot"}
    assert {"403", "415", "422", "429", "503"} <= set(create["responses"])
    assert "401" not in doc["paths"]["/v1/health"]["get"]["responses"]


def test_a_token_guards_everything_but_health(tmp_path: Path) -> None:
    token = "correct-horse-battery-staple"
    server = start_server(tmp_path, extra_env={"WAVECAST_TOKEN": token})
    try:
        assert server.request("GET", "/v1/health")[0] == 200
        for headers in ({}, {"Authorization": "Bearer wrong-wrong-wrong-wrong"}, {"Authorization": token}):
            status, body = server.request("POST", "/v1/streams", TONE, headers=headers)
            assert_error(status, body, 401, "unauthorized", "WAVECAST_TOKEN")
        assert "--token" not in server.process.args and token not in " ".join(server.process.args)
        status, body = server.request("POST", "/v1/streams", TONE, headers={"Authorization": f"Bearer {token}"})
        assert status == 201, body
    finally:
        stop_server(server)


async def drain(server: Server) -> tuple[list[dict], float]:
    sid = server.request("POST", "/v1/streams", TONE)[1]["id"]
    listener = await Listener.connect(server.url, sid)
    await listener.collect(0.3)
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    told = await asyncio.wait_for(listener.replies.get(), 5)
    await listener.close()
    return [told], started


def test_sigterm_drains_listeners_and_exits_0(tmp_path: Path) -> None:
    server = start_server(tmp_path)
    told, started = asyncio.run(drain(server))
    assert told[0]["type"] == "error" and told[0]["error"]["code"] == "shutdown"
    assert server.process.wait(timeout=5) == 0
    assert time.monotonic() - started < 5
    assert "draining" in server.log.read_text()


async def listen_then_stop_twice(server: Server) -> None:
    sid = server.request("POST", "/v1/streams", TONE)[1]["id"]
    listeners = [await Listener.connect(server.url, sid) for _ in range(2)]
    server.process.send_signal(signal.SIGTERM)
    while "draining" not in server.log.read_text() and server.process.poll() is None:
        await asyncio.sleep(0.005)
    server.process.send_signal(signal.SIGTERM)  # while the listeners are being told (>= 100 ms)
    for listener in listeners:
        await listener.close()


def test_a_second_sigterm_stops_at_once(tmp_path: Path) -> None:
    for attempt in range(3):  # a drain that beat the second signal says nothing: try again
        (tmp_path / str(attempt)).mkdir()
        server = start_server(tmp_path / str(attempt))
        asyncio.run(listen_then_stop_twice(server))
        code = server.process.wait(timeout=3)
        if code != 0:
            break
    assert code == 1 and "stopping now" in server.log.read_text()


def test_the_readme_curl_examples_work(tmp_path: Path) -> None:
    """The README's curl lines (they send JSON with its Content-Type) against a real daemon with the default
    flags; the device line needs a sound card and is left to tests/test_device.py."""
    assert shutil.which("curl"), "curl is missing; .ci/run installs it (apt-get install curl)"
    readme = (ROOT / "README.md").read_text()
    lines = [line.split("   #")[0] for line in readme.splitlines() if line.startswith("curl ")]
    assert len(lines) >= 5
    server = start_server(tmp_path)
    try:
        port, sid = server.url.rsplit(":", 1)[1], None
        for line in lines:
            if "/device" in line:
                continue
            line = line.replace("localhost:8765", f"localhost:{port}")
            if sid is not None:
                line = line.replace("/ID", f"/{sid}")
            out = subprocess.run(shlex.split(line), capture_output=True, text=True, timeout=30)
            body = json.loads(out.stdout)
            assert "error" not in body, (line, body)
            if line.split()[2].endswith("/v1/streams"):
                sid = body["id"]
    finally:
        stop_server(server)
