"""An inaudible, keyed mark on every sample the engine makes, and its detector.

What survives the channel the audio goes through (Opus at 32-64 kb/s, resampling, gain, mixing, cuts) is
the energy of each band in each 20 ms frame: Opus codes exactly that before anything else. So the mark is a
pattern of band energies: every BLOCK_SECONDS (two engine frames) each of the BANDS bands of the audio is made
ALPHA louder or quieter (+-0.26 dB), chosen by a keyed +-1 chip per (block, band). The mark signal is
ALPHA times the band-filtered audio, so in every band it is 30.5 dB below the audio it rides on, and silence
stays silent.

The marker is one batched stage: per frame, one FFT of every stream's frame, a product with each stream's
filter for this block (its chips times the band filters, one small matmul), one inverse FFT, overlap-add.
The band filters are linear-phase FIRs of TAPS taps, so the mark is in phase with the audio delayed by
TAPS // 2 samples: the marked output is the audio DELAY samples (1.3 ms) late plus the mark.

The chips repeat every PERIOD blocks (5 s). A stream's chips are the key's base chips times a Walsh code of
its 16-bit serial over keyed positions, so one detector pass tests every serial at once: fold the clip's
per-block band statistics onto the period, scatter them onto the positions' 16-bit masks and take a fast
Walsh-Hadamard transform, for each of the PERIOD * OFFSETS alignments. The payload is the key's 16-bit id
(a mark is only found with its own key) and the serial: 32 bits.

The detector's statistic is a z-score: conditional on the clip, the correlation with a random +-1 pattern has
variance equal to the clip statistics' energy, so an unmarked clip scores N(0, 1) at each of the
PERIOD * OFFSETS * 2^16 hypotheses (6.6e7), and THRESHOLD keeps their maximum below it in all but 1e-4 of clips
(the union bound; the hypotheses overlap, so fewer in fact).
"""

from __future__ import annotations

import hashlib
import math
import secrets
from dataclasses import dataclass, field

import numpy as np
import scipy.fft
import scipy.linalg
import scipy.signal

SAMPLE_RATE = 48000  # the detector works at this rate; the marker at the model's (all shipped models: 48 kHz)
BLOCK_SECONDS = 0.020  # one chip per band per block: an Opus frame
PERIOD = 250  # blocks before the chips repeat (5 s; see `_fold` on why not shorter)
CENTRES_HZ = (400, 1000, 1600, 2300, 3000, 3800, 4700, 5700, 6800, 8000, 9400)  # the bands' centres
EDGE_HZ = 400.0  # width of the crossover between neighbouring bands
TOP_HZ = 10500.0  # the last band's upper edge: above it Opus at low rates keeps little, and music has little
BANDS = len(CENTRES_HZ)
ALPHA = 10 ** (-30.5 / 20)  # a band's gain moves by +-ALPHA: the mark is 30.5 dB below the audio in it
TAPS = 128  # band filters' length at 48 kHz (375 Hz resolution)
DELAY = TAPS // 2  # samples the marked audio lags the model's
RAMP = 240  # samples over which a block's filter takes over from the last one's (5 ms)
SERIAL_BITS = 16
CHUNK = 16  # detector: alignments transformed at once
ROWS = 128  # marker: streams marked at once (measured: 32 -> 1.6 ms, 128 -> 1.3 ms, 256 -> 2.3 ms for 256 streams)
HOP = 240  # detector: band energies every 5 ms ...
WINDOW = 960  # ... over 20 ms Hann windows
OFFSETS = round(BLOCK_SECONDS * SAMPLE_RATE / HOP)  # block phases the detector tries (5 ms apart)
THRESHOLD = 7.0  # z-score of a mark (see the module's docstring)
RANGE_SECONDS = 3.0  # ranges: windows this long, ...
RANGE_STEP_SECONDS = 0.5  # ... this far apart, ...
RANGE_THRESHOLD = 4.5  # ... marked when their own best alignment for the found serial scores this
MIN_SECONDS = 2.0  # shorter clips are not judged


def band_weights(freqs: np.ndarray) -> np.ndarray:
    """[BANDS, len(freqs)] flat-topped bands that meet halfway between centres with raised-cosine edges
    EDGE_HZ wide and sum to 1 up to TOP_HZ: a flat top puts the whole chip on the band, where overlapping
    triangles would mix neighbours' chips and spend the mark's level on cancelling each other."""
    centres = np.array(CENTRES_HZ, np.float64)
    lower = np.r_[-np.inf, (centres[1:] + centres[:-1]) / 2]
    upper = np.r_[(centres[1:] + centres[:-1]) / 2, TOP_HZ]
    rise = np.clip((freqs[None, :] - lower[:, None]) / EDGE_HZ + 0.5, 0.0, 1.0)
    fall = np.clip((upper[:, None] - freqs[None, :]) / EDGE_HZ + 0.5, 0.0, 1.0)
    return 0.5 - 0.5 * np.cos(np.pi * np.minimum(rise, fall))


def band_filters(sample_rate: int, taps: int) -> np.ndarray:
    """[BANDS, taps] linear-phase FIRs (delay taps // 2) whose responses are `band_weights`."""
    grid = np.fft.rfftfreq(4096, 1 / sample_rate)
    impulse = np.fft.irfft(band_weights(grid), axis=1)  # zero-phase, centred on sample 0
    return (np.roll(impulse, taps // 2, axis=1)[:, :taps] * np.hanning(taps)).astype(np.float64)


@dataclass(frozen=True)
class Key:
    """A daemon's watermark key: `secret` seeds the chips and the positions' masks; `id` (16 bits) names it."""

    secret: bytes
    id: int = field(init=False)

    def __post_init__(self) -> None:
        if len(self.secret) < 16:
            raise ValueError("a watermark key needs at least 16 bytes of secret")
        object.__setattr__(self, "id", int.from_bytes(hashlib.sha256(b"id" + self.secret).digest()[:2], "big"))

    @classmethod
    def generate(cls) -> Key:
        return cls(secrets.token_bytes(32))

    def _rng(self) -> np.random.Generator:
        return np.random.default_rng(int.from_bytes(hashlib.sha256(b"chips" + self.secret).digest(), "big"))

    @property
    def base(self) -> np.ndarray:
        """[PERIOD, BANDS] +-1: the chips of serial 0."""
        return _tables(self)[0]

    @property
    def masks(self) -> np.ndarray:
        """[PERIOD, BANDS] the 16-bit mask of each position: serial s flips the chips where popcount(s & mask)
        is odd."""
        return _tables(self)[1]

    def chips(self, serial: int) -> np.ndarray:
        """[PERIOD, BANDS] float32 +-1: the pattern of `serial`'s stream."""
        if not 0 <= serial < 1 << SERIAL_BITS:
            raise ValueError(f"a serial is {SERIAL_BITS} bits: 0..{(1 << SERIAL_BITS) - 1}")
        parity = (np.bitwise_count(self.masks & serial) & 1).astype(np.float64)
        return (self.base * (1 - 2 * parity)).astype(np.float32)

    def payload(self, serial: int) -> int:
        """The 32 bits a mark of `serial` carries: the key's id, then the serial."""
        return self.id << SERIAL_BITS | serial


_TABLES: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}


def _tables(key: Key) -> tuple[np.ndarray, np.ndarray]:
    if key.secret not in _TABLES:
        rng = key._rng()
        base = rng.choice(np.array([-1.0, 1.0]), (PERIOD, BANDS))
        masks = rng.integers(0, 1 << SERIAL_BITS, (PERIOD, BANDS), dtype=np.int64)
        _TABLES[key.secret] = (base, masks)
    return _TABLES[key.secret]


def payload_text(payload: int) -> str:
    """'kkkk-ssss': the key id and the serial in hex."""
    return f"{payload >> SERIAL_BITS:04x}-{payload & ((1 << SERIAL_BITS) - 1):04x}"


class Marker:
    """The batched marking stage of one model group: per-slot chips, overlap-add tails and delay lines,
    sized up front for `capacity` slots."""

    def __init__(self, key: Key, capacity: int, sample_rate: int, hop: int) -> None:
        frames = BLOCK_SECONDS * sample_rate / hop
        if abs(frames - round(frames)) > 1e-9 or sample_rate != SAMPLE_RATE:
            raise ValueError(f"the watermark needs 48 kHz audio in frames that divide {BLOCK_SECONDS * 1000:g} ms "
                             f"(this model: {sample_rate} Hz, hop {hop})")
        self.key = key
        self.hop = hop
        self.block_frames = round(frames)
        self.n = scipy.fft.next_fast_len(hop + TAPS - 1, real=True)
        spectra = scipy.fft.rfft(band_filters(sample_rate, TAPS), n=self.n, axis=1) * ALPHA  # [BANDS, F]
        self.filters = spectra.astype(np.complex64).view(np.float32)  # [BANDS, 2F]: a real matmul makes one
        self.chips = np.zeros((capacity, PERIOD, BANDS), np.float32)  # per slot: its serial's chips (zeros: none)
        self.filter = np.zeros((capacity, self.n // 2 + 1), np.complex64)  # each slot's filter for its block
        self.previous = np.zeros_like(self.filter)  # and for the block before, which it fades from
        self.tail = np.zeros((capacity, self.n - hop), np.float32)  # the mark's overlap into the next frame
        self.delayed = np.zeros((capacity, DELAY), np.float32)  # the last DELAY samples of the audio
        self._padded = np.zeros((capacity, self.n), np.float32)
        # raised-cosine fade between two blocks' filters over RAMP samples: a sudden switch would splash a faint
        # click (-60 dB) across the spectrum, above the audio where the audio has little (a violin above 9 kHz)
        ramp = np.ones(self.n, np.float32)
        ramp[:RAMP] = 0.5 - 0.5 * np.cos(np.pi * (np.arange(RAMP) + 0.5) / RAMP)
        self.fade_out = 1.0 - ramp
        self._out = np.zeros((capacity, hop), np.float32)

    def assign(self, slot: int, serial: int | None) -> None:
        """A new stream in `slot` marks `serial` from its first sample (None: it is not marked, only delayed: a
        sting's voice, which is mixed into its stream before this stage, and its stream is marked)."""
        self.chips[slot] = 0.0 if serial is None else self.key.chips(serial)
        self.filter[slot] = (self.chips[slot, PERIOD - 1] @ self.filters).view(np.complex64)  # faded from at frame 0
        self.tail[slot] = 0.0
        self.delayed[slot] = 0.0

    def take(self, slot: int, other: Marker, other_slot: int) -> None:
        """`slot` continues the marking of `other`'s `other_slot` (a stream moving to another version)."""
        for mine, theirs in ((self.chips, other.chips), (self.filter, other.filter), (self.previous, other.previous),
                             (self.tail, other.tail), (self.delayed, other.delayed)):
            mine[slot] = theirs[other_slot]

    def apply(self, slots: np.ndarray, frames: np.ndarray, audio: np.ndarray) -> None:
        """Mark `audio` [n, hop] in place: row i is frame `frames[i]` of the stream in `slots[i]`, and every frame
        of a stream comes here in order. Rows go through in chunks of ROWS, so the FFTs' temporaries stay small
        enough to be reused from the heap rather than mapped (and page-faulted) afresh every tick."""
        for first in range(0, len(audio), ROWS):
            rows = slice(first, first + ROWS)
            self._apply(slots[rows], frames[rows], audio[rows])

    def _apply(self, slots: np.ndarray, frames: np.ndarray, audio: np.ndarray) -> None:
        n, hop = audio.shape
        starting = np.flatnonzero(frames % self.block_frames == 0)
        if len(starting):  # a new block: its filter (one matmul for these rows), kept for the block's frames
            new = slots[starting]
            self.previous[new] = self.filter[new]
            block = (frames[starting] // self.block_frames) % PERIOD
            self.filter[new] = (self.chips[new, block] @ self.filters).view(np.complex64)
        padded = self._padded[:n]
        padded[:, :hop] = audio  # the columns past hop stay zero
        spectrum = scipy.fft.rfft(padded, axis=1)
        mark = scipy.fft.irfft(spectrum * self.filter[slots], n=self.n, axis=1)
        if len(starting):  # a block's first frame fades from the last block's filter to its own
            before = scipy.fft.irfft(spectrum[starting] * self.previous[slots[starting]], n=self.n, axis=1)
            mark[starting] += (before - mark[starting]) * self.fade_out
        mark[:, : self.n - hop] += self.tail[slots]
        out = self._out[:n]
        out[:, :DELAY] = self.delayed[slots]
        out[:, DELAY:] = audio[:, : hop - DELAY]
        self.delayed[slots] = audio[:, hop - DELAY :]
        self.tail[slots] = mark[:, hop:]
        np.add(out, mark[:, :hop], out=audio)


# -- detection ---------------------------------------------------------------------------------------
@dataclass
class Detection:
    marked: bool
    confidence: float  # that the clip is marked: 1 - the chance that unmarked audio scores this high; 0 when not marked
    score: float  # the best alignment's z-score
    key_id: int | None = None
    serial: int | None = None
    ranges: list[tuple[float, float]] = field(default_factory=list)  # seconds of the clip where the mark is

    @property
    def payload(self) -> int | None:
        return None if self.key_id is None or self.serial is None else self.key_id << SERIAL_BITS | self.serial

    def as_dict(self) -> dict:
        return {"marked": self.marked, "confidence": round(self.confidence, 6), "score": round(self.score, 2),
                "payload": payload_text(self.payload) if self.marked and self.payload is not None else None,
                "ranges": [[round(a, 2), round(b, 2)] for a, b in self.ranges] if self.marked else []}


def to_detector_rate(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """Mono float64 at SAMPLE_RATE from [samples] or [samples, channels] at `sample_rate`."""
    x = np.asarray(audio, np.float64)
    if x.ndim == 2:
        x = x.mean(axis=1)
    if sample_rate != SAMPLE_RATE:
        g = math.gcd(int(sample_rate), SAMPLE_RATE)
        x = scipy.signal.resample_poly(x, SAMPLE_RATE // g, int(sample_rate) // g)
    return x


_WEIGHTS = band_weights(np.fft.rfftfreq(WINDOW, 1 / SAMPLE_RATE)).T  # [F, BANDS]
_HANN = np.hanning(WINDOW)


def statistics(x: np.ndarray) -> list[np.ndarray]:
    """Per block phase o (OFFSETS of them): [blocks - 2, BANDS] whitened log band energies whose row t belongs
    to block t + 1 of the grid that starts at o * HOP samples. The host's own level moves (notes, dynamics)
    are taken out three ways: each block against the mean of its neighbours (a mark chip is independent of
    them), each block against its mean across bands (onsets move every band), and every value scaled by its
    band's and its block's robust spread, then clipped (a note's start weighs no more than a held note)."""
    frames = (len(x) - WINDOW) // HOP + 1
    if frames <= 0:
        return []
    index = np.arange(WINDOW)[None, :] + HOP * np.arange(frames)[:, None]
    power = np.abs(np.fft.rfft(x[index] * _HANN, axis=1)) ** 2
    energy = power @ _WEIGHTS + 1e-12  # [frames, BANDS]
    out = []
    for o in range(OFFSETS):
        level = np.log(energy[o::OFFSETS])
        if len(level) < 3:
            continue
        r = level[1:-1] - (level[:-2] + level[2:]) / 2
        r -= r.mean(axis=1, keepdims=True)
        band = 1.4826 * np.median(np.abs(r), axis=0) + 1e-9
        r /= band
        block = np.median(np.abs(r), axis=1, keepdims=True) + 0.3
        r /= block
        np.clip(r, -3.0, 3.0, out=r)
        out.append(r / (band * block))
    return out


_H16 = scipy.linalg.hadamard(16).astype(np.float32)


def _fwht(a: np.ndarray) -> np.ndarray:
    """Walsh-Hadamard transform of each row of `a` [rows, 2^16]: 2^16 = 16^4, so four products with the 16-point
    Hadamard matrix, one per base-16 digit of the index (one GEMM each, rotating the digits between them)."""
    rows = a.shape[0]
    x = a.reshape(rows, 16, 16, 16, 16)
    for _ in range(4):
        x = (np.ascontiguousarray(x).reshape(-1, 16) @ _H16).reshape(rows, 16, 16, 16, 16).transpose(0, 4, 1, 2, 3)
    return np.ascontiguousarray(x).reshape(rows, -1)


def _fold(r: np.ndarray) -> np.ndarray:
    """[PERIOD, BANDS]: the rows of `r` (row t = block t + 1) summed by their position in the period. Rows
    that share a position share a chip, so the music's own likeness between them adds up with the mark's
    (the z-score's norm counts it): a short period repeats the chips in step with the music's beat and bars and
    loses much of what the repetitions gain (10 s clips through Opus scored 5-40 % lower with a 1 s period than
    with 5 s; 10 s scored no better than 5 s and doubles the search)."""
    folded = np.zeros((PERIOD, BANDS))
    np.add.at(folded, (np.arange(1, len(r) + 1) % PERIOD), r)
    return folded


def _search(key: Key, stats: list[np.ndarray]) -> tuple[float, int, int, int]:
    """(z, block phase, period shift, serial) of the best of every alignment and serial."""
    base, masks = key.base, key.masks.ravel()
    best = (-np.inf, 0, 0, 0)
    for o, r in enumerate(stats):
        folded = _fold(r)
        norm = math.sqrt(float((folded**2).sum())) or 1.0
        # shift s: row position p of the clip sits at period position (p + s) % PERIOD
        spectra = np.zeros((CHUNK, 1 << SERIAL_BITS), np.float32)  # a few shifts at a time: stays in cache
        for first in range(0, PERIOD, CHUNK):
            shifts = range(first, min(PERIOD, first + CHUNK))
            for row, s in enumerate(shifts):
                weights = (np.roll(folded, s, axis=0) * base).ravel()
                spectra[row] = np.bincount(masks, weights=weights, minlength=1 << SERIAL_BITS)
            walsh = _fwht(spectra[: len(shifts)])
            row, serial = np.unravel_index(int(np.argmax(walsh)), walsh.shape)
            z = float(walsh[row, serial]) / norm
            if z > best[0]:
                best = (z, o, shifts[row], int(serial))
    return best


def _ranges(stats: list[np.ndarray], chips: np.ndarray, seconds: float) -> list[tuple[float, float]]:
    """Where in the clip `chips` (one serial's pattern) is found, each RANGE_SECONDS window searched over every
    alignment on its own: a clip with a piece cut out keeps the mark on both sides of the cut."""
    blocks = round(RANGE_SECONDS / BLOCK_SECONDS)
    step = round(RANGE_STEP_SECONDS / BLOCK_SECONDS)
    found: list[tuple[float, float]] = []
    length = min(len(r) for r in stats)
    starts = list(range(0, max(1, length - blocks + 1), step))
    if starts[-1] < length - blocks:
        starts.append(length - blocks)  # a last window that ends with the clip
    for start in starts:
        best = -np.inf
        for r in stats:
            part = r[start : start + blocks]
            norm = math.sqrt(float((part**2).sum())) or 1.0
            for s in range(PERIOD):
                pattern = chips[(np.arange(start + 1, start + 1 + len(part)) + s) % PERIOD]
                best = max(best, float((part * pattern).sum()) / norm)
        if best >= RANGE_THRESHOLD:  # the first and last windows reach the clip's ends
            a = 0.0 if start == 0 else (start + 1) * BLOCK_SECONDS
            b = seconds if start + blocks >= length else (start + 1 + blocks) * BLOCK_SECONDS
            if found and a <= found[-1][1]:
                found[-1] = (found[-1][0], b)
            else:
                found.append((a, b))
    return found


def hypotheses() -> int:
    return OFFSETS * PERIOD * (1 << SERIAL_BITS)


def confidence(z: float) -> float:
    """1 - the union bound on an unmarked clip's best score reaching `z`."""
    tail = 0.5 * math.erfc(z / math.sqrt(2))
    return max(0.0, 1.0 - hypotheses() * tail)


def detect(audio: np.ndarray, sample_rate: int, keys: list[Key]) -> Detection:
    """Is `audio` ([samples] or [samples, channels], float in [-1, 1]) marked with one of `keys`?"""
    x = to_detector_rate(audio, sample_rate)
    seconds = len(x) / SAMPLE_RATE
    if seconds < MIN_SECONDS:
        raise ValueError(f"the clip is {seconds:.2f} s long; the detector needs at least {MIN_SECONDS:g} s")
    stats = statistics(x)
    best = Detection(False, 0.0, -np.inf)
    for key in keys:
        z, _, _, serial = _search(key, stats)
        if z > best.score:
            best = Detection(z >= THRESHOLD, confidence(z) if z >= THRESHOLD else 0.0, z, key.id, serial)
            if best.marked:
                best.ranges = _ranges(stats, key.chips(serial), seconds)
    if not keys:
        best.score = 0.0
    return best
