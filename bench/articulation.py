"""How FluidSynth starts and stops each instrument's notes, beside the performer's `ARTICULATIONS`.

Run from the repository root:  PYTHONPATH=. .venv/bin/python bench/articulation.py [--out FILE]
(the 'train' extra; FluidSynth and FluidR3_GM as for training). For each GM program in
`streaming.performer.ARTICULATIONS` it renders single notes across the instrument's range (`data.INSTRUMENTS`,
every key) at velocities 64, 96 and 120, each held 1 s, and measures:

- onset: each frame's level from note-on under the note's sustained level (the median of the last 0.3 s
  before note-off), the median over the notes of every 6th key, until it comes within 1 dB
  (`Articulation.onset_db`);
- release: the rate of the fall after note-off as seconds per 60 dB, from a line fitted to the frames until
  it is 30 dB down (what a release before the next note reaches; the time to -60 dB has a steep tail no gap
  reaches), the median over the same notes;
- key level: how far each key's sustained level lies above the mean over the range, the median over the
  velocities, then over the key and its two neighbours, so that a key the samples miss (FluidR3's violin
  misses one) does not carry (`Articulation.key_db`).

Prints the medians beside the performer's values and writes JSON (default bench/out/articulation.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import mido
import numpy as np

from wavecast.models import data
from wavecast.streaming.performer import ARTICULATIONS

ROOT = Path(__file__).resolve().parent.parent
VELOCITIES = (64, 96, 120)
KEY_STEP = 6
HELD_SECONDS, LEAD_SECONDS = 1.0, 0.05
SUSTAIN_SECONDS, WITHIN_DB, RELEASE_DB = 0.3, 1.0, 30.0
RELEASE_WINDOW_SECONDS = 0.5  # after note-off, where the fall is looked for
FRAME_SECONDS = data.HOP / data.SAMPLE_RATE


def levels(program: int, key: int, velocity: int) -> tuple[np.ndarray, int, int]:
    """Per-frame level (dB) of one note, and the frames of its note-on and note-off."""
    song = mido.MidiFile(ticks_per_beat=480)  # 120 bpm: 960 ticks a second
    track = mido.MidiTrack()
    song.tracks.append(track)
    track += [mido.Message("program_change", program=program, time=0),
              mido.Message("note_on", note=key, velocity=velocity, time=round(LEAD_SECONDS * 960)),
              mido.Message("note_off", note=key, time=round(HELD_SECONDS * 960))]
    with tempfile.TemporaryDirectory(prefix="wavecast-bench-") as tmp:
        path = Path(tmp) / "note.mid"
        song.save(path)
        audio = data.render_midi_file(path, int((LEAD_SECONDS + HELD_SECONDS + 1.0) * data.SAMPLE_RATE))
    on = round(LEAD_SECONDS / FRAME_SECONDS)
    return data.loudness_db(audio), on, on + round(HELD_SECONDS / FRAME_SECONDS)


def measure(program: int, low: int, high: int) -> dict[str, Any]:
    rises, releases, sustains = [], [], np.zeros((high + 1 - low, len(VELOCITIES)))
    for key in range(low, high + 1):
        for j, velocity in enumerate(VELOCITIES):
            level, on, off = levels(program, key, velocity)
            sustain = float(np.median(level[off - round(SUSTAIN_SECONDS / FRAME_SECONDS): off]))
            sustains[key - low, j] = sustain
            if (key - low) % KEY_STEP:
                continue
            rises.append(level[on:off] - sustain)
            fall = level[off: off + round(RELEASE_WINDOW_SECONDS / FRAME_SECONDS)] - sustain
            end = int(np.argmax(fall < -RELEASE_DB)) if (fall < -RELEASE_DB).any() else len(fall)
            if end <= 2:  # gone within two frames: as fast as a frame can say
                releases.append(FRAME_SECONDS)
                continue
            slope = -np.polyfit(np.arange(end), fall[:end], 1)[0]  # dB a frame
            releases.append(60.0 * FRAME_SECONDS / max(float(slope), 1e-3))
    rise = np.median(np.array(rises), axis=0)
    steps = int(np.argmax(rise >= -WITHIN_DB))
    above = np.median(sustains - sustains.mean(axis=0), axis=1)  # each key over the range's mean, by velocity
    padded = np.pad(above, 1, mode="edge")
    key_db = np.median(np.stack([padded[:-2], padded[1:-1], padded[2:]]), axis=0)  # a key missing in the samples
    return {"onset_db": [round(float(v), 1) for v in rise[:steps]], "release_seconds": float(np.median(releases)),
            "low_key": low, "key_db": [round(float(v), 1) for v in key_db], "notes": len(rises)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "articulation.json")
    args = parser.parse_args(argv)
    rows = []
    print(f"{'instrument':12} {'program':>7} {'onset s (performer)':>20} {'largest difference dB':>22} "
          f"{'release s/60 dB (performer)':>28} {'key levels dB, spread (largest difference)':>44}")
    for name, (program, low, high) in data.INSTRUMENTS.items():
        ours = ARTICULATIONS[program]
        print(f"[articulation] {name}: {(high + 1 - low) * len(VELOCITIES)} notes", file=sys.stderr, flush=True)
        got = measure(program, low, high)
        rows.append({"instrument": name, "program": program, "fluidsynth": got,
                     "performer": {"onset_db": ours.onset_db, "release_seconds": ours.release_seconds,
                                   "low_key": ours.low_key, "key_db": ours.key_db}})
        steps = max(len(got["onset_db"]), len(ours.onset_db))
        theirs, mine = (np.pad(np.array(c, float), (0, steps - len(c))) for c in (got["onset_db"], ours.onset_db))
        keys = range(low, high + 1)
        off = max(abs(got["key_db"][k - low] - ours.key_level(k)) for k in keys)
        print(f"{name:12} {program:>7} {len(got['onset_db']) * FRAME_SECONDS:>13.2f} ({ours.attack_seconds:.2f})"
              f" {np.abs(theirs - mine).max():>22.1f} {got['release_seconds']:>19.3f} ({ours.release_seconds:.2f})"
              f" {np.std(got['key_db']):>36.1f} ({off:.1f})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"velocities": VELOCITIES, "key_step": KEY_STEP, "rows": rows}, indent=1))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
