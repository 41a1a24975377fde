"""A Standard MIDI File (format 0) of the notes a composed stream played; no dependency beyond struct."""

from __future__ import annotations

import struct
from pathlib import Path

from wavecast.streaming.composer import Note

TICKS_PER_QUARTER = 480
_TEMPO_US = 500_000  # the file's own clock: 120 quarters a minute, so a tick is 1/960 s


def _varlen(n: int) -> bytes:
    out = [n & 0x7F]
    while n > 0x7F:
        n >>= 7
        out.append(0x80 | (n & 0x7F))
    return bytes(reversed(out))


def write_midi(path: Path, notes: list[Note], frame_seconds: float, program: int = 0) -> None:
    """Each note at its real time, to the next note's start (tempo changes are baked into the times)."""
    ticks_per_second = TICKS_PER_QUARTER * 1_000_000 / _TEMPO_US
    events: list[tuple[int, bytes]] = []
    for note in notes:
        if note.midi is None:
            continue
        start = round(note.frame * frame_seconds * ticks_per_second)
        length = max(1, round(note.frames * frame_seconds * ticks_per_second))
        events += [(start, bytes([0x90, note.midi, 96])), (start + length, bytes([0x80, note.midi, 0]))]
    events.sort(key=lambda e: (e[0], e[1][0] == 0x90))  # at one tick, note-offs first
    track = bytearray(b"\x00\xff\x51\x03" + _TEMPO_US.to_bytes(3, "big") + bytes([0, 0xC0, program & 0x7F]))
    now = 0
    for tick, message in events:
        track += _varlen(tick - now) + message
        now = tick
    track += b"\x00\xff\x2f\x00"
    header = struct.pack(">4sIHHH", b"MThd", 6, 0, 1, TICKS_PER_QUARTER)
    Path(path).write_bytes(header + struct.pack(">4sI", b"MTrk", len(track)) + bytes(track))
