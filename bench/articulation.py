"""How FluidSynth starts and stops each instrument's notes, beside the performer's `ARTICULATIONS`.

Run from the repository root:  PYTHONPATH=. .venv/bin/python bench/articulation.py [--out FILE]
(the 'train' extra; FluidSynth and FluidR3_GM as for training). For each GM program in
`streaming.performer.ARTICULATIONS` it renders single notes across the instrument's range (`data.INSTRUMENTS`,
every 6th key) at velocities 64, 96 and 120, each held 1 s, and measures:

- onset: each frame's level from note-on under the note's sustained level (the median of the last 0.3 s
  before note-off), the median over the notes, until it comes within 1 dB (`Articulation.onset_db`);
- release: the rate of the fall after note-off as seconds per 60 dB, from a line fitted to the frames until
  it is 30 dB down (what a release before the next note reaches; the time to -60 dB has a steep tail no gap
  reaches).

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


def measure(program: int, keys: range) -> dict[str, Any]:
    rises, releases = [], []
    for key in keys:
        for velocity in VELOCITIES:
            level, on, off = levels(program, key, velocity)
            sustain = float(np.median(level[off - round(SUSTAIN_SECONDS / FRAME_SECONDS): off]))
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
    return {"onset_db": [round(float(v), 1) for v in rise[:steps]], "release_seconds": float(np.median(releases)),
            "notes": len(rises)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "articulation.json")
    args = parser.parse_args(argv)
    rows = []
    print(f"{'instrument':12} {'program':>7} {'onset s (performer)':>20} {'largest difference dB':>22} "
          f"{'release s/60 dB (performer)':>28}")
    for name, (program, low, high) in data.INSTRUMENTS.items():
        ours, keys = ARTICULATIONS[program], range(low, high + 1, KEY_STEP)
        print(f"[articulation] {name}: {len(keys) * len(VELOCITIES)} notes", file=sys.stderr, flush=True)
        got = measure(program, keys)
        rows.append({"instrument": name, "program": program, "fluidsynth": got,
                     "performer": {"onset_db": ours.onset_db, "release_seconds": ours.release_seconds}})
        steps = max(len(got["onset_db"]), len(ours.onset_db))
        theirs, mine = (np.pad(np.array(c, float), (0, steps - len(c))) for c in (got["onset_db"], ours.onset_db))
        print(f"{name:12} {program:>7} {len(got['onset_db']) * FRAME_SECONDS:>13.2f} ({ours.attack_seconds:.2f})"
              f" {np.abs(theirs - mine).max():>22.1f} {got['release_seconds']:>19.3f} ({ours.release_seconds:.2f})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"velocities": VELOCITIES, "key_step": KEY_STEP, "rows": rows}, indent=1))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
