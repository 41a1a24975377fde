"""The overlay through Janus: `/overlay?janus=URL&mountpoint=N` plays a Janus Streaming mountpoint with its own
small Janus client (daemon/static/janus.js), so an audience listens without touching the daemon.

Real parts: `wavecast serve`, Debian's janus with tests/janus/'s configuration on the test's interface
(tests/conftest.py's `interface` fixture and `JanusServer`), the daemon publishing a stream into it, and Debian's
chromium driven by Playwright (tests/browser.py). What the page hears is measured by the page's own analyser, as in
test_overlay.py.
"""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote, urlsplit

import pytest

from tests.browser import history, launch, open_page, playwright, sample
from tests.conftest import JanusServer, JanusSetup, Server, free_port, mountpoint_info

TONE = {"model": "default", "seed": 7, "controls": {"f0": 440, "loudness": -20}}


@pytest.fixture(scope="module")
def browser():
    with playwright() as p:
        b = launch(p)
        yield b
        b.close()


def overlay_url(daemon: Server, janus: str, mountpoint: object) -> str:
    return f"{daemon.url}/overlay?janus={quote(janus, safe='')}&mountpoint={mountpoint}"


def janus_post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps({**body, "transaction": "test"}).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


def mountpoint_info_now(janus: JanusServer, mountpoint: int) -> dict:
    """Janus's `info` on the mountpoint (asked from a thread of its own: Playwright's loop runs in this one)."""
    with ThreadPoolExecutor(1) as pool:
        info = pool.submit(asyncio.run, mountpoint_info(janus.url, mountpoint)).result()
    assert info is not None, f"no mountpoint {mountpoint}"
    return info


def test_the_overlay_plays_a_mountpoint_through_janus(janus_setup: JanusSetup, browser) -> None:
    daemon, janus = janus_setup.daemon, janus_setup.janus
    status, stream = daemon.request("POST", "/v1/streams", TONE)  # the default instrument at 440 Hz
    assert status == 201, stream
    sid = stream["id"]
    status, body = daemon.request("POST", f"/v1/streams/{sid}/publish", {"janus": janus.url})
    assert status == 201, body
    mountpoint = body["mountpoint"]

    rec = open_page(browser, overlay_url(daemon, janus.url, mountpoint))
    try:
        rec.wait("wavecast.state === 'playing' && wavecast.level() > -50", timeout=20)
    except Exception as e:
        raise AssertionError(f"the overlay does not play through Janus: {history(rec)} {rec.errors[-3:]}\n"
                             f"{janus.log()}") from e

    # it plays the stream, at its pitch
    heard = [s for s in sample(rec, 1.5) if s["hz"]]
    assert len(heard) >= 15, heard
    assert statistics.median(s["db"] for s in heard) > -30
    off = statistics.median(abs(12 * math.log2(s["hz"] / 440)) for s in heard)
    print(f"through Janus: f0 440 Hz heard {off:.3f} semitones off (median)")
    assert off < 0.15, off

    # it shows the mountpoint's description: what plays, and that it is AI-generated
    info = mountpoint_info_now(janus, mountpoint)
    credit = rec.js("document.getElementById('credit').textContent")
    assert credit == info["description"] and sid in credit and "AI-generated music, made by wavecast" in credit, credit
    assert rec.js("document.getElementById('nowplaying').hidden")  # no data channel through Janus: no note shown
    assert info["viewers"] == 1, info

    # the audio came through Janus: the daemon has no WebRTC peer, and the page asked it for its files only
    stream = daemon.request("GET", f"/v1/streams/{sid}")[1]
    assert stream["peers"] == 0 and stream["encoders"] == 1, stream  # the encoder feeds the Janus publisher alone
    hosts = rec.hosts()
    assert hosts == {urlsplit(daemon.url).netloc, urlsplit(janus.url).netloc}, rec.requests
    asked = {urlsplit(u).path for u in rec.requests if urlsplit(u).netloc == urlsplit(daemon.url).netloc}
    assert asked == {"/overlay", "/static/wavecast.css", "/static/overlay.js", "/static/client.js",
                     "/static/janus.js"}, asked
    assert not rec.errors, rec.errors

    # leaving the page destroys its Janus session at once (not after Janus's 60 s session timeout)
    attach = next(u for u in rec.requests if urlsplit(u).path.startswith("/janus/"))  # {janus.url}/{session}
    assert janus_post(attach, {"janus": "keepalive"})["janus"] == "ack"
    rec.page.goto("about:blank")
    deadline = time.monotonic() + 2
    while (answer := janus_post(attach, {"janus": "keepalive"}))["janus"] == "ack" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert answer["janus"] == "error" and answer["error"]["code"] == 458, answer  # no such session
    assert mountpoint_info_now(janus, mountpoint)["viewers"] == 0
    rec.page.close()
    daemon.request("DELETE", f"/v1/streams/{sid}")


def test_what_is_wrong_is_said_on_the_page(janus_setup: JanusSetup, browser) -> None:
    daemon, janus = janus_setup.daemon, janus_setup.janus
    nowhere = f"http://127.0.0.1:{free_port()}/janus"
    cases = [
        (overlay_url(daemon, janus.url, 987654), f"Janus at {janus.url} has no mountpoint 987654: check 'mountpoint'"),
        (overlay_url(daemon, nowhere, 1), f"Janus does not answer at {nowhere}: check that Janus runs"),
        (overlay_url(daemon, janus.url.replace("/janus", "/not-janus"), 1), "but not as Janus's HTTP API"),
        (overlay_url(daemon, janus.url, "abc"), "'mountpoint' must be the id of a Janus Streaming mountpoint"),
        (overlay_url(daemon, "ftp://127.0.0.1/janus", 1), "'janus' must be the http(s) URL of Janus's HTTP API"),
    ]
    for url, words in cases:
        rec = open_page(browser, url)
        try:
            rec.wait("wavecast.state === 'error'", timeout=10)
            text = rec.page.locator("#status").inner_text()
            assert words in text, (url, text, history(rec))
            assert rec.page.locator("#status").is_visible()
            assert not [e for e in rec.errors if "Content Security Policy" in e], rec.errors
        finally:
            rec.page.close()


def test_the_overlay_policy_allows_the_janus_origin_alone(janus_setup: JanusSetup) -> None:
    daemon = janus_setup.daemon

    def connect_src(query: str) -> str:
        with urllib.request.urlopen(f"{daemon.url}/overlay{query}", timeout=10) as response:
            policy = response.headers["Content-Security-Policy"]
        return next(part.strip() for part in policy.split(";") if part.strip().startswith("connect-src"))

    assert connect_src("") == "connect-src 'self'"
    assert connect_src(f"?janus={quote('http://Janus.example:8088/janus?x=1')}&mountpoint=1") == (
        "connect-src 'self' http://janus.example:8088")
    for bad in ("ftp://h/janus", "http://h;script-src%20*/janus", "http://user:pw@h:1/janus", "not a url"):
        assert connect_src(f"?janus={quote(bad, safe='%')}") == "connect-src 'self'", bad


def test_the_overlay_plays_again_after_janus_restarts(janus_setup: JanusSetup, browser) -> None:
    """Janus killed and started again: the publisher makes the mountpoint again with the same id, and the page,
    which said what was wrong meanwhile, plays it again by itself. Unpublished, the page says the mountpoint is
    gone."""
    daemon, janus = janus_setup.daemon, janus_setup.janus
    sid = daemon.request("POST", "/v1/streams", TONE)[1]["id"]
    status, body = daemon.request("POST", f"/v1/streams/{sid}/publish", {"janus": janus.url})
    assert status == 201, body
    rec = open_page(browser, overlay_url(daemon, janus.url, body["mountpoint"]))
    try:
        rec.wait("wavecast.state === 'playing' && wavecast.level() > -50", timeout=20)
        janus.kill()
        rec.wait("wavecast.state !== 'playing'", timeout=5)
        rec.wait("wavecast.state === 'error'", timeout=10)
        assert "Janus does not answer at" in rec.page.locator("#status").inner_text()
        janus.start()
        try:
            rec.wait("wavecast.connects === 2 && wavecast.state === 'playing' && wavecast.level() > -50", timeout=30)
        except Exception as e:
            raise AssertionError(f"not playing again after Janus restarted: {history(rec)}") from e
        assert len(rec.navigations) == 1, rec.navigations  # no reload
        assert daemon.request("GET", f"/v1/streams/{sid}")[1]["peers"] == 0

        # the stream no longer published: its mountpoint is gone, and the page says so
        assert daemon.request("DELETE", f"/v1/streams/{sid}/publish")[0] == 200
        rec.wait("wavecast.state === 'error'", timeout=10)
        assert f"has no mountpoint {body['mountpoint']}" in rec.page.locator("#status").inner_text(), history(rec)
    finally:
        rec.page.close()
        daemon.request("DELETE", f"/v1/streams/{sid}")
