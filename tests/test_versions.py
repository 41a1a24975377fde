"""A model's versions are the user's to choose: rollback, pinned NAME@VERSION, delete (never the current, a shipped
or a playing version), the training log and curve beside each version, and quick runs under their own name. Real
files (shipped models published into a tmp store), real ONNX Runtime, a real daemon and the real CLI."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, Server, start_server, stop_server, wavecast_command
from wavecast.daemon.cli import build_parser
from wavecast.models.store import SHIPPED, InvalidModelName, ModelStore, UnknownVersion, VersionRefused, default_name
from wavecast.streaming.composer import ComposerModel
from wavecast.streaming.model import FrameModel, Manifest

PNG = b"\x89PNG\r\n\x1a\n"


def publish(store: ModelStore, tmp: Path, model: str, marker: int) -> int:
    """Publish a copy of shipped `model` whose manifest carries `marker` (training.marker), so each version can be
    told from the others; returns the new version."""
    directory = tmp / f"{model}-{marker}"
    shutil.copytree(SHIPPED / model, directory)
    raw = json.loads((directory / "model.json").read_text())
    raw["training"]["marker"] = marker
    (directory / "model.json").write_text(json.dumps(raw))
    return store.publish(directory).manifest.version


def marker(store: ModelStore, ref: str) -> int | None:
    return store.resolve(ref).manifest.training.get("marker")


def versions(store: ModelStore, name: str) -> list[tuple[int, bool, bool]]:
    """(version, current, shipped) of each version."""
    return [(v.entry.manifest.version, v.current, v.entry.shipped) for v in store.versions(name)]


# -- the store ------------------------------------------------------------------------------------------------
def test_rollback_makes_an_earlier_version_current_and_a_publish_the_new_one(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    assert [publish(store, tmp_path, "violin", n) for n in (2, 3)] == [2, 3]
    assert versions(store, "violin") == [(1, False, True), (2, False, False), (3, True, False)]
    assert store.rollback("violin").manifest.version == 2
    # Every reader sees it, in this process and another store object alike; the graph loads as the daemon loads it.
    for s in (store, ModelStore(tmp_path / "store")):
        assert marker(s, "violin") == 2 and s.latest()["violin"].manifest.version == 2
    assert FrameModel(store.resolve("violin").directory).manifest.version == 2
    assert (store.root / "violin" / "current").read_text() == "2\n"
    assert store.rollback("violin").shipped  # back to the shipped version 1
    with pytest.raises(VersionRefused, match=r"version 1 is the oldest version of 'violin'.*versions: 1, 2, 3") as e:
        store.rollback("violin")
    assert e.value.code == "no_earlier_version"
    assert store.rollback("violin", 3).manifest.version == 3
    with pytest.raises(UnknownVersion, match=r"'violin' has no version 7 \(its versions: 1, 2, 3\)"):
        store.rollback("violin", 7)
    store.rollback("violin", 2)
    assert publish(store, tmp_path, "violin", 4) == 4  # a new version is current again
    assert versions(store, "violin")[-1] == (4, True, False) and marker(store, "violin") == 4
    assert not (store.root / "violin" / "current").exists()
    assert not [p for p in (store.root / "violin").iterdir() if p.name.startswith(".")]  # no temp file left


def test_a_pinned_reference_resolves_to_exactly_that_version(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    for n in (2, 3):
        publish(store, tmp_path, "violin", n)
    store.rollback("violin", 2)
    assert [marker(store, f"violin@{n}") for n in (2, 3)] == [2, 3]  # current is 2; @3 still means 3
    assert store.resolve("violin@1").shipped and store.resolve("violin@1").directory == SHIPPED / "violin"
    assert FrameModel(store.resolve("violin@3").directory).manifest.version == 3
    assert store.resolve("folk@1").manifest.kind == "composer"
    for ref in ("violin@9", "violin@0", "violin@x", "violin@", "violin@-1"):
        with pytest.raises(UnknownVersion, match=r"'violin' has no version .*\(its versions: 1, 2, 3\); pin one as "
                                                 r"violin@VERSION") as e:
            store.resolve(ref)
        assert "None" not in str(e.value)
    with pytest.raises(InvalidModelName, match=r"invalid model name 'Violin'"):
        store.resolve("Violin@2")
    with pytest.raises(KeyError, match=r"unknown model 'viola'"):
        store.resolve("viola@1")


def test_delete_refuses_the_current_and_a_shipped_version_and_never_reuses_a_number(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    for n in (2, 3):
        publish(store, tmp_path, "violin", n)
    with pytest.raises(VersionRefused, match=r"version 3 of 'violin' is its current version; make another current "
                                             r"first \(wavecast models rollback violin 2") as e:
        store.delete("violin", 3)
    assert e.value.code == "version_current"
    with pytest.raises(VersionRefused, match=r"version 1 of 'violin' ships with wavecast") as e:
        store.delete("violin", 1)
    assert e.value.code == "version_shipped" and (SHIPPED / "violin" / "model.onnx").is_file()
    with pytest.raises(UnknownVersion, match=r"'violin' has no version 5"):
        store.delete("violin", 5)
    store.rollback("violin")
    gone = store.delete("violin", 3)
    assert not gone.directory.exists() and versions(store, "violin") == [(1, False, True), (2, True, False)]
    with pytest.raises(UnknownVersion):
        store.resolve("violin@3")
    # violin@3 named one model; a new version takes 4, never 3 again.
    assert publish(store, tmp_path, "violin", 4) == 4
    assert sorted(p.name for p in (store.root / "violin").iterdir()) == [".deleted-000003", "000002", "000004"]


def test_the_only_version_of_a_model_is_not_deleted(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store", shipped=tmp_path / "no-shipped")
    publish(store, tmp_path, "cello", 1)
    with pytest.raises(VersionRefused, match=r"it is its only version; to remove the model itself, delete .*cello"):
        store.delete("cello", 1)
    assert versions(store, "cello") == [(1, True, False)]


# -- quick runs -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, name", [
    (["train", "instrument", "--quick"], "quick"),
    (["train", "instrument", "--quick", "--instrument", "violin"], "quick-violin"),
    (["train", "composer", "--quick"], "quick-folk"),
    (["train", "instrument"], "default"),
    (["train", "instrument", "--instrument", "cello"], "cello"),
    (["train", "composer"], "folk"),
])
def test_a_quick_run_publishes_under_its_own_name(argv: list[str], name: str) -> None:
    args = build_parser().parse_args(argv)
    assert args.name is None  # no --name: the run takes the default below (models/train*.py: run)
    assert default_name(args.what, args.quick, getattr(args, "instrument", None)) == name
    assert build_parser().parse_args([*argv, "--name", "mine"]).name == "mine"


def test_a_runs_log_and_curve_are_real_files(tmp_path: Path) -> None:
    record = training_record(tmp_path / "cand", [0.9, float("nan"), *[0.8 - i / 200 for i in range(60)]])
    log = json.loads((record / "training.json").read_text())  # JSON has no NaN: a non-finite loss is null
    assert log["loss"][:2] == [0.9, None] and len(log["loss"]) == 62 and log["heldout_loss"] == 0.5
    assert log["settings"]["steps"] == 62 and log["timings"]["resumed_at_step"] == 0
    assert log["timings"]["seconds_per_step"] > 0 and log["unit"] == "spectral loss"
    assert (record / "curve.png").read_bytes().startswith(PNG)


def training_record(directory: Path, history: list[float]) -> Path:
    """A copy of the shipped violin with the training log and curve a run writes (models.runs, which needs torch)."""
    pytest.importorskip("torch", reason="the training log is written by models.runs: ./install train")
    from wavecast.models.runs import timings, write_record

    shutil.copytree(SHIPPED / "violin", directory)
    manifest = json.loads((directory / "model.json").read_text())
    manifest["training"] |= {"steps": len(history), "seconds": 12.5}
    now = time.time()
    write_record(directory, manifest, history, timings(now - 12.5, now - 10.0, now - 2.0, 0, len(history)),
                 "spectral loss", 0.5)
    return directory


# -- the API ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, ModelStore]]:
    tmp = tmp_path_factory.mktemp("versions")
    store = ModelStore(tmp / "store")  # the store start_server gives the daemon
    for n in (2, 3):
        publish(store, tmp, "violin", n)
    publish(store, tmp, "folk", 2)
    server = start_server(tmp)
    yield server, store
    stop_server(server)


def fetch(server: Server, path: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(server.url + path, timeout=30) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read()


def error(server: Server, method: str, path: str, body: object = None) -> tuple[int, str, str]:
    status, reply = server.request(method, path, body)
    assert "None" not in reply["error"]["message"]
    return status, reply["error"]["code"], reply["error"]["message"]


def test_the_api_lists_versions_and_rolls_back(daemon: tuple[Server, ModelStore]) -> None:
    server, _ = daemon
    status, listed = server.request("GET", "/v1/models/violin/versions")
    assert status == 200 and listed["name"] == "violin" and listed["current"] == 3
    assert [(v["version"], v["current"], v["shipped"]) for v in listed["versions"]] == [
        (1, False, True), (2, False, False), (3, True, False)]
    first, shipped = listed["versions"][0], Manifest.read(SHIPPED / "violin" / "model.json")
    assert first["training"]["steps"] == shipped.training["steps"] and first["links"] == {}
    assert server.request("POST", "/v1/models/violin/rollback", {}) == (
        200, {"name": "violin", "version": 2, "previous": 3})
    status, model = server.request("GET", "/v1/models/violin")
    assert status == 200 and model["version"] == 2 and model["training"]["marker"] == 2
    assert model["links"] == {"versions": "/v1/models/violin/versions"}
    status, stream = server.request("POST", "/v1/streams", {"model": "violin", "seed": 1})
    assert status == 201 and stream["version"] == 2  # new streams play the current version
    server.request("DELETE", f"/v1/streams/{stream['id']}")
    assert server.request("GET", "/v1/models/violin@3")[1]["version"] == 3  # pinned
    assert server.request("POST", "/v1/models/violin/rollback", {"version": 3})[1]["version"] == 3
    assert error(server, "POST", "/v1/models/violin/rollback", {"version": 9})[:2] == (404, "unknown_version")
    assert error(server, "POST", "/v1/models/violin/rollback", {"version": "2"})[:2] == (422, "invalid_request")
    assert error(server, "POST", "/v1/models/nope/rollback", {})[:2] == (404, "unknown_model")
    status, code, message = error(server, "POST", "/v1/models/cello/rollback", {})
    assert (status, code) == (409, "no_earlier_version") and "oldest version of 'cello'" in message
    assert error(server, "GET", "/v1/models/nope/versions")[:2] == (404, "unknown_model")


def test_the_api_deletes_only_a_version_nothing_plays(daemon: tuple[Server, ModelStore]) -> None:
    server, store = daemon
    status, stream = server.request("POST", "/v1/streams", {"model": "violin", "seed": 2})
    assert status == 201 and stream["version"] == 3
    server.request("POST", "/v1/models/violin/rollback", {"version": 2})  # the stream stays on 3
    status, code, message = error(server, "DELETE", "/v1/models/violin/versions/3")
    assert (status, code) == (409, "version_in_use") and stream["id"] in message and "DELETE /v1/streams/" in message
    status, code, message = error(server, "DELETE", "/v1/models/violin/versions/2")
    assert (status, code) == (409, "version_current") and "rollback" in message
    status, code, message = error(server, "DELETE", "/v1/models/violin/versions/1")
    assert (status, code) == (409, "version_shipped") and "ships with wavecast" in message
    for version in ("9", "abc", "0", "-1"):
        assert error(server, "DELETE", f"/v1/models/violin/versions/{version}")[:2] == (404, "unknown_version")
    assert server.request("GET", f"/v1/streams/{stream['id']}")[1]["state"] != "failed"
    server.request("DELETE", f"/v1/streams/{stream['id']}")
    assert server.request("DELETE", "/v1/models/violin/versions/3") == (
        200, {"name": "violin", "version": 3, "deleted": True})
    assert [v["version"] for v in server.request("GET", "/v1/models/violin/versions")[1]["versions"]] == [1, 2]
    assert error(server, "GET", "/v1/models/violin@3")[:2] == (404, "unknown_version")
    # A composer in use counts too: a composed stream of folk v2 keeps it.
    status, composed = server.request("POST", "/v1/streams", {"model": "violin", "composer": "folk", "seed": 3})
    assert status == 201 and composed["composer_version"] == 2
    server.request("POST", "/v1/models/folk/rollback", {})
    assert error(server, "DELETE", "/v1/models/folk/versions/2")[:2] == (409, "version_in_use")
    server.request("DELETE", f"/v1/streams/{composed['id']}")
    assert server.request("DELETE", "/v1/models/folk/versions/2")[0] == 200
    assert ComposerModel(store.resolve("folk").directory).manifest.version == 1


def test_the_training_log_and_curve_are_served_beside_their_version(
        daemon: tuple[Server, ModelStore], tmp_path: Path) -> None:
    server, store = daemon
    for file in ("curve.png", "training.json"):  # the shipped models were trained before logs were kept
        status, _, body = fetch(server, f"/v1/models/violin/versions/1/{file}")
        assert status == 404 and json.loads(body)["error"]["code"] == "no_training_record"
    assert fetch(server, "/v1/models/violin/versions/9/curve.png")[0] == 404
    history = [1.0 - i / 100 for i in range(50)]
    entry = store.publish(training_record(tmp_path / "cand", history))  # the running daemon sees it at once
    v = entry.manifest.version
    assert sorted(p.name for p in entry.directory.iterdir()) == ["curve.png", "model.json", "model.onnx",
                                                                 "training.json"]
    status, kind, png = fetch(server, f"/v1/models/violin/versions/{v}/curve.png")
    assert (status, kind) == (200, "image/png") and png.startswith(PNG)
    assert png == (entry.directory / "curve.png").read_bytes()
    status, kind, raw = fetch(server, f"/v1/models/violin/versions/{v}/training.json")
    assert (status, kind) == (200, "application/json")
    assert all(math.isclose(a, b) for a, b in zip(json.loads(raw)["loss"], history, strict=True))
    links = {"curve": f"/v1/models/violin/versions/{v}/curve.png",
             "training_log": f"/v1/models/violin/versions/{v}/training.json"}
    status, model = server.request("GET", "/v1/models/violin")
    assert model["version"] == v and model["links"] == {"versions": "/v1/models/violin/versions", **links}
    listed = server.request("GET", "/v1/models/violin/versions")[1]["versions"]
    assert listed[-1]["links"] == links and listed[-1]["files"] == ["training.json", "curve.png"]


def test_the_openapi_document_lists_the_version_routes(daemon: tuple[Server, ModelStore]) -> None:
    server, _ = daemon
    paths = server.request("GET", "/v1/openapi.json")[1]["paths"]
    versions = "/v1/models/{name}/versions"
    assert set(paths[versions]) == {"get"} and set(paths["/v1/models/{name}/rollback"]) == {"post"}
    delete = paths[versions + "/{version}"]["delete"]
    assert {"404", "409"} <= set(delete["responses"])
    assert {p["name"] for p in delete["parameters"]} == {"name", "version"}
    rollback = paths["/v1/models/{name}/rollback"]["post"]
    assert rollback["requestBody"]["content"]["application/json"]["schema"]["properties"]["version"]["minimum"] == 1
    curve = paths[versions + "/{version}/curve.png"]["get"]
    assert "image/png" in curve["responses"]["200"]["content"]
    assert "get" in paths[versions + "/{version}/training.json"]


# -- the CLI ----------------------------------------------------------------------------------------------------
def wavecast(store: Path, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([*wavecast_command(), "models", *argv, "--store", str(store)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_the_cli_lists_rolls_back_and_deletes_without_a_daemon(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    for n in (2, 3):
        publish(store, tmp_path, "violin", n)
    done = wavecast(store.root, "rollback", "violin")
    assert done.returncode == 0 and "'violin': version 2 is current (was 3)" in done.stderr
    assert marker(store, "violin") == 2
    listed = json.loads(wavecast(store.root, "versions", "violin", "--json").stdout)
    assert [(v["version"], v["current"]) for v in listed] == [(1, False), (2, True), (3, False)]
    table = wavecast(store.root, "versions", "violin").stdout.splitlines()
    assert table[2].split()[:2] == ["2", "*"] and "000002" in table[2]
    refused = wavecast(store.root, "delete", "violin", "2")
    assert refused.returncode == 2 and "is its current version; make another current first" in refused.stderr
    assert wavecast(store.root, "rollback", "violin", "3").returncode == 0 and marker(store, "violin") == 3
    assert wavecast(store.root, "delete", "violin", "2").returncode == 0
    assert versions(store, "violin") == [(1, False, True), (3, True, False)]
    missing = wavecast(store.root, "rollback", "violin", "8")
    assert missing.returncode == 2 and "error: 'violin' has no version 8 (its versions: 1, 3)" in missing.stderr
    assert "violin" in wavecast(store.root).stdout  # without an action it lists the models, as before
