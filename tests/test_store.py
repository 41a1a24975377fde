"""The model store owns its gates and its layout: loosened, forged, misnamed, symlinked and corrupted models are
refused with the reason, on real files and the shipped ONNX models."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from wavecast.models.store import SHIPPED, ModelStore, gate
from wavecast.streaming.model import FrameModel, Manifest, ModelError, file_sha256


def candidate(tmp_path: Path, change: Callable[[dict], None] | None = None, model: str = "default",
              name: str = "cand") -> Path:
    """A copy of a shipped model in tmp_path/name, its manifest edited by `change`."""
    directory = tmp_path / name
    shutil.copytree(SHIPPED / model, directory)
    if change:
        edit(directory, change)
    return directory


def edit(directory: Path, change: Callable[[dict], None]) -> None:
    raw = json.loads((directory / "model.json").read_text())
    change(raw)
    (directory / "model.json").write_text(json.dumps(raw))


def store_of(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "store")


def refused(store: ModelStore, directory: Path, match: str) -> str:
    """Publish `directory`, expecting a refusal that matches; checks that it leaves no version and no
    staging directory behind, and that the message holds no Python repr."""
    before = sorted(p.relative_to(store.root) for p in store.root.rglob("*")) if store.root.exists() else []
    with pytest.raises(ModelError, match=match) as e:
        store.publish(directory)
    after = sorted(p.relative_to(store.root) for p in store.root.rglob("*")) if store.root.exists() else []
    assert [p for p in after if p not in before and p.name != "default"] == []
    assert not any(p.name.startswith(".incoming-") for p in after)
    assert "None" not in str(e.value)
    return str(e.value)


def published(store: ModelStore, name: str = "default") -> list[int]:
    return sorted(e.manifest.version for e in store.entries() if e.manifest.name == name and not e.shipped)


# -- the gate is the store's: a manifest may tighten it, never loosen it ---------------------------------------
@pytest.mark.parametrize("model", sorted(p.parent.name for p in SHIPPED.glob("*/model.json")))
def test_the_shipped_models_pass_the_stores_gate(model: str) -> None:
    manifest = json.loads((SHIPPED / model / "model.json").read_text())
    assert gate(manifest["verification"], manifest["kind"]) == []


def test_loosened_thresholds_and_limits_are_ignored_and_the_model_refused(tmp_path: Path) -> None:
    store = store_of(tmp_path)

    def clicky(raw: dict) -> None:
        raw["verification"]["thresholds"]["clicks"] = ["max", 1000]
        raw["verification"]["quality"]["clicks"] = 500

    message = refused(store, candidate(tmp_path, clicky, name="clicky"),
                      r"refused to publish: clicks: 500 is not max 0")
    assert "'max 1000' is looser than the store's" in message

    def rough(raw: dict) -> None:
        raw["verification"]["parity_limit"] = 1.0
        raw["verification"]["parity"]["max_abs_audio"] = 0.9

    message = refused(store, candidate(tmp_path, rough, name="rough"),
                      r"parity: max_abs_audio 0.9 against limit 0.0001")
    assert "verification.parity_limit 1 is looser" in message

    def out_of_tune(raw: dict) -> None:
        raw["verification"]["pitch_limit"] = 0.5
        raw["verification"]["pitch"]["max_f0_relative_error"] = 0.2

    refused(store, candidate(tmp_path, out_of_tune, name="out_of_tune"),
            r"pitch: max_f0_relative_error 0.2 against limit 0.01 \(verification.pitch_limit 0.5 is looser")
    # A rule that bounds the metric from the other side does not replace the store's either.
    refused(store, candidate(tmp_path, lambda raw: raw["verification"].update(
        thresholds={**raw["verification"]["thresholds"], "clicks": ["above", -1]},
        quality={**raw["verification"]["quality"], "clicks": 5}), name="upside_down"),
        r"clicks: verification.thresholds.clicks 'above -1' bounds it from the other side")
    assert published(store) == []


def test_an_instrument_no_better_than_the_per_key_table_is_refused(tmp_path: Path) -> None:
    store = store_of(tmp_path)
    refused(store, candidate(tmp_path, lambda raw: raw["verification"]["quality"].update(table_ratio=1.3),
                             name="dull"), r"table_ratio: 1.3 is not max 1.1\b")
    refused(store, candidate(tmp_path, lambda raw: raw["verification"]["quality"].update(onset_table_ratio=1.0),
                             name="blunt"), r"onset_table_ratio: 1 is not below 1\b")
    refused(store, candidate(tmp_path, lambda raw: raw["verification"]["quality"].pop("table_ratio"),
                             name="unmeasured"), r"table_ratio: verification.quality.table_ratio is missing")
    assert published(store) == []


def test_a_loosened_manifest_that_meets_the_policy_is_published_with_the_policys_limits(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = store_of(tmp_path)

    def loose(raw: dict) -> None:
        raw["verification"]["thresholds"]["clicks"] = ["max", 1000]
        raw["verification"]["parity_limit"] = 1.0

    with caplog.at_level(logging.WARNING, logger="wavecast.store"):
        entry = store.publish(candidate(tmp_path, loose))
    assert "verification.thresholds.clicks 'max 1000' is looser than the store's 'max 0'" in caplog.text
    assert "verification.parity_limit 1 is looser than the store's limit 0.0001" in caplog.text
    v = json.loads((entry.directory / "model.json").read_text())["verification"]
    assert v["parity_limit"] == 1e-4 and v["thresholds"]["clicks"] == ["max", 0]


def test_a_stricter_manifest_binds_the_model(tmp_path: Path) -> None:
    store = store_of(tmp_path)
    # What the shipped default's manifest records it measured: pitch_p95_cents 2-3, parity about 1e-6.
    measured = Manifest.read(SHIPPED / "default" / "model.json").verification
    p95, parity = measured["quality"]["pitch_p95_cents"], measured["parity"]["max_abs_audio"]
    assert 1.0 < p95 < 3.0 and 1e-7 < parity < 1e-4
    refused(store, candidate(tmp_path, lambda raw: raw["verification"]["thresholds"].update(
        pitch_p95_cents=["below", 1.0]), name="strict_pitch"), rf"pitch_p95_cents: {p95:.6g} is not below 1\b")
    refused(store, candidate(tmp_path, lambda raw: raw["verification"].update(parity_limit=1e-7),
                             name="strict_parity"), rf"parity: max_abs_audio {parity:.6g} against limit 1e-07")
    # A metric only the manifest names is a requirement too.
    refused(store, candidate(tmp_path, lambda raw: raw["verification"]["thresholds"].update(
        heldout_seconds=["above", 100]), name="strict_extra"), r"heldout_seconds: 40 is not above 100")

    def strict(raw: dict) -> None:
        raw["verification"]["thresholds"].update(spectral_ratio=["below", 0.2], pitch_p95_cents=["max", 3.0])
        raw["verification"]["pitch_limit"] = 0.001

    entry = store.publish(candidate(tmp_path, strict, name="strict"))
    v = json.loads((entry.directory / "model.json").read_text())["verification"]
    assert v["thresholds"]["spectral_ratio"] == ["below", 0.2] and v["thresholds"]["pitch_p95_cents"] == ["max", 3.0]
    assert v["thresholds"]["clicks"] == ["max", 0] and v["pitch_limit"] == 0.001 and v["parity_limit"] == 1e-4


def test_a_forged_manifest_missing_a_required_metric_is_refused(tmp_path: Path) -> None:
    store = store_of(tmp_path)

    def only_spectral(raw: dict) -> None:  # names one threshold and measures nothing else
        raw["verification"]["thresholds"] = {"spectral_ratio": ["max", 0.7]}
        raw["verification"]["quality"] = {"spectral_ratio": 0.1}

    message = refused(store, candidate(tmp_path, only_spectral, name="forged"),
                      r"pitch_median_cents: verification.quality.pitch_median_cents is missing")
    for metric in ("pitch_p95_cents", "loudness_correlation", "clicks"):
        assert f"{metric}: verification.quality.{metric} is missing" in message
    refused(store, candidate(tmp_path, lambda raw: raw["verification"].pop("pitch"), name="no_pitch"),
            r"pitch: verification.pitch.max_f0_relative_error is missing")
    refused(store, candidate(tmp_path, lambda raw: raw["verification"].pop("parity_limit"), name="no_limit"),
            r"parity: verification.parity_limit is missing")
    refused(store, candidate(tmp_path, lambda raw: raw.pop("verification"), name="unverified"),
            r"verification.parity_limit is missing.*no quality thresholds")
    refused(store, candidate(tmp_path, lambda raw: raw["verification"]["quality"].pop("nll_ratio_to_markov3"),
                             model="folk", name="composer"),
            r"nll_ratio_to_markov3: verification.quality.nll_ratio_to_markov3 is missing")
    assert published(store) == [] and published(store, "folk") == []


@pytest.mark.parametrize("value", [float("nan"), float("inf"), True, "0", None, [0], 10**400])
def test_a_metric_that_is_not_a_finite_number_is_refused(tmp_path: Path, value: object) -> None:
    store = store_of(tmp_path)
    expect = "is missing" if value is None else "is not a finite number"
    refused(store, candidate(tmp_path, lambda raw: raw["verification"]["quality"].update(clicks=value)),
            rf"clicks: verification.quality.clicks {expect}")
    refused(store, candidate(tmp_path, lambda raw: raw["verification"]["parity"].update(max_abs_audio=value),
                             name="parity"), rf"parity: verification.parity.max_abs_audio {expect}")


@pytest.mark.parametrize("rule", [["max", float("nan")], ["max", "1000"], ["max", True], ["at most", 1], ["max"], 5])
def test_a_malformed_threshold_is_refused(tmp_path: Path, rule: object) -> None:
    refused(store_of(tmp_path), candidate(tmp_path, lambda raw: raw["verification"]["thresholds"].update(clicks=rule)),
            r"clicks: verification.thresholds.clicks must be \[kind, number\] with kind one of max, below, above")


def test_composer_gate_is_the_stores(tmp_path: Path) -> None:
    store = store_of(tmp_path)

    def lax(raw: dict) -> None:
        raw["verification"]["thresholds"]["nll_ratio_to_markov3"] = ["below", 5.0]
        raw["verification"]["quality"]["nll_ratio_to_markov3"] = 2.0

    refused(store, candidate(tmp_path, lax, model="folk", name="lax"), r"nll_ratio_to_markov3: 2 is not below 1\b")
    refused(store, candidate(tmp_path, lambda raw: raw["verification"].update(
        parity_limit=1.0, parity={**raw["verification"]["parity"], "max_abs_logits": 0.5}), model="folk", name="p"),
        r"parity: max_abs_logits 0.5 against limit 0.0001")
    entry = store.publish(candidate(tmp_path, model="folk", name="folk"))
    assert (entry.manifest.kind, entry.manifest.version, entry.directory.name) == ("composer", 2, "000002")
    # Read as an instrument's, a composer's block has no audio parity and no pitch check.
    folk = json.loads((SHIPPED / "folk" / "model.json").read_text())["verification"]
    assert gate(folk, "composer") == []
    assert {p.split(":")[0] for p in gate(folk, "instrument")} >= {"parity", "pitch", "clicks"}


# -- names, versions and the layout: nothing outside the store ------------------------------------------------
@pytest.mark.parametrize("name", ["../evil", "a/b", "{tmp}/evil", "", "..", "Evil", "a\u0000b", "x" * 65, ".hidden"])
def test_a_name_that_is_not_a_slug_is_refused_at_publish_and_at_resolve(tmp_path: Path, name: str) -> None:
    store, name = store_of(tmp_path), name.format(tmp=tmp_path)
    refused(store, candidate(tmp_path, lambda raw: raw.update(name=name)), r"field 'name' .*is not a model name: use")
    assert not (tmp_path / "evil").exists()
    assert not store.root.exists() or list(store.root.iterdir()) == []
    with pytest.raises(KeyError, match="invalid model name") as e:
        store.resolve(name)
    assert "\u0000" not in e.value.args[0] and len(e.value.args[0]) < 400


def test_unknown_names_are_still_key_errors(tmp_path: Path) -> None:
    shipped = ", ".join(sorted(p.name for p in SHIPPED.iterdir() if (p / "model.json").is_file()))
    assert shipped.startswith("cello, clarinet, default")
    with pytest.raises(KeyError, match=rf"unknown model 'nope' \(known: {shipped}\)"):
        store_of(tmp_path).resolve("nope")
    with pytest.raises(KeyError, match=r"invalid model name \(not a string\)"):
        store_of(tmp_path).resolve(5)  # a JSON body can put anything there


@pytest.mark.parametrize("file", ["../outside.onnx", "{tmp}/outside.onnx", "sub/model.onnx", ".."])
def test_the_graph_must_be_a_plain_file_in_the_candidate(tmp_path: Path, file: str) -> None:
    shutil.copyfile(SHIPPED / "default" / "model.onnx", tmp_path / "outside.onnx")
    (tmp_path / "cand").mkdir()
    (tmp_path / "cand" / "sub").mkdir()
    shutil.copyfile(SHIPPED / "default" / "model.onnx", tmp_path / "cand" / "sub" / "model.onnx")
    shutil.copyfile(SHIPPED / "default" / "model.json", tmp_path / "cand" / "model.json")
    edit(tmp_path / "cand", lambda raw: raw["onnx"].update(file=file.format(tmp=tmp_path)))
    refused(store_of(tmp_path), tmp_path / "cand", r"field 'onnx.file' must be a plain file name in .* not a path")


def test_symlinked_candidate_files_are_refused(tmp_path: Path) -> None:
    store = store_of(tmp_path)
    linked = candidate(tmp_path, name="linked")
    (linked / "model.onnx").unlink()
    (linked / "model.onnx").symlink_to(SHIPPED / "default" / "model.onnx")
    refused(store, linked, r"model.onnx: is a symbolic link; publish a directory that holds the files themselves")
    manifest_linked = tmp_path / "manifest_linked"
    manifest_linked.mkdir()
    shutil.copyfile(SHIPPED / "default" / "model.onnx", manifest_linked / "model.onnx")
    (manifest_linked / "model.json").symlink_to(SHIPPED / "default" / "model.json")
    refused(store, manifest_linked, r"model.json: is a symbolic link")


def test_store_entries_that_leave_the_store_are_not_listed(tmp_path: Path) -> None:
    store = store_of(tmp_path)
    store.publish(candidate(tmp_path))  # default v2, a real version
    outside = tmp_path / "outside"
    for version in (5, 6):  # a well-formed model of a later version, outside the store
        d = candidate(outside, lambda raw, v=version: raw.update(version=v), name=f"{version:06d}")
        assert FrameModel(d).manifest.version == version
    (store.root / "default" / "000005").symlink_to(outside / "000005", target_is_directory=True)
    violins = candidate(tmp_path / "violins", lambda raw: raw.update(version=2), model="violin", name="000002")
    (store.root / "violin").symlink_to(violins.parent, target_is_directory=True)  # a whole name directory
    real = store.root / "default" / "000007"  # a real directory whose files point outside
    real.mkdir()
    for file in ("model.json", "model.onnx"):
        (real / file).symlink_to(outside / "000006" / file)
    edit(outside / "000006", lambda raw: raw.update(version=7))
    misplaced = store.root / "default" / "000008"  # a copy whose manifest says another name than its place
    shutil.copytree(SHIPPED / "violin", misplaced)
    edit(misplaced, lambda raw: raw.update(version=8))
    evil = store.root / "cello" / "000009"  # ... or a name no model can have
    shutil.copytree(SHIPPED / "cello", evil)
    edit(evil, lambda raw: raw.update(name="../evil", version=9))
    assert published(store) == [2] and published(store, "violin") == published(store, "cello") == []
    assert store.resolve("default").manifest.version == 2 and store.resolve("violin").shipped
    with pytest.raises(KeyError, match="invalid model name"):
        store.resolve("../evil")
    # The next version is past every version-named directory, listed or not.
    assert store.publish(candidate(tmp_path, name="again")).manifest.version == 9


def test_versions_are_positive_and_zero_padded(tmp_path: Path) -> None:
    store = store_of(tmp_path)
    store.publish(candidate(tmp_path))
    for bad in ("0", "000000", "2", "0000002", "-00003", "00000x"):  # not %06d of a positive version
        d = store.root / "default" / bad
        shutil.copytree(SHIPPED / "default", d)
        edit(d, lambda raw, b=bad: raw.update(version=int(b) if b.lstrip("-").isdigit() else 3))
    stale = store.root / "default" / "000004"  # a version directory whose manifest claims another version
    shutil.copytree(SHIPPED / "default", stale)
    edit(stale, lambda raw: raw.update(version=40))
    assert published(store) == [2] and store.resolve("default").manifest.version == 2


# -- corrupt candidates ---------------------------------------------------------------------------------------
def test_corrupt_candidates_are_refused_with_the_reason(tmp_path: Path) -> None:
    store = store_of(tmp_path)
    truncated = candidate(tmp_path, name="truncated")
    (truncated / "model.json").write_text((SHIPPED / "default" / "model.json").read_text()[:200])
    refused(store, truncated, r"truncated/model.json: not valid JSON \(")
    garbage = candidate(tmp_path, name="garbage")
    (garbage / "model.json").write_bytes(b"\xff\xfe\x00garbage")
    refused(store, garbage, r"garbage/model.json: not UTF-8 text")
    deep = candidate(tmp_path, name="deep")
    (deep / "model.json").write_text("[" * 100_000)
    refused(store, deep, r"deep/model.json: JSON nested too deeply to be a manifest")
    refused(store, tmp_path / "nowhere", r"nowhere/model.json: no manifest")
    missing = candidate(tmp_path, name="missing")
    (missing / "model.onnx").unlink()
    refused(store, missing, r"missing/model.onnx: graph file named by field 'onnx.file' is missing")
    flipped = candidate(tmp_path, name="flipped")
    data = bytearray((flipped / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (flipped / "model.onnx").write_bytes(bytes(data))
    refused(store, flipped, r"flipped/model.onnx: sha256 .* does not match field 'onnx.sha256'")
    # Bytes that are not a model, with a checksum that matches them.
    noise = candidate(tmp_path, name="noise")
    (noise / "model.onnx").write_bytes(b"not an ONNX model\n" * 200)
    edit(noise, lambda raw: raw["onnx"].update(sha256=file_sha256(noise / "model.onnx")))
    refused(store, noise, r"noise/model.onnx: ONNX Runtime cannot load it")
    # A real graph that breaks the instrument contract: the composer's graph under an instrument manifest.
    swapped = candidate(tmp_path, name="swapped")
    shutil.copyfile(SHIPPED / "folk" / "model.onnx", swapped / "model.onnx")
    edit(swapped, lambda raw: raw["onnx"].update(sha256=file_sha256(swapped / "model.onnx")))
    refused(store, swapped, r"swapped/model.onnx: graph inputs .* do not match the manifest")
    assert published(store) == []


# -- the happy path -------------------------------------------------------------------------------------------
def test_publish_is_atomic_and_takes_the_next_version(tmp_path: Path) -> None:
    store = store_of(tmp_path)
    source = candidate(tmp_path, lambda raw: raw["onnx"].update(file="graph.onnx"))
    (source / "model.onnx").rename(source / "graph.onnx")
    first = store.publish(source)
    (store.root / "default" / "000003").mkdir()  # a broken version directory still takes its number
    second = store.publish(source)
    assert (first.manifest.version, second.manifest.version) == (2, 4)
    assert sorted(p.name for p in (store.root / "default").iterdir()) == ["000002", "000003", "000004"]
    assert sorted(p.name for p in second.directory.iterdir()) == ["model.json", "model.onnx"]
    assert file_sha256(second.directory / "model.onnx") == file_sha256(SHIPPED / "default" / "model.onnx")
    raw = json.loads((second.directory / "model.json").read_text())
    assert raw["version"] == 4 and raw["onnx"]["file"] == "model.onnx"
    assert store.resolve("default").directory == second.directory
    assert FrameModel(second.directory).manifest.version == 4
    # The checksum is checked again where the daemon loads it.
    (second.directory / "model.onnx").write_bytes((second.directory / "model.onnx").read_bytes()[:-1] + b"\0")
    with pytest.raises(ModelError, match=r"000004/model.onnx: sha256 .* does not match field 'onnx.sha256'"):
        FrameModel(second.directory)
