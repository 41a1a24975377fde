"""The model store: shipped models (read-only, in the package) plus trained versions in a store directory.

Layout: ``<store>/<name>/<version:06d>/{model.onnx, model.json}``. Publishing copies a candidate into a
hidden directory beside its final place, checks it through the frame-model contract, then renames it
into place, so a reader sees a version whole or not at all. No torch here: the daemon imports this.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from wavecast.streaming.model import GRAPH, MANIFEST, FrameModel, Manifest, ModelError

SHIPPED = Path(__file__).parent / "shipped"
# Quality gates written into each trained manifest's verification block, read back at publish time:
# "max" = at most, "below" = less than, "above" = more than.
QUALITY_TARGETS = {
    "spectral_ratio": ("max", 0.7),  # held-out spectral distance, model / saw+noise baseline
    "pitch_median_cents": ("below", 10.0),
    "pitch_p95_cents": ("below", 30.0),
    "loudness_correlation": ("above", 0.95),
    "clicks": ("max", 0),
}


def meets(kind: str, value: object, target: float) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return False
    return {"max": value <= target, "below": value < target, "above": value > target}[kind]


def gate(verification: dict, kind: str) -> list[str]:
    """What a manifest's verification block fails: parity, pitch (instruments) and every quality threshold
    it names. `kind` is the manifest's: an instrument's parity is on audio, a composer's on logits."""
    v = verification
    problems = []
    checks = ((("parity", "max_abs_audio", "parity_limit"), ("pitch", "max_f0_relative_error", "pitch_limit"))
              if kind == "instrument" else (("parity", "max_abs_logits", "parity_limit"),))
    for what, value_key, limit_key in checks:
        value, limit = (v.get(what) or {}).get(value_key), v.get(limit_key)
        if limit is None or not meets("max", value, limit):
            problems.append(f"{what}: {value_key} {value} against limit {limit}")
    thresholds, measured = v.get("thresholds"), v.get("quality") or {}
    if not thresholds:
        problems.append("no quality thresholds in verification.thresholds")
    for name, (kind, target) in (thresholds or {}).items():
        if not meets(kind, measured.get(name), target):
            problems.append(f"{name}: {measured.get(name)} is not {kind} {target}")
    return problems


def default_store() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "wavecast" / "models"


def default_work() -> Path:
    """Data cache, checkpoints and rejected models of `wavecast train` (and the quality bench's data)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "wavecast"


@dataclass(frozen=True)
class Entry:
    manifest: Manifest
    directory: Path
    shipped: bool


class ModelStore:
    def __init__(self, root: Path | None = None, shipped: Path = SHIPPED) -> None:
        self.root = Path(root) if root else default_store()
        self.shipped = shipped

    def entries(self) -> list[Entry]:
        """Every readable version; unreadable ones are skipped (they are reported by `check`)."""
        found = []
        for base, shipped in ((self.shipped, True), (self.root, False)):
            if not base.is_dir():
                continue
            dirs = [d for d in base.iterdir() if d.is_dir()] if shipped else [
                v for n in base.iterdir() if n.is_dir() for v in n.iterdir() if v.is_dir() and v.name.isdigit()
            ]
            for d in dirs:
                try:
                    found.append(Entry(Manifest.read(d / MANIFEST), d, shipped))
                except ModelError:
                    continue
        return found

    def latest(self) -> dict[str, Entry]:
        """The newest version of each model; a trained version beats a shipped one of the same number."""
        best: dict[str, Entry] = {}
        for e in self.entries():
            cur = best.get(e.manifest.name)
            if cur is None or (e.manifest.version, not e.shipped) > (cur.manifest.version, not cur.shipped):
                best[e.manifest.name] = e
        return dict(sorted(best.items()))

    def resolve(self, name: str) -> Entry:
        entry = self.latest().get(name)
        if entry is None:
            known = ", ".join(self.latest()) or "none"
            raise KeyError(f"unknown model '{name}' (known: {known}); train one with 'wavecast train instrument'")
        return entry

    def publish(self, candidate: Path) -> Entry:
        """Publish a candidate directory as the next version of its model; returns the new entry.

        Refused, naming the metric, when its verification block misses a gate."""
        manifest = Manifest.read(candidate / MANIFEST)
        problems = gate(manifest.verification, manifest.kind)
        if problems:
            raise ModelError(f"{candidate / MANIFEST}: refused to publish: {'; '.join(problems)}")
        versions = [e.manifest.version for e in self.entries() if e.manifest.name == manifest.name]
        version = max(versions, default=0) + 1
        target_parent = self.root / manifest.name
        target_parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=target_parent))
        try:
            shutil.copy2(candidate / manifest.onnx["file"], staging / GRAPH)
            published = replace(manifest, version=version, onnx={**manifest.onnx, "file": GRAPH})
            published.write(staging)
            if manifest.kind == "composer":  # the contract check, exactly as the daemon will load it
                from wavecast.streaming.composer import ComposerModel

                ComposerModel(staging)
            else:
                FrameModel(staging, device="cpu")
            final = target_parent / f"{version:06d}"
            os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return Entry(published, final, shipped=False)
