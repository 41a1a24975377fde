"""Listeners through Janus against direct WebRTC peers, and the gap a Janus listener hears when its stream moves.

Run as root from the repository root, in a network namespace of its own (the bench adds an interface with
192.0.2.1 for Janus's ICE, which leaves loopback out, as tests/conftest.py's Janus set-up does):

    unshare -n -- sh -c 'ip link set lo up && PYTHONPATH=. .venv/bin/python bench/janus.py'

Starts Debian's Janus (tests/janus/), daemon A and daemon B (`wavecast serve`, watermark off). Then:
1. direct: one stream on A with 1 and --direct aiortc peers (bench/webrtc.py's `listener_cpu`): A's CPU seconds
   per wall second with each;
2. through Janus: one stream on A published to a mountpoint, aiortc listeners subscribing through Janus alone,
   added up to each count of --counts: A's and Janus's CPU per wall second over --window, and the frames a second
   the slowest listener got. The ramp stops at the first count where a listener gets under 45 of its 50 frames a
   second or cannot connect; the listeners run in this process, so on a small machine they, not Janus, are the
   limit (this process's CPU is printed beside);
3. moves: --moves times, a stream published from A (then B, then A...) moves to the other daemon while a listener
   through Janus plays it: how late the new daemon's first packet was against the agreed time, and the longest gap
   between frames reaching the listener within 0.5 s of the cut.
Prints a table and writes JSON (default bench/out/janus.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import numpy as np

from bench.webrtc import cpu_seconds, listener_cpu
from tests.conftest import JanusServer, NoInterface, Server, Watcher, janus_interface, start_server, stop_server

ROOT = Path(__file__).resolve().parent.parent
STREAM = {"model": "default", "seed": 5, "controls": {"f0": 440, "loudness": -20}}
UNMARKED = ("--watermark", "off")
SLOW_FPS = 45.0  # of the 50 frames a second a listener should get


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def published(daemon: Server, janus: JanusServer) -> tuple[str, int]:
    status, created = daemon.request("POST", "/v1/streams", STREAM)
    if status != 201:
        raise RuntimeError(f"cannot create a stream: {status} {created}")
    status, publication = daemon.request("POST", f"/v1/streams/{created['id']}/publish", {"janus": janus.url})
    if status != 201:
        raise RuntimeError(f"cannot publish: {status} {publication}")
    return created["id"], publication["mountpoint"]


async def through_janus(daemon: Server, janus: JanusServer, counts: list[int], window: float) -> list[dict]:
    sid, mountpoint = published(daemon, janus)
    rows: list[dict] = []
    watchers: list[Watcher] = []
    drains: list[asyncio.Task] = []
    async with aiohttp.ClientSession() as http:
        try:
            for n in counts:
                try:
                    while len(watchers) < n:
                        batch = await asyncio.gather(*(Watcher.watch(http, janus.url, mountpoint)
                                                       for _ in range(min(5, n - len(watchers)))))
                        watchers += batch
                        drains += [asyncio.ensure_future(w.drain()) for w in batch]
                except Exception as e:  # the ramp's end: say where and why
                    rows.append({"listeners": n, "failed": f"a listener could not connect: {e}"})
                    break
                await asyncio.sleep(2.0)
                frames = [w.frames for w in watchers]
                cpu = {k: cpu_seconds(pid) for k, pid in (("daemon", daemon.process.pid),
                                                          ("janus", janus.process.pid), ("bench", os.getpid()))}
                wall = time.monotonic()
                await asyncio.sleep(window)
                wall = time.monotonic() - wall
                fps = [(w.frames - f) / wall for w, f in zip(watchers, frames, strict=True)]
                row = {"listeners": n, **{f"{k}_cpu_per_s": (cpu_seconds(pid) - cpu[k]) / wall for k, pid in
                                          (("daemon", daemon.process.pid), ("janus", janus.process.pid),
                                           ("bench", os.getpid()))},
                       "frames_per_s_min": min(fps), "frames_per_s_median": float(np.median(fps))}
                rows.append(row)
                log(f"through Janus, {n} listeners: daemon {row['daemon_cpu_per_s']:.3f}, Janus "
                    f"{row['janus_cpu_per_s']:.3f}, listeners (this process) {row['bench_cpu_per_s']:.3f} CPU s/s; "
                    f"slowest listener {row['frames_per_s_min']:.1f} frames/s")
                if row["frames_per_s_min"] < SLOW_FPS:
                    break
        finally:
            for task in drains:
                task.cancel()
            for w in watchers:
                await w.close()
            daemon.request("DELETE", f"/v1/streams/{sid}")
    return rows


async def move_gap(origin: Server, target: Server, janus: JanusServer) -> dict:
    sid, mountpoint = published(origin, janus)
    async with aiohttp.ClientSession() as http:
        watcher = await Watcher.watch(http, janus.url, mountpoint)
        try:
            await watcher.collect(0.5)
            heard = asyncio.ensure_future(watcher.collect(3.0))
            await asyncio.sleep(1.0)
            status, moved = await asyncio.to_thread(origin.request, "POST", f"/v1/streams/{sid}/move",
                                                    {"to": target.url})
            if status != 200:
                raise RuntimeError(f"the move failed: {status} {moved}")
            _, stamps, arrivals = await heard
        finally:
            await watcher.close()
    target.request("DELETE", f"/v1/streams/{moved['id']}")
    cut = moved["janus"]["at"] - time.time() + time.monotonic()
    near = np.array([t for t in arrivals if abs(t - cut) < 0.5])
    steps = {(b - a) % 2**32 for a, b in zip(stamps, stamps[1:], strict=False)}
    return {"late_ms": moved["janus"]["late_ms"], "max_gap_ms": 1000 * float(np.diff(near).max()),
            "rtp_steps": sorted(steps)}


def report(r: dict) -> str:
    d = r["direct"]
    lines = ["== Daemon CPU (CPU s per wall s) for one stream's listeners",
             f"direct WebRTC: 1 peer {d['one']['cpu_per_s']:.3f}, {d['listeners']} peers "
             f"{d['many']['cpu_per_s']:.3f}: {1000 * d['per_extra_listener_cpu_per_s']:.2f} ms CPU a second per "
             "extra listener",
             f"{'through Janus':<16}{'daemon':>8}{'Janus':>8}{'bench':>8}{'min fps':>9}"]
    for row in r["janus"]:
        if "failed" in row:
            lines.append(f"{row['listeners']:>5} listeners: {row['failed']}")
            continue
        lines.append(f"{row['listeners']:>5} listeners {row['daemon_cpu_per_s']:>8.3f}{row['janus_cpu_per_s']:>8.3f}"
                     f"{row['bench_cpu_per_s']:>8.3f}{row['frames_per_s_min']:>9.1f}")
    ok = [row for row in r["janus"] if "failed" not in row]
    if len(ok) >= 2:
        first, last = ok[0], ok[-1]
        extra = max(1, last["listeners"] - first["listeners"])
        lines.append(f"per extra listener through Janus: daemon "
                     f"{1000 * (last['daemon_cpu_per_s'] - first['daemon_cpu_per_s']) / extra:.2f} ms/s, Janus "
                     f"{1000 * (last['janus_cpu_per_s'] - first['janus_cpu_per_s']) / extra:.2f} ms/s; most "
                     f"listeners served at >= {SLOW_FPS:g} frames/s here: "
                     f"{max((x['listeners'] for x in ok if x['frames_per_s_min'] >= SLOW_FPS), default=0)}")
    moves = r["moves"]
    lines += ["", f"== Moves between two daemons, a listener through Janus ({len(moves)})",
              "first packet late (ms): " + ", ".join(f"{m['late_ms']:.1f}" for m in moves),
              "longest gap between frames near the cut (ms): " + ", ".join(f"{m['max_gap_ms']:.1f}" for m in moves),
              f"RTP timestamp steps seen: {sorted({s for m in moves for s in m['rtp_steps']})} (960: none lost)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--counts", default="1,20,50,100,200", help="listener counts through Janus (default: %(default)s)")
    p.add_argument("--direct", type=int, default=20, help="direct peers compared with one (default: %(default)s)")
    p.add_argument("--window", type=float, default=5.0, help="seconds each CPU window lasts (default: %(default)s)")
    p.add_argument("--moves", type=int, default=5, help="moves timed (default: %(default)s)")
    p.add_argument("--out", type=Path, default=ROOT / "bench/out/janus.json", help="JSON results (folder is made)")
    a = p.parse_args(argv)
    counts = [int(x) for x in a.counts.split(",")]
    started = time.monotonic()
    with ExitStack() as stack:
        try:
            stack.enter_context(janus_interface())
        except NoInterface as e:
            log(f"bench/janus.py: {e}; run it as the docstring says (root, in `unshare -n`)")
            return 2
        r = measure(a, counts, Path(stack.enter_context(tempfile.TemporaryDirectory())))
    r["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "when": datetime.now(UTC).isoformat(timespec="seconds")}
    print(report(r))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(r, indent=1) + "\n")
    print(f"\nwrote {a.out} in {time.monotonic() - started:.0f} s")
    return 0


def measure(a: argparse.Namespace, counts: list[int], tmp: Path) -> dict:
    """Janus and daemons A and B started in `tmp`, the three measurements, everything stopped again."""
    for name in ("janus", "a", "b"):
        (tmp / name).mkdir()
    janus = JanusServer(tmp / "janus")
    janus.start()
    a_daemon, b_daemon = start_server(tmp / "a", args=UNMARKED), start_server(tmp / "b", args=UNMARKED)
    try:
        log(f"direct: 1 and {a.direct} peers")
        r = {"direct": asyncio.run(listener_cpu(a_daemon, a.direct, a.window))}
        r["janus"] = asyncio.run(through_janus(a_daemon, janus, counts, a.window))
        r["moves"] = []
        for i in range(a.moves):
            origin, target = (a_daemon, b_daemon) if i % 2 == 0 else (b_daemon, a_daemon)
            r["moves"].append(asyncio.run(move_gap(origin, target, janus)))
            log(f"move {i + 1}: {r['moves'][-1]}")
        return r
    finally:
        stop_server(a_daemon)
        stop_server(b_daemon)
        janus.kill()


if __name__ == "__main__":
    sys.exit(main())
