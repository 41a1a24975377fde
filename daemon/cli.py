"""`wavecast`: serve, render, train, models, devices. Heavy imports happen inside each command."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import ipaddress
import json
import logging
import os
import re
import signal
import struct
import sys
from collections.abc import Callable
from dataclasses import asdict
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from wavecast.streaming.events import Events
    from wavecast.streaming.watermark import Key

log = logging.getLogger("wavecast")


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()), stream=sys.stderr,
        format="ts=%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)s",
    )
    for noisy in ("aioice", "aiortc", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def parse_control(text: str) -> tuple[str, float | str]:
    """NAME=VALUE; VALUE is a number where it reads as one (f0=440), else text (scale='D dorian')."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, e.g. f0=440 or scale='D dorian', not '{text}'")
    try:
        return name, float(value)
    except ValueError:
        return name, value


def parse_change(text: str) -> tuple[float, tuple[str, float | str]]:
    """SECONDS:NAME=VALUE, a control change (or action=pause|play|reset) during a render."""
    at, sep, control = text.partition(":")
    try:
        seconds = float(at)
    except ValueError:
        seconds = -1.0
    if not sep or seconds < 0:
        raise argparse.ArgumentTypeError(f"expected SECONDS:NAME=VALUE, e.g. 30:tempo=140, not '{text}'")
    return seconds, parse_control(control)


def number(kind: type, low: float, high: float) -> Callable[[str], float]:
    """An argparse type: a `kind` (int or float) in [low, high], refused in words otherwise."""
    what = "a whole number" if kind is int else "a number"
    span = f"from {int(low)} to {int(high)}" if kind is int else f"from {low:g} to {high:g}"

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not {what}; give {what} {span}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text} is out of range; give {what} {span}")
        return value

    parse.kind, parse.low, parse.high = kind, low, high  # the jobs API's config schema reads them
    return parse


def model_name() -> Callable[[str], str]:
    """An argparse type: a model name as the store takes it (a slug); its `pattern` and `description` make the
    jobs API's config schema."""
    from wavecast.models.store import NAME, NAME_RULE, valid_name

    def parse(text: str) -> str:
        if not valid_name(text):
            raise argparse.ArgumentTypeError(f"'{text[:64]}' is not a model name; use {NAME_RULE}")
        return text

    parse.pattern, parse.description = f"^{NAME.pattern}$", f"a model name: {NAME_RULE}"
    return parse


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- serve ------------------------------------------------------------------------------------------
def read_token(args: argparse.Namespace) -> str | None:
    """The bearer token from --token-file or WAVECAST_TOKEN (never from argv, where `ps` shows it)."""
    if args.token_file is not None:
        try:
            lines = args.token_file.read_text().splitlines()
        except OSError as e:
            raise SystemExit(f"error: cannot read --token-file {args.token_file} ({e.strerror}); give a readable "
                             "file whose first line is the token") from None
        token = lines[0].strip() if lines else ""
        if len(token) < 16:
            raise SystemExit(f"error: the token in {args.token_file} is shorter than 16 characters; write a longer "
                             "one (e.g. python3 -c 'import secrets; print(secrets.token_urlsafe())')")
        return token
    return os.environ.get("WAVECAST_TOKEN") or None


def janus_url(text: str) -> str:
    """--janus: an http(s) URL, checked as POST /v1/streams/{id}/publish checks its 'janus'."""
    from wavecast.daemon.routes.publish import PUBLISH

    if not re.fullmatch(PUBLISH["properties"]["janus"]["pattern"], text):
        raise argparse.ArgumentTypeError(f"'{text[:100]}' is not an http:// or https:// URL; give Janus's HTTP API, "
                                         "e.g. http://127.0.0.1:8088/janus")
    return text


def drop_client_errors(record: logging.LogRecord) -> bool:
    """aiohttp logs a request it cannot parse (a request line over 8 KiB, a bad header) as an ERROR with a
    traceback; it is the client's fault, already answered with a 4xx, and would let any client fill the log."""
    from aiohttp.http_exceptions import HttpProcessingError

    return not (record.exc_info and isinstance(record.exc_info[1], HttpProcessingError))


async def serve(args: argparse.Namespace, token: str | None, events: Events, watermark: Key | None) -> None:
    from aiohttp import web

    from wavecast.daemon.api import Guard
    from wavecast.daemon.app import make_app
    from wavecast.daemon.limits import Limits
    from wavecast.daemon.peers import use_ice_host
    from wavecast.daemon.service import Daemon
    from wavecast.models.store import ModelStore

    logging.getLogger("aiohttp.server").addFilter(drop_client_errors)
    if args.ice_host:
        use_ice_host(args.ice_host)
    limits = Limits(**{name: getattr(args, name) for name in asdict(Limits())})
    guard = Guard(bound=args.host.strip("[]").lower(), hosts=frozenset(h.lower() for h in args.allow_host),
                  origins=frozenset(o.rstrip("/") for o in args.allow_origin), token=token)
    daemon = Daemon(ModelStore(args.store), limits=limits, guard=guard, buffer_frames=args.buffer_frames,
                    budget=args.tick_budget, encode_budget=args.encode_budget, events=events, watermark=watermark,
                    janus=args.janus)
    await daemon.group(args.model)  # load and check the default model before accepting requests
    daemon.engine.start()
    runner = web.AppRunner(make_app(daemon), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port)
    await site.start()
    port = runner.addresses[0][1]
    print(f"wavecast serving http://{args.host}:{port} (model '{args.model}')", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():  # a second SIGTERM or Ctrl-C: no more draining
            print("wavecast: stopping now", file=sys.stderr, flush=True)
            os._exit(1)
        print("wavecast: draining (telling listeners, closing devices); signal again to stop at once",
              file=sys.stderr, flush=True)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    await stop.wait()
    await daemon.shutdown()  # listeners hear why before the server goes
    await runner.cleanup()


def serve_key(args: argparse.Namespace) -> Key | None:
    """The key every stream is marked with: the data directory's, made on the first start (None: --watermark
    off, said once in the log; the streams' provenance says it too)."""
    from wavecast.daemon.marks import load_key, watermark_dir
    from wavecast.models.store import ModelStore

    if args.watermark == "off":
        logging.getLogger("wavecast.daemon").warning("the watermark is off (--watermark off): streams carry no mark")
        return None
    return load_key(watermark_dir(ModelStore(args.store).root), create=True)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvloop

    token = read_token(args)
    if not is_loopback(args.host) and not token:
        print(f"error: listening on {args.host}, beyond this machine, needs a token: set WAVECAST_TOKEN or pass "
              "--token-file FILE; clients then send 'Authorization: Bearer TOKEN'", file=sys.stderr)
        return 2
    from wavecast.daemon.api import ApiError
    from wavecast.daemon.marks import KeyFileError
    from wavecast.streaming.events import EventError, load_events

    try:
        events = load_events(args.events)
    except EventError as e:
        print(f"error: --events {e}", file=sys.stderr)
        return 2
    try:
        watermark = serve_key(args)
    except (KeyFileError, OSError) as e:
        reason = f"cannot make the watermark key in {e.filename} ({e.strerror})" if isinstance(e, OSError) else e
        print(f"error: {reason}; or start with --watermark off", file=sys.stderr)
        return 2
    try:
        uvloop.run(serve(args, token, events, watermark))
    except ApiError as e:  # the start-up model is unknown or unusable
        print(f"error: {e.message}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port} ({e.strerror or e}); pick another --port or "
              "--host", file=sys.stderr)
        return 2
    return 0


# -- render -----------------------------------------------------------------------------------------
RENDER_CODECS = {".wav": "", ".flac": "flac", ".ogg": "libopus"}  # --out's suffix: its PyAV encoder (WAV: written here)
INFO_IDS = {"title": "INAM", "artist": "IART", "comment": "ICMT", "date": "ICRD", "software": "ISFT"}  # WAV LIST/INFO


def pcm16(audio: np.ndarray) -> np.ndarray:
    return np.round(np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2")


def riff_chunk(tag: bytes, data: bytes) -> bytes:
    return tag + struct.pack("<I", len(data)) + data + b"\0" * (len(data) % 2)


def write_wav(path: Path, audio: np.ndarray, sample_rate: int, tags: dict[str, str] | None = None) -> None:
    """Mono 16-bit WAV; `tags` (INFO_IDS' names) go in a LIST/INFO chunk before the samples, where players and
    ffmpeg read them as title, artist, comment, date and encoder."""
    pcm = pcm16(audio)
    info = b"".join(riff_chunk(INFO_IDS[name].encode(), value.encode("utf-8") + b"\0")
                    for name, value in (tags or {}).items())
    head = b"WAVE" + riff_chunk(b"fmt ", struct.pack("<HHIIHH", 1, 1, sample_rate, 2 * sample_rate, 2, 16))
    head += riff_chunk(b"LIST", b"INFO" + info) if info else b""
    with open(path, "wb") as f:
        f.write(b"RIFF" + struct.pack("<I", len(head) + 8 + pcm.nbytes) + head)
        f.write(b"data" + struct.pack("<I", pcm.nbytes))
        f.write(pcm.tobytes())


def write_encoded(path: Path, audio: np.ndarray, sample_rate: int, codec: str, tags: dict[str, str]) -> None:
    """Mono FLAC or Ogg Opus (at 48 kHz, Opus's rate) through PyAV, `tags` as its Vorbis comments. Bit-exact
    muxing: the same audio and tags give the same file (no random Ogg serial, no ffmpeg version in it)."""
    import av

    with av.open(str(path), "w", options={"fflags": "+bitexact"}) as out:
        out.metadata.update(tags)
        stream = out.add_stream(codec, rate=48_000 if codec == "libopus" else sample_rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(pcm16(audio)[None], format="s16", layout="mono")
        frame.sample_rate = sample_rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)


def render_mark(store_root: Path, record: dict) -> tuple[Key, int]:
    """The data directory's watermark key (made on first use) and a new serial, recorded with `record`."""
    from wavecast.daemon.marks import Registry, load_key, watermark_dir

    directory = watermark_dir(store_root)
    key = load_key(directory, create=True)
    return key, Registry(directory).issue(record)


def cmd_render(args: argparse.Namespace) -> int:
    from wavecast.daemon.marks import KeyFileError
    from wavecast.models.store import ModelStore
    from wavecast.streaming.composer import ComposerModel, validate_controls
    from wavecast.streaming.controls import ControlError, validate
    from wavecast.streaming.engine import compose
    from wavecast.streaming.model import FrameModel, ModelError
    from wavecast.streaming.provenance import generator_version, provenance
    from wavecast.streaming.watermark import payload_text

    codec = RENDER_CODECS.get(args.out.suffix.lower())
    if codec is None:
        print(f"error: --out {args.out}: wavecast writes .wav, .flac or .ogg (Opus) files; give one of those "
              "suffixes", file=sys.stderr)
        return 2
    store = ModelStore(args.store)
    try:
        model = FrameModel(store.resolve(args.model).directory, device=args.device)
        composer = ComposerModel(store.resolve(args.composer).directory) if args.composer else None
        check = validate_controls if composer else (lambda values: validate(model.manifest, values))
        controls = check(dict(args.control))
        timeline = []
        for seconds, (name, value) in args.change:
            if name == "action" and composer is not None:
                timeline.append((seconds, {"action": value}))
            else:
                timeline.append((seconds, check({name: value})))
    except (KeyError, ModelError, ControlError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    if not args.seconds > 0:
        print("error: --seconds must be positive", file=sys.stderr)
        return 2
    if args.midi and composer is None:
        print("error: --midi writes the notes of a composed render; add --composer NAME", file=sys.stderr)
        return 2
    m, c = model.manifest, composer.manifest if composer else None
    key, serial, mark = None, 0, None
    if args.watermark == "on":
        try:
            key, serial = render_mark(store.root, {
                "kind": "render", "model": m.name, "version": m.version, "composer": c.name if c else None,
                "composer_version": c.version if c else None, "seed": args.seed, "seconds": args.seconds,
                "out": str(args.out.resolve())})
        except (OSError, KeyFileError) as e:
            reason = f"cannot make the watermark key or record the render in {e.filename} ({e.strerror})" \
                if isinstance(e, OSError) else e
            print(f"error: {reason}; or render with --watermark off", file=sys.stderr)
            return 2
        mark = {"key_id": f"{key.id:04x}", "payload": payload_text(key.payload(serial))}
    audio, notes = compose(model, args.seconds, args.seed, controls, timeline, composer=composer, watermark=key,
                           serial=serial)
    about = provenance(m, c, args.seed, mark, why_unmarked="wavecast render ran with --watermark off")
    what = f"{m.name} v{m.version}" + (f", {c.name} v{c.version}" if c else "") + f", seed {args.seed}"
    tags = {"title": what, "artist": "wavecast (AI-generated)", "comment": about["statement"],
            "date": date.today().isoformat()}
    if codec:
        write_encoded(args.out, audio, m.sample_rate, codec,
                      tags | {"encoded_by": f"wavecast {generator_version()}", "provenance": json.dumps(about)})
    else:
        write_wav(args.out, audio, m.sample_rate, tags | {"software": f"wavecast {generator_version()}"})
        sidecar = args.out.with_name(args.out.name + ".provenance.json")  # WAV has no tag for it
        sidecar.write_text(json.dumps(about, indent=2) + "\n")
    marked = f"watermark {mark['payload']}" if mark else "no watermark (--watermark off)"
    also = "" if codec else f" and its provenance {sidecar.name}"
    print(f"wrote {args.out}{also}: {args.seconds:g} s of {what}, {marked}", file=sys.stderr)
    if args.midi:
        from wavecast.daemon.midi import write_midi

        write_midi(args.midi, notes, m.frame_seconds, int(m.source.get("gm_program", 0)),
                   texts=(about["statement"], json.dumps(about, separators=(",", ":"))))
        print(f"wrote {args.midi}: {sum(n.midi is not None for n in notes)} notes", file=sys.stderr)
    return 0


# -- train, models, devices -------------------------------------------------------------------------
def run_torch_command(module: str, args: argparse.Namespace, bar: TrainingBar | None = None) -> int:
    """Run `models.<module>.run`, a command that needs torch (the 'train' extra), or say how to install it;
    with `bar`, the run's log lines and progress go through it."""
    try:
        command = importlib.import_module(f"wavecast.models.{module}")
    except ImportError as e:
        print(f"error: this command needs the 'train' extra ({e}); run: ./install train", file=sys.stderr)
        return 2
    if bar is not None:
        from wavecast.models.runs import REPORTING

        REPORTING.line, REPORTING.event = bar.write, bar.progress
    command.run(args, sys.argv[1:])
    return 0


class TrainingBar:
    """The progress bar of a training run (tqdm, on stderr when it is a terminal): the phase, the steps, the loss.
    Fed by models/runs.py's events in the foreground and by a job's events when following a daemon's job; with
    `echo`, a stderr that is not a terminal gets a line per step report instead."""

    def __init__(self, label: str, echo: bool = False) -> None:
        from tqdm import tqdm

        self.tqdm, self.label, self.echo = tqdm, label, echo
        self.bar = tqdm(desc=label, unit="step", file=sys.stderr, disable=None, dynamic_ncols=True)
        self.shown: tuple = ()  # the phase and step last echoed

    def progress(self, event: dict) -> None:
        phase, step, steps, loss = (event.get(k) for k in ("phase", "step", "steps", "loss"))
        if self.bar.disable:
            if self.echo and phase and (phase, step) != self.shown:
                figures = f" step {step}/{steps}" if step is not None else ""
                figures += f" loss {loss:.4f}" if loss is not None else ""
                self.write(f"[{self.label}] {phase}{figures}")
                self.shown = (phase, step)
        else:
            if phase:
                self.bar.set_description_str(f"{self.label} {phase}", refresh=False)
            if steps and self.bar.total != steps:
                self.bar.reset(total=steps)
                self.bar.initial = self.bar.n = step or 0  # the speed counts the steps seen, not a resumed start
            if step is not None and step >= self.bar.n:
                self.bar.update(step - self.bar.n)
            if loss is not None:
                self.bar.set_postfix_str(f"loss {loss:.4f}", refresh=False)
            self.bar.refresh()

    def write(self, line: str) -> None:
        self.tqdm.write(line, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


def cmd_train(args: argparse.Namespace) -> int:
    if args.daemon:
        return train_on_daemon(args)
    args.threads = args.threads or 2
    bar = TrainingBar(f"train {args.what}")
    try:
        return run_torch_command("train_composer" if args.what == "composer" else "train", args, bar)
    finally:
        bar.close()


# -- jobs: training on a daemon ---------------------------------------------------------------------------
DEFAULT_DAEMON = "http://127.0.0.1:8765"


class DaemonError(Exception):
    """The daemon refused a request or did not answer; the message says why in words."""


def open_daemon(url: str, path: str, headers: dict[str, str], method: str = "GET", data: bytes | None = None,
                timeout: float = 30):
    """An HTTP response from the daemon's API (with WAVECAST_TOKEN when it is set), or DaemonError in words."""
    import urllib.error
    import urllib.request

    if os.environ.get("WAVECAST_TOKEN"):
        headers = headers | {"Authorization": f"Bearer {os.environ['WAVECAST_TOKEN']}"}
    request = urllib.request.Request(url.rstrip("/") + path, data=data, method=method, headers=headers)
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = e.reason
        raise DaemonError(f"the daemon at {url} answered {e.code}: {message}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DaemonError(f"no daemon answers at {url} ({getattr(reason, 'strerror', None) or reason}); start one "
                          "with 'wavecast serve', or give its address with --daemon URL") from None


def call(url: str, method: str, path: str, body: object = None, timeout: float = 30) -> dict:
    """A JSON request to the daemon's API."""
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    with open_daemon(url, path, headers, method, data, timeout) as response:
        return json.loads(response.read() or b"{}")


def events(url: str, job_id: str):
    """The job's server-sent events, as (event, data) pairs, until the daemon closes the stream."""
    # the daemon sends a comment every 15 s, so a quiet job does not time out
    response = open_daemon(url, f"/v1/jobs/{job_id}/events", {"Accept": "text/event-stream"}, timeout=120)
    with response:
        event, data = "message", []
        for raw in response:
            line = raw.decode("utf-8").rstrip("\r\n")
            if not line:
                if data:
                    yield event, json.loads("\n".join(data))
                event, data = "message", []
            elif line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())


def follow(url: str, job_id: str) -> int:
    """Follow a job's events with the progress bar until it ends; Ctrl-C detaches, the job goes on."""
    bar = TrainingBar(f"job {job_id}", echo=True)
    last: dict = {}
    try:
        for event, job in events(url, job_id):
            bar.progress(job)
            last = job
            if event == "end":
                break
    except KeyboardInterrupt:
        bar.close()
        where = "" if url == DEFAULT_DAEMON else f" --daemon {url}"
        print(f"\ndetached; job {job_id} goes on in the daemon. Follow it with 'wavecast jobs follow {job_id}{where}', "
              f"cancel it with 'wavecast jobs cancel {job_id}{where}'", file=sys.stderr)
        return 130
    finally:
        bar.close()
    return report_end(last)


def report_end(job: dict) -> int:
    state, result = job.get("state"), job.get("result") or {}
    if state == "succeeded":
        print(f"job {job['id']} succeeded: published '{result['model']}' version {result['version']}",
              file=sys.stderr)
        return 0
    if state in ("queued", "running"):
        print(f"job {job.get('id')} is {state}; the daemon closed the event stream (is it stopping?)", file=sys.stderr)
        return 1
    print(f"job {job.get('id')} {state}: {job.get('error') or 'no reason given'}", file=sys.stderr)
    for line in job.get("log_tail", [])[-5:]:
        print(f"  {line}", file=sys.stderr)
    return 1


def job_config(args: argparse.Namespace) -> dict:
    """The options given on the command line, as a job's config: those left at their default are not sent, so
    the job takes its own (threads 1)."""
    parser = argparse.ArgumentParser(add_help=False)
    (add_composer_train_arguments if args.what == "composer" else add_train_arguments)(parser)
    config = {}
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if action.dest in ("store", "out", "work"):
            if value is not None:
                raise DaemonError(f"--{action.dest} is not for a job: the daemon publishes to its own store and uses "
                                  "its own work directory; leave it out, or train here without --daemon")
        elif value != action.default:
            config[action.dest] = value
    return config


def train_on_daemon(args: argparse.Namespace) -> int:
    try:
        job = call(args.daemon, "POST", "/v1/jobs", {"kind": args.what, "config": job_config(args)})
        print(f"job {job['id']} {job['state']} on {args.daemon}", file=sys.stderr)
        return follow(args.daemon, job["id"])
    except DaemonError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def cmd_jobs(args: argparse.Namespace) -> int:
    try:
        if args.action == "follow":
            return follow(args.daemon, args.id)
        if args.action in ("cancel", "resume"):
            path = f"/v1/jobs/{args.id}" + ("/resume" if args.action == "resume" else "")
            if args.action == "cancel" and args.keep_checkpoint:
                path += "?keep_checkpoint=true"
            job = call(args.daemon, "POST" if args.action == "resume" else "DELETE", path, timeout=60)
            kept = args.action == "cancel" and job.get("checkpoint_step")
            print(f"job {job['id']} {job['state']}" + (f"; its checkpoint at step {kept} is kept: 'wavecast jobs "
                                                      f"resume {job['id']}' goes on from it" if kept else ""),
                  file=sys.stderr)
            return 0
        jobs = call(args.daemon, "GET", "/v1/jobs")["jobs"]
    except DaemonError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(jobs, indent=2))
        return 0
    print(f"{'id':<22} {'kind':<10} {'state':<11} {'step':>13} {'loss':>8} {'eta':>7}  result")
    for j in jobs:
        step = f"{j['step'] or 0}/{j['steps']}" if j.get("steps") else "-"
        loss = f"{j['loss']:.4f}" if j.get("loss") is not None else "-"
        eta = f"{j['eta_seconds'] / 60:.1f} m" if j.get("eta_seconds") is not None else "-"
        result = j.get("result") or {}
        said = f"{result['model']} v{result['version']}" if "model" in result else (j.get("error") or "")
        print(f"{j['id']:<22} {j['kind']:<10} {j['state']:<11} {step:>13} {loss:>8} {eta:>7}  {said[:80]}")
    return 0


# -- drain: move every stream to another daemon -------------------------------------------------------------
DRAIN_TIMEOUT_S = 600.0  # POST /v1/drain answers when every stream has moved (a few at a time, ~1 s each)


def cmd_drain(args: argparse.Namespace) -> int:
    body = {"to": args.to}
    if args.to_token_file is not None:
        body["token"] = read_token(argparse.Namespace(token_file=args.to_token_file))
    try:
        result = call(args.daemon, "POST", "/v1/drain", body, timeout=DRAIN_TIMEOUT_S)
    except DaemonError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r in result["streams"]:
        if r["moved"]:
            late = (r.get("janus") or {}).get("late_ms")
            handover = f", Janus handover {late:+.1f} ms" if late is not None else ""
            print(f"moved {r['stream']} -> {r['url']}{handover}")
        else:
            print(f"NOT moved {r['stream']}: {r['error']['message']}")
    print(f"{result['moved']} moved, {result['failed']} not; {args.daemon} refuses new streams now"
          + ("; stop it" if not result["failed"] else "; run this again to retry, or stop it anyway"), file=sys.stderr)
    return 1 if result["failed"] else 0


def cmd_export(args: argparse.Namespace) -> int:
    return run_torch_command("reexport", args)


def cmd_models(args: argparse.Namespace) -> int:
    from wavecast.models.store import ModelStore

    store = ModelStore(args.store)
    latest = store.latest()
    if args.json:
        print(json.dumps([{"name": n, "version": e.manifest.version, "kind": e.manifest.kind,
                           "shipped": e.shipped, "path": str(e.directory)} for n, e in latest.items()], indent=2))
        return 0
    print(f"{'name':<16} {'version':>7}  {'kind':<12} {'from':<8} path")
    for name, e in latest.items():
        print(f"{name:<16} {e.manifest.version:>7}  {e.manifest.kind:<12} {'shipped' if e.shipped else 'store':<8} "
              f"{e.directory}")
    return 0


def cmd_model_versions(args: argparse.Namespace) -> int:
    """`wavecast models versions|rollback|delete`: the store's versions of one model, on the store directly."""
    from wavecast.models.store import ModelStore, VersionRefused

    store = ModelStore(args.store)
    try:
        if args.action == "rollback":
            before = store.resolve(args.name).manifest.version
            entry = store.rollback(args.name, args.version)
            print(f"'{args.name}': version {entry.manifest.version} is current (was {before}); a running daemon's "
                  "new streams play it", file=sys.stderr)
        elif args.action == "delete":
            entry = store.delete(args.name, args.version)
            print(f"deleted version {args.version} of '{args.name}' ({entry.directory})", file=sys.stderr)
        else:
            versions = store.versions(args.name)
            if args.json:
                print(json.dumps([v.summary() | {"path": str(v.entry.directory)} for v in versions], indent=2))
                return 0
            print(f"{'version':>7}  {'current':<7}  {'from':<8} {'steps':>7} {'minutes':>7} {'loss':>8}  path")
            for v in versions:
                t = v.summary()["training"]
                minutes = f"{t['seconds'] / 60:.1f}" if isinstance(t.get("seconds"), int | float) else "-"
                loss = f"{t['final_loss']:.4f}" if isinstance(t.get("final_loss"), int | float) else "-"
                print(f"{v.entry.manifest.version:>7}  {'*' if v.current else '':<7}  "
                      f"{'shipped' if v.entry.shipped else 'store':<8} {t.get('steps', '-'):>7} {minutes:>7} "
                      f"{loss:>8}  {v.entry.directory}")
    except KeyError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    except VersionRefused as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    from wavecast.daemon.device import DeviceError, list_outputs

    try:
        outputs = list_outputs()
    except DeviceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(outputs, indent=2))
        return 0
    for d in outputs:
        print(f"{d['index']:>3}{'*' if d['default'] else ' '} {d['name']}  ({d['channels']} ch, "
              f"{d['default_samplerate']:g} Hz)")
    if not outputs:
        print("no output devices (is PortAudio seeing ALSA/PulseAudio?)")
    return 0


# -- detect -----------------------------------------------------------------------------------------
def detect_keys(args: argparse.Namespace) -> list[Key]:
    """The data directory's key (if any) and every --key file's; KeyFileError when one cannot be read."""
    from wavecast.daemon.marks import load_key, read_key, watermark_dir
    from wavecast.models.store import ModelStore

    own = load_key(watermark_dir(ModelStore(args.store).root), create=False)
    return ([own] if own is not None else []) + [read_key(path) for path in args.key]


def describe_source(record: dict | None) -> str:
    """What a mark's registry record says, in words: 'render of 'violin' v1 by 'folk' v1, seed 3 (2026-12-02)'."""
    if record is None:
        return "not in this machine's registry (marked elsewhere with this key, or the registry was lost)"
    what = "render" if record.get("kind") == "render" else f"stream {record.get('stream') or '(id unknown)'}"
    text = f"{what} of '{record.get('model')}' v{record.get('version')}"
    if record.get("composer"):
        text += f" by '{record['composer']}' v{record.get('composer_version')}"
    text += f", seed {record.get('seed')}"
    if record.get("name"):
        text += f", named '{record['name']}'"
    return text + f" ({str(record.get('at', '?'))[:10]})"


def cmd_detect(args: argparse.Namespace) -> int:
    from wavecast.daemon.marks import KeyFileError, Registry, Unreadable, examine, watermark_dir
    from wavecast.models.store import ModelStore
    from wavecast.streaming.watermark import THRESHOLD

    directory = watermark_dir(ModelStore(args.store).root)
    try:
        keys = detect_keys(args)
    except KeyFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not keys:
        print(f"error: no watermark key in {directory}; pass --key FILE or run on the machine whose daemon marked "
              "the audio", file=sys.stderr)
        return 2
    registry = Registry(directory)
    status = 0
    for path in args.files:
        try:
            result = examine(path, keys, registry)
        except Unreadable as e:
            status = 2
            if args.json:
                print(json.dumps({"file": str(path), "error": str(e)}), flush=True)
            print(f"error: {e}", file=sys.stderr)
            continue
        if not result["marked"]:
            status = max(status, 1)
        if args.json:
            print(json.dumps({"file": str(path)} | result), flush=True)
        elif result["marked"]:
            key, serial = result["payload"].split("-")
            found = ", ".join(f"{a:.1f}-{b:.1f} s" for a, b in result["ranges"]) or "nowhere on its own"
            print(f"{path}: marked (confidence {result['confidence']:.6f}, score {result['score']:.1f}): key {key}, "
                  f"serial {serial} = {describe_source(result['source'])}; found {found}", flush=True)
        else:
            print(f"{path}: not marked (score {result['score']:.1f}; a mark scores {THRESHOLD:g} or more)", flush=True)
    return status


def add_run_arguments(p: argparse.ArgumentParser, work: str) -> None:
    """The options every training command shares: where it runs and where its result goes."""
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="torch device for training")
    p.add_argument("--threads", type=number(int, 1, 256), help="torch CPU threads (default 2; 1 in a daemon's job)")
    p.add_argument("--work", type=Path, help=f"{work} (default ~/.cache/wavecast)")
    p.add_argument("--store", type=Path, help="model store to publish to (default $XDG_DATA_HOME/wavecast/models)")
    p.add_argument("--out", type=Path, help="write the verified model to this directory instead of publishing")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Options of 'wavecast train instrument' (consumed by models.train.run)."""
    p.add_argument("--instrument", choices=["violin", "cello", "trumpet", "clarinet", "flute"],
                   help="imitate this GM instrument over its own range (f0 control limited to it)")
    p.add_argument("--name", type=model_name(),
                   help="model name to publish under (default: the instrument's name, else 'default'; with "
                        "--quick 'quick' or 'quick-INSTRUMENT', so a quick run never replaces a model)")
    p.add_argument("--program", type=number(int, 0, 127), default=73,
                   help="without --instrument: GM program (0-based, 73 = flute) over MIDI notes 24-95 (f0 33-1976 Hz)")
    p.add_argument("--quick", action="store_true", help="tiny data and few steps: a working model in ~2 min")
    p.add_argument("--steps", type=number(int, 1, 10_000_000), help="training steps (default 3000, quick 600)")
    p.add_argument("--batch", type=number(int, 1, 4096), help="crops per step (default 8, quick 4)")
    p.add_argument("--frames", type=number(int, 2, 10_000), help="frames per crop, 10 ms each (default 100, quick 50)")
    p.add_argument("--hidden", type=number(int, 8, 4096), default=128, help="LSTM width (default: %(default)s)")
    p.add_argument("--lr", type=number(float, 1e-7, 1.0), default=2e-3,
                   help="peak learning rate (default: %(default)s)")
    p.add_argument("--mel-weight", type=number(float, 0.0, 100.0), default=1.0,
                   help="weight of a log-mel L1 term added to the spectral loss, which weighs every band alike as "
                        "the gate's timbre figures do; 0 trains on the spectral loss alone, as the shipped "
                        "instruments were (default: %(default)s)")
    p.add_argument("--crops", choices=["any", "onset"], default="any",
                   help="where training crops start: anywhere (default), or a few frames before a note starts, so "
                        "that every crop hears its first note from the onset, as a stream does, and the model can "
                        "learn how a note's sound moves from there (FluidSynth's samples evolve through a note)")
    p.add_argument("--brightness", action="store_true",
                   help="a third control, brightness 0..1 (the note's velocity in the data), for instruments whose "
                        "timbre moves with how hard a note is played apart from its level (trumpet, clarinet)")
    p.add_argument("--init", metavar="MODEL",
                   help="start from the weights of this instrument in the store (NAME or NAME@VERSION, e.g. "
                        "default) instead of random ones: the same --hidden; a model that learned an instrument's "
                        "fundamental over a wide range keeps it on a narrow one; with --brightness from one without "
                        "it, the new control starts out doing nothing")
    p.add_argument("--seed", type=number(int, 0, 2**63 - 1), default=0, help="seed for data, init and batches")
    add_run_arguments(p, "data cache and checkpoints")


def add_composer_train_arguments(p: argparse.ArgumentParser) -> None:
    """Options of 'wavecast train composer' (consumed by models.train_composer.run)."""
    from wavecast.models.corpus import COLLECTIONS, SHIPPABLE

    p.add_argument("--name", type=model_name(),
                   help="model name to publish under (default: 'folk'; with --quick 'quick-folk', so a "
                        "quick run never replaces the composer)")
    p.add_argument("--collections", nargs="+", choices=list(COLLECTIONS), default=list(SHIPPABLE),
                   help="music21 corpus collections to learn from (default: those whose licence allows a shipped "
                        "model: %(default)s)")
    p.add_argument("--quick", action="store_true", help="a few tunes and few steps: a working model in ~1 min")
    p.add_argument("--steps", type=number(int, 1, 10_000_000), help="training steps (default 4000, quick 600)")
    p.add_argument("--batch", type=number(int, 1, 4096), help="sequences per step (default 32, quick 16)")
    p.add_argument("--length", type=number(int, 2, 10_000), help="events per training sequence (default 64, quick 32)")
    p.add_argument("--hidden", type=number(int, 8, 4096), help="LSTM width (default 256, quick 128)")
    p.add_argument("--lr", type=number(float, 1e-7, 1.0), help="peak learning rate (default 0.003, quick 0.008)")
    p.add_argument("--seed", type=number(int, 0, 2**63 - 1), default=0, help="seed for init, batches and augmentation")
    add_run_arguments(p, "corpus cache and checkpoints")


def build_parser() -> argparse.ArgumentParser:
    from wavecast.daemon.limits import Limits
    from wavecast.models.store import MAX_VERSION
    from wavecast.streaming.engine import BUDGET, BUFFER_FRAMES, MAX_BUFFER_FRAMES, MAX_STREAMS

    p = argparse.ArgumentParser(prog="wavecast", description="Real-time generative audio from stateful LSTM models.")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                   help="log verbosity (default: %(default)s)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    store_help = "trained-model store (default $XDG_DATA_HOME/wavecast/models); shipped models are always there"

    s = sub.add_parser("serve", help="run the daemon: HTTP API, WebRTC, device output", allow_abbrev=False,
                       description="Run the daemon. Streams play a model live to WebRTC peers and sound devices.")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    s.add_argument("--port", type=number(int, 0, 65535), default=8765,
                   help="TCP port, 0 picks a free one (default: %(default)s)")
    s.add_argument("--store", type=Path, help=store_help)
    s.add_argument("--model", default="default", help="model to load and check at start (default: %(default)s)")
    s.add_argument("--ice-host", help="offer this address as the only ICE host candidate, e.g. 127.0.0.1 for "
                                      "local clients (aioice leaves loopback out otherwise)")
    s.add_argument("--buffer-frames", type=number(int, 2, MAX_BUFFER_FRAMES), default=BUFFER_FRAMES,
                   help="frames (10 ms each) a stream starts generating ahead of its hungriest listener; it grows by "
                        f"one, up to {MAX_BUFFER_FRAMES}, each time a listener underruns; at least 2, as a WebRTC "
                        "packet takes 20 ms at once (default: %(default)s)")
    s.add_argument("--janus", type=janus_url, metavar="URL",
                   help="publish every new stream into this Janus server's Streaming plugin (its HTTP API, e.g. "
                        "http://127.0.0.1:8088/janus): Janus serves the listeners from one RTP stream (docs/janus.md)")
    s.add_argument("--watermark", choices=["on", "off"], default="on",
                   help="on: every sample a stream sends carries an inaudible mark of this daemon's key (made in the "
                        "data directory on first start) and the stream's serial, which 'wavecast detect' reads "
                        "back; off: no mark, and the streams' provenance says so (default: %(default)s)")
    s.add_argument("--events", type=Path, metavar="FILE",
                   help="a JSON file of stings and moods that adds to or replaces the shipped ones by name (format: "
                        "docs/overlay.md, 'Stings and moods')")
    s.add_argument("--tick-budget", type=number(float, 0.05, 1.0), default=BUDGET, metavar="FRACTION",
                   help="share of each 10 ms frame the predicted tick may take before new streams are refused "
                        "(default: %(default)s)")
    s.add_argument("--encode-budget", type=number(float, 0.0001, 1.0), default=BUDGET, metavar="FRACTION",
                   help="busy share of the Opus encoding thread past which a WebRTC offer that needs a new encoder "
                        "is refused with 503 (joining a stream that has one is not) (default: %(default)s)")
    limits = s.add_argument_group("limits", "what one daemon takes at most (all exported in /metrics)")
    limit_help = {
        "max_streams": "streams; below it admission control refuses (503) a stream that would push the tick past "
                       "--tick-budget",
        "max_peers": "WebRTC peer connections, all streams together",
        "max_peers_per_stream": "WebRTC peers of one stream; they share its one Opus encoding",
        "max_devices": "streams playing on sound devices at once",
        "max_models": "model versions loaded at once, instruments and composers together",
        "stream_rate": "stream creations a second per client address (429 with Retry-After beyond)",
        "stream_burst": "stream creations a client may make at once before --stream-rate applies",
        "message_rate": "data-channel messages a second per WebRTC peer (an error reply beyond)",
        "message_burst": "data-channel messages a peer may send at once before --message-rate applies",
        "max_jobs": "training jobs queued and running together (POST /v1/jobs answers 429 beyond)",
        "job_concurrency": "training jobs that run at once, each in a worker process of its own",
    }
    for name, value in asdict(Limits()).items():
        kind, low, high = (int, 1, MAX_STREAMS if name == "max_streams" else 100_000) if isinstance(value, int) \
            else (float, 0.01, 10_000.0)
        limits.add_argument(f"--{name.replace('_', '-')}", type=number(kind, low, high), default=value,
                            help=f"{limit_help[name]} (default: %(default)s)")
    access = s.add_argument_group("access", "who may use the API (see README: Security)")
    access.add_argument("--token-file", type=Path, metavar="FILE",
                        help="file whose first line is the bearer token clients must send (Authorization: Bearer); "
                             "or set WAVECAST_TOKEN. Required with a non-loopback --host")
    access.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                        help="a web page origin (e.g. http://localhost:3000) that may call the API and gets CORS "
                             "headers; repeatable. Pages the daemon serves itself are always allowed")
    access.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                        help="a Host name clients may use besides loopback names and --host (e.g. the machine's "
                             "DNS name); repeatable. Other names are refused (DNS rebinding)")
    s.set_defaults(func=cmd_serve)

    r = sub.add_parser("render", help="write a stream to an audio file, reproducibly",
                       description="Run the engine without a clock and write mono 16-bit WAV, FLAC or Ogg Opus, "
                                   "tagged with its provenance (AI-generated, the models, their training data, the "
                                   "seed, the watermark). With --watermark off, the same model, seed and controls "
                                   "give bit-identical audio; on, each render carries a serial of its own.")
    r.add_argument("--model", default="default", help="instrument model name (default: %(default)s)")
    r.add_argument("--composer", help="composer model name, e.g. folk: it writes the notes the instrument plays")
    r.add_argument("--seconds", type=number(float, 0.01, 86_400), required=True, help="length of the render")
    r.add_argument("--seed", type=number(int, 0, 2**63 - 1), default=0,
                   help="seed of the noise and the composer (default: %(default)s)")
    r.add_argument("--control", type=parse_control, action="append", default=[], metavar="NAME=VALUE",
                   help="a control value, repeatable: --control f0=440 --control loudness=-20, or with "
                        "--composer: --control tempo=96 --control 'scale=D dorian' --control register=high")
    r.add_argument("--change", type=parse_change, action="append", default=[], metavar="SECONDS:NAME=VALUE",
                   help="a control change during the render, repeatable, e.g. --change 30:tempo=140; with "
                        "--composer also --change 20:action=pause|play|reset")
    r.add_argument("--out", type=Path, required=True,
                   help="file to write: .wav (its provenance also in OUT.provenance.json), .flac or .ogg (Opus)")
    r.add_argument("--midi", type=Path, help="with --composer: also write the notes as a MIDI file")
    r.add_argument("--watermark", choices=["on", "off"], default="on",
                   help="mark the audio with this data directory's key and a serial of its own, recorded in the "
                        "registry, so that 'wavecast detect' finds it; off says so in the provenance "
                        "(default: %(default)s)")
    r.add_argument("--store", type=Path, help=store_help)
    r.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"],
                   help="ONNX Runtime device (default: %(default)s, bit-reproducible)")
    r.set_defaults(func=cmd_render)

    t = sub.add_parser("train", help="train, export, verify and publish a model",
                       description="Train a model in this process (torch), export it to ONNX, verify it and "
                                   "publish it to the store.")
    tsub = t.add_subparsers(dest="what", required=True, metavar="KIND")
    ti = tsub.add_parser("instrument", help="a neural instrument (controls f0, loudness[, brightness] -> audio)",
                         description="Render FluidSynth performances, train the LSTM instrument, export, verify, "
                                     "publish.")
    add_train_arguments(ti)
    ti.set_defaults(func=cmd_train)
    tc = tsub.add_parser("composer", help="a note-level LSTM that writes melodies (music21 folk corpus)",
                         description="Parse the music21 folk corpus, train the note-level LSTM composer, export, "
                                     "verify (parity; held-out NLL against unigram and key-relative Markov "
                                     "baselines), publish.")
    add_composer_train_arguments(tc)
    tc.set_defaults(func=cmd_train)
    for kind in (ti, tc):
        kind.add_argument("--daemon", metavar="URL", help="train in a running daemon's worker process instead: submit "
                          f"the job (e.g. to {DEFAULT_DAEMON}) and follow its progress; Ctrl-C detaches")

    j = sub.add_parser("jobs", help="a daemon's training jobs: list, follow, cancel, resume",
                       description="The training jobs of a running daemon (POST /v1/jobs; 'wavecast train ... "
                                   "--daemon URL' submits one). Without an action, list them.")
    j.add_argument("--daemon", metavar="URL", default=DEFAULT_DAEMON, help="the daemon (default: %(default)s)")
    j.add_argument("--json", action="store_true", help="machine-readable output")
    j.set_defaults(func=cmd_jobs, action=None)
    jsub = j.add_subparsers(dest="action", metavar="ACTION")
    on_daemon = argparse.ArgumentParser(add_help=False)  # --daemon after the action too, not hiding one before it
    on_daemon.add_argument("--daemon", metavar="URL", default=argparse.SUPPRESS, help="the daemon")
    jf = jsub.add_parser("follow", parents=[on_daemon], help="follow a job's progress until it ends (Ctrl-C detaches)")
    jc = jsub.add_parser("cancel", parents=[on_daemon], help="cancel a job: its worker stops, its temporary files go")
    jc.add_argument("--keep-checkpoint", action="store_true",
                    help="keep its checkpoint, so that 'wavecast jobs resume ID' goes on from it")
    jr = jsub.add_parser("resume", parents=[on_daemon], help="queue an interrupted, failed or cancelled job again "
                         "(it goes on from its checkpoint, if it has one)")
    for action in (jf, jc, jr):
        action.add_argument("id", help="the job's id (wavecast jobs lists them)")

    dr = sub.add_parser("drain", help="move every stream of a daemon to another daemon, before stopping it",
                        description="Move every stream of the daemon at --daemon to the daemon at --to (POST "
                                    "/v1/drain): each goes on there from where it was (a snapshot); a stream published "
                                    "into Janus keeps its mountpoint and its listeners stay connected; WebRTC "
                                    "listeners of the old daemon are told the stream's new URL. From now on the old "
                                    "daemon refuses new streams (503 draining, naming --to); stop it once this "
                                    "reports every stream moved. The daemons' clocks must agree (one host, or NTP). "
                                    "One line a stream; exit status 0 when all moved, 1 when one did not (run it "
                                    "again), 2 when the daemon did not answer. WAVECAST_TOKEN is --daemon's token.")
    dr.add_argument("--to", required=True, metavar="URL", help="the daemon the streams move to, e.g. "
                                                               "http://10.0.0.2:8765")
    dr.add_argument("--daemon", metavar="URL", default=DEFAULT_DAEMON,
                    help="the daemon to drain (default: %(default)s)")
    dr.add_argument("--to-token-file", type=Path, metavar="FILE",
                    help="file whose first line is --to's bearer token, when it needs one")
    dr.set_defaults(func=cmd_drain)

    x = sub.add_parser("export", help="re-export a trained instrument's graph with today's synthesis (no retraining)",
                       description="Read the trained weights back out of each instrument's model.onnx, check them "
                                   "against it, export the graph with the current synthesis, verify torch against "
                                   "ONNX Runtime over 240 stateful frames and the new graph against the old on the "
                                   "same inputs (max |new - old|, SNR >= 60 dB), measure held-out quality again on "
                                   "the model's own training data recipe and pass the store's gate, and write "
                                   "model.onnx and model.json (name, version, controls, states and training kept, "
                                   "control smoothing as this code trains it; the re-export recorded under "
                                   "training.reexport).")
    x.add_argument("model_dirs", nargs="+", type=Path, metavar="DIR", help="instrument model directory")
    x.add_argument("--out", type=Path, help="write here instead of in place (with several DIRs: OUT/<dir name>)")
    x.add_argument("--threads", type=number(int, 1, 256), default=2, help="torch CPU threads (default: %(default)s)")
    x.add_argument("--work", type=Path, help="data cache for the quality check (default ~/.cache/wavecast)")
    x.add_argument("--no-quality", action="store_true",
                   help="skip the held-out quality check (keeps the manifest's earlier figures)")
    x.set_defaults(func=cmd_export)

    m = sub.add_parser("models", help="list the models the daemon can play; their versions, rollback, delete",
                       description="List the models (the current version of each), or with an action, one model's "
                                   "versions. These work on the store directly; no daemon is needed.")
    m.add_argument("--store", type=Path, help=store_help)
    m.add_argument("--json", action="store_true", help="machine-readable output")
    m.set_defaults(func=cmd_models)
    msub = m.add_subparsers(dest="action", metavar="ACTION")
    # Given after the action too; SUPPRESS keeps an action's absent flag from hiding the one given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", type=Path, default=argparse.SUPPRESS, help=store_help)
    version = number(int, 1, MAX_VERSION)
    mv = msub.add_parser("versions", parents=[common], help="every version of a model, and which one is current",
                         description="Every version of a model, shipped or trained, oldest first; '*' marks the "
                                     "current one, the one that plays by name.")
    mv.add_argument("name", help="model name")
    mv.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    mr = msub.add_parser("rollback", parents=[common], help="make an earlier version of a model current again",
                         description="Make VERSION (default: the one before the current one) the version that plays "
                                     "by name; a running daemon's new streams play it. Publishing a new version "
                                     "makes that one current again.")
    mr.add_argument("name", help="model name")
    mr.add_argument("version", nargs="?", type=version, help="version to make current (default: the previous one)")
    md = msub.add_parser("delete", parents=[common], help="delete a trained version (not the current one)",
                         description="Delete a trained version of a model. The current version and shipped ones "
                                     "stay: roll back first. Its number is never given to another version. A "
                                     "running daemon's streams that play it go on (DELETE "
                                     "/v1/models/NAME/versions/VERSION refuses while one does).")
    md.add_argument("name", help="model name")
    md.add_argument("version", type=version, help="version to delete")
    for action in (mv, mr, md):
        action.set_defaults(func=cmd_model_versions)

    d = sub.add_parser("devices", help="list sound output devices")
    d.add_argument("--json", action="store_true", help="machine-readable output")
    d.set_defaults(func=cmd_devices)

    w = sub.add_parser("detect", help="is an audio file marked by this machine's watermark key?",
                       description="Read the watermark of each audio file (WAV, FLAC, Ogg/Opus, WebM, anything "
                                   "PyAV opens; at least 2 s): marked or not, the confidence, the payload (key id "
                                   "and serial) and what it names (a stream or a render: model, seed, date), and "
                                   "where in the file the mark is. Exit status: 0 when every file is marked, 1 "
                                   "when one is not, 2 when one cannot be read or there is no key.")
    w.add_argument("files", type=Path, nargs="+", metavar="FILE", help="audio files to examine")
    w.add_argument("--json", action="store_true",
                   help='one JSON object a file: {"file", "marked", "confidence", "payload", "ranges", "score", '
                        '"source"} ({"file", "error"} for an unreadable one)')
    w.add_argument("--store", type=Path, help=f"{store_help}; its data directory holds the key (watermark/key.json)")
    w.add_argument("--key", type=Path, action="append", default=[], metavar="FILE",
                   help="another key file (a key.json from another machine, or an old one); repeatable")
    w.set_defaults(func=cmd_detect)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
