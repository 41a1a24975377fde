"""The model store: shipped models (read-only, in the package) plus trained versions in a store directory.

Layout: ``<store>/<name>/<version:06d>/{model.onnx, model.json}`` (plus ``training.json`` and ``curve.png`` when
the run wrote them), real files (no symbolic links), and ``<store>/<name>/current``, the number of the version
that plays by name, written by a rollback (without it, the newest plays). Publishing checks a candidate against
the store's policy and the frame-model contract, copies it into a hidden directory beside its final place, then
renames it into place and removes the pointer, so a reader sees a version whole or not at all and the new one
is current. A rollback writes the pointer (a temp file renamed over it); a delete renames the version to a
hidden name before removing it, and leaves a ``.deleted-<version>`` marker so that its number never names
another model (``name@3`` means one model forever). Changes to one name's versions hold a lock on
``<store>/<name>``. No torch here: the daemon imports this.

The store owns the gate (POLICIES): what a model must measure to be published lives here, in the code that
enforces it, never in the manifest it judges. A manifest's own limits and thresholds may only tighten it.
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from wavecast.streaming.model import GRAPH, MANIFEST, FrameModel, Manifest, ModelError, checked_graph, file_sha256

log = logging.getLogger("wavecast.store")

SHIPPED = Path(__file__).parent / "shipped"
# A model name is a slug: it becomes a directory name and a URL path segment (GET /v1/models/NAME).
NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
NAME_RULE = "1-64 lowercase letters, digits, '-' or '_', beginning with a letter or digit"
FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # a candidate's graph: a plain name, no path
VERSION = re.compile(r"[0-9]+")  # a version directory's name is the version as %06d
MAX_VERSION = 999_999_999
POINTER = "current"  # <store>/<name>/current: the number of the version that plays by name
TOMBSTONE = ".deleted-"  # <store>/<name>/.deleted-000003: version 3 was deleted; no other model gets its number
EXTRAS = ("training.json", "curve.png")  # a training run's log and loss curve: published beside its model

# "max" = at most, "below" = less than (both bound a metric from above), "above" = more than.
UPPER, LOWER = ("max", "below"), ("above",)
Rule = tuple[str, float]
QUALITY_TARGETS: dict[str, Rule] = {  # an instrument's, on held-out performances rendered through the engine
    "spectral_ratio": ("max", 0.7),  # held-out spectral distance, model / saw+noise baseline
    "pitch_median_cents": ("below", 10.0),
    "pitch_p95_cents": ("below", 30.0),
    "loudness_correlation": ("above", 0.95),
    "clicks": ("max", 0),
    # timbre against the fair non-neural baseline: each key's mean spectrum from the training data, at the
    # frame's level (models/quality.py), log-mel L1 on voiced frames and on onset frames (a note's first 60 ms)
    "table_ratio": ("max", 1.1),
    "onset_table_ratio": ("below", 1.0),
}


@dataclass(frozen=True)
class Policy:
    """What the store requires of one kind of model before it publishes it."""

    parity_metric: str  # the field of verification.parity the parity limit bounds
    parity_limit: float  # max |torch - ONNX Runtime| over the stateful parity run
    pitch_limit: float | None  # max relative f0 error of constant-pitch renders; None: no pitch check
    thresholds: Mapping[str, Rule]  # verification.quality metric -> rule

    def record(self) -> dict:
        """The limits and thresholds as a manifest's verification block records them."""
        limits = {"parity_limit": self.parity_limit}
        if self.pitch_limit is not None:
            limits["pitch_limit"] = self.pitch_limit
        return {**limits, "thresholds": {name: list(rule) for name, rule in self.thresholds.items()}}


POLICIES = {
    "instrument": Policy("max_abs_audio", 1e-4, 0.01, QUALITY_TARGETS),
    # beat the strongest simple model: a key-relative order-3 Markov chain (models/train_composer.py)
    "composer": Policy("max_abs_logits", 1e-4, None, {"nll_ratio_to_markov3": ("below", 1.0)}),
}


def is_number(value: object) -> bool:
    """A finite int or float (JSON's NaN, Infinity, true and integers too large for a float are not)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def meets(kind: str, value: object, target: float) -> bool:
    if not is_number(value):
        return False
    return {"max": value <= target, "below": value < target, "above": value > target}[kind]


def tightens(own: Rule, policy: Rule) -> bool:
    """True when every value that meets `own` also meets `policy` (the same bound or a stricter one)."""
    (kind, target), (p_kind, p_target) = own, policy
    if kind in UPPER and p_kind in UPPER:
        return target < p_target or (target == p_target and (kind == "below" or p_kind == "max"))
    return kind in LOWER and p_kind in LOWER and target >= p_target


def num(x: float) -> str:
    return f"{x:.6g}"


@dataclass(frozen=True)
class Verdict:
    policy: Policy  # the store's policy for the kind, tightened where the manifest asks
    problems: list[str]  # why the model may not be published, each naming the metric; empty: it passes
    ignored: list[str]  # the manifest's limits and thresholds that were looser than the policy


def judge(verification: object, kind: str) -> Verdict:
    """A manifest's verification block against the store's policy for `kind` ("instrument": parity on audio
    and pitch; "composer": parity on logits). The block must record the limits and thresholds it was
    checked against; where one is stricter than the policy it applies, a looser one is ignored."""
    policy = POLICIES[kind]
    v = verification if isinstance(verification, dict) else {}
    problems = [] if isinstance(verification, dict) else ["verification: the manifest has no 'verification' object"]
    ignored = []
    limits: dict[str, float | None] = {}
    for what, value_key, limit_key, limit in (("parity", policy.parity_metric, "parity_limit", policy.parity_limit),
                                              ("pitch", "max_f0_relative_error", "pitch_limit", policy.pitch_limit)):
        if limit is None:
            limits[limit_key] = None
            continue
        own, looser = v.get(limit_key), ""
        if own is None:
            problems.append(f"{what}: verification.{limit_key} is missing (the limit the model was checked against)")
        elif not is_number(own) or own < 0:
            problems.append(f"{what}: verification.{limit_key} must be a number, 0 or more")
        elif own <= limit:
            limit = own
        else:
            looser = f"verification.{limit_key} {num(own)} is looser than the store's limit {num(limit)}"
            ignored.append(looser)
        limits[limit_key] = limit
        block = v.get(what)
        value = block.get(value_key) if isinstance(block, dict) else None
        if value is None:
            problems.append(f"{what}: verification.{what}.{value_key} is missing")
        elif not is_number(value):
            problems.append(f"{what}: verification.{what}.{value_key} is not a finite number")
        elif value > limit:
            problems.append(f"{what}: {value_key} {num(value)} against limit {num(limit)}"
                            + (f" ({looser}, and ignored)" if looser else ""))

    own_rules = v.get("thresholds")
    if not isinstance(own_rules, dict) or not own_rules:
        problems.append("no quality thresholds in verification.thresholds (the thresholds the model was checked "
                        "against)")
        own_rules = {}
    rules, loosened = dict(policy.thresholds), {}
    for name, rule in own_rules.items():
        if not (isinstance(rule, list) and len(rule) == 2 and rule[0] in (*UPPER, *LOWER) and is_number(rule[1])):
            problems.append(f"{name}: verification.thresholds.{name} must be [kind, number] with kind one of "
                            f"{', '.join((*UPPER, *LOWER))}")
            continue
        own: Rule = (rule[0], rule[1])
        if name not in rules or tightens(own, rules[name]):
            rules[name] = own
        elif (own[0] in UPPER) != (rules[name][0] in UPPER):
            problems.append(f"{name}: verification.thresholds.{name} '{own[0]} {num(own[1])}' bounds it from the "
                            f"other side than the store's '{rules[name][0]} {num(rules[name][1])}'")
        else:
            loosened[name] = f"verification.thresholds.{name} '{own[0]} {num(own[1])}' is looser than the store's"
            ignored.append(f"{loosened[name]} '{rules[name][0]} {num(rules[name][1])}'")
    measured = v.get("quality") if isinstance(v.get("quality"), dict) else {}
    for name, (rule_kind, target) in rules.items():
        value = measured.get(name)
        if value is None:
            problems.append(f"{name}: verification.quality.{name} is missing")
        elif not is_number(value):
            problems.append(f"{name}: verification.quality.{name} is not a finite number")
        elif not meets(rule_kind, value, target):
            problems.append(f"{name}: {num(value)} is not {rule_kind} {num(target)}"
                            + (f" ({loosened[name]}, and ignored)" if name in loosened else ""))
    return Verdict(Policy(policy.parity_metric, limits["parity_limit"], limits["pitch_limit"], rules),
                   problems, ignored)


def gate(verification: object, kind: str) -> list[str]:
    """What a manifest's verification block fails, each naming the metric; empty when it may be published."""
    return judge(verification, kind).problems


def valid_name(name: object) -> bool:
    return isinstance(name, str) and NAME.fullmatch(name) is not None


def version_of(dirname: str) -> int | None:
    """The version a store directory stands for: its name is %06d of a positive number; else None."""
    number = int(dirname) if VERSION.fullmatch(dirname) else 0
    return number if number >= 1 and dirname == f"{number:06d}" else None


def shown(name: object) -> str:
    """A name as an error message quotes it: only a short, printable one is repeated."""
    if not isinstance(name, str):
        return "(not a string)"
    return f"'{name}'" if len(name) <= 80 and name.isprintable() else f"({len(name)} characters, not shown)"


def real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def real_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def default_store() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "wavecast" / "models"


def default_work() -> Path:
    """Data cache, checkpoints and rejected models of `wavecast train` (and the quality bench's data)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "wavecast"


def default_name(kind: str, quick: bool, instrument: str | None = None) -> str:
    """The name a training run publishes under without --name: the instrument's, 'default' or 'folk'. A quick
    run (a model in a minute or two, to try things) gets a name of its own, 'quick', 'quick-violin' or
    'quick-folk', so it never replaces the model that `serve` and `render` play by that name."""
    base = instrument or ("folk" if kind == "composer" else "default")
    if not quick:
        return base
    return "quick" if base == "default" else f"quick-{base}"


@dataclass(frozen=True)
class Entry:
    manifest: Manifest
    directory: Path
    shipped: bool


@dataclass(frozen=True)
class Version:
    """One version of a model, and whether it is the one that plays by name."""

    entry: Entry
    current: bool

    def summary(self) -> dict:
        """What `wavecast models versions` and GET /v1/models/NAME/versions show of it."""
        m, d = self.entry.manifest, self.entry.directory
        training = m.training if isinstance(m.training, dict) else {}
        return {"version": m.version, "kind": m.kind, "current": self.current, "shipped": self.entry.shipped,
                "training": {k: training[k] for k in ("command", "steps", "seconds", "final_loss", "heldout_loss")
                             if k in training},
                "files": [f for f in EXTRAS if real_file(d / f)]}


class InvalidModelName(KeyError):
    """A name that cannot be a model's (a KeyError, so callers that answer 'unknown model' still do)."""


class UnknownVersion(KeyError):
    """A model that has no such version (a KeyError, as an unknown model is)."""


class VersionRefused(Exception):
    """A rollback or delete the store will not do: `code` says why, the message what to do instead."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def listing(versions: Mapping[int, Entry]) -> str:
    return ", ".join(str(v) for v in sorted(versions))


class ModelStore:
    def __init__(self, root: Path | None = None, shipped: Path = SHIPPED) -> None:
        self.root = Path(root) if root else default_store()
        self.shipped = shipped

    def entries(self) -> list[Entry]:
        """Every well-formed version: real directories and files (no symbolic links) whose manifest's name,
        version and graph file match where they lie. Anything else is skipped, as is an unreadable manifest."""
        found = []
        for base, shipped in ((self.shipped, True), (self.root, False)):
            if not base.is_dir():
                continue
            names = [n for n in base.iterdir() if valid_name(n.name) and real_dir(n)]
            dirs = [(n.name, None, n) for n in names] if shipped else [
                (n.name, version_of(v.name), v) for n in names for v in n.iterdir()
                if version_of(v.name) and real_dir(v)
            ]
            for name, version, d in dirs:
                if not (real_file(d / MANIFEST) and real_file(d / GRAPH)):
                    continue
                try:
                    m = Manifest.read(d / MANIFEST)
                except ModelError:
                    continue
                placed = m.version == version if version is not None else m.version >= 1
                if m.name == name and placed and m.onnx["file"] == GRAPH:
                    found.append(Entry(m, d, shipped))
        return found

    def models(self) -> dict[str, dict[int, Entry]]:
        """Every model's versions by number; a trained version beats a shipped one of the same number."""
        found: dict[str, dict[int, Entry]] = {}
        for e in self.entries():
            versions = found.setdefault(e.manifest.name, {})
            if e.manifest.version not in versions or versions[e.manifest.version].shipped:
                versions[e.manifest.version] = e
        return dict(sorted(found.items()))

    def current(self, name: str, versions: Mapping[int, Entry]) -> int:
        """The version of `name` that plays by name: the pointer's, else (no pointer, or it names a version
        that is not there) the newest."""
        try:
            with (self.root / name / POINTER).open("rb") as f:
                text = f.read(16).decode("ascii").strip()
        except (OSError, UnicodeDecodeError):
            text = ""
        pointed = int(text) if VERSION.fullmatch(text) else 0
        return pointed if pointed in versions else max(versions)

    def latest(self) -> dict[str, Entry]:
        """The current version of each model (see `current`)."""
        return {name: versions[self.current(name, versions)] for name, versions in self.models().items()}

    def resolve(self, name: str) -> Entry:
        """The current version of model `name`, or exactly version N of a pinned 'NAME@N' (e.g. violin@3);
        KeyError (InvalidModelName for a name no model can have, UnknownVersion) otherwise."""
        base, pinned, number = name.partition("@") if isinstance(name, str) else (name, "", "")
        versions = self.known(base)
        if not pinned:
            return versions[self.current(base, versions)]
        version = int(number) if VERSION.fullmatch(number) and len(number) <= 9 else 0
        if version not in versions:
            raise UnknownVersion(f"'{base}' has no version {shown(number)} (its versions: {listing(versions)}); pin "
                                 f"one as {base}@VERSION, or name '{base}' alone for its current version")
        return versions[version]

    def known(self, name: str) -> dict[int, Entry]:
        """The versions of model `name` by number; KeyError (InvalidModelName) when there is no such model."""
        models = self.models()
        known = ", ".join(models) or "none"
        if not valid_name(name):
            raise InvalidModelName(f"invalid model name {shown(name)}: a model name is {NAME_RULE} (known: {known})")
        if name not in models:
            raise KeyError(f"unknown model '{name}' (known: {known}); 'wavecast train instrument' or 'wavecast train "
                           "composer' makes one")
        return models[name]

    def versions(self, name: str) -> list[Version]:
        """Every version of `name`, oldest first, shipped or trained, marking the current one."""
        versions = self.known(name)
        current = self.current(name, versions)
        return [Version(versions[v], v == current) for v in sorted(versions)]

    def rollback(self, name: str, version: int | None = None) -> Entry:
        """Make `version` of `name` current (default: the newest one before the current one), atomically; what
        plays `name` from then on plays it. Returns the now-current version."""
        self.known(name)  # refused before the lock makes a directory for it
        with self._lock(name):
            versions = self.known(name)
            current = self.current(name, versions)
            if version is None:
                earlier = [v for v in versions if v < current]
                if not earlier:
                    raise VersionRefused("no_earlier_version", f"version {current} is the oldest version of '{name}': "
                                         f"there is none before it; name the version to make current (versions: "
                                         f"{listing(versions)})")
                version = max(earlier)
            elif version not in versions:
                raise UnknownVersion(f"'{name}' has no version {version} (its versions: {listing(versions)})")
            self._point(name, version)
        log.info("model %s: version %d is current (was %d)", name, version, current)
        return versions[version]

    def delete(self, name: str, version: int) -> Entry:
        """Remove trained `version` of `name`; never a shipped one, never the current one (roll back first).
        The version is renamed to a hidden name, then removed, so a reader sees it whole or not at all."""
        self.known(name)
        with self._lock(name):
            versions = self.known(name)
            entry = versions.get(version)
            if entry is None:
                raise UnknownVersion(f"'{name}' has no version {version} (its versions: {listing(versions)})")
            if entry.shipped:
                raise VersionRefused("version_shipped", f"version {version} of '{name}' ships with wavecast (it is "
                                     "part of the installed package) and cannot be deleted; to stop it playing, "
                                     "make another version current (rollback)")
            if version == self.current(name, versions):
                others = [v for v in versions if v != version]
                raise VersionRefused("version_current", f"version {version} of '{name}' is its current version; "
                                     + (f"make another current first (wavecast models rollback {name} "
                                        f"{max(others)}, or POST /v1/models/{name}/rollback), then delete it"
                                        if others else f"it is its only version; to remove the model itself, "
                                        f"delete {self.root / name}"))
            directory = self.root / name
            (directory / f"{TOMBSTONE}{version:06d}").touch()
            trash = Path(tempfile.mkdtemp(prefix=f".deleting-{version:06d}-", dir=directory))
            os.rename(entry.directory, trash / entry.directory.name)
        shutil.rmtree(trash)
        log.info("model %s: version %d deleted", name, version)
        return entry

    @contextmanager
    def _lock(self, name: str) -> Iterator[None]:
        """Hold a lock on `name`'s directory: its versions and pointer change in one process at a time (the
        daemon, the CLI, training runs)."""
        directory = self.root / name
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released when the descriptor closes
            yield
        finally:
            os.close(fd)

    def _point(self, name: str, version: int) -> None:
        """Make `version` current: a temp file renamed over the pointer, so readers see the old or the new one."""
        directory = self.root / name
        fd, tmp = tempfile.mkstemp(prefix=".current-", dir=directory)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(f"{version}\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, directory / POINTER)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def publish(self, candidate: Path) -> Entry:
        """Publish a candidate directory as the next version of its model, which makes it current (the newest
        is current where no rollback points elsewhere, and publishing removes the pointer); returns the new
        entry. Its training log and curve (EXTRAS) come along when it has them.

        Refused with the reason (a ModelError naming the file and field) when its name or files are not a
        model's, its verification block misses the store's policy, or its graph breaks the contract. The
        published manifest records the limits and thresholds it was held to."""
        candidate = Path(candidate)
        manifest, graph = self._candidate(candidate)
        verdict = judge(manifest.verification, manifest.kind)
        if verdict.problems:
            raise ModelError(f"{candidate / MANIFEST}: refused to publish: {'; '.join(verdict.problems)}; retrain or "
                             "re-verify the model (a manifest may tighten the store's gate, never loosen it)")
        for note in verdict.ignored:
            log.warning("%s: %s, and ignored: the store's policy applies", candidate / MANIFEST, note)
        target_parent = self.root / manifest.name
        target_parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=target_parent))
        try:
            if manifest.kind == "composer":  # the contract check, as the daemon will load it
                from wavecast.streaming.composer import ComposerModel

                ComposerModel(candidate)
            else:
                FrameModel(candidate, device="cpu")
            shutil.copyfile(graph, staging / GRAPH)
            if file_sha256(staging / GRAPH) != manifest.onnx["sha256"]:
                raise ModelError(f"{graph}: changed while it was being published; publish it again")
            for extra in EXTRAS:
                if (candidate / extra).is_symlink():
                    raise ModelError(f"{candidate / extra}: is a symbolic link; publish a directory that holds the "
                                     "files themselves")
                if real_file(candidate / extra):
                    shutil.copyfile(candidate / extra, staging / extra)
            verification = {**manifest.verification, **verdict.policy.record()}
            with self._lock(manifest.name):
                taken = [e.manifest.version for e in self.entries() if e.manifest.name == manifest.name]
                for v in target_parent.iterdir():
                    number = v.name.removeprefix(TOMBSTONE)
                    if VERSION.fullmatch(number) and len(number) <= 9:
                        taken.append(int(number))
                version = max(taken, default=0) + 1
                if version > MAX_VERSION:
                    raise ModelError(f"{target_parent}: '{manifest.name}' has used up its version numbers; publish "
                                     "under another name (--name)")
                published = replace(manifest, version=version, onnx={**manifest.onnx, "file": GRAPH},
                                    verification=verification)
                published.write(staging)
                final = target_parent / f"{version:06d}"
                os.rename(staging, final)
                (target_parent / POINTER).unlink(missing_ok=True)  # no pointer: the newest, this one, is current
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return Entry(published, final, shipped=False)

    @staticmethod
    def _candidate(candidate: Path) -> tuple[Manifest, Path]:
        """A candidate's manifest and graph file, refused unless both are real files in `candidate`, the name
        is a model name and the graph matches its checksum."""
        path = candidate / MANIFEST
        if path.is_symlink():
            raise ModelError(f"{path}: is a symbolic link; publish a directory that holds the files themselves")
        manifest = Manifest.read(path)
        if not valid_name(manifest.name):
            raise ModelError(f"{path}: field 'name' {shown(manifest.name)} is not a model name: use {NAME_RULE}")
        file = manifest.onnx["file"]
        if not FILE_NAME.fullmatch(file):
            raise ModelError(f"{path}: field 'onnx.file' must be a plain file name in {candidate} (like {GRAPH}), "
                             "not a path")
        graph = candidate / file
        if graph.is_symlink():
            raise ModelError(f"{graph}: is a symbolic link; publish a directory that holds the files themselves")
        return manifest, checked_graph(candidate, manifest)
