"""The frame-model contract and the model store: mismatches are refused with the file and field named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from wavecast.models.store import ModelStore
from wavecast.streaming.model import FrameModel, Manifest, ModelError, file_sha256


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_manifest(directory: Path, change) -> None:
    path = directory / "model.json"
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))


def test_shipped_default_satisfies_the_contract(default_model: FrameModel) -> None:
    m = default_model.manifest
    assert (m.name, m.kind, m.sample_rate, m.hop) == ("default", "instrument", 48_000, 480)
    assert [c.name for c in m.controls] == ["f0", "loudness"]
    assert m.control("f0").min == 32.7 and m.control("f0").max == 1975.53  # MIDI 24..95, the range it learned
    assert m.training["command"].startswith("wavecast train instrument")
    assert m.verification["parity"]["steps"] >= 200
    assert m.verification["parity"]["max_abs_audio"] <= m.verification["parity_limit"]
    assert "CPUExecutionProvider" in default_model.providers


def test_checksum_mismatch_names_file_and_field(default_dir: Path, tmp_path: Path) -> None:
    d = copy_model(default_dir, tmp_path / "m")
    edit_manifest(d, lambda raw: raw["onnx"].update(sha256="0" * 64))
    with pytest.raises(ModelError, match=r"model\.onnx: sha256 .* field 'onnx\.sha256'"):
        FrameModel(d)


def test_missing_and_mistyped_fields_are_named(default_dir: Path, tmp_path: Path) -> None:
    d = copy_model(default_dir, tmp_path / "m")
    edit_manifest(d, lambda raw: raw.pop("hop"))
    with pytest.raises(ModelError, match=r"model\.json: field 'hop' is missing"):
        FrameModel(d)
    edit_manifest(d, lambda raw: raw.update(hop=480, controls=[{**raw["controls"][0], "max": "lots"}]))
    with pytest.raises(ModelError, match=r"field 'controls\[0\]\.max' has the wrong type"):
        FrameModel(d)


def test_graph_signature_must_match_manifest(default_dir: Path, tmp_path: Path) -> None:
    d = copy_model(default_dir, tmp_path / "m")
    edit_manifest(d, lambda raw: raw["controls"].append({**raw["controls"][0], "name": "brightness"}))
    with pytest.raises(ModelError, match=r"input 'control' has shape .* the manifest implies"):
        FrameModel(d)
    d2 = copy_model(default_dir, tmp_path / "m2")
    edit_manifest(d2, lambda raw: raw["states"].pop())
    with pytest.raises(ModelError, match=r"graph inputs .* do not match the manifest"):
        FrameModel(d2)


def test_corrupt_graph_is_refused(default_dir: Path, tmp_path: Path) -> None:
    d = copy_model(default_dir, tmp_path / "m")
    graph = d / "model.onnx"
    graph.write_bytes(graph.read_bytes()[:5000])
    edit_manifest(d, lambda raw: raw["onnx"].update(sha256=file_sha256(graph)))
    with pytest.raises(ModelError, match="ONNX Runtime cannot load it"):
        FrameModel(d)


def test_not_json_manifest(tmp_path: Path) -> None:
    (tmp_path / "model.json").write_text("{nope")
    with pytest.raises(ModelError, match="not valid JSON"):
        Manifest.read(tmp_path / "model.json")


def test_publish_versions_and_precedence(default_dir: Path, tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    assert store.resolve("default").shipped
    first = store.publish(default_dir)
    second = store.publish(default_dir)
    shipped_version = Manifest.read(default_dir / "model.json").version
    assert (first.manifest.version, second.manifest.version) == (shipped_version + 1, shipped_version + 2)
    latest = store.resolve("default")
    assert not latest.shipped and latest.manifest.version == second.manifest.version
    assert FrameModel(latest.directory).manifest.version == second.manifest.version
    with pytest.raises(KeyError, match="unknown model 'nope'"):
        store.resolve("nope")


def test_publish_refuses_a_broken_candidate_and_leaves_nothing(default_dir: Path, tmp_path: Path) -> None:
    bad = copy_model(default_dir, tmp_path / "bad")
    edit_manifest(bad, lambda raw: raw["states"].pop())
    store = ModelStore(tmp_path / "store")
    with pytest.raises(ModelError):
        store.publish(bad)
    assert list((tmp_path / "store" / "default").iterdir()) == []
    assert store.resolve("default").shipped


def test_publish_gate_names_the_metric_a_model_misses(default_dir: Path, tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    clicky = copy_model(default_dir, tmp_path / "clicky")
    edit_manifest(clicky, lambda raw: raw["verification"]["quality"].update(clicks=3))
    with pytest.raises(ModelError, match=r"refused to publish: clicks: 3 is not max 0"):
        store.publish(clicky)
    dull = copy_model(default_dir, tmp_path / "dull")
    edit_manifest(dull, lambda raw: raw["verification"]["quality"].update(spectral_ratio=0.9, loudness_correlation=0.5))
    with pytest.raises(ModelError, match=r"spectral_ratio: 0.9 is not max 0.7; loudness_correlation: 0.5 is not above"):
        store.publish(dull)
    unchecked = copy_model(default_dir, tmp_path / "unchecked")
    edit_manifest(unchecked, lambda raw: raw["verification"].pop("thresholds"))
    with pytest.raises(ModelError, match="no quality thresholds"):
        store.publish(unchecked)
    loose = copy_model(default_dir, tmp_path / "loose")
    edit_manifest(loose, lambda raw: raw["verification"]["parity"].update(max_abs_audio=0.5))
    with pytest.raises(ModelError, match="parity: max_abs_audio 0.5 against limit 0.0001"):
        store.publish(loose)
    assert not (tmp_path / "store" / "default").exists() or list((tmp_path / "store" / "default").iterdir()) == []
