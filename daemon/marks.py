"""The daemon's side of the watermark: its key file, the registry of the serials it has marked, and decoding
audio files for the detector.

The data directory (the model store's parent, `$XDG_DATA_HOME/wavecast`) holds `watermark/key.json`, made on
the first start of `serve` or `render`, and `watermark/marks.jsonl`, one JSON line per serial issued, which says
what carries it (a stream, a render). `wavecast serve` and `wavecast render` may run at once, so issuing a
serial holds an exclusive lock on the registry file.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

import numpy as np

from wavecast.streaming.watermark import SERIAL_BITS, Key, detect, payload_text

KEY_FILE = "key.json"
REGISTRY_FILE = "marks.jsonl"
COUNTER_FILE = "next_serial"


class KeyFileError(Exception):
    """The key file exists but cannot be used."""


class Unreadable(Exception):
    """An audio file the detector cannot read; the message says why, for people."""


def watermark_dir(store_root: Path) -> Path:
    """The watermark's directory in the data directory (the model store's parent, beside `jobs`)."""
    return Path(store_root).parent / "watermark"


def read_key(path: Path) -> Key:
    """The key in `path` (a key.json); a clear error when it is not one."""
    try:
        data = json.loads(Path(path).read_text())
        if data.get("version") != 1:
            raise ValueError("unknown version")
        key = Key(bytes.fromhex(data["secret"]))
    except FileNotFoundError:
        raise KeyFileError(f"no watermark key file at {path}") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "it is not a wavecast key file (version 1)"
        raise KeyFileError(f"the watermark key file {path} cannot be used: {reason}. Move it away and start the "
                           "daemon again to make a new key; audio marked with the old key is only detected with "
                           "the old file (pass it to 'wavecast detect --key FILE')") from None
    if data.get("id") != f"{key.id:04x}":
        raise KeyFileError(f"the watermark key file {path} says its id is '{str(data.get('id', ''))[:8]}' but its "
                           f"secret is key {key.id:04x}: the file was edited. Restore it from a backup, or move it "
                           "away and start the daemon again to make a new key")
    return key


def load_key(directory: Path, create: bool) -> Key | None:
    """The key in `directory`/key.json; when there is none, a new one written there (create=True: the file is
    0600 in a 0700 directory, written whole or not at all) or None."""
    path = Path(directory) / KEY_FILE
    if path.exists():
        return read_key(path)
    if not create:
        return None
    Path(directory).mkdir(mode=0o700, parents=True, exist_ok=True)
    key = Key.generate()
    text = json.dumps({"version": 1, "id": f"{key.id:04x}", "secret": key.secret.hex()}) + "\n"
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".key-")  # mkstemp makes it 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)  # fails if another process made the key first: theirs wins
    except FileExistsError:
        return read_key(path)
    finally:
        os.unlink(tmp)
    return key


class Registry:
    """The serials issued under the directory's key and what carries each. Serials count up from 0 and wrap
    after 65535 (16 bits): past that, a serial names the newest of the records that used it. `key`: the key
    the marks are made with, when the caller holds it already (a daemon keeps its key if the file is moved
    away while it runs); by default the directory's, made if there is none."""

    def __init__(self, directory: Path, key: Key | None = None) -> None:
        self.directory = Path(directory)
        self.key = key

    def issue(self, record: dict) -> int:
        """The next serial, recorded with `record` (what it marks: {"kind": "stream"|"render", ...})."""
        key = self._key()
        with self._locked() as f:
            counter = self.directory / COUNTER_FILE
            try:
                serial = int(counter.read_text()) % (1 << SERIAL_BITS)
            except (FileNotFoundError, ValueError):
                serial = 0
            tmp = counter.with_name(f".{COUNTER_FILE}.tmp")
            tmp.write_text(f"{(serial + 1) % (1 << SERIAL_BITS)}\n")
            os.replace(tmp, counter)
            self._append(f, {"serial": serial, "payload": payload_text(key.payload(serial)),
                             "at": datetime.now(UTC).isoformat(timespec="seconds")} | record)
        return serial

    def amend(self, serial: int, fields: dict) -> None:
        """Add `fields` to the record of `serial` (e.g. a stream's id, known only once the stream exists)."""
        key = self._key()
        with self._locked() as f:
            self._append(f, {"serial": serial, "payload": payload_text(key.payload(serial)), "amend": True} | fields)

    def lookup(self, payload: int) -> dict | None:
        """The newest record of `payload` (key id and serial), with its amendments; None when this registry
        never issued it."""
        text = payload_text(payload)
        found: dict | None = None
        try:
            lines = (self.directory / REGISTRY_FILE).read_text().splitlines()
        except FileNotFoundError:
            return None
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:  # a line cut short by a crash: the others still count
                continue
            if not isinstance(entry, dict) or entry.get("payload") != text:
                continue
            if entry.pop("amend", False):
                if found is not None:
                    found |= entry
            else:
                found = entry
        return found

    def _key(self) -> Key:
        return self.key or load_key(self.directory, create=True)

    @contextmanager
    def _locked(self) -> Iterator[TextIO]:
        """The registry file open for appending under an exclusive flock: other processes, and other threads
        (each opens the file anew), wait for it."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        with (self.directory / REGISTRY_FILE).open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield f

    @staticmethod
    def _append(f: TextIO, entry: dict) -> None:
        f.write(json.dumps(entry, separators=(",", ":")) + "\n")
        f.flush()


def examine(source: Path | bytes, keys: list[Key], registry: Registry | None) -> dict:
    """What `wavecast detect --json` and POST /v1/detect say of one file: {"marked", "confidence", "payload",
    "ranges", "score", "source"}; "source" is the registry's record of the payload (None when the registry does
    not know it). Raises Unreadable for a file that is not audio or too short to judge."""
    audio, rate = decode(source)
    try:
        found = detect(audio, rate, keys)
    except ValueError as e:  # too short
        raise Unreadable(f"{_name(source)}: {e}") from None
    result = found.as_dict()
    result["source"] = registry.lookup(found.payload) if found.marked and registry is not None else None
    return result


def _name(source: Path | bytes) -> str:
    return str(source) if isinstance(source, Path) else "the body"


def decode(source: Path | bytes) -> tuple[np.ndarray, int]:
    """(mono float32 audio, sample rate) of any file PyAV opens (WAV, FLAC, Ogg/Opus, WebM, ...): its first
    audio stream, channels averaged. Unreadable says why in words."""
    import av

    name = _name(source)
    try:
        container = av.open(str(source) if isinstance(source, Path) else io.BytesIO(source))
    except FileNotFoundError:
        raise Unreadable(f"{name}: no such file") from None
    except IsADirectoryError:
        raise Unreadable(f"{name}: is a directory, not an audio file") from None
    except (av.FFmpegError, OSError, ValueError):
        raise Unreadable(f"{name}: not an audio file PyAV can open (WAV, FLAC, Ogg/Opus, WebM, ...)") from None
    parts: list[np.ndarray] = []
    with container:
        if not container.streams.audio:
            raise Unreadable(f"{name}: the file has no audio stream")
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate or stream.rate
        try:
            for frame in container.decode(stream):
                parts.append(_mono(frame))
        except (av.FFmpegError, ValueError) as e:
            if not parts:
                raise Unreadable(f"{name}: the audio cannot be decoded ({getattr(e, 'strerror', None) or e})") from None
            # a truncated file: what decoded is still judged
    if not parts or not rate:
        raise Unreadable(f"{name}: the file holds no audio")
    return np.concatenate(parts), int(rate)


def _mono(frame) -> np.ndarray:
    """One decoded frame as mono float32 in [-1, 1], whatever its sample format and layout."""
    data = frame.to_ndarray()
    fmt = frame.format
    channels = len(frame.layout.channels)
    if not fmt.is_planar:  # packed: one row, channels interleaved
        data = data.reshape(-1, channels).T
    data = data.astype(np.float32)
    if fmt.name.startswith("s"):  # integers: s16, s32, ...
        data /= float(2 ** (8 * fmt.bytes - 1))
    elif fmt.name.startswith("u8"):
        data = (data - 128.0) / 128.0
    return data.mean(axis=0)
