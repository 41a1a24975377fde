"""Leave a real daemon running under load and abuse for minutes: does it stay real-time, correct and flat?

Run from the repository root:  PYTHONPATH=. python bench/soak.py [--minutes 10] [--share 0.8] [--out FILE]

It starts `wavecast serve --port 0 --ice-host 127.0.0.1` (everything stays on 127.0.0.1), finds the admission
cap (creates streams until the engine answers 503 engine_saturated), deletes down to `--share` of it and keeps
those streams for the whole run. A stream costs the engine only while something listens, and every WebRTC
stream has its own Opus encoder, so what plays is: `--test-streams` streams under test, each with one aiortc
listener that stays (it decodes and measures what it hears) and others that join and leave on a schedule, and
`--playing` more streams with one light listener each (RTP counted, not decoded) to load the engine and the
encoding thread. Meanwhile, for `--minutes`:

- PATCH storm: `--patch-rate` valid control changes a second over HTTP, to streams under test and idle ones;
- data-channel storm: `--message-rate` messages a second on the staying listeners' `controls` channels, valid
  and invalid JSON; every message must be answered (`controls` for a valid one, `error` for an invalid one)
  and no message may close the peer (a closed one is counted and replaced);
- the bad-input corpus, `--bad-rate` requests a second, interleaved: malformed and deeply nested JSON, wrong
  or missing Content-Type, oversize bodies, unknown keys, non-finite and out-of-range controls, unknown models
  and streams, malformed SDP, wrong methods, a foreign Origin or Host, a huge query string; each must get a
  4xx (which one is the API's business);
- every `--sample` seconds: the daemon's RSS and open file descriptors (/proc/PID), its CPU, /metrics.

Targets (exit status 1 when one is missed, 0 otherwise): 0 underruns on the streams under test after their
first audio (the daemon's per-stream `underruns`, GET /v1/streams/ID), 0 responses 5xx to anything sent
during the run, every bad input answered with a 4xx, every data-channel message answered and no peer closed
by input, the daemon healthy at the end, and RSS and fds flat: after the warm-up (`--warmup` of the run),
the median of every later window of samples within 5 % of the first window's. Sockets come and go on
purpose (a UDP socket per WebRTC peer, the client's HTTP connections), so the fds held to 5 % are the others
(files, pipes, eventfds, unix sockets), and the sockets are checked against what is open: UDP sockets at most
the daemon's peers plus JOINING, TCP connections at most the client's pool (CONNECTIONS) plus JOINING.
Prints a line every ~10 s and a summary, and writes JSON (default bench/out/soak.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import statistics
import sys
import tempfile
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import uvloop
from aiortc import RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from tests.conftest import Server, start_server, stop_server
from wavecast.daemon.client import Listener
from wavecast.daemon.peers import use_ice_host
from wavecast.streaming.engine import BUFFER_FRAMES

ROOT = Path(__file__).resolve().parent.parent
SILENT_DB = -50.0  # a 5 ms block quieter than this, in a stream playing at -25..-15 dB, is a gap
BLOCK = 240  # 5 ms at 48 kHz
DRIFT = 0.05  # RSS and fds: every window's median within 5 % of the first window's after warm-up
CONNECTIONS = 8  # the client's HTTP connections at most
JOINING = 2  # sockets of peers joining or leaving while a sample is taken


def log(msg: str) -> None:
    print(f"[soak] {msg}", file=sys.stderr, flush=True)


# -- the daemon process, from outside -----------------------------------------------------------------
def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def open_fds(pid: int) -> dict[str, int]:
    """The process's open file descriptors by kind: udp (WebRTC peers), tcp (HTTP connections), other."""
    inodes = {}
    for kind in ("tcp", "tcp6", "udp", "udp6"):
        for line in Path(f"/proc/{pid}/net/{kind}").read_text().splitlines()[1:]:
            inodes[line.split()[9]] = kind.rstrip("6")
    counts = Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:  # closed meanwhile
            continue
        m = re.fullmatch(r"socket:\[(\d+)\]", target)
        counts[inodes.get(m.group(1), "other") if m else "other"] += 1
    return {"total": sum(counts.values()), "udp": counts["udp"], "tcp": counts["tcp"], "other": counts["other"]}


def prometheus(text: str) -> dict[str, float]:
    return {name: float(value) for name, value in re.findall(r"^(wavecast_\w+) (\S+)$", text, re.M)}


def drift(samples: list[dict], key: str, warmup: float, window: float) -> dict:
    """Median of `key` over the first window after `warmup` seconds (the level), and each later window's
    median against it."""
    after = [s for s in samples if s["t"] >= warmup]
    if not after:
        return {"level": None, "windows": [], "max_drift_pct": None, "flat": False}
    start, windows = after[0]["t"], []
    while True:
        got = [s[key] for s in after if start <= s["t"] < start + window]
        if not got:
            break
        windows.append(statistics.median(got))
        start += window
    level = windows[0]
    drifts = [100 * (w / level - 1) for w in windows]
    worst = max(drifts, key=abs)
    return {"level": level, "windows": windows, "max_drift_pct": round(worst, 2), "flat": abs(worst) <= 100 * DRIFT}


# -- HTTP, counted -------------------------------------------------------------------------------------
@dataclass
class Http:
    """Every request the soak makes during the run goes through here, so each 5xx is seen and named."""

    url: str
    session: aiohttp.ClientSession
    statuses: Counter = field(default_factory=Counter)
    server_errors: Counter = field(default_factory=Counter)  # (method, route, case, status) -> count
    unanswered: Counter = field(default_factory=Counter)  # (method, route, case) -> connection dropped, no reply

    async def call(self, case: str, method: str, path: str, route: str, *, body: Any = None, raw: bytes | None = None,
                   headers: dict | None = None) -> tuple[int, Any]:
        """The status (0 when the connection dropped without a response) and the JSON reply (None if not JSON)."""
        if raw is None and body is not None:
            raw, headers = json.dumps(body).encode(), {"Content-Type": "application/json", **(headers or {})}
        try:
            async with self.session.request(method, self.url + path, data=raw, headers=headers) as resp:
                text = await resp.read()
                status = resp.status
        except (TimeoutError, aiohttp.ClientError):
            self.unanswered[(method, route, case)] += 1
            return 0, None
        self.statuses[status] += 1
        if status >= 500:
            self.server_errors[(method, route, case, status)] += 1
        try:
            return status, json.loads(text)
        except ValueError:
            return status, None


# -- listeners -----------------------------------------------------------------------------------------
class Probe(Listener):
    """A listener that measures what it hears (levels per 5 ms, gaps, frames missing from the timestamps),
    counts the replies to what it sends on the data channel and notices when it is lost."""

    def __init__(self) -> None:
        super().__init__()
        self.frames = self.gap_frames = self.missing_frames = 0
        self.audible_frames, self.level_sum = 0, 0.0
        self.audible_from: int | None = None  # index of the first audible frame
        self.last_pts: int | None = None
        self.expected: deque[tuple[str, str]] = deque()  # (message name, reply type it should get), in order
        self.answered = self.refused = 0
        self.wrong_replies: Counter = Counter()
        self.leaving = False  # the soak closes it (a close or failure before that is a loss)
        self.lost: dict | None = None  # closed or failed while we kept it: the state and the last message sent
        self.last_sent: str | None = None
        self.track_ready.add_done_callback(lambda f: setattr(self, "receiver", asyncio.ensure_future(
            self._receive(f.result()))))
        self.pc.on("connectionstatechange", self._on_state)

    def _on_state(self) -> None:
        if self.pc.connectionState in ("failed", "closed") and not self.leaving and self.lost is None:
            # "closed": the daemon hung up; "failed": connectivity lost (ICE consent: one side starved for 30 s)
            self.lost = {"state": self.pc.connectionState, "after": self.last_sent or "(nothing sent)"}

    async def _receive(self, track) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            pcm = frame.to_ndarray().reshape(-1, len(frame.layout.channels))[:, 0].astype(np.float32) / 32768.0
            if self.last_pts is not None and frame.pts > self.last_pts + len(pcm):
                self.missing_frames += (frame.pts - self.last_pts) // len(pcm) - 1
            self.last_pts = frame.pts
            blocks = pcm[: len(pcm) // BLOCK * BLOCK].reshape(-1, BLOCK)
            db = 10 * np.log10(np.mean(blocks.astype(np.float64) ** 2, axis=1) + 1e-20)
            level = float(10 * np.log10(np.mean(pcm.astype(np.float64) ** 2) + 1e-20))
            if self.audible_from is None and level >= SILENT_DB:
                self.audible_from = self.frames
            elif self.audible_from is not None:  # the first audible frame starts in Opus's encoder delay
                self.gap_frames += int(db.min() < SILENT_DB)
                if level >= SILENT_DB:
                    self.audible_frames += 1
                    self.level_sum += level
            self.frames += 1

    def send_message(self, name: str, text: str | bytes, expect: str) -> None:
        """Send without waiting; the reply is matched in order by `take_replies`."""
        self.expected.append((name, expect))
        self.last_sent = name
        self.channel.send(text)

    def take_replies(self) -> None:
        while not self.replies.empty():
            reply = self.replies.get_nowait()
            if not self.expected:
                self.wrong_replies["(unexpected)"] += 1
                continue
            name, expect = self.expected.popleft()
            self.answered += 1
            if reply.get("type") != expect:
                if expect == "controls":  # a valid message refused (e.g. a rate limit): reported, not a fault
                    self.refused += 1
                else:
                    self.wrong_replies[name] += 1

    def summary(self) -> dict:
        self.take_replies()
        return {"frames": self.frames, "audible_frames": self.audible_frames,
                "level_db": round(self.level_sum / self.audible_frames, 1) if self.audible_frames else None,
                "gap_frames": self.gap_frames, "missing_frames": self.missing_frames,
                "messages": self.answered + len(self.expected), "answered": self.answered,
                "wrong_replies": dict(self.wrong_replies), "refused": self.refused,
                "lost": self.lost}

    async def close(self) -> None:
        self.leaving = True
        await super().close()
        if hasattr(self, "receiver"):
            self.receiver.cancel()


class LightPeer(Listener):
    """A listener that costs its client little: its RTP packets are counted, not decoded."""

    packets = 0

    async def count(self, packet, arrival_time_ms: int) -> None:
        self.packets += 1


class Refused(Exception):
    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"offer refused: {status} {body}")
        self.status = status


async def join(kind: type[Listener], http: Http, sid: str, case: str) -> Listener:
    """A new listener of stream `sid` (the offer is counted like every request), audio and channel up."""
    peer = kind()
    peer.pc.addTransceiver("audio", direction="recvonly")
    if kind is LightPeer:
        for receiver in peer.pc.getReceivers():  # before any packet arrives
            receiver._handle_rtp_packet = peer.count
    await peer.pc.setLocalDescription(await peer.pc.createOffer())
    offer = {"sdp": peer.pc.localDescription.sdp, "type": "offer"}
    status, answer = await http.call(case, "POST", f"/v1/streams/{sid}/webrtc", "/v1/streams/{id}/webrtc", body=offer)
    if status != 200:
        await peer.close()
        raise Refused(status, answer)
    peer.stream_id = sid
    try:
        await peer.pc.setRemoteDescription(RTCSessionDescription(**answer))
        await asyncio.wait_for(peer.track_ready, 20)
        await asyncio.wait_for(peer.channel_open.wait(), 20)
    except BaseException:
        await peer.close()
        raise
    return peer


# -- what is sent ---------------------------------------------------------------------------------------
def valid_controls(rng: random.Random) -> dict:
    """Audible controls: a gap in the listeners' audio is then an underrun or a lost packet, never the music."""
    return {"f0": round(220 * 2 ** (rng.randrange(25) / 12), 2), "loudness": rng.choice([-25.0, -20.0, -15.0])}


def channel_messages(rng: random.Random) -> list[tuple[str, str | bytes, str]]:
    """(name, message, reply type it must get) for the data-channel storm, valid and invalid."""
    ok = json.dumps({"controls": valid_controls(rng)})
    return [
        ("valid_controls", ok, "controls"),
        ("valid_f0", json.dumps({"controls": {"f0": valid_controls(rng)["f0"]}}), "controls"),
        ("malformed_json", '{"controls": {"f0": 440', "error"),
        ("not_an_object", "[1, 2, 3]", "error"),
        ("a_string", '"play"', "error"),
        ("empty_object", "{}", "error"),
        ("nan", '{"controls": {"f0": NaN}}', "error"),
        ("infinity", '{"controls": {"loudness": -Infinity}}', "error"),
        ("out_of_range", '{"controls": {"f0": 1e9}}', "error"),
        ("wrong_type", '{"controls": {"f0": "high"}}', "error"),
        ("unknown_control", '{"controls": {"tempo": 120}}', "error"),
        ("unknown_key", '{"controls": {"f0": 440}, "volume": 3}', "error"),
        ("action_null", '{"action": null}', "error"),
        ("action_on_instrument", '{"action": "pause"}', "error"),
        ("deep_arrays", "[" * 50_000, "error"),
        ("deep_objects", '{"a":' * 5000 + "1" + "}" * 5000, "error"),
        ("binary", b"\x00\xff\xfe", "error"),
    ]


@dataclass
class Case:
    name: str
    method: str
    path: str  # {id}: a stream under test
    route: str
    raw: bytes | None = None
    headers: dict = field(default_factory=dict)


def corpus() -> list[Case]:
    """Bad requests; each must be answered with a 4xx and leave the playing streams alone."""
    js = {"Content-Type": "application/json"}
    create = json.dumps({"model": "default", "seed": 1, "controls": {"f0": 440, "loudness": -20}}).encode()
    patch = json.dumps({"controls": {"f0": 440}}).encode()
    big = json.dumps({"model": "default", "pad": "x" * (300 * 1024)}).encode()
    s, one, offer = "/v1/streams", "/v1/streams/{id}", "/v1/streams/{id}/webrtc"
    return [
        Case("malformed_json", "POST", s, s, b'{"model": "default",', js),
        Case("not_an_object", "POST", s, s, b"[1, 2]", js),
        Case("empty_body", "PATCH", one, one, b"", js),
        Case("no_content_type", "POST", s, s, create),
        Case("text_plain_create", "POST", s, s, create, {"Content-Type": "text/plain"}),
        Case("form_patch", "PATCH", one, one, patch, {"Content-Type": "application/x-www-form-urlencoded"}),
        Case("oversize_create", "POST", s, s, big, js),
        Case("oversize_patch", "PATCH", one, one, big, js),
        Case("deep_arrays", "POST", s, s, b"[" * 100_000, js),
        Case("deep_objects", "PATCH", one, one, b'{"a":' * 5000 + b"1" + b"}" * 5000, js),
        Case("unknown_key_create", "POST", s, s, b'{"model": "default", "control": {"f0": 440}}', js),
        Case("unknown_key_patch", "PATCH", one, one, b'{"controls": {"f0": 440}, "extra": 1}', js),
        Case("unknown_control", "PATCH", one, one, b'{"controls": {"tempo": 120}}', js),
        Case("nan_control", "PATCH", one, one, b'{"controls": {"f0": NaN}}', js),
        Case("inf_control", "PATCH", one, one, b'{"controls": {"loudness": Infinity}}', js),
        Case("out_of_range_control", "PATCH", one, one, b'{"controls": {"f0": 1e9}}', js),
        Case("nan_create", "POST", s, s, b'{"model": "default", "controls": {"f0": NaN}}', js),
        Case("bad_seed", "POST", s, s, b'{"model": "default", "seed": -1}', js),
        Case("controls_not_object", "PATCH", one, one, b'{"controls": [440]}', js),
        Case("action_null", "PATCH", one, one, b'{"action": null}', js),
        Case("action_on_instrument", "PATCH", one, one, b'{"action": "pause"}', js),
        Case("unknown_model", "POST", s, s, b'{"model": "no-such-model"}', js),
        Case("unknown_composer", "POST", s, s, b'{"model": "default", "composer": "no-such-composer"}', js),
        Case("model_path_traversal", "GET", "/v1/models/..%2F..%2Fetc%2Fpasswd", "/v1/models/{name}"),
        Case("unknown_model_get", "GET", "/v1/models/no-such-model", "/v1/models/{name}"),
        Case("unknown_stream_get", "GET", "/v1/streams/no-such-stream", one),
        Case("unknown_stream_patch", "PATCH", "/v1/streams/no-such-stream", one, patch, js),
        Case("unknown_stream_delete", "DELETE", "/v1/streams/no-such-stream", one),
        Case("unknown_stream_offer", "POST", "/v1/streams/no-such-stream/webrtc", offer,
             b'{"type": "offer", "sdp": "v=0"}', js),
        Case("malformed_sdp", "POST", offer, offer, b'{"type": "offer", "sdp": "v=0\\r\\nthis is not sdp\\r\\n"}', js),
        Case("sdp_not_text", "POST", offer, offer, b'{"type": "offer", "sdp": 5}', js),
        Case("sdp_answer_type", "POST", offer, offer, b'{"type": "answer", "sdp": "v=0"}', js),
        Case("notes_of_instrument", "GET", "/v1/streams/{id}/notes?since=x", "/v1/streams/{id}/notes"),
        Case("wrong_method_put", "PUT", s, s, create, js),
        Case("wrong_method_health", "POST", "/v1/health", "/v1/health", b"{}", js),
        Case("wrong_method_models", "DELETE", "/v1/models", "/v1/models"),
        Case("foreign_origin", "POST", s, s, create, {**js, "Origin": "http://evil.example"}),
        Case("foreign_origin_patch", "PATCH", one, one, patch, {**js, "Origin": "http://evil.example"}),
        Case("foreign_host", "GET", s, s, None, {"Host": "evil.example"}),
        Case("foreign_host_patch", "PATCH", one, one, patch, {**js, "Host": "rebind.evil.example:8765"}),
        Case("huge_query", "GET", s + "?q=" + "a" * 100_000, s),
    ]


# -- the run ---------------------------------------------------------------------------------------------
class Soak:
    def __init__(self, a: argparse.Namespace, server: Server, http: Http, streams: list[str]) -> None:
        self.a, self.server, self.http = a, server, http
        self.pid = server.process.pid
        self.rng = random.Random(a.seed)
        self.streams = streams  # every stream kept; the first a.test_streams are under test
        self.tests = streams[: a.test_streams]
        self.anchors: dict[str, Probe] = {}  # the listener that stays, per stream under test
        self.churners: list[Probe] = []
        self.retired: list[dict] = []  # summaries of listeners that left or were closed
        self.lost: list[dict] = []  # listeners closed or failed while kept
        self.light: list[LightPeer] = []
        self.patches = Counter()  # status -> count, valid PATCHes
        self.bad = Counter()  # (case, status) -> count
        self.not_4xx: Counter = Counter()  # (case, status) -> count: a bad input answered with something else
        self.joins = self.leaves = self.join_failures = 0
        self.samples: list[dict] = []
        self.steps: Counter = Counter()  # steps made by each storm
        self.baseline_total = 0  # underruns of the streams under test when the run starts
        self.stop = asyncio.Event()

    async def setup(self) -> None:
        for sid in self.tests:
            self.anchors[sid] = await join(Probe, self.http, sid, "anchor_join")
            self.churners.append(await join(Probe, self.http, sid, "churn_join"))
        for sid in self.streams[len(self.tests):][: self.a.playing]:
            try:
                self.light.append(await join(LightPeer, self.http, sid, "light_join"))
            except Refused as e:  # the encoding thread is full: that is as many as this machine plays
                log(f"a light listener was refused ({e.status}); playing {len(self.light)} beside the tests")
                break

    async def underruns(self) -> dict[str, int]:
        out = {}
        for sid in self.tests:
            status, info = await self.http.call("stream_info", "GET", f"/v1/streams/{sid}", "/v1/streams/{id}")
            out[sid] = info["underruns"] if status == 200 else -1
        return out

    async def every(self, name: str, rate: float, step) -> None:
        """Call `step` `rate` times a second on the wall clock (fewer when a call takes longer: the steps
        made are counted, so a client that could not keep up shows)."""
        if rate <= 0:
            return
        period, n, start = 1.0 / rate, 0, time.monotonic()
        while not self.stop.is_set():
            await step()
            n += 1
            self.steps[name] = n
            try:
                await asyncio.wait_for(self.stop.wait(), max(0.0, start + n * period - time.monotonic()))
            except TimeoutError:
                pass

    async def patch_storm(self) -> None:
        async def step() -> None:
            sid = self.rng.choice(self.tests if self.rng.random() < 0.5 else self.streams)
            status, _ = await self.http.call("patch_storm", "PATCH", f"/v1/streams/{sid}", "/v1/streams/{id}",
                                             body={"controls": valid_controls(self.rng)})
            self.patches[status] += 1

        await self.every("patches", self.a.patch_rate, step)

    async def message_storm(self) -> None:
        k = 0
        messages = [m for m in channel_messages(self.rng) if m[0] not in self.a.skip]

        async def step() -> None:
            nonlocal k
            sid = self.tests[k % len(self.tests)]
            peer = self.anchors[sid]
            name, text, expect = messages[k % len(messages)]
            if name == "valid_controls":  # new values each time
                text = json.dumps({"controls": valid_controls(self.rng)})
            k += 1
            if peer.channel.readyState == "open":
                peer.send_message(name, text, expect)
            peer.take_replies()
            if peer.lost is not None:  # count it and put a new one in
                await self.replace(sid)

        await self.every("messages", self.a.message_rate, step)

    async def replace(self, sid: str) -> None:
        old = self.anchors[sid]
        self.lost.append({"stream": sid, **old.lost})
        log(f"a staying listener of {sid} was lost ({old.lost['state']}) after message '{old.lost['after']}'")
        await old.close()
        self.retired.append(old.summary())
        try:
            self.anchors[sid] = await join(Probe, self.http, sid, "anchor_rejoin")
        except (TimeoutError, Refused) as e:
            log(f"could not put a new listener on {sid}: {e}")
            self.stop.set()

    async def churn(self) -> None:
        """Every `--churn` seconds a listener joins a stream under test and the oldest of those that came and
        go leaves, so as many stay as `setup` put there (one per stream under test), give or take one."""
        async def step() -> None:
            sid = self.rng.choice(self.tests)
            try:
                self.churners.append(await join(Probe, self.http, sid, "churn_join"))
                self.joins += 1
            except (TimeoutError, Refused) as e:
                self.join_failures += 1
                log(f"a listener could not join {sid}: {e}")
            while len(self.churners) > len(self.tests):
                peer = self.churners.pop(0)
                if peer.lost is not None:
                    self.lost.append({"stream": peer.stream_id, **peer.lost})
                await peer.close()
                self.retired.append(peer.summary())
                self.leaves += 1

        await self.every("joins", 1.0 / self.a.churn, step)

    async def bad_inputs(self) -> None:
        cases = [c for c in corpus() if c.name not in self.a.skip]
        k = 0

        async def step() -> None:
            nonlocal k
            case = cases[k % len(cases)]
            sid = self.tests[k % len(self.tests)]
            k += 1
            status, body = await self.http.call(case.name, case.method, case.path.replace("{id}", sid), case.route,
                                                raw=case.raw, headers=case.headers)
            self.bad[(case.name, status)] += 1
            if not 400 <= status < 500:
                self.not_4xx[(case.name, status)] += 1
            if status == 201 and isinstance(body, dict) and "id" in body:  # a bad request made a stream: undo it
                await self.http.call("cleanup", "DELETE", f"/v1/streams/{body['id']}", "/v1/streams/{id}")

        await self.every("bad_inputs", self.a.bad_rate, step)

    async def sampler(self, started: float) -> None:
        cpu0, said = cpu_seconds(self.pid), -math.inf
        while not self.stop.is_set():
            t = time.monotonic() - started
            status, health = await self.http.call("health", "GET", "/v1/health", "/v1/health")
            async with self.http.session.get(self.http.url + "/metrics") as resp:
                m = prometheus(await resp.text())
            under = await self.underruns()
            s = {"t": round(t, 1), "rss": rss_bytes(self.pid), **{f"fds_{k}": v for k, v in open_fds(self.pid).items()},
                 "cpu_s": round(cpu_seconds(self.pid) - cpu0, 2), "test_underruns": sum(under.values()),
                 "all_underruns": int(m.get("wavecast_underruns_total", 0)), "peers": int(m.get("wavecast_peers", 0)),
                 "ticks": int(m.get("wavecast_engine_ticks_total", 0)),
                 "frames": int(m.get("wavecast_engine_frames_total", 0)),
                 "busy_s": round(m.get("wavecast_engine_busy_seconds_total", 0.0), 3),
                 "tick_max_ms": round(1000 * m.get("wavecast_engine_tick_max_seconds", 0.0), 2),
                 "encoding_load": round(m.get("wavecast_encoding_load", 0.0), 3),
                 "health": health.get("status") if isinstance(health, dict) else status}
            self.samples.append(s)
            if t - said >= 9.5:
                said = t
                log(f"{t:5.0f} s  rss {s['rss'] / 2**20:.1f} MiB  fds {s['fds_total']}  underruns test "
                    f"{s['test_underruns'] - self.baseline_total} (all {s['all_underruns']})  5xx "
                    f"{sum(self.http.server_errors.values())}  patches {sum(self.patches.values())}  bad "
                    f"{sum(self.bad.values())}  peers {s['peers']}  tick max {s['tick_max_ms']} ms  encoding "
                    f"{100 * s['encoding_load']:.0f} %")
            if self.server.process.poll() is not None:
                log(f"the daemon exited with status {self.server.process.returncode}")
                self.stop.set()
                return
            try:
                await asyncio.wait_for(self.stop.wait(), self.a.sample)
            except TimeoutError:
                pass

    async def run(self) -> dict:
        await asyncio.sleep(1.0)  # first audio everywhere
        baseline = await self.underruns()
        self.baseline_total = sum(baseline.values())
        seconds = 60 * self.a.minutes
        log(f"soaking for {seconds:g} s: {len(self.tests)} streams under test, {len(self.light)} more playing")
        started = time.monotonic()
        tasks = [asyncio.ensure_future(c) for c in (self.sampler(started), self.patch_storm(), self.message_storm(),
                                                     self.churn(), self.bad_inputs())]
        try:
            await asyncio.wait_for(self.stop.wait(), seconds)
            log("stopped early")
        except TimeoutError:
            pass
        self.stop.set()
        elapsed = time.monotonic() - started
        await asyncio.gather(*tasks)
        alive = self.server.process.poll() is None
        deadline = time.monotonic() + 5  # the last data-channel replies
        while alive and time.monotonic() < deadline and any(p.expected and p.channel.readyState == "open"
                                                            for p in self.anchors.values()):
            await asyncio.sleep(0.1)
            for p in self.anchors.values():
                p.take_replies()
        end = {"underruns": await self.underruns() if alive else {}, "streams": {}}
        if alive:
            for sid in self.tests:
                end["streams"][sid] = (await self.http.call("stream_info", "GET", f"/v1/streams/{sid}",
                                                            "/v1/streams/{id}"))[1]
            end["health"] = (await self.http.call("health", "GET", "/v1/health", "/v1/health"))[1]
        for p in [*self.anchors.values(), *self.churners]:
            if p.lost is not None:
                self.lost.append({"stream": p.stream_id, **p.lost})
            await p.close()
        packets = [p.packets for p in self.light]
        for p in self.light:
            await p.close()
        return {"elapsed": elapsed, "alive": alive, "baseline": baseline, "end": end, "light_packets": packets,
                "anchors": {sid: p.summary() for sid, p in self.anchors.items()},
                "listeners": [p.summary() for p in self.churners] + self.retired}


async def find_cap(http: Http, rng: random.Random) -> tuple[list[str], dict]:
    """Create streams until the engine refuses one; the ids and the refusal. A rate limit on creating
    streams is waited out (Retry-After), as a client should."""
    ids = []
    while True:
        status, body = await http.call("admission", "POST", "/v1/streams", "/v1/streams",
                                       body={"model": "default", "seed": len(ids), "controls": valid_controls(rng)})
        if status == 429 and (body or {}).get("error", {}).get("code") == "rate_limited":
            await asyncio.sleep(0.2)
            continue
        if status != 201:
            return ids, {"status": status, **(body or {})}
        ids.append(body["id"])


async def soak(a: argparse.Namespace, server: Server) -> dict:
    use_ice_host("127.0.0.1")
    rng = random.Random(a.seed)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=CONNECTIONS)) as session:
        http = Http(server.url, session)
        ids, refusal = await find_cap(http, rng)
        cap = len(ids)
        keep = max(a.test_streams + a.playing, int(a.share * cap))
        if keep > cap:
            raise SystemExit(f"the engine admits {cap} streams, fewer than --test-streams + --playing ({keep})")
        for sid in ids[keep:]:
            await http.call("admission", "DELETE", f"/v1/streams/{sid}", "/v1/streams/{id}")
        health = (await http.call("health", "GET", "/v1/health", "/v1/health"))[1]
        log(f"admission cap {cap} streams ({refusal.get('error', {}).get('code', refusal['status'])}); keeping {keep} "
            f"({100 * keep / cap:.0f} %), predicted tick {health['admission']['predicted_tick_ms']} ms of "
            f"{health['admission']['budget_ms']} ms")
        run = Soak(a, server, http, ids[:keep])
        await run.setup()
        setup = {"statuses": {str(k): v for k, v in sorted(http.statuses.items())}}
        http.statuses.clear()  # the setup's refusals are expected; from here on every response counts
        http.server_errors.clear()
        r = await run.run()
        return {"admission_cap": cap, "refusal": refusal, "setup": setup, "streams": keep,
                "admission": health["admission"], "run": run, **r}


def report(a: argparse.Namespace, out: dict, model: dict, log_text: str) -> dict:
    run: Soak = out.pop("run")
    samples, warmup = run.samples, a.warmup * 60 * a.minutes
    window = max(3 * a.sample, 0.1 * 60 * a.minutes)
    under = {sid: out["end"]["underruns"].get(sid, -1) - out["baseline"][sid] for sid in run.tests}
    anchors = list(out["anchors"].values())
    messages = [*anchors, *(x for x in out["listeners"] if x["messages"])]
    dc = {"sent": sum(x["messages"] for x in messages), "answered": sum(x["answered"] for x in messages),
          "refused": sum(x["refused"] for x in messages),
          "wrong_replies": dict(sum((Counter(x["wrong_replies"]) for x in messages), Counter()))}
    dc["unanswered"] = dc["sent"] - dc["answered"]
    errors = [{"method": m, "route": route, "case": case, "status": s, "count": n}
              for (m, route, case, s), n in sorted(run.http.server_errors.items())]
    dropped = [{"method": m, "route": route, "case": case, "count": n}
               for (m, route, case), n in sorted(run.http.unanswered.items())]
    not_4xx = [{"case": c, "status": s, "count": n} for (c, s), n in sorted(run.not_4xx.items())]
    rss, fds = drift(samples, "rss", warmup, window), drift(samples, "fds_other", warmup, window)
    after = [x for x in samples if x["t"] >= warmup]
    fds["udp_beyond_peers_max"] = max((x["fds_udp"] - x["peers"] for x in after), default=None)
    fds["tcp_max"] = max((x["fds_tcp"] for x in after), default=None)
    fds["sockets_ok"] = (bool(after) and fds["udp_beyond_peers_max"] <= JOINING
                         and fds["tcp_max"] <= CONNECTIONS + JOINING)
    first, last = (samples[0], samples[-1]) if samples else ({}, {})
    wall = max(1e-9, last.get("t", 0) - first.get("t", 0))
    engine = {"ticks_per_s": round((last.get("ticks", 0) - first.get("ticks", 0)) / wall, 1),
              "frames_per_tick": round((last.get("frames", 0) - first.get("frames", 0))
                                       / max(1, last.get("ticks", 0) - first.get("ticks", 0)), 2),
              "busy_share": round((last.get("busy_s", 0) - first.get("busy_s", 0)) / wall, 3),
              "tick_max_ms": last.get("tick_max_ms"), "daemon_cpu_per_s": round(
                  (last.get("cpu_s", 0) - first.get("cpu_s", 0)) / wall, 3)}
    health = out["end"].get("health") or {}
    targets = {
        "underruns": out["alive"] and sum(under.values()) == 0,
        "no_5xx": not errors,
        "bad_inputs_4xx": not not_4xx and not dropped,
        "messages_answered": dc["unanswered"] == 0 and not dc["wrong_replies"],
        "peers_stayed_up": not run.lost,
        "healthy": out["alive"] and health.get("status") == "ok",
        "rss_flat": rss["flat"], "fds_flat": fds["flat"] and fds["sockets_ok"],
    }
    return {
        "bench": "soak", "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": f"{model.get('name')} v{model.get('version')}", "cores": os.cpu_count(),
        "settings": {k: (sorted(v) if isinstance(v, set) else str(v) if isinstance(v, Path) else v)
                     for k, v in vars(a).items()},
        "seconds": round(out["elapsed"], 1), "setup": out["setup"], "admission_cap": out["admission_cap"],
        "streams": out["streams"],
        "share": round(out["streams"] / out["admission_cap"], 3), "admission": out["admission"],
        "test_streams": len(run.tests), "playing": len(run.light) + len(run.tests),
        "light_listener_packets": out["light_packets"],
        "targets": targets, "ok": all(targets.values()),
        "underruns": {"test_streams": under, "total": sum(under.values()),
                      "all_streams_at_end": samples[-1]["all_underruns"] if samples else None,
                      "buffer_ms_at_end": {sid: (info or {}).get("latency_ms", {}).get("buffer")
                                           for sid, info in out["end"]["streams"].items()}},
        "http": {"statuses": {str(k): v for k, v in sorted(run.http.statuses.items())}, "server_errors": errors,
                 "dropped_without_response": dropped},
        "patches": {str(k): v for k, v in sorted(run.patches.items())},
        "bad_inputs": {"sent": sum(run.bad.values()), "cases": len(corpus()) - len(a.skip & {c.name for c in corpus()}),
                       "by_case": {c: {str(s): n for (c2, s), n in sorted(run.bad.items()) if c2 == c}
                                   for c in sorted({c for c, _ in run.bad})}, "not_4xx": not_4xx},
        "datachannel": dc, "peers_lost": run.lost,
        "listeners": {"joined": run.joins, "left": run.leaves, "join_failures": run.join_failures,
                      "anchors": out["anchors"], "others": out["listeners"]},
        "health": health, "rss": rss, "fds": fds, "fds_at_end": {k[4:]: v for k, v in last.items() if k[:4] == "fds_"},
        "engine": engine,
        "rates": {name: {"asked": asked, "made": round(run.steps[name] / out["elapsed"], 2)} for name, asked in
                  (("patches", a.patch_rate), ("messages", a.message_rate), ("joins", 1 / a.churn),
                   ("bad_inputs", a.bad_rate))},
        "daemon_log_errors": sorted(set(re.findall(r"^(\w+(?:\.\w+)*(?:Error|Exception)\b.*)$", log_text, re.M)))[:20],
        "samples": samples,
    }


def summary(r: dict) -> str:
    t, u, e = r["targets"], r["underruns"], r["engine"]
    mark = lambda ok: "ok" if ok else "MISSED"  # noqa: E731
    anchors = r["listeners"]["anchors"].values()
    lines = [
        f"soak: {r['streams']} streams ({100 * r['share']:.0f} % of the admission cap {r['admission_cap']}), "
        f"{r['playing']} playing ({r['test_streams']} under test), {r['seconds']:g} s on {r['cores']} cores",
        f"underruns on the streams under test: {u['total']} {list(u['test_streams'].values())} "
        f"[{mark(t['underruns'])}]; all streams {u['all_streams_at_end']}; buffers at the end "
        f"{list(u['buffer_ms_at_end'].values())} ms",
        f"responses 5xx: {sum(x['count'] for x in r['http']['server_errors'])} [{mark(t['no_5xx'])}]",
        *(f"  {x['status']} {x['method']} {x['route']} ({x['case']}) x{x['count']}"
          for x in r["http"]["server_errors"]),
        f"bad inputs: {r['bad_inputs']['sent']} sent ({r['bad_inputs']['cases']} cases), not answered 4xx: "
        f"{sum(x['count'] for x in r['bad_inputs']['not_4xx'])} [{mark(t['bad_inputs_4xx'])}]",
        *(f"  {x['case']}: {x['status'] or 'no response'} x{x['count']}" for x in r["bad_inputs"]["not_4xx"]),
        f"PATCH storm: {r['patches']}; data channel: {r['datachannel']['sent']} sent, {r['datachannel']['answered']} "
        f"answered, wrong replies {r['datachannel']['wrong_replies']} [{mark(t['messages_answered'])}]",
        f"listeners lost: {len(r['peers_lost'])} [{mark(t['peers_stayed_up'])}] "
        f"{sorted({(x['state'], x['after']) for x in r['peers_lost']})}",
        f"listeners: {r['listeners']['joined']} joined, {r['listeners']['left']} left; staying listeners heard "
        f"levels {[a['level_db'] for a in anchors]} dB, gap frames {[a['gap_frames'] for a in anchors]}, "
        f"missing frames {[a['missing_frames'] for a in anchors]}",
        f"RSS {r['rss']['level'] and r['rss']['level'] / 2**20:.1f} MiB after warm-up, worst window "
        f"{r['rss']['max_drift_pct']:+} % [{mark(t['rss_flat'])}]; fds other than sockets {r['fds']['level']}, worst "
        f"window {r['fds']['max_drift_pct']:+} %, UDP sockets beyond peers at most {r['fds']['udp_beyond_peers_max']}, "
        f"TCP at most {r['fds']['tcp_max']} [{mark(t['fds_flat'])}]; at the end {r['fds_at_end']}",
        "rates a second, asked/made: " + ", ".join(f"{k} {v['asked']:g}/{v['made']:g}" for k, v in r["rates"].items()),
        f"daemon health at the end: {r['health'].get('status')} [{mark(t['healthy'])}]; CPU "
        f"{e['daemon_cpu_per_s']} s/s; engine {e['ticks_per_s']} ticks/s, {e['frames_per_tick']} frames a tick, "
        f"busy {100 * e['busy_share']:.0f} %, longest tick {e['tick_max_ms']} ms",
        f"{'all targets met' if r['ok'] else 'targets missed: ' + ', '.join(k for k, v in t.items() if not v)}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="how long to soak (default: %(default)s)")
    p.add_argument("--share", type=float, default=0.8, help="share of the admission cap kept (default: %(default)s)")
    p.add_argument("--test-streams", type=int, default=4, help="streams under test (default: %(default)s)")
    p.add_argument("--playing", type=int, default=4, help="more streams with a light listener each; fewer if the "
                   "daemon's encoding thread refuses (default: %(default)s)")
    p.add_argument("--buffer-frames", type=int, default=BUFFER_FRAMES,
                   help="passed to `wavecast serve --buffer-frames` (default: %(default)s)")
    p.add_argument("--patch-rate", type=float, default=20.0, help="valid PATCHes a second (default: %(default)s)")
    p.add_argument("--message-rate", type=float, default=20.0, help="data-channel messages a second "
                   "(default: %(default)s)")
    p.add_argument("--bad-rate", type=float, default=5.0, help="bad requests a second (default: %(default)s)")
    p.add_argument("--churn", type=float, default=2.0, help="seconds between listeners joining (default: %(default)s)")
    p.add_argument("--sample", type=float, default=5.0, help="seconds between samples (default: %(default)s)")
    p.add_argument("--warmup", type=float, default=0.2, help="share of the run before RSS and fds must be flat "
                   "(default: %(default)s)")
    p.add_argument("--skip", action="append", default=[], metavar="CASE",
                   help="leave out a bad-input case or data-channel message by name (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="seed of the choices made (default: %(default)s)")
    p.add_argument("--out", type=Path, default=ROOT / "bench/out/soak.json", help="JSON results (folder is made)")
    a = p.parse_args(argv)
    if a.minutes <= 0 or not 0 < a.share <= 1 or a.test_streams < 1 or a.playing < 0 or a.churn <= 0:
        p.error("--minutes, --churn and --share (at most 1) must be positive, --test-streams at least 1, "
                "--playing at least 0")
    a.skip = set(a.skip)
    known = {c.name for c in corpus()} | {m[0] for m in channel_messages(random.Random(0))}
    if a.skip - known:
        p.error(f"--skip: no case named {', '.join(sorted(a.skip - known))}; cases: {', '.join(sorted(known))}")
    with tempfile.TemporaryDirectory(prefix="wavecast-soak-") as tmp:
        log(f"starting wavecast serve --buffer-frames {a.buffer_frames} on 127.0.0.1")
        server = start_server(Path(tmp), args=("--buffer-frames", str(a.buffer_frames)))
        try:
            model = server.request("GET", "/v1/models/default")[1]
            out = uvloop.run(soak(a, server))
        except BaseException:
            log(f"failed; daemon log tail:\n{server.log.read_text()[-3000:]}")
            raise
        finally:
            stop_server(server)
        r = report(a, out, model, server.log.read_text())
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.with_suffix(".log").write_text(server.log.read_text())
    a.out.write_text(json.dumps(r, indent=1) + "\n")
    print(summary(r) + f"\nwrote {a.out} and the daemon's log {a.out.with_suffix('.log')}")
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
