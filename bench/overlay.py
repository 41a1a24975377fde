"""Control -> heard in Chromium: what the overlay page (an OBS browser source) hears, beside the aiortc client.

Run from the repository root, in a network namespace that has only loopback (as CI runs the browser tests):

    unshare -n -- sh -c 'ip link set lo up && PYTHONPATH=. exec python3 bench/overlay.py [--quick]'

Starts `wavecast serve --host 127.0.0.1 --port 0 --ice-host 127.0.0.1` (the tests' launcher) and Debian's chromium,
headless, driven by Playwright (tests/browser.py's flags). Per repetition, in alternating order:

- **chromium**: opens `/overlay?composer=none&model=default&f0=...&loudness=-20` (the page makes a plain stream
  of the default instrument, constant controls, so the pitch is exact), waits for its audio, then moves f0
  440 -> 660 Hz and back by HTTP PATCH. A script added before the page's own (Playwright init script) reads the
  page's AnalyserNode every few ms (each time the audio clock has moved) and takes the YIN pitch (the same
  algorithm and settings as bench/webrtc.py) and the level of the last 30 ms, stamped with the page's clock
  (performance.timeOrigin + performance.now(), mapped onto this process's time.time()).
- **aiortc**: the same two changes heard by bench/webrtc.py's client (daemon/client.py), on a stream of its own.
- **pause**: opens `/overlay?model=violin&composer=folk&density=1&legato=1` (few rests), waits for a sounding
  note, PATCHes `{"action": "pause"}` and measures when the page's level falls below -50 dBFS for good.

Prints a table (p50, p95, max, missed) and writes JSON (default bench/out/overlay.json; keys in bench/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import textwrap
import time
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

import aiohttp
import aiortc
import numpy as np
from playwright.async_api import Browser, Page, async_playwright

from bench.webrtc import FMAX, FMIN, LOUDNESS, SILENT_DB, STABLE, TOLERANCE, TimedListener, change, log, stats
from tests.browser import AUTOPLAY, CHROMIUM_ARGS, chromium_path
from tests.conftest import Server, start_server, stop_server
from wavecast.streaming.analysis import estimate_f0
from wavecast.streaming.engine import BUFFER_FRAMES

ROOT = Path(__file__).resolve().parent.parent
WINDOW_S = 0.030  # pitch and level window: the last 30 ms of the analyser's buffer (bench/webrtc.py's WINDOW)
HOLD_MS = 20.0 * (STABLE - 1)  # "held": bench/webrtc.py's STABLE 20 ms frames in a row span 80 ms after the first
SETTLE_S = 0.8  # audio before the first change
AFTER_S = 1.0  # audio analysed after each change (a change not heard by then is missed)
PAUSE_AFTER_S = 1.5
NOTE_DB = -40.0  # pause is sent while a note sounds at least this loud (the last 30 ms)
POLL_MS = 1  # setTimeout delay of the in-page reader (Chromium clamps a chain of timers to 4 ms)

# Added before the page's scripts (Playwright init script, not subject to the page's Content-Security-Policy).
# Reads window.wavecast.analyser whenever the AudioContext's clock has moved (or the samples have): pitch (a port
# of streaming/analysis.py estimate_f0: YIN, threshold 0.15, parabolic interpolation), level of the last 30 ms and
# level of the whole analyser buffer (what wavecast.level() reads), stamped with performance.timeOrigin + now().
POLLER = """
(() => {
  const FMIN = @FMIN, FMAX = @FMAX, WINDOW_S = @WINDOW_S, POLL_MS = @POLL_MS;
  const B = { polls: [], snaps: [], keepSnaps: 0 };
  window.__bench = B;
  B.now = () => performance.timeOrigin + performance.now();
  B.take = () => { const p = B.polls; B.polls = []; return p; };
  B.takeSnaps = () => { const s = B.snaps; B.snaps = []; return s; };
  function yin(x, sr) {
    const n = x.length;
    let mean = 0;
    for (let i = 0; i < n; i++) mean += x[i];
    mean /= n;
    const y = new Float64Array(n);
    for (let i = 0; i < n; i++) y[i] = x[i] - mean;
    const maxLag = Math.ceil(sr / FMIN), minLag = Math.max(2, Math.floor(sr / FMAX));
    const w = n - maxLag;
    if (w < maxLag) return NaN;
    const cmnd = new Float64Array(maxLag + 1);
    cmnd[0] = 1;
    let running = 0;
    for (let tau = 1; tau <= maxLag; tau++) {
      let d = 0;
      for (let i = 0; i < w; i++) { const v = y[i] - y[i + tau]; d += v * v; }
      running += d;
      cmnd[tau] = d * tau / Math.max(running, 1e-20);
    }
    let tau = -1;
    for (let t = minLag; t < maxLag; t++) if (cmnd[t] < 0.15) { tau = t; break; }
    if (tau >= 0) {
      while (tau + 1 < maxLag && cmnd[tau + 1] < cmnd[tau]) tau++;
    } else {
      tau = minLag;
      for (let t = minLag; t < maxLag; t++) if (cmnd[t] < cmnd[tau]) tau = t;
      if (cmnd[tau] > 0.5) return NaN;
    }
    const a = cmnd[tau - 1], b = cmnd[tau], c = cmnd[tau + 1];
    const den = a - 2 * b + c;
    return sr / (tau + (den > 0 ? 0.5 * (a - c) / den : 0));
  }
  const db = (x) => {
    let s = 0;
    for (let i = 0; i < x.length; i++) s += x[i] * x[i];
    const r = Math.sqrt(s / x.length);
    return r > 0 ? 20 * Math.log10(r) : -200;
  };
  let buf = null, lastCt = -1, lastSample = NaN;
  function tick() {
    const wc = window.wavecast;
    if (wc && wc.analyser && wc.context) {
      const a = wc.analyser, ct = wc.context.currentTime, sr = wc.context.sampleRate;
      if (!buf || buf.length !== a.fftSize) buf = new Float32Array(a.fftSize);
      a.getFloatTimeDomainData(buf);
      const last = buf[buf.length - 1];
      if (ct !== lastCt || last !== lastSample) {
        lastCt = ct;
        lastSample = last;
        const seg = buf.subarray(buf.length - Math.round(WINDOW_S * sr));
        const f0 = yin(seg, sr);
        B.polls.push([B.now(), ct, Number.isFinite(f0) ? f0 : null, db(seg), db(buf)]);
        if (B.keepSnaps > 0) {
          B.keepSnaps--;
          B.snaps.push({ f0: Number.isFinite(f0) ? f0 : null, sr, x: Array.from(seg) });
        }
      }
    }
    setTimeout(tick, POLL_MS);
  }
  tick();
})();
"""
for _name, _value in (("FMIN", FMIN), ("FMAX", FMAX), ("WINDOW_S", WINDOW_S), ("POLL_MS", POLL_MS)):
    POLLER = POLLER.replace(f"@{_name}", repr(_value))

# A poll as the page records it: [page time ms, AudioContext.currentTime s, f0 Hz or None, dB of the last 30 ms,
# dB of the whole analyser buffer]
T, CT, F0, DB, DB_ALL = range(5)


def first_held(polls: list[list], ok: list[bool], end: float) -> int | None:
    """Index of the first poll from which every poll over the next HOLD_MS is `ok` (and the record goes on that
    long, before `end`)."""
    for i, p in enumerate(polls):
        if not ok[i] or p[T] + HOLD_MS > end:
            continue
        j = i
        while j < len(polls) and polls[j][T] <= p[T] + HOLD_MS and ok[j]:
            j += 1
        if j == len(polls) or polls[j][T] > p[T] + HOLD_MS:
            return i
    return None


async def clock_offset(page: Page, tries: int = 5) -> dict:
    """The page's clock minus this process's time.time() (ms), from the evaluate with the shortest round trip."""
    best = None
    for _ in range(tries):
        before = time.time() * 1000
        page_ms = await page.evaluate("() => performance.timeOrigin + performance.now()")
        after = time.time() * 1000
        if best is None or after - before < best[1]:
            best = (page_ms - (before + after) / 2, after - before)
    return {"offset_ms": best[0], "round_trip_ms": best[1]}


async def take(page: Page, offset: float) -> list[list]:
    """The polls recorded since the last take, their times on this process's clock."""
    polls = await page.evaluate("() => __bench.take()")
    for p in polls:
        p[T] -= offset
    return polls


async def api(http: aiohttp.ClientSession, server: Server, method: str, path: str, body: object = None) -> dict:
    async with http.request(method, server.url + path, json=body) as resp:
        data = await resp.json(content_type=None)
        if resp.status >= 300:
            raise RuntimeError(f"{method} {path}: {resp.status} {data}")
        return data


async def open_overlay(browser: Browser, url: str, timeout: float = 20.0) -> tuple[Page, list[str]]:
    page = await browser.new_page(viewport={"width": 800, "height": 200})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))
    page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
    await page.add_init_script(script=POLLER)
    await page.goto(url)
    return page, errors


async def until_audible(page: Page, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await page.evaluate(f"() => !!window.__bench && __bench.polls.some(p => p[3] >= {SILENT_DB})"):
            return
        await asyncio.sleep(0.02)
    state = await page.evaluate("() => window.wavecast && [wavecast.state, wavecast.log.slice(-8)]")
    raise RuntimeError(f"the overlay played no audio within {timeout:g} s: {state}")


async def first_audio(page: Page, offset: float) -> dict:
    """Navigation start -> the analyser's first audible poll, and the steps between from the page's own records:
    resource timing of the offer's POST, the page's log (peer connected = ICE + DTLS; connected = track and data
    channel open, analyser attached)."""
    r = await page.evaluate("""(silent) => {
      const res = performance.getEntriesByType('resource').filter(e => e.name.endsWith('/webrtc'));
      const at = (type, state) => {
        const e = wavecast.log.find(x => x.type === type && (!state || x.state === state));
        return e ? e.t : null;
      };
      const made = performance.getEntriesByType('resource').filter(e => new URL(e.name).pathname === '/v1/streams');
      return { origin: performance.timeOrigin, offer: res.length ? res[0].startTime : null,
               stream: made.length ? made[made.length - 1].responseEnd : null,
               answer: res.length ? res[0].responseEnd : null, peer: at('peer', 'connected'),
               connected: at('connected'), audible: (__bench.polls.find(p => p[3] >= silent) || [null])[0],
               sampleRate: wavecast.context.sampleRate, fftSize: wavecast.analyser.fftSize,
               baseLatency: wavecast.context.baseLatency, outputLatency: wavecast.context.outputLatency };
    }""", SILENT_DB)
    origin = r["origin"]
    rel = lambda t: None if t is None else t - origin  # noqa: E731 (Date.now() and timeOrigin+now: epoch ms)
    offer, answer, peer, connected = r["offer"], r["answer"], rel(r["peer"]), rel(r["connected"])
    audible = rel(r["audible"])
    made = r["stream"]
    out = {"nav_to_first_audio_ms": audible, "nav_to_offer_ms": offer, "nav_to_stream_ms": made,
           "stream_to_offer_ms": None if made is None or offer is None else offer - made,
           "offer_to_answer_ms": None if answer is None or offer is None else answer - offer,
           "answer_to_peer_connected_ms": None if peer is None or answer is None else peer - answer,
           "peer_connected_to_open_ms": None if peer is None or connected is None else connected - peer,
           "open_to_first_audio_ms": None if connected is None or audible is None else audible - connected}
    out["page"] = {k: r[k] for k in ("sampleRate", "fftSize", "baseLatency", "outputLatency")}
    return out


async def browser_change(page: Page, http: aiohttp.ClientSession, server: Server, sid: str, offset: float,
                         start: float, target: float) -> dict:
    """PATCH f0 from `start` to `target`; when the page's analyser saw the pitch leave `start` and reach `target`
    (within TOLERANCE, held HOLD_MS), on this process's clock from the moment the PATCH was sent."""
    await take(page, offset)
    sent = time.time() * 1000
    await api(http, server, "PATCH", f"/v1/streams/{sid}", {"controls": {"f0": target}})
    acked = time.time() * 1000
    await asyncio.sleep(AFTER_S)
    polls = [p for p in await take(page, offset) if p[T] >= sent]
    end = sent + 1000 * AFTER_S
    f0 = [p[F0] for p in polls]
    moved = first_held(polls, [f is None or abs(f / start - 1) > TOLERANCE for f in f0], end)
    heard = first_held(polls, [f is not None and abs(f / target - 1) <= TOLERANCE for f in f0], end)
    steps = np.diff([p[T] for p in polls]) if len(polls) > 1 else np.array([np.nan])
    return {"how": "http", "start": start, "target": target, "ack_ms": acked - sent,
            "moved_ms": None if moved is None else polls[moved][T] - sent,
            "heard_ms": None if heard is None else polls[heard][T] - sent,
            "polls": len(polls), "poll_step_ms_median": float(np.median(steps)),
            "poll_step_ms_max": float(np.max(steps))}


async def page_stream(page: Page) -> dict:
    return await page.evaluate("() => wavecast.stream")


async def browser_rep(browser: Browser, http: aiohttp.ClientSession, server: Server, n: int,
                      snapshots: int, query: str = "") -> dict:
    start, other = (440.0, 660.0) if n % 2 == 0 else (660.0, 440.0)
    url = (f"{server.url}/overlay?name=bench-chromium-{n}&model=default&composer=none&seed={n}"
           f"&f0={start:g}&loudness={LOUDNESS:g}{query}")
    page, errors = await open_overlay(browser, url)
    sid = None
    try:
        await until_audible(page)
        sid = (await page_stream(page))["id"]
        clock = await clock_offset(page)
        r = {"rep": n, "stream": sid, "clock": clock} | await first_audio(page, clock["offset_ms"])
        if snapshots:
            await page.evaluate(f"() => {{ __bench.keepSnaps = {snapshots}; }}")
        await asyncio.sleep(SETTLE_S)
        await page.evaluate("() => wavecast.stats()")  # the jitter buffer's average restarts here
        r["changes"] = [await browser_change(page, http, server, sid, clock["offset_ms"], start, other),
                        await browser_change(page, http, server, sid, clock["offset_ms"], other, start)]
        r["neteq"] = await page.evaluate("() => wavecast.stats()")  # averaged over the two changes
        # the stream's telemetry as the page got it, ms after navigation start: when underruns grew the buffer
        r["telemetry"] = await page.evaluate("""() => wavecast.log.filter(e => e.type === 'telemetry').map(e =>
          [Math.round(e.t - performance.timeOrigin), e.message.underruns, e.message.latency_ms.buffer])""")
        r["snapshots"] = await page.evaluate("() => __bench.takeSnaps()") if snapshots else []
        info = await api(http, server, "GET", f"/v1/streams/{sid}")
        r |= {"underruns": info["underruns"], "buffer_ms": info["latency_ms"]["buffer"],
              "buffered_ms": info["buffered_ms"], "errors": errors[:10]}
    finally:
        await page.close()  # first: a page made by name would make its stream again
        if sid is not None:
            await http.delete(f"{server.url}/v1/streams/{sid}")
    return r


async def aiortc_rep(http: aiohttp.ClientSession, server: Server, n: int) -> dict:
    """bench/webrtc.py's client on a stream of its own: the same two changes, by PATCH."""
    start, other = (440.0, 660.0) if n % 2 == 0 else (660.0, 440.0)
    created = await api(http, server, "POST", "/v1/streams", {"seed": n, "controls": {"f0": start,
                                                                                        "loudness": LOUDNESS}})
    sid = created["id"]
    listener = await TimedListener.connect(server.url, sid)
    try:
        await listener.until(round(SETTLE_S * 50))
        r = {"rep": n, "stream": sid,
             "offer_to_first_audio_ms": 1000 * (listener.first_audio_at - listener.offered_at)}
        url = f"{server.url}/v1/streams/{sid}"
        r["changes"] = [await change(listener, http, url, "http", start, other),
                        await change(listener, http, url, "http", other, start)]
        info = await api(http, server, "GET", f"/v1/streams/{sid}")
        r |= {"underruns": info["underruns"], "buffer_ms": info["latency_ms"]["buffer"],
              "buffered_ms": info["buffered_ms"],
              "jitter_buffer_ms": 1000 * float(np.median(listener.held)) if listener.held else None}
    finally:
        await listener.close()
        await http.delete(f"{server.url}/v1/streams/{sid}")
    return r


async def pause_rep(browser: Browser, http: aiohttp.ClientSession, server: Server, n: int,
                    query: str = "") -> dict:
    """A composed stream in the overlay: pause while a note sounds; when the page's level falls below SILENT_DB
    for good (to the end of the PAUSE_AFTER_S analysed), by the last 30 ms and by the whole analyser buffer."""
    url = f"{server.url}/overlay?name=bench-pause-{n}&model=violin&composer=folk&seed={n}&density=1&legato=1{query}"
    page, errors = await open_overlay(browser, url)
    sid = None
    try:
        await until_audible(page)
        sid = (await page_stream(page))["id"]
        clock = await clock_offset(page)
        await asyncio.sleep(1.0)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # a note sounding now: the page's last 3 reads (~25 ms) loud enough
            loud = await page.evaluate(f"() => __bench.polls.slice(-3).map(p => p[3]).every(db => db >= {NOTE_DB})")
            if loud:
                break
            await asyncio.sleep(0.005)
        else:
            raise RuntimeError(f"no note above {NOTE_DB:g} dBFS in 10 s")
        await take(page, clock["offset_ms"])
        sent = time.time() * 1000
        await api(http, server, "PATCH", f"/v1/streams/{sid}", {"action": "pause"})
        acked = time.time() * 1000
        await asyncio.sleep(PAUSE_AFTER_S)
        polls = [p for p in await take(page, clock["offset_ms"]) if p[T] >= sent]
        info = await api(http, server, "GET", f"/v1/streams/{sid}")
        r = {"rep": n, "stream": sid, "ack_ms": acked - sent, "level_at_pause_db": polls[0][DB] if polls else None,
             "buffer_ms": info["latency_ms"]["buffer"], "underruns": info["underruns"], "errors": errors[:10]}
        for key, col in (("silent_ms", DB), ("silent_full_window_ms", DB_ALL)):
            quiet = [p[col] < SILENT_DB for p in polls]
            # the first poll from which every later one is quiet
            i = next((i for i in range(len(polls)) if all(quiet[i:])), None)
            r[key] = None if i is None or polls[-1][T] - polls[i][T] < HOLD_MS else polls[i][T] - sent
    finally:
        await page.close()
        if sid is not None:
            await http.delete(f"{server.url}/v1/streams/{sid}")
    return r


def yin_check(snaps: list[dict]) -> dict:
    """The page's YIN against streaming/analysis.py's estimate_f0 on the same samples."""
    cents = []
    for s in snaps:
        py = estimate_f0(np.asarray(s["x"], np.float64), s["sr"], FMIN, FMAX)
        if s["f0"] is None or not np.isfinite(py):
            cents.append(0.0 if s["f0"] is None and not np.isfinite(py) else float("inf"))
        else:
            cents.append(abs(1200 * np.log2(s["f0"] / py)))
    return {"snapshots": len(snaps), "max_cents": max(cents) if cents else None}


async def run(server: Server, a: argparse.Namespace) -> dict:
    out = {"chromium": [], "aiortc": [], "pause": []}
    query = "".join(f"&{x}" for x in a.query)
    async with async_playwright() as p, aiohttp.ClientSession() as http:
        browser = await p.chromium.launch(executable_path=chromium_path(), headless=True,
                                          args=[*CHROMIUM_ARGS, AUTOPLAY])
        out["chromium_version"] = browser.version
        try:
            log("warming up: one overlay page (not counted)")
            await pause_rep(browser, http, server, 1000, query)
            for n in range(a.reps):
                order = ("chromium", "aiortc") if n % 2 == 0 else ("aiortc", "chromium")
                for who in order:
                    if who == "chromium":
                        out["chromium"].append(await browser_rep(browser, http, server, n, 30 if n == 0 else 0,
                                                                 query))
                    else:
                        out["aiortc"].append(await aiortc_rep(http, server, n))
                out["pause"].append(await pause_rep(browser, http, server, n, query))
                b, c, q = out["chromium"][-1], out["aiortc"][-1], out["pause"][-1]
                ms = lambda v: "missed" if v is None else f"{v:.0f}"  # noqa: E731
                log(f"rep {n + 1}/{a.reps}: heard chromium {'/'.join(ms(x['heard_ms']) for x in b['changes'])} ms "
                    f"(buffer {b['buffer_ms']} ms), aiortc {'/'.join(ms(x['heard_ms']) for x in c['changes'])} ms "
                    f"(buffer {c['buffer_ms']} ms); first audio {ms(b['nav_to_first_audio_ms'])} ms; pause -> "
                    f"silent {ms(q['silent_ms'])} ms")
        finally:
            await browser.close()
    return out


ROWS = [  # (title, client, key in "latency")
    ("control -> heard (PATCH)", "chromium", "chromium_heard"), ("", "aiortc", "aiortc_heard"),
    ("  pitch starts to move", "chromium", "chromium_moved"), ("", "aiortc", "aiortc_moved"),
    ("  PATCH response received", "chromium", "chromium_ack"), ("", "aiortc", "aiortc_ack"),
    ("first audio: navigation start", "chromium", "first_audio"),
    ("  nav -> stream found or made", "chromium", "nav_to_stream"),
    ("  -> offer posted (ICE gathering)", "chromium", "stream_to_offer"),
    ("  offer -> answer", "chromium", "offer_to_answer"),
    ("  answer -> ICE+DTLS connected", "chromium", "answer_to_peer_connected"),
    ("  -> track + channel open", "chromium", "peer_connected_to_open"),
    ("  -> analyser hears audio", "chromium", "open_to_first_audio"),
    ("first audio: offer posted", "aiortc", "aiortc_first_audio"),
    ("pause -> silent (< -50 dBFS, 30 ms)", "chromium", "pause_silent"),
    ("  (whole analyser buffer)", "chromium", "pause_silent_full_window"),
]


def report(r: dict) -> str:
    s, pg = r["settings"], r["page"]
    lines = [*textwrap.wrap(
        f"wavecast overlay bench: {s['reps']} reps ({2 * s['reps']} control changes per client), chromium "
        f"{r['host']['chromium']} and aiortc {r['host']['aiortc']} alternating, --buffer-frames {s['buffer_frames']}, "
        f"127.0.0.1; {r['host']['cores']} cores, load average {r['host']['loadavg_1min_before']:.1f} before, "
        f"{r['host']['loadavg_1min_after']:.1f} after", 116), "",
        f"{'ms':<38}{'client':<10}{'p50':>8}{'p95':>8}{'max':>8}{'missed':>8}"]
    for title, who, key in ROWS:
        x = r["latency"][key]
        cells = [f"{x[k]:8.1f}" if k in x else f"{'-':>8}" for k in ("median", "p95", "max")]
        lines.append(f"{title:<38}{who:<10}{''.join(cells)}{x['missed']:>8}")
    buf, pct = r["daemon_buffer_ms"], f"{100 * TOLERANCE:g} %"
    notes = [
        f"Daemon buffer at the changes (latency_ms.buffer, median [min-max]): chromium {buf['chromium']['median']:g} "
        f"[{buf['chromium']['min']:g}-{buf['chromium']['max']:g}] ms, aiortc {buf['aiortc']['median']:g} "
        f"[{buf['aiortc']['min']:g}-{buf['aiortc']['max']:g}] ms (it starts at {10 * s['buffer_frames']} ms and grows "
        f"10 ms at each underrun); underruns per stream, median: chromium {r['underruns']['chromium']:g}, aiortc "
        f"{r['underruns']['aiortc']:g}. Chromium's NetEQ jitter buffer (getStats jitterBufferDelay / emitted, over "
        f"the changes): median {r['neteq_ms']:.0f} ms; the aiortc client's (packet in -> frame out): median "
        f"{r['aiortc_jitter_buffer_ms']:.0f} ms.",
        f"The page's AudioContext runs at {pg['sampleRate']:g} Hz; its analyser holds {pg['fftSize']} samples "
        f"({1000 * pg['fftSize'] / pg['sampleRate']:.1f} ms) and is read each time the audio clock moves: every "
        f"{r['poll_step_ms']:.1f} ms (median), the audio thread's render period, which is the resolution of the "
        f"browser figures. baseLatency {1000 * pg['baseLatency']:.0f} ms and outputLatency "
        f"{1000 * pg['outputLatency']:.0f} ms (the output device, after the analyser) are not in them.",
        f"'heard' = the first read from which the YIN pitch of the last {1000 * WINDOW_S:g} ms ({FMIN:g}-{FMAX:g} Hz) "
        f"stays within {pct} of the new f0 for {HOLD_MS:g} ms, as bench/webrtc.py ({STABLE} 20 ms frames in a row); "
        f"'starts to move' = off the old f0 by more than {pct} for {HOLD_MS:g} ms. Page times are mapped onto "
        f"time.time() (the quickest of 5 page.evaluate round trips, median {r['clock_round_trip_ms']:.1f} ms). The "
        f"page's YIN agrees with estimate_f0 on {r['yin_check']['snapshots']} snapshots to "
        f"{r['yin_check']['max_cents']:.2f} cents.",
        "Both clients' figures include the engine's control smoothing (10 ms time constant, ~30 ms to 3 %), the "
        "daemon's buffer, the 20 ms packet and Opus; chromium adds NetEQ, the MediaStream -> Web Audio hand-over "
        "and one render period; aiortc adds its fixed 80 ms jitter buffer and stamps 20 ms frames as they leave it.",
        "DESIGN target (section 7): control change -> audible in a browser on localhost < 100 ms; first audio after "
        "offer < 300 ms.",
    ]
    for note in notes:
        lines += ["", *textwrap.wrap(note, 116)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=10, help="repetitions; each makes 2 control changes per client, "
                                                        "1 page load and 1 pause (default: %(default)s)")
    p.add_argument("--buffer-frames", type=int, default=BUFFER_FRAMES,
                   help="passed to `wavecast serve --buffer-frames` (default: %(default)s)")
    p.add_argument("--query", action="append", default=[], metavar="KEY=VALUE",
                   help="more overlay options for the pages, e.g. --query show=credit (no visual); repeatable")
    p.add_argument("--quick", action="store_true", help="3 reps: a smoke test, rough numbers")
    p.add_argument("--out", type=Path, default=ROOT / "bench/out/overlay.json", help="JSON results (folder is made)")
    a = p.parse_args(argv)
    if a.quick:
        a.reps = 3
    if a.reps < 1 or a.buffer_frames < 1:
        p.error("--reps and --buffer-frames must be at least 1")
    started, load_before = time.perf_counter(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="wavecast-bench-") as tmp:
        log(f"starting wavecast serve --buffer-frames {a.buffer_frames} on 127.0.0.1")
        server = start_server(Path(tmp), args=("--buffer-frames", str(a.buffer_frames)))
        try:
            res = asyncio.run(run(server, a))
        except BaseException:
            log(f"failed; daemon log tail:\n{server.log.read_text()[-3000:]}")
            raise
        finally:
            stop_server(server)
    ch, ai, pa = res["chromium"], res["aiortc"], res["pause"]
    changes = lambda reps, k: [c[k] for x in reps for c in x["changes"]]  # noqa: E731
    latency = {"chromium_heard": stats(changes(ch, "heard_ms")), "aiortc_heard": stats(changes(ai, "heard_ms")),
               "chromium_moved": stats(changes(ch, "moved_ms")), "aiortc_moved": stats(changes(ai, "moved_ms")),
               "chromium_ack": stats(changes(ch, "ack_ms")), "aiortc_ack": stats(changes(ai, "ack_ms")),
               "first_audio": stats([x["nav_to_first_audio_ms"] for x in ch]),
               "aiortc_first_audio": stats([x["offer_to_first_audio_ms"] for x in ai]),
               "pause_silent": stats([x["silent_ms"] for x in pa]),
               "pause_silent_full_window": stats([x["silent_full_window_ms"] for x in pa])}
    for k in ("nav_to_offer", "nav_to_stream", "stream_to_offer", "offer_to_answer", "answer_to_peer_connected",
              "peer_connected_to_open",
              "open_to_first_audio"):
        latency[k] = stats([x[f"{k}_ms"] for x in ch])
    for x in latency.values():
        if "values" in x:
            x["min"] = min(x["values"])
    neteq = [x["neteq"]["jitterBufferMs"] for x in ch if x.get("neteq") and x["neteq"].get("jitterBufferMs")]
    held = [x["jitter_buffer_ms"] for x in ai if x["jitter_buffer_ms"] is not None]
    pct = lambda v, q: float(np.percentile(v, q)) if v else None  # noqa: E731
    heard_ch, heard_ai = [v for v in changes(ch, "heard_ms") if v is not None], \
        [v for v in changes(ai, "heard_ms") if v is not None]
    r = {
        "bench": "overlay", "created": datetime.now(UTC).isoformat(timespec="seconds"), "quick": a.quick,
        "host": {"cores": os.cpu_count(), "python": platform.python_version(), "aiortc": aiortc.__version__,
                 "playwright": version("playwright"), "chromium": res["chromium_version"],
                 "loadavg_1min_before": load_before[0], "loadavg_1min_after": os.getloadavg()[0]},
        "settings": {"reps": a.reps, "buffer_frames": a.buffer_frames, "query": a.query, "loudness_db": LOUDNESS,
                     "window_ms": 1000 * WINDOW_S, "fmin": FMIN, "fmax": FMAX, "tolerance": TOLERANCE,
                     "hold_ms": HOLD_MS, "after_s": AFTER_S, "pause_after_s": PAUSE_AFTER_S, "silent_db": SILENT_DB,
                     "note_db": NOTE_DB,
                     "poll_timeout_ms": POLL_MS},
        "control_to_heard_ms_p50": pct(heard_ch, 50), "control_to_heard_ms_p95": pct(heard_ch, 95),
        "aiortc_control_to_heard_ms_p50": pct(heard_ai, 50), "aiortc_control_to_heard_ms_p95": pct(heard_ai, 95),
        "first_audio_ms_p50": latency["first_audio"].get("median"),
        "first_audio_ms_p95": latency["first_audio"].get("p95"),
        "pause_to_silent_ms_p50": latency["pause_silent"].get("median"),
        "pause_to_silent_ms_p95": latency["pause_silent"].get("p95"),
        "latency": latency,
        "daemon_buffer_ms": {who: {"median": float(np.median([x["buffer_ms"] for x in reps])),
                                   "min": min(x["buffer_ms"] for x in reps), "max": max(x["buffer_ms"] for x in reps)}
                             for who, reps in (("chromium", ch), ("aiortc", ai))},
        "underruns": {who: float(np.median([x["underruns"] for x in reps])) for who, reps in (("chromium", ch),
                                                                                              ("aiortc", ai))},
        "neteq_ms": float(np.median(neteq)) if neteq else float("nan"),
        "aiortc_jitter_buffer_ms": float(np.median(held)) if held else float("nan"),
        "poll_step_ms": float(np.median([c["poll_step_ms_median"] for x in ch for c in x["changes"]])),
        "clock_round_trip_ms": float(np.median([x["clock"]["round_trip_ms"] for x in ch])),
        "page": ch[0]["page"],
        "yin_check": yin_check(ch[0]["snapshots"]),
    }
    for x in ch:
        x.pop("snapshots", None)
    r["reps"] = {"chromium": ch, "aiortc": ai, "pause": pa}
    r["seconds"] = round(time.perf_counter() - started, 1)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(r, indent=2) + "\n")
    print(report(r))
    print(f"\nwrote {a.out} in {r['seconds']:g} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
