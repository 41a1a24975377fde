"""Notes, scales and the composer's vocabulary: shared by its training (models/) and its sampler (streaming/).

A melody is a sequence of events (pitch or rest, duration in quarter notes). The composer reads the previous
event as two tokens and, per step, a feature vector: where the next event falls in the bar and what the
stream asks for (key and mode, note density, register, metre). Both sides build those features with
`features`, so training and live sampling cannot drift apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

PITCH_LOW, PITCH_HIGH = 36, 96  # MIDI range the composer writes in (C2..C7)
REST = 0  # pitch token 0 is a rest; token k > 0 is MIDI PITCH_LOW + k - 1
PITCH_TOKENS = PITCH_HIGH - PITCH_LOW + 2
START = PITCH_TOKENS  # input-only token that begins every sequence (pitch and duration alike)
DURATIONS = (0.25, 1 / 3, 0.5, 2 / 3, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)  # quarter notes
NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
_SPELLINGS = {"Db": 1, "D#": 3, "Gb": 6, "G#": 8, "A#": 10, "Cb": 11, "B#": 0, "E#": 5, "Fb": 4}
MODES = {  # semitones above the tonic
    "major": (0, 2, 4, 5, 7, 9, 11), "dorian": (0, 2, 3, 5, 7, 9, 10), "phrygian": (0, 1, 3, 5, 7, 8, 10),
    "lydian": (0, 2, 4, 6, 7, 9, 11), "mixolydian": (0, 2, 4, 5, 7, 9, 10), "minor": (0, 2, 3, 5, 7, 8, 10),
    "locrian": (0, 1, 3, 5, 6, 8, 10),
}
_MODE_ALIASES = {"ionian": "major", "aeolian": "minor"}
REGISTERS = {"low": 0.0, "mid": 0.5, "high": 1.0}  # the register feature: median pitch 55 .. 79 mapped to 0..1
_REGISTER_LOW, _REGISTER_HIGH = 55.0, 79.0
VELOCITIES = (40, 127)  # the MIDI velocities the instruments' data plays (models/data.py): brightness 0..1 spans them
MIDDLE_BRIGHTNESS = 0.5  # a brightness control's default, and where a performer starts or a snapshot without it resumes
_DENSITY_LOW, _DENSITY_HIGH = 0.5, 4.0  # notes per quarter note mapped to density 0..1 (log scale)
FEATURES = 3 + 12 + len(MODES) + 3  # bar position (3), tonic, mode, density, register, triple metre


@dataclass(frozen=True)
class Scale:
    tonic: int  # pitch class, 0 = C
    mode: str  # a key of MODES

    @classmethod
    def parse(cls, text: str) -> Scale:
        """'D dorian', 'F# minor', 'Bb major', 'G mixolydian' (case-insensitive)."""
        parts = text.split()
        if len(parts) != 2:
            raise ValueError(f"scale '{text}' must be a tonic and a mode, e.g. 'D dorian'")
        name = parts[0][:1].upper() + parts[0][1:].lower()
        tonic = NAMES.index(name) if name in NAMES else _SPELLINGS.get(name)
        mode = _MODE_ALIASES.get(parts[1].lower(), parts[1].lower())
        if tonic is None or mode not in MODES:
            raise ValueError(f"scale '{text}': tonic must be one of {', '.join(NAMES)} (or a sharp/flat "
                             f"spelling) and the mode one of {', '.join(MODES)}")
        return cls(tonic, mode)

    @property
    def pitch_classes(self) -> frozenset[int]:
        return frozenset((self.tonic + s) % 12 for s in MODES[self.mode])

    def __str__(self) -> str:
        return f"{NAMES[self.tonic]} {self.mode}"


def pitch_token(midi: int | None) -> int:
    """Token of a MIDI note (None = rest); notes outside the range fold in by octaves."""
    if midi is None:
        return REST
    while midi < PITCH_LOW:
        midi += 12
    while midi > PITCH_HIGH:
        midi -= 12
    return midi - PITCH_LOW + 1


def token_midi(token: int) -> int | None:
    return None if token == REST else PITCH_LOW + token - 1


def duration_token(quarters: float) -> int:
    """Nearest duration on a log scale (a dotted half is nearer 3 than 2)."""
    return int(np.argmin([abs(math.log(quarters / d)) for d in DURATIONS]))


def midi_hz(midi: float) -> float:
    """Equal-tempered frequency of a MIDI note, A4 (69) = 440 Hz."""
    return 440.0 * 2.0 ** ((midi - 69) / 12)


def velocity_of(brightness: float) -> int:
    """The MIDI velocity a note of `brightness` (0..1) was played at, over VELOCITIES."""
    low, high = VELOCITIES
    return round(low + min(1.0, max(0.0, brightness)) * (high - low))


def note_name(midi: int) -> str:
    return f"{NAMES[midi % 12]}{midi // 12 - 1}"


def scale_mask(scale: Scale | None) -> np.ndarray:
    """[PITCH_TOKENS] bool: the tokens a scale allows (a rest always)."""
    mask = np.ones(PITCH_TOKENS, bool)
    if scale is not None:
        classes = scale.pitch_classes
        mask[1:] = [(PITCH_LOW + k) % 12 in classes for k in range(PITCH_TOKENS - 1)]
    return mask


def density_value(notes_per_quarter: float) -> float:
    """A melody's note rate as the density feature, 0..1."""
    span = math.log(_DENSITY_HIGH / _DENSITY_LOW)
    return min(max(math.log(max(notes_per_quarter, 1e-3) / _DENSITY_LOW) / span, 0.0), 1.0)


def density_rate(density: float) -> float:
    """The note rate (notes a quarter) a density feature asks for: `density_value`'s inverse."""
    return _DENSITY_LOW * (_DENSITY_HIGH / _DENSITY_LOW) ** density


def register_median(register: float) -> float:
    """The median MIDI pitch a register feature asks for: `register_value`'s inverse."""
    return _REGISTER_LOW + (_REGISTER_HIGH - _REGISTER_LOW) * register


def register_value(median_midi: float) -> float:
    """A melody's median pitch as the register feature, 0..1."""
    return min(max((median_midi - _REGISTER_LOW) / (_REGISTER_HIGH - _REGISTER_LOW), 0.0), 1.0)


def features(out: np.ndarray, position: float, bar: float, scale: Scale, density: float, register: float,
             triple: bool) -> np.ndarray:
    """Fill `out` [FEATURES] for the next event: `position` quarter notes into a bar of `bar` quarters."""
    phase = 2.0 * math.pi * (position % bar) / bar
    out[:] = 0.0
    out[0], out[1], out[2] = math.sin(phase), math.cos(phase), (position % bar) / bar
    out[3 + scale.tonic] = 1.0
    out[15 + list(MODES).index(scale.mode)] = 1.0
    out[15 + len(MODES)] = density
    out[16 + len(MODES)] = register
    out[17 + len(MODES)] = 1.0 if triple else 0.0
    return out
