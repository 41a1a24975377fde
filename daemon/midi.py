"""A Standard MIDI File (format 0) of the notes a composed stream played; no dependency beyond struct.

The file is in the piece's own musical time, so other tools read its form: each note starts at its position
in quarter notes (480 ticks each) and lasts as long as the performer held it (a detached note is released
before the next one starts, a slurred one is held to it), at the velocity it was played with; a tempo event
comes wherever the tempo changes, a time signature wherever the metre does and a key signature wherever the
key does (a mode is written as the key signature of its major scale; minor as minor). A pause or a reset,
which leave a gap the notes' quarters do not account for, becomes that gap at the tempo then playing, so the
file's timing is the stream's. Text meta events at the start say what made it (the provenance).
"""

from __future__ import annotations

import struct
from pathlib import Path

from wavecast.streaming.composer import Note
from wavecast.streaming.notes import MODES, Scale

TICKS_PER_QUARTER = 480
_MODE_DEGREE = {mode: MODES["major"][i] for i, mode in enumerate(("major", "dorian", "phrygian", "lydian",
                                                                    "mixolydian", "minor", "locrian"))}
_TIME_SIGNATURES = {"4/4": (4, 2), "2/4": (2, 2), "3/4": (3, 2), "6/8": (6, 3)}  # numerator, log2 denominator


def _varlen(n: int) -> bytes:
    out = [n & 0x7F]
    while n > 0x7F:
        n >>= 7
        out.append(0x80 | (n & 0x7F))
    return bytes(reversed(out))


def key_signature(scale: str) -> bytes:
    """The key-signature meta event of `scale`: sharps (+) or flats (-) of its major scale; minor keeps its own."""
    s = Scale.parse(scale)
    major = (s.tonic - _MODE_DEGREE[s.mode]) % 12  # the major scale with the same notes
    sharps = major * 7 % 12
    sharps -= 12 if sharps > 6 else 0  # F# (6) sharps; C# and beyond as flats (Db = -5)
    return b"\xff\x59\x02" + struct.pack(">bB", sharps, int(s.mode == "minor"))


def time_signature(metre: str) -> bytes:
    numerator, log2 = _TIME_SIGNATURES[metre]
    return b"\xff\x58\x04" + bytes([numerator, log2, 24, 8])


def tempo(quarters_per_minute: float) -> bytes:
    return b"\xff\x51\x03" + round(60_000_000 / quarters_per_minute).to_bytes(3, "big")


def text(words: str) -> bytes:
    """A text meta event (FF 01), UTF-8."""
    data = words.encode("utf-8")
    return b"\xff\x01" + _varlen(len(data)) + data


def write_midi(path: Path, notes: list[Note], frame_seconds: float, program: int = 0,
               texts: tuple[str, ...] = ()) -> None:
    """`notes` (oldest first, as a stream played them) as a format-0 file on `program` (GM, 0-based), with
    `texts` as text events at its start."""
    # (tick, order at one tick: meta, off, on; message); the sort below is stable, so the texts come first
    events: list[tuple[int, int, bytes]] = [(0, 0, text(words)) for words in texts]
    tick, previous = 0, None
    for note in notes:
        if previous is not None:
            expected = previous.frame + previous.frames
            if abs(note.frame - expected) <= 1:  # the next note where the last one's quarters end
                tick += round(previous.quarters * TICKS_PER_QUARTER)
            else:  # a pause or a reset: the real gap at the tempo that was playing
                seconds = (note.frame - previous.frame) * frame_seconds
                tick += round(seconds * previous.tempo / 60 * TICKS_PER_QUARTER)
        for changed, message in ((previous is None or note.tempo != previous.tempo, tempo(note.tempo)),
                                 (previous is None or note.metre != previous.metre, time_signature(note.metre)),
                                 (previous is None or note.scale != previous.scale, key_signature(note.scale))):
            if changed:
                events.append((tick, 0, message))
        if note.midi is not None:  # released where the performer released it
            held = 1.0 if note.sounding is None else note.sounding / max(1, note.frames)
            length = max(1, round(note.quarters * held * TICKS_PER_QUARTER))
            events += [(tick, 2, bytes([0x90, note.midi, note.velocity])),
                       (tick + length, 1, bytes([0x80, note.midi, 0]))]
        previous = note
    events.sort(key=lambda e: e[:2])
    track = bytearray(bytes([0, 0xC0, program & 0x7F]))
    now = 0
    for at, _, message in events:
        track += _varlen(at - now) + message
        now = at
    track += b"\x00\xff\x2f\x00"
    header = struct.pack(">4sIHHH", b"MThd", 6, 0, 1, TICKS_PER_QUARTER)
    Path(path).write_bytes(header + struct.pack(">4sI", b"MTrk", len(track)) + bytes(track))
