"""Folk melodies from the music21 corpus (shipped inside the music21 wheel; nothing is downloaded).

Each tune becomes a monophonic event list (MIDI pitch or rest, duration in quarter notes) with its metre,
where it starts in the bar (pickups) and its scale: the key signature's notes with the tonic taken from the
final note, which is how modal folk tunes are written (a dorian tune in D carries one sharp fewer than D
major). Parsing is slow (~0.1 s a tune), so the result is cached as JSON keyed by what produced it.
Licences: see COLLECTIONS and docs/music21-corpus.md; shipped models use only the `shippable` ones.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from wavecast.streaming.notes import Scale


@dataclass(frozen=True)
class Collection:
    title: str
    licence: str
    shippable: bool  # may train a model we ship (no non-commercial or other restriction stated)


COLLECTIONS = {
    "ryansMammoth": Collection(
        "Ryan's Mammoth Collection (1883) and Cole's 1000 Fiddle Tunes, ABC by John Chambers et al.",
        "public-domain source; the ABC editions state no restriction (given to music21 by John Chambers)", True),
    "oneills1850": Collection(
        "O'Neill's Music of Ireland (1903), ABC by Norbeck, Safranek, O'Neil, Chambers",
        "public-domain source; the ABC editions state no restriction (given to music21 by John Chambers)", True),
    "airdsAirs": Collection(
        "Aird's Selection of Scotch, English, Irish and Foreign Airs (1778-1803), ABC by Jack Campin",
        "public-domain source; Jack Campin gave permission to distribute his ABC with music21", True),
    "miscFolk": Collection(
        "Northumbrian Minstrelsy (1882) and American fife music, ABC by Jack Campin",
        "public-domain source; Jack Campin gave permission to distribute his ABC with music21", True),
    "essenFolksong": Collection(
        "Essen Folksong Collection, ABC by Seymour Schlien",
        "non-commercial use only (corpus/essenFolksong/license.txt)", False),
}
SHIPPABLE = tuple(name for name, c in COLLECTIONS.items() if c.shippable)
CORPUS_VERSION = 1  # bump when extraction changes, so old caches are not reused
HELDOUT_EVERY = 20  # one tune family in 20 (by a hash of its content) is held out
SHINGLE = 8  # intervals in the n-grams that compare two tunes' melodies
SAME_TUNE = 0.5  # Jaccard similarity of interval n-grams from which two tunes count as one (another edition)
COMMON_SHINGLE = 40  # an n-gram in more tunes than this (a scale run) proposes no pairs; it still counts


@dataclass
class Tune:
    id: str  # "<corpus path>#<tune number>"
    collection: str
    scale: str  # e.g. "D dorian"
    metre: str  # e.g. "6/8"
    bar: float  # quarter notes per bar
    start: float  # quarter notes into the bar where the first event begins (pickups)
    events: list[tuple[int | None, float]]  # (MIDI pitch or None for a rest, quarter notes)

    @property
    def contour(self) -> tuple[int, ...]:
        """Semitone steps between its consecutive notes (rests left out): the melody whatever its key."""
        pitches = [m for m, _ in self.events if m is not None]
        return tuple(b - a for a, b in zip(pitches, pitches[1:], strict=False))

    @property
    def triple(self) -> bool:
        """Compound or triple metre (6/8, 9/8, 3/4, 3/2): the metre tag the composer is conditioned on."""
        top = int(self.metre.split("/")[0]) if self.metre[:1].isdigit() else 4
        return top % 3 == 0


def families(tunes: list[Tune]) -> list[int]:
    """A family number for each tune: tunes whose contours are equal (the same tune in another key) or share
    at least SAME_TUNE of their interval n-grams (another edition, a variant, the same tune in two
    collections) are one family, transitively. Families are what a held-out split must keep apart."""
    parent = list(range(len(tunes)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    grams = [{c[k : k + SHINGLE] for k in range(max(1, len(c) - SHINGLE + 1))} for c in (t.contour for t in tunes)]
    holders: dict[tuple[int, ...], list[int]] = {}
    for i, g in enumerate(grams):
        for gram in g:
            holders.setdefault(gram, []).append(i)
    pairs = {(m[a], m[b]) for m in holders.values() if len(m) <= COMMON_SHINGLE
             for a in range(len(m)) for b in range(a + 1, len(m))}
    same: dict[tuple[int, ...], int] = {}
    for i, t in enumerate(tunes):
        pairs.add((same.setdefault(t.contour, i), i))
    for a, b in pairs:
        if a != b and len(grams[a] & grams[b]) >= SAME_TUNE * len(grams[a] | grams[b]):
            parent[find(a)] = find(b)
    return [find(i) for i in range(len(tunes))]


def heldout_split(tunes: list[Tune]) -> list[bool]:
    """Which tunes are held out: whole families (see `families`), one in HELDOUT_EVERY, chosen by a hash of
    the family's content (its smallest contour), so the split depends on the melodies, not on ids, order or
    which collections were loaded. A corpus whose hash holds none out holds out the family of its last tune."""
    family = families(tunes)
    key: dict[int, tuple[int, ...]] = {}
    for f, t in zip(family, tunes, strict=True):
        key[f] = min(key.get(f, t.contour), t.contour)
    held = {f: int(hashlib.sha256(repr(k).encode()).hexdigest(), 16) % HELDOUT_EVERY == 0 for f, k in key.items()}
    if tunes and not any(held.values()):
        held[family[-1]] = True
    return [held[f] for f in family]


def load(collections: tuple[str, ...] = SHIPPABLE, tunes_per_collection: int | None = None,
         cache_dir: Path | None = None, progress: Callable[[str], None] | None = None) -> list[Tune]:
    """Tunes of the named collections (the first `tunes_per_collection` of each), from cache when there."""
    unknown = [c for c in collections if c not in COLLECTIONS]
    if unknown:
        raise ValueError(f"unknown corpus collection(s) {unknown}; known: {', '.join(COLLECTIONS)}")
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"corpus-{cache_key(collections, tunes_per_collection)}.json.gz"
        if path.exists():
            with gzip.open(path, "rt") as f:
                return [Tune(**{**t, "events": [tuple(e) for e in t["events"]]}) for t in json.load(f)]
    tunes: list[Tune] = []
    for name in collections:
        tunes += _parse_collection(name, tunes_per_collection, progress)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with gzip.open(tmp, "wt") as f:
            json.dump([asdict(t) for t in tunes], f)
        os.replace(tmp, path)
    return tunes


def cache_key(collections: tuple[str, ...], tunes_per_collection: int | None = None) -> str:
    """What names a parsed corpus: the collections, the tune limit, music21's version and CORPUS_VERSION."""
    import music21

    key_text = json.dumps([collections, tunes_per_collection, music21.__version__, CORPUS_VERSION])
    return hashlib.sha256(key_text.encode()).hexdigest()[:16]


def _parse_collection(name: str, limit: int | None, progress: Callable[[str], None] | None) -> list[Tune]:
    from music21 import abcFormat, corpus, environment, stream

    environment.Environment()["autoDownload"] = "deny"  # in memory only; core-corpus parsing is local anyway
    # The corpus ABC has no '%abc-2.x' header, so music21 reads it as ABC 1.3, where an accidental does not
    # carry through the bar; these editions are written with carry-through (Essen 'Hildebrandslied' _B2B2 is
    # Bb Bb). Parse them as ABC 2.1 does.
    abcFormat.ABCHandler._accidentalPropagation = lambda self: self.abcDirectives.get(
        "propagate-accidentals", "pitch")
    by_file: dict[str, list] = {}
    for entry in corpus.corpora.CoreCorpus().metadataBundle._metadataEntries.values():
        if str(entry.sourcePath).split("/")[0] == name:
            by_file.setdefault(str(entry.sourcePath), []).append(entry)
    tunes: list[Tune] = []
    for path in sorted(by_file):
        if limit is not None and len(tunes) >= limit:
            break
        try:
            parsed = corpus.parse(path, forceSource=True)  # forceSource: no music21 pickles in /tmp
        except Exception as e:  # music21 raises many types on a bad tune; skip it, say so
            if progress:
                progress(f"skip {path}: {type(e).__name__}: {e}")
            continue
        scores = list(parsed.scores) if isinstance(parsed, stream.Opus) else [parsed]
        for number, score in enumerate(scores, 1):
            if limit is not None and len(tunes) >= limit:
                break
            tune = _tune(f"{path}#{score.metadata.number if score.metadata else number}", name, score)
            if tune is not None:
                tunes.append(tune)
        if progress:
            progress(f"{name}: {len(tunes)} tunes ({path})")
    return tunes


def _tune(tune_id: str, collection: str, score) -> Tune | None:
    """The first part's melody (first voice, top note of a chord, ties merged, chord symbols and grace notes
    skipped), or None when it has fewer than 8 notes or no time signature."""
    from music21 import chord, harmony, key, meter, note, stream

    parts = score.getElementsByClass(stream.Part)
    part = parts[0] if parts else score
    signature, metre, start = None, None, None
    events: list[list] = []
    tied = False
    measures = part.getElementsByClass(stream.Measure) or [part]
    for measure in measures:
        source = measure.voices[0] if isinstance(measure, stream.Measure) and measure.voices else measure
        for el in source.getElementsByClass([note.GeneralNote, key.KeySignature, meter.TimeSignature]):
            if isinstance(el, key.KeySignature):
                signature = signature or el
                continue
            if isinstance(el, meter.TimeSignature):
                metre = metre or el
                continue
            if isinstance(el, harmony.Harmony) or el.duration.isGrace or el.quarterLength == 0:
                continue
            if isinstance(el, note.Rest):
                midi = None
            elif isinstance(el, chord.Chord):
                midi = max(p.midi for p in el.pitches)
            elif isinstance(el, note.Note):
                midi = el.pitch.midi
            else:
                continue
            quarters = float(el.quarterLength)
            tie = el.tie.type if getattr(el, "tie", None) is not None else None
            if start is None:
                try:
                    start = (float(el.beat) - 1.0) * float(metre.beatDuration.quarterLength) if metre else 0.0
                except Exception:  # no metre context
                    start = 0.0
            if events and ((tied and midi is not None and events[-1][0] == midi and tie in ("stop", "continue"))
                           or (midi is None and events[-1][0] is None)):
                events[-1][1] += quarters  # a tie to the same pitch, or consecutive rests
                tied = tie == "continue"
                continue
            events.append([midi, quarters])
            tied = midi is not None and tie in ("start", "continue")
    while events and events[-1][0] is None:
        events.pop()
    pitches = [m for m, _ in events if m is not None]
    if len(pitches) < 8 or metre is None:
        return None
    bar = float(metre.barDuration.quarterLength)
    return Tune(tune_id, collection, str(_scale(signature, pitches[-1])), metre.ratioString, bar,
                (start or 0.0) % bar, [(m, q) for m, q in events])


def _scale(signature, final: int) -> Scale:
    """The mode whose tonic is the final note within the key signature's notes; the signature's major key
    when the final note is not one of them."""
    major_tonic = (7 * (signature.sharps if signature is not None else 0)) % 12
    degree = (final - major_tonic) % 12
    by_degree = {0: "major", 2: "dorian", 4: "phrygian", 5: "lydian", 7: "mixolydian", 9: "minor", 11: "locrian"}
    if degree not in by_degree:
        return Scale(major_tonic, "major")
    return Scale(final % 12, by_degree[degree])
