"""What a person driving wavecast over WebRTC on localhost feels: first audio, control latency, gaps.

Run from the repository root:  PYTHONPATH=. .venv/bin/python bench/webrtc.py [--reps N] [--buffer-frames F] [--quick]
Starts `wavecast serve --port 0 --ice-host 127.0.0.1` (all traffic stays on 127.0.0.1), then per repetition
creates a stream (f0 440 or 660 Hz, loudness -20 dB), connects an aiortc client (daemon/client.py), steers f0
once over the `controls` data channel and once by HTTP PATCH, and deletes the stream. Every received 20 ms
frame is timestamped on arrival (time.monotonic), i.e. after aiortc's receive jitter buffer, when a player
would get it; the time each RTP packet reached the client is recorded too, so the jitter buffer's hold is
measured. Then one stream with 1 and with --listeners aiortc listeners (in this process): the daemon's CPU
seconds per wall second (/proc/PID/stat) over --cpu-window each, and their ratio. Prints a table (median,
p90, max over repetitions) and writes JSON (default bench/out/webrtc.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import aiortc
import numpy as np
from aiortc.mediastreams import MediaStreamError

from tests.conftest import Server, start_server, stop_server
from wavecast.daemon.client import Listener
from wavecast.models.store import SHIPPED
from wavecast.streaming.analysis import estimate_f0, rms_db
from wavecast.streaming.engine import BUFFER_FRAMES, render
from wavecast.streaming.model import FrameModel

ROOT = Path(__file__).resolve().parent.parent
SR = 48_000
LOUDNESS = -20.0
SILENT_DB = -50.0
WINDOW = int(0.030 * SR)  # pitch window ending at each received frame
FMIN, FMAX = 350.0, 900.0  # YIN search range bracketing 400..800 Hz
TOLERANCE = 0.03
STABLE = 5  # a change counts as heard at the first frame from which this many windows in a row read the target
SETTLE_S, AFTER_S = 0.5, 0.8  # audio received before a change, and after it (analysed)


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


class TimedListener(Listener):
    """daemon.client.Listener plus timestamps for each step of connecting and every frame as it arrives."""

    keep = True  # keep every frame's audio (False: count frames only)

    def __init__(self) -> None:
        super().__init__()
        self.frames: list[tuple[float, np.ndarray]] = []  # (arrival, left channel float32)
        self.count = 0
        self.packet_at: dict[int, float] = {}  # RTP timestamp -> when the packet reached the client
        self.held: list[float] = []  # per frame: seconds from its packet's arrival to recv() handing it over
        self.arrived = asyncio.Event()
        self.answered_at = self.opened_at = self.track_at = 0.0
        self.channel.on("open", lambda: setattr(self, "opened_at", time.monotonic()))
        self.track_ready.add_done_callback(self._start_receiving)
        remote = self.pc.setRemoteDescription

        async def timed_remote(description: aiortc.RTCSessionDescription) -> None:
            self.answered_at = time.monotonic()  # Listener.connect calls this as soon as the answer is read
            for receiver in self.pc.getReceivers():
                self._time_packets(receiver)
            await remote(description)

        self.pc.setRemoteDescription = timed_remote

    def _time_packets(self, receiver: aiortc.RTCRtpReceiver) -> None:
        """Note when each RTP packet reaches the receiver, before its jitter buffer (a decoded frame's pts is its
        packet's RTP timestamp minus the first packet's: aiortc's TimestampMapper)."""
        handle, origin = receiver._handle_rtp_packet, []

        async def timed(packet, arrival_time_ms: int) -> None:
            if not origin:
                origin.append(packet.timestamp)
            self.packet_at.setdefault((packet.timestamp - origin[0]) % 2**32, time.monotonic())
            await handle(packet, arrival_time_ms)

        receiver._handle_rtp_packet = timed

    def _start_receiving(self, ready: asyncio.Future) -> None:
        self.track_at = time.monotonic()
        self.receiver = asyncio.ensure_future(self._receive(ready.result()))

    async def _receive(self, track: aiortc.MediaStreamTrack) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            now = time.monotonic()
            if self.first_audio_at is None:
                self.first_audio_at = now
            self.count += 1
            arrived = self.packet_at.pop(frame.pts, None)
            if arrived is not None:
                self.held.append(now - arrived)
            if self.keep:
                pcm = frame.to_ndarray().reshape(-1, len(frame.layout.channels))[:, 0]
                self.frames.append((now, pcm.astype(np.float32) / 32768.0))
            self.arrived.set()

    async def until(self, count: int) -> None:
        """Wait until `count` frames have been received in all."""
        while len(self.frames) < count:
            self.arrived.clear()
            await asyncio.wait_for(self.arrived.wait(), 10)

    async def close(self) -> None:
        await super().close()
        if hasattr(self, "receiver"):
            self.receiver.cancel()


def pitches(frames: list[tuple[float, np.ndarray]], first: int) -> list[float]:
    """YIN f0 of the WINDOW samples ending at each frame from `first` on (nan where unvoiced)."""
    audio = np.concatenate([pcm for _, pcm in frames])
    ends = np.cumsum([len(pcm) for _, pcm in frames])
    return [estimate_f0(audio[max(0, e - WINDOW) : e], SR, FMIN, FMAX) for e in ends[first:]]


def first_run(ok: list[bool]) -> int | None:
    """Offset of the first STABLE True values in a row."""
    return next((j for j in range(len(ok) - STABLE + 1) if all(ok[j : j + STABLE])), None)


def onsets(frames: list[tuple[float, np.ndarray]], first: int, start: float, target: float) -> tuple[int | None, ...]:
    """Offsets from frame `first` of the first frames from which the pitch has left `start` and reached `target`."""
    f0 = pitches(frames, first)
    moved = first_run([not abs(f / start - 1) <= TOLERANCE for f in f0])  # nan (unvoiced) counts as moved
    return moved, first_run([abs(f / target - 1) <= TOLERANCE for f in f0])


def reference(start: float, target: float) -> dict:
    """The same analysis on a clockless render of the default model (no buffers, no network): how long after the
    first 20 ms frame that carries a change the pitch moves and arrives, i.e. what smoothing and analysis add."""
    audio = render(FrameModel(SHIPPED / "default", device="cpu"), 1.5, 0, {"f0": start, "loudness": LOUDNESS},
                   timeline=[(0.5, {"f0": target})])
    frames = [(0.0, audio[i : i + 960]) for i in range(0, len(audio), 960)]
    return {k: None if j is None else 20.0 * j for k, j in zip(("moved_ms", "heard_ms"),
                                                                onsets(frames, 25, start, target), strict=True)}


async def change(listener: TimedListener, http: aiohttp.ClientSession, url: str, how: str, start: float,
                 target: float) -> dict:
    """Move f0 from `start` to `target` over the data channel or by PATCH: when it was acknowledged, when the
    pitch left `start` and when it reached `target` (within TOLERANCE for STABLE windows in a row)."""
    first = len(listener.frames)
    sent = time.monotonic()
    if how == "datachannel":
        reply = await listener.send_controls({"f0": target})
        if reply.get("type") != "controls":
            raise RuntimeError(f"data channel refused the change: {reply}")
    else:
        async with http.patch(url, json={"controls": {"f0": target}}) as resp:
            if resp.status != 200:
                raise RuntimeError(f"PATCH failed: {resp.status} {await resp.text()}")
    acked = time.monotonic()
    await listener.until(first + round(AFTER_S * 50))
    moved, heard = onsets(listener.frames, first, start, target)
    ms = lambda j: None if j is None else 1000 * (listener.frames[first + j][0] - sent)  # noqa: E731
    return {"how": how, "start": start, "target": target, "ack_ms": 1000 * (acked - sent), "moved_ms": ms(moved),
            "heard_ms": ms(heard)}


async def rep(server: Server, http: aiohttp.ClientSession, n: int) -> dict:
    start, other = (440.0, 660.0) if n % 2 == 0 else (660.0, 440.0)
    body = {"seed": n, "controls": {"f0": start, "loudness": LOUDNESS}}
    status, created = server.request("POST", "/v1/streams", body)
    if status != 201:
        raise RuntimeError(f"cannot create a stream: {status} {created}")
    sid = created["id"]
    listener = await TimedListener.connect(server.url, sid)
    try:
        await listener.until(round(SETTLE_S * 50))
        ready = max(listener.opened_at, listener.track_at)
        r = {"rep": n, "offer_to_first_audio_ms": 1000 * (listener.first_audio_at - listener.offered_at),
             "offer_to_answer_ms": 1000 * (listener.answered_at - listener.offered_at),
             "answer_to_open_ms": 1000 * (ready - listener.answered_at),
             "open_to_first_audio_ms": 1000 * (listener.first_audio_at - ready)}
        url = f"{server.url}/v1/streams/{sid}"
        r["datachannel"] = await change(listener, http, url, "datachannel", start, other)
        r["http"] = await change(listener, http, url, "http", other, start)
    finally:
        await listener.close()
    levels = [rms_db(pcm) for _, pcm in listener.frames]
    audible = next((i for i, db in enumerate(levels) if db >= SILENT_DB), len(levels))
    r["frames"] = len(levels)
    r["startup_silent_frames"] = audible  # near-silent frames before the first audible one
    r["silent_frames"] = sum(int(db < SILENT_DB) for db in levels[audible:])
    blocks = [min(rms_db(b) for b in pcm.reshape(-1, 240)) for _, pcm in listener.frames[audible + 1 :]]
    r["gap_frames"] = sum(int(db < SILENT_DB) for db in blocks)  # a 5 ms stretch of near-silence inside a frame
    # (the first audible frame starts with ~5 ms of near-silence, Opus's encoder delay, so it is left out)
    r["underruns"] = server.request("GET", f"/v1/streams/{sid}")[1]["underruns"]
    r["jitter_buffer_ms"] = 1000 * float(np.median(listener.held)) if listener.held else None
    server.request("DELETE", f"/v1/streams/{sid}")
    return r


def stats(values: list[float | None]) -> dict:
    got = [v for v in values if v is not None]
    if not got:
        return {"n": 0, "missed": len(values)}
    return {"median": float(np.median(got)), "p90": float(np.percentile(got, 90)),
            "p95": float(np.percentile(got, 95)), "max": float(max(got)),
            "n": len(got), "missed": len(values) - len(got), "values": [round(v, 2) for v in got]}


def smoothing_ms(tau: float, frame_s: float, start: float, target: float) -> float:
    """Time the engine's one-pole control smoother takes to bring f0 within TOLERANCE of `target`."""
    frames = math.ceil(tau / frame_s * math.log(abs(target - start) / (TOLERANCE * target)))  # (1-a)^n <= remaining
    return 1000 * frames * frame_s


async def run(server: Server, reps: int) -> list[dict]:
    results = []
    async with aiohttp.ClientSession() as http:
        for n in range(reps):
            results.append(await rep(server, http, n))
            x = results[-1]
            heard = {how: "missed" if x[how]["heard_ms"] is None else f"{x[how]['heard_ms']:.0f} ms"
                     for how in ("datachannel", "http")}
            log(f"rep {n + 1}/{reps}: first audio {x['offer_to_first_audio_ms']:.0f} ms, data channel "
                f"{heard['datachannel']}, PATCH {heard['http']}, silent frames {x['silent_frames']}, "
                f"underruns {x['underruns']}")
    return results


class CountingListener(TimedListener):
    keep = False


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def cpu_load(pid: int, listeners: list[CountingListener], seconds: float) -> dict:
    """The daemon's CPU seconds per wall second over `seconds`, and the frames each listener got meanwhile."""
    counts, cpu, wall = [x.count for x in listeners], cpu_seconds(pid), time.monotonic()
    await asyncio.sleep(seconds)
    cpu, wall = cpu_seconds(pid) - cpu, time.monotonic() - wall
    per_s = [(x.count - c) / wall for x, c in zip(listeners, counts, strict=True)]
    return {"cpu_per_s": cpu / wall, "window_s": round(wall, 2), "listeners": len(listeners),
            "frames_per_s_min": min(per_s), "frames_per_s_max": max(per_s)}


async def listener_cpu(server: Server, n: int, seconds: float, settle: float = 2.0) -> dict:
    """One stream with 1, then `n` listeners (aiortc, in this process: its CPU is not counted): the daemon's CPU
    per wall second with each, the Opus packets it encoded per second and how many encoders ran."""
    pid = server.process.pid
    status, created = server.request("POST", "/v1/streams", {"seed": 1, "controls": {"f0": 440, "loudness": LOUDNESS}})
    if status != 201:
        raise RuntimeError(f"cannot create a stream: {status} {created}")
    sid = created["id"]
    loop = asyncio.get_running_loop()
    listeners: list[CountingListener] = []

    async def packets() -> float:
        text = await loop.run_in_executor(None, server.text, "/metrics")
        return next((float(line.split()[1]) for line in text.splitlines()
                     if line.startswith("wavecast_packets_encoded_total ")), math.nan)  # nan: a daemon without it

    async def phase() -> dict:
        await asyncio.sleep(settle)
        before = await packets()
        r = await cpu_load(pid, listeners, seconds)
        r["packets_per_s"] = (await packets() - before) / r["window_s"]
        info = (await loop.run_in_executor(None, server.request, "GET", f"/v1/streams/{sid}"))[1]
        r |= {"peers": info.get("peers"), "encoders": info.get("encoders"), "underruns": info["underruns"]}
        return r

    try:
        listeners.append(await CountingListener.connect(server.url, sid))
        one = await phase()
        while len(listeners) < n:
            batch = min(5, n - len(listeners))
            listeners += await asyncio.gather(*(CountingListener.connect(server.url, sid) for _ in range(batch)))
        many = await phase()
    finally:
        for x in listeners:
            await x.close()
        await loop.run_in_executor(None, server.request, "DELETE", f"/v1/streams/{sid}")
    held = [h for x in listeners for h in x.held]
    return {"listeners": n, "one": one, "many": many, "ratio": many["cpu_per_s"] / one["cpu_per_s"],
            "per_extra_listener_cpu_per_s": (many["cpu_per_s"] - one["cpu_per_s"]) / max(1, n - 1),
            "jitter_buffer_ms_median": 1000 * float(np.median(held)) if held else None}


ROWS = [("first audio after offer", "offer_to_first_audio_ms"), ("  offer -> answer (HTTP)", "offer_to_answer_ms"),
        ("  answer -> track + channel open", "answer_to_open_ms"), ("  open -> first frame", "open_to_first_audio_ms"),
        ("control -> heard, data channel", "datachannel"), ("  reply received", "datachannel_ack"),
        ("  pitch starts to move", "datachannel_moved_ms"),
        ("  delivery (heard - render ref)", "datachannel_delivery_ms"),
        ("control -> heard, HTTP PATCH", "http"), ("  response received", "http_ack"),
        ("  pitch starts to move", "http_moved_ms"), ("  delivery (heard - render ref)", "http_delivery_ms")]


def report(r: dict) -> str:
    s, c, ref, pct = r["settings"], r["continuity"], r["render_reference"], f"{100 * TOLERANCE:g} %"
    out = [f"wavecast WebRTC bench: {s['reps']} reps, --buffer-frames {s['buffer_frames']} "
           f"({10 * s['buffer_frames']} ms generated ahead), localhost; {r['host']['cores']} cores, "
           f"aiortc {r['host']['aiortc']}", "", f"{'ms':<34}{'median':>8}{'p90':>8}{'max':>8}{'missed':>8}"]
    for title, key in ROWS:
        x = r["latency"][key]
        cells = [f"{x[k]:8.1f}" if k in x else f"{'-':>8}" for k in ("median", "p90", "max")]
        out.append(f"{title:<34}{''.join(cells)}{x['missed']:>8}")
    out += [
        "", f"Continuity: {c['frames']} frames received ({c['frames'] / 50:.1f} s), daemon underruns {c['underruns']}. "
        f"Near-silent (< {SILENT_DB:g} dB) while playing at {LOUDNESS:g} dB:",
        f"  whole 20 ms frames {c['silent_frames']}, frames with a silent 5 ms gap {c['gap_frames']}, frames before "
        f"a connection's first audible one {c['startup_silent_frames']}", "",
        "Times are arrivals at the client: time.monotonic() as aiortc hands over each 20 ms frame, after its receive",
        "jitter buffer, which waits for 4 more packets (80 ms at real-time pacing: most of 'open -> first frame').",
        f"'heard' = first frame from which the pitch of the {s['window_ms']} ms ending there "
        f"(YIN, {FMIN:g}-{FMAX:g} Hz)",
        f"is within {pct} of the new f0 for {STABLE} frames in a row; 'starts to move' = off the old f0 by more than "
        f"{pct} ({STABLE} in a row).",
        f"'heard' includes the engine's control smoothing (one-pole, {1000 * r['smoothing_s']:g} ms time constant, "
        "manifest 'smoothing'), part of",
        f"what the user hears: alone it takes {r['smoothing_ms']['440->660']:.0f} ms (440->660) / "
        f"{r['smoothing_ms']['660->440']:.0f} ms (660->440) to come within {pct}. The same analysis",
        f"on a clockless render hears the change {ref['440->660']['heard_ms']:.0f} / "
        f"{ref['660->440']['heard_ms']:.0f} ms after the first frame carrying it; 'delivery' = heard minus",
        "that (the daemon's buffer, packetisation, network, Opus, the client's jitter buffer).",
        "DESIGN targets (section 7): control change -> audible < 100 ms; first audio after offer < 300 ms.",
    ]
    ctl, jb = r["control_to_heard_ms_p50"], r["jitter_buffer_ms"]
    if ctl is not None and jb is not None:
        out += ["", f"control -> heard (data channel and PATCH pooled): p50 {ctl:.0f} ms, p95 "
                    f"{r['control_to_heard_ms_p95']:.0f} ms; of it the client's jitter buffer",
                f"(median time from an RTP packet reaching the client to its frame leaving recv()): {jb:.0f} ms "
                f"({100 * jb / ctl:.0f} % of p50)."]
    lc = r.get("listener_cpu")
    if lc:
        one, many = lc["one"], lc["many"]
        out += ["", f"Listener cost, one stream, daemon CPU (/proc utime+stime) over {one['window_s']:.0f} s each:",
                f"  1 listener : {one['cpu_per_s']:.3f} CPU s/s, {one['packets_per_s']:.1f} packets encoded/s, "
                f"encoders {one['encoders']}",
                f"  {lc['listeners']} listeners: {many['cpu_per_s']:.3f} CPU s/s, {many['packets_per_s']:.1f} "
                f"packets encoded/s, encoders {many['encoders']}, peers {many['peers']}, frames/s per listener "
                f"{many['frames_per_s_min']:.1f}-{many['frames_per_s_max']:.1f}",
                f"  ratio {lc['ratio']:.2f}x ({1000 * lc['per_extra_listener_cpu_per_s']:.1f} ms CPU per s per extra "
                "listener); target <= 3.0x at 20"]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=10, help="connections, each with one data-channel and one PATCH "
                                                        "change (default: %(default)s)")
    p.add_argument("--buffer-frames", type=int, default=BUFFER_FRAMES,
                   help="passed to `wavecast serve --buffer-frames`: 10 ms frames generated ahead of the listener "
                        "(default: %(default)s)")
    p.add_argument("--listeners", type=int, default=20, help="listeners on one stream for the CPU comparison with "
                   "1 listener; 0 skips it (default: %(default)s)")
    p.add_argument("--cpu-window", type=float, default=10.0, help="seconds the daemon's CPU is measured with 1 and "
                   "with --listeners listeners (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="3 reps and a 3 s CPU window: a smoke test, rough numbers")
    p.add_argument("--out", type=Path, default=ROOT / "bench/out/webrtc.json", help="JSON results (folder is made)")
    a = p.parse_args(argv)
    if a.quick:
        a.reps, a.cpu_window = 3, min(a.cpu_window, 3.0)
    if a.reps < 1 or a.buffer_frames < 1:
        p.error("--reps and --buffer-frames must be at least 1")
    if a.listeners < 0 or a.listeners == 1 or a.cpu_window <= 0:
        p.error("--listeners must be 0 (skip) or at least 2, --cpu-window positive")
    started = time.perf_counter()
    log("render reference: the same pitch analysis on a clockless render")
    ref = {f"{x:g}->{y:g}": reference(x, y) for x, y in ((440.0, 660.0), (660.0, 440.0))}
    with tempfile.TemporaryDirectory(prefix="wavecast-bench-") as tmp:
        log(f"starting wavecast serve --buffer-frames {a.buffer_frames} on 127.0.0.1")
        server = start_server(Path(tmp), args=("--buffer-frames", str(a.buffer_frames)))
        try:
            model = server.request("GET", "/v1/models/default")[1]
            reps = asyncio.run(run(server, a.reps))
            if a.listeners:
                log(f"daemon CPU with 1 and {a.listeners} listeners on one stream, {a.cpu_window:g} s each")
                cpu = asyncio.run(listener_cpu(server, a.listeners, a.cpu_window))
        except BaseException:
            log(f"failed; daemon log tail:\n{server.log.read_text()[-3000:]}")
            raise
        finally:
            stop_server(server)
    tau = next(c["smoothing"] for c in model["controls"] if c["name"] == "f0")
    frame_s = model["hop"] / model["sample_rate"]
    latency = {key: stats([x[key] for x in reps]) for _, key in ROWS[:4]}
    for how in ("datachannel", "http"):
        for x in reps:
            ch, base = x[how], ref[f"{x[how]['start']:g}->{x[how]['target']:g}"]["heard_ms"]
            ch["delivery_ms"] = None if ch["heard_ms"] is None or base is None else ch["heard_ms"] - base
        latency[how] = stats([x[how]["heard_ms"] for x in reps])
        latency[f"{how}_ack"] = stats([x[how]["ack_ms"] for x in reps])
        for k in ("moved_ms", "delivery_ms"):
            latency[f"{how}_{k}"] = stats([x[how][k] for x in reps])
    heard = [x[how]["heard_ms"] for x in reps for how in ("datachannel", "http")]
    heard = [v for v in heard if v is not None]
    held = [x["jitter_buffer_ms"] for x in reps if x["jitter_buffer_ms"] is not None]
    r = {
        "bench": "webrtc", "created": datetime.now(UTC).isoformat(timespec="seconds"), "quick": a.quick,
        "host": {"cores": os.cpu_count(), "python": platform.python_version(), "aiortc": aiortc.__version__},
        "settings": {"reps": a.reps, "buffer_frames": a.buffer_frames, "listeners": a.listeners,
                     "cpu_window_s": a.cpu_window, "loudness_db": LOUDNESS,
                     "window_ms": 1000 * WINDOW // SR, "fmin": FMIN, "fmax": FMAX, "tolerance": TOLERANCE,
                     "stable_frames": STABLE},
        "smoothing_s": tau,
        "smoothing_ms": {k: smoothing_ms(tau, frame_s, *map(float, k.split("->"))) for k in ref},
        "render_reference": ref,
        "latency": latency,
        "continuity": {k: sum(x[k] for x in reps) for k in ("frames", "silent_frames", "gap_frames",
                                                            "startup_silent_frames", "underruns")},
        "reps": reps,
        # control -> heard over both routes (data channel and PATCH), and the client's jitter buffer's share
        "control_to_heard_ms_p50": float(np.percentile(heard, 50)) if heard else None,
        "control_to_heard_ms_p95": float(np.percentile(heard, 95)) if heard else None,
        "jitter_buffer_ms": float(np.median(held)) if held else None,
    }
    if a.listeners:
        r["listener_cpu"] = cpu
        r[f"listener_cpu_ratio_{a.listeners}"] = cpu["ratio"]
    r["seconds"] = round(time.perf_counter() - started, 1)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(r, indent=2) + "\n")
    print(report(r))
    print(f"\nwrote {a.out} in {r['seconds']:g} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
