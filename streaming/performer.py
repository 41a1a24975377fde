"""The performer: typed notes in, an instrument's per-frame f0, loudness and brightness out.

The composer (streaming.composer) decides what is played; the performer decides how, the way a player phrases a
line. A note attacks along the instrument's own onset contour (its level, frame by frame, as its notes rise in
the data) while the previous note's tail rings on under it at its release rate, the two summed in power as two
overlapping notes sound (the level dips where the tail falls faster than the attack rises; nothing is gated to
silence first). `legato` is the chance that a note is slurred into the next one (held to the next start, the
pitch gliding over, no new attack) and, for detached notes, how little of the note's end is released. A released
note falls at the instrument's release rate but no more than LIFT_DB before the next note (a lift, not a stop; an
instrument whose sound stops at release, `Articulation.stops`, such as the clarinet's tongued reed, falls silent
at its own rate), and a rest shorter than a quarter note falls to no more than ROOM_DB under the note before, as
it rings on in a room, so that a phrase breathes instead of stopping dead. Each key is louder or quieter by as
much as the instrument's own keys differ. Dynamics follow the metre and the phrase: an accent on the downbeat, a swell
to the middle of each 4-bar phrase, a little unevenness; and a louder note is played harder, so it is brighter
(for an instrument with a brightness control: see `Articulation.brightest_db`). Everything here runs on the
inference thread, once a frame, with no allocation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from wavecast.streaming.model import Manifest
from wavecast.streaming.notes import MIDDLE_BRIGHTNESS, midi_hz

FLOOR_DB = -80.0  # loudness of silence
ONSET_FRAME_SECONDS = 0.01  # the step of `Articulation.onset_db`
REARTICULATE_DB = 9.0  # dip between two slurred notes of the same pitch, so the second one is heard
GLIDE_SECONDS = 0.04  # portamento between slurred notes
MAX_GAP_SECONDS = 0.15  # a detached note's release before the next start, at legato 0 (at most half the note)
FAST_ATTACK = 0.35  # share of a note its onset contour may take at most: a fast note speaks faster
LIFT_DB = 30.0  # the most that release falls: a detached note lifts off, the phrase goes on
ROOM_DB = 40.0  # a short rest (under a quarter note) falls to this far under the note before it, no further
VIBRATO_HZ, VIBRATO_CENTS, VIBRATO_AFTER_SECONDS = 5.5, 30.0, 0.25
ACCENT_DB, PHRASE_SWELL_DB, UNEVEN_DB = 2.0, 2.0, 1.0  # downbeat accent, 4-bar phrase swell, random +-
# A pause or reset is someone stopping the music, not a note's natural end: the note falls 60 dB in this time
# whatever the instrument (a violin's own release would add 180 ms to the dock's pause-to-silence)
STOP_SECONDS = 0.05


@dataclass(frozen=True)
class Articulation:
    """How an instrument starts and stops a note."""

    # A note's level under its sustained level (dB, < 0), every ONSET_FRAME_SECONDS from its start until it
    # comes within 1 dB: the attack out of silence (a sounding tail rings on beside it: see Performer.frame).
    onset_db: tuple[float, ...]
    release_seconds: float  # a released note's fall of 60 dB
    # The level (dB) at which the training data's notes are on average played at full velocity (brightness 1),
    # and the dB under it at which they are at the softest (0): a line fitted to brightness against loudness over
    # the data's voiced frames.
    brightest_db: float = -5.0
    brightness_span_db: float = 55.0
    stops: bool = False  # a detached note falls at its release rate to silence, not at most LIFT_DB
    # How far each key sounds above the instrument's average at one velocity (dB), from `low_key` up (the
    # nearest end beyond): a note is played at its level plus its key's, as the instrument sounds it.
    low_key: int = 0
    key_db: tuple[float, ...] = (0.0,)

    @property
    def attack_seconds(self) -> float:
        return len(self.onset_db) * ONSET_FRAME_SECONDS

    def key_level(self, midi: int) -> float:
        return self.key_db[min(max(midi - self.low_key, 0), len(self.key_db) - 1)]

    def brightness(self, level: float) -> float:
        """How hard a note at `level` dB is played, as the data plays such notes on average."""
        return min(1.0, max(0.0, 1.0 + (level - self.brightest_db) / self.brightness_span_db))


# Measured from FluidSynth (FluidR3_GM) on each GM program; bench/articulation.py measures them again. Onset:
# the median over the instrument's range (every 6th key) at velocities 64, 96 and 120 of each frame's level
# under the note's sustained level, until it comes within 1 dB (a cello's bow takes 0.3 s, a trumpet's tongue
# 0.02 s). Release: the rate of the fall after note-off, as seconds per 60 dB, from a line fitted to its first
# 30 dB (what a release before the next note reaches; the time to -60 dB, with its steep tail, would make every
# gap too deep), the median over the same notes. The clarinet's is one frame: its tongued reed stops, so a
# detached clarinet note falls silent before the next, as FluidSynth's does, where the others lift LIFT_DB and
# ring on (a lift was most of the clarinet's MFCC distance to FluidSynth as played: bench/RESULTS.md). The
# brightness lines come from each one's training data (models.data: velocity as brightness against loudness,
# voiced frames of the 22 performances). Key levels: every key's sustained level over the range's mean (median
# over the three velocities, then over each key and its neighbours): a sampled instrument's keys differ by a few
# dB, zone by zone (the cello's by +-2.4 dB), as a real one's strings and registers do.
ARTICULATIONS = {
    40: Articulation(  # violin
        (-19.2, -13.9, -12.2, -11.0, -8.8, -9.0, -8.0, -7.8, -6.8, -6.1, -5.5, -5.1, -4.5, -4.2, -3.8, -3.6, -3.3,
         -2.7, -4.2, -4.1, -2.3, -2.1, -1.6, -1.3),
        0.38, -0.6, 65.4, low_key=55,
        key_db=(4.4, 4.9, 4.9, 4.9, 3.4, 3.4, 4.0, 4.8, 5.1, 5.1, 2.6, 2.6, 2.9, 2.9, 2.9, 2.9, 2.9, 1.1, 1.0, 0.9,
                -1.0, -1.1, -1.1, -0.8, -0.6, -0.5, 0.3, 0.3, 0.4, 0.3, 0.4, 0.4, 0.4, 0.1, -0.4, -4.4, -4.9, -5.3,
                -5.3, -5.3, 2.1, 2.1)),
    42: Articulation(  # cello
        (-23.5, -20.1, -17.0, -14.9, -12.4, -11.9, -9.9, -10.5, -8.4, -7.5, -7.5, -6.8, -5.8, -5.2, -5.5, -5.0, -4.8,
         -4.7, -5.0, -4.5, -3.9, -3.7, -3.6, -2.9, -3.0, -2.8, -2.2, -2.6, -2.4, -1.5, -1.2),
        0.49, -4.0, 61.5, low_key=36,
        key_db=(1.2, 1.6, 1.8, 1.8, 0.7, 0.4, 0.4, 3.8, 3.8, 3.6, 2.3, 2.3, 2.3, -0.3, -0.6, -0.6, 4.4, 4.4, 3.7,
                -0.3, -0.5, -0.5, 1.6, 1.7, 1.6, -2.6, -2.6, -2.5, 0.0, 0.5, 0.5, -1.8, -1.8, -1.6, -0.3, -0.3, -0.4,
                -0.4, -0.5, -1.5, -4.7, -5.4, -5.4, -2.9, -2.9, -3.6)),
    56: Articulation(  # trumpet
        (-9.5, -1.8),
        0.19, -9.5, 42.6, low_key=52,
        key_db=(-0.8, -0.9, -1.1, -1.4, -1.6, -1.9, -1.9, -1.6, -1.3, -1.3, -1.5, -1.6, -1.7, -1.7, -1.4, 1.0, 1.0,
                1.0, 1.1, 1.1, 0.5, 0.4, 0.4, 0.4, 1.8, 1.8, 1.8, 1.7, 1.8, 1.7, 1.7, 1.6, 0.9)),
    71: Articulation(  # clarinet
        (-27.7, -17.2, -7.9, -3.7, -2.0),
        0.01, -4.8, 47.6, stops=True, low_key=50,
        key_db=(-1.5, -1.5, -1.5, -1.5, -2.4, -2.4, -2.4, -0.6, -0.6, -0.6, 0.5, 0.5, 0.5, -2.6, -2.6, -2.6, -1.3,
                -1.3, -1.3, -1.4, -1.4, 1.9, 1.9, 0.0, 0.0, 1.0, 1.0, 1.7, 1.7, 1.0, 1.0, -0.5, -0.5, 1.9, 1.9, 1.9,
                1.9, 2.0, 2.0, 2.0, 2.0, 1.9)),
    73: Articulation(  # flute
        (-31.8, -21.8, -15.6, -10.0, -6.1, -2.8, -1.4),
        0.25, 0.1, 63.1, low_key=60,
        key_db=(-2.3, -2.3, -2.1, -2.1, -2.1, -2.0, -1.9, -1.5, -1.5, -1.1, -0.9, -0.9, -1.0, -1.1, -1.3, -1.3, -1.2,
                -0.9, -1.2, -1.6, -1.6, -1.4, 1.3, 1.3, 1.3, 2.5, 2.5, 2.4, 2.4, 2.4, 2.4, 2.5, 2.7, 2.7, 2.4, 2.4,
                2.6)),
}
DEFAULT_ARTICULATION = Articulation((-30.0, -15.0, -7.0, -3.0, -1.5), 0.15)  # a quick attack, a short release


def articulation_of(manifest: Manifest) -> Articulation:
    """The articulation of the GM program an instrument was trained on (its manifest's training data)."""
    data = manifest.training.get("data") if isinstance(manifest.training, dict) else None
    program = data.get("program") if isinstance(data, dict) else None
    return ARTICULATIONS.get(program, DEFAULT_ARTICULATION)


@dataclass
class Phrasing:
    """What the performer needs to know of a note beyond its pitch and length (from the composer)."""

    frame: int  # the stream's frame the note starts at
    frames: int  # to the next note's start
    midi: int | None  # None = rest
    quarters: float
    downbeat: bool
    phrase: float  # 0..1 through its 4-bar phrase


class Performer:
    """One voice's playing: `play` a note at its first frame, then `frame` for each frame's controls."""

    def __init__(self, seed: int, articulation: Articulation, f0_range: tuple[float, float], loudness_max: float,
                 frame_seconds: float) -> None:
        self.seed = seed
        self.articulation = articulation
        self.f0_range = f0_range
        self.loudness_max = loudness_max  # the instrument's top: an accent never asks for more
        self.frame_seconds = frame_seconds
        # f0, loudness, brightness of this frame
        self.out = np.array([f0_range[0], FLOOR_DB, MIDDLE_BRIGHTNESS], np.float32)
        self.reset()

    def reset(self) -> None:
        """Silent, no note, the random unevenness from its seed again (what sounds now keeps falling)."""
        self.rng = np.random.Generator(np.random.PCG64([self.seed, 2]))
        self.note: Phrasing | None = None
        self.off_frame = 0  # where the current note's release starts
        self.level = FLOOR_DB  # the current note's loudness
        self.onset = FLOOR_DB  # the loudness its attack starts from
        self.tail = FLOOR_DB  # the loudness the previous note rang at as this one attacked (rings on under it)
        self.attack = self.articulation.attack_seconds  # its attack's length
        self.glide_from: float | None = None  # f0 a slurred note glides from
        self.fall = self._release_fall()  # dB a frame while released

    def instrument(self, articulation: Articulation, f0_range: tuple[float, float], loudness_max: float) -> None:
        """Play another instrument from the next note on."""
        self.articulation, self.f0_range, self.loudness_max = articulation, f0_range, loudness_max

    def _release_fall(self) -> float:
        return 60.0 * self.frame_seconds / self.articulation.release_seconds

    def stop(self, frame: int) -> None:
        """Stop the note from `frame` within STOP_SECONDS (pause, reset)."""
        self.off_frame = min(self.off_frame, frame)
        self.fall = 60.0 * self.frame_seconds / STOP_SECONDS

    def play(self, note: Phrasing, volume: float, legato: float) -> None:
        """Start `note` (at its first frame). A slurred previous note (held to here) hands over without a
        new attack: gliding to another pitch, or dipping REARTICULATE_DB on the same one."""
        previous, fs = self.note, self.frame_seconds
        slurred = previous is not None and previous.midi is not None and self.off_frame >= note.frame
        self.note, self.glide_from = note, None
        if note.midi is None:
            self.off_frame = note.frame
            self.fall = self._release_fall()
            if note.quarters < 1.0:  # a short rest rings on: to ROOM_DB under the last note's level at most
                self.fall = min(self.fall, max(0.0, float(self.out[1]) - self.level + ROOM_DB) / max(1, note.frames))
            return
        level = volume + (ACCENT_DB if note.downbeat else 0.0) + PHRASE_SWELL_DB * math.sin(math.pi * note.phrase)
        level = min(level + self.rng.uniform(-UNEVEN_DB, UNEVEN_DB), self.loudness_max)
        self.out[2] = self.articulation.brightness(level)  # as a velocity: set at the note's start
        self.level = min(level + self.articulation.key_level(note.midi), self.loudness_max)
        self.tail = FLOOR_DB
        if slurred and previous.midi != note.midi:
            self.glide_from, self.onset = float(self.out[0]), float(self.out[1])
        elif slurred:
            self.onset = self.level - REARTICULATE_DB
        else:
            self.onset, self.tail = self.level + self.articulation.onset_db[0], float(self.out[1])
        self.fall = self._release_fall()
        self.attack = min(self.articulation.attack_seconds, FAST_ATTACK * note.frames * fs)
        if self.rng.random() < legato:  # slurred into the next note
            self.off_frame = note.frame + note.frames
        else:
            gap = max(1, round((1.0 - legato) * min(0.5 * note.frames * fs, MAX_GAP_SECONDS) / fs))
            self.off_frame = note.frame + max(1, note.frames - gap)
            # the instrument's release, but staccato (legato 0) always lifts the full LIFT_DB, however short
            if not self.articulation.stops:
                self.fall = min(LIFT_DB / gap, max(self._release_fall(), (1.0 - legato) * LIFT_DB / gap))

    def frame(self, frame: int, vibrato: float) -> np.ndarray:
        """f0 (Hz), loudness (dB) and brightness (0..1) for this frame; `vibrato` 0..1 of VIBRATO_CENTS."""
        note, fs = self.note, self.frame_seconds
        if note is None or note.midi is None or frame >= self.off_frame:
            self.out[1] = max(FLOOR_DB, self.out[1] - self.fall)
            return self.out
        target = midi_hz(note.midi)
        since = (frame - note.frame) * fs
        f0 = target
        if self.glide_from is not None and since < GLIDE_SECONDS:
            f0 = self.glide_from * (target / self.glide_from) ** (since / GLIDE_SECONDS)
        depth = vibrato * VIBRATO_CENTS
        if depth and since > VIBRATO_AFTER_SECONDS:
            ramp = min(1.0, (since - VIBRATO_AFTER_SECONDS) / 0.2)
            f0 *= 2.0 ** (ramp * depth / 1200 * math.sin(2 * math.pi * VIBRATO_HZ * (since - VIBRATO_AFTER_SECONDS)))
        self.out[0] = min(max(f0, self.f0_range[0]), self.f0_range[1])
        if self.glide_from is not None:
            under = (1.0 - min(1.0, (since + fs) / GLIDE_SECONDS)) ** 2  # from the slurred note's level
        else:
            under = self._under(since / self.attack * len(self.articulation.onset_db))
        level = self.level + (self.onset - self.level) * under
        if self.tail > FLOOR_DB:  # the previous note rings on at its release rate, its power beside the attack's
            ring = self.tail - (frame - note.frame + 1) * self._release_fall()
            level = min(10.0 * math.log10(10.0 ** (level / 10.0) + 10.0 ** (ring / 10.0)), self.loudness_max)
        self.out[1] = level
        return self.out

    def _under(self, step: float) -> float:
        """How far under its level a note is `step` steps into its onset contour, as a share of the contour's
        start (1 at its first step, 0 from its end on), interpolated between steps."""
        contour = self.articulation.onset_db
        i = int(step)
        if i >= len(contour):
            return 0.0
        after = contour[i + 1] if i + 1 < len(contour) else 0.0
        return (contour[i] + (after - contour[i]) * (step - i)) / contour[0]

    def export(self) -> dict[str, Any]:
        """Every field the next frame depends on, as JSON-able values (a snapshot's 'performer')."""
        return {"rng": self.rng.bit_generator.state, "note": None if self.note is None else asdict(self.note),
                "off_frame": int(self.off_frame), "level": float(self.level), "onset": float(self.onset),
                "tail": float(self.tail), "attack": float(self.attack),
                "glide_from": self.glide_from, "fall": float(self.fall), "out": [float(v) for v in self.out]}

    def restore(self, state: dict[str, Any]) -> None:
        """Take up where `export` left off (fields checked by streaming/snapshot.py)."""
        self.rng = np.random.Generator(np.random.PCG64())
        self.rng.bit_generator.state = state["rng"]
        self.note = None if state["note"] is None else Phrasing(**state["note"])
        self.off_frame, self.level, self.onset = state["off_frame"], state["level"], state["onset"]
        self.tail = state["tail"]
        self.attack = state["attack"]
        self.glide_from, self.fall = state["glide_from"], state["fall"]
        self.out = np.array([*state["out"], MIDDLE_BRIGHTNESS][:3], np.float32)  # from before brightness
