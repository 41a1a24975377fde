"""`wavecast train composer`: corpus, training, export, verification and the publish gate, for real."""

from __future__ import annotations

import json
import math
import subprocess
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, wavecast_command
from wavecast.models.store import ModelStore, gate
from wavecast.streaming.model import ModelError

# Only the tests that train or export need torch; the publish gate is the daemon's and runs without it.
needs_torch = pytest.mark.skipif(find_spec("torch") is None, reason="training needs the 'train' extra: ./install train")


def composer_verification(nll: float, markov: float, parity: float = 1e-6) -> dict:
    return {"parity": {"max_abs_logits": parity, "steps": 96}, "parity_limit": 1e-4,
            "quality": {"nll": nll, "unigram_nll": 4.0, "markov3_nll": markov, "nll_ratio_to_markov3": nll / markov},
            "thresholds": {"nll_ratio_to_markov3": ["below", 1.0]}}


def test_gate_refuses_a_composer_that_does_not_beat_the_markov_chain() -> None:
    assert gate(composer_verification(2.0, 3.0), "composer") == []
    problems = gate(composer_verification(3.0, 3.0), "composer")
    assert len(problems) == 1 and problems[0].startswith("nll_ratio_to_markov3")
    assert any(p.startswith("parity: max_abs_logits") for p in gate(composer_verification(2.0, 3.0, 1e-3),
                                                                     "composer"))
    # A composer's block has no pitch check and no audio parity; read as an instrument's it fails on both.
    assert {p.split(":")[0] for p in gate(composer_verification(2.0, 3.0), "instrument")} >= {"parity", "pitch"}


@needs_torch
def test_song_sequence_shifts_one_event_and_transposes() -> None:
    from wavecast.models.corpus import Tune
    from wavecast.models.train_composer import Song
    from wavecast.streaming.notes import FEATURES, PITCH_TOKENS, START, duration_token, pitch_token

    tune = Tune("t#1", "miscFolk", "D dorian", "6/8", 3.0, 2.5,
                [(62, 0.5), (64, 0.5), (None, 1.0), (93, 1.5), (65, 0.5)])
    inputs, feats, targets = Song.of(tune).sequence(shift=5)
    assert inputs.tolist()[0] == [START, START] and (inputs[1:] == targets[:-1]).all()
    assert targets[:, 0].tolist() == [pitch_token(67), pitch_token(69), 0, pitch_token(86), pitch_token(70)]
    assert targets[2, 1] == duration_token(1.0) and targets.max() < PITCH_TOKENS
    assert feats.shape == (5, FEATURES)
    assert feats[0, 3 + 7] == 1.0  # D dorian up a fourth is G dorian
    assert math.isclose(feats[1, 2], 0.0)  # 2.5 + 0.5 quarters: the first event of the next bar
    assert feats[0, -1] == 1.0  # 6/8 is a triple metre


@needs_torch
def test_export_matches_torch_step_by_step(tmp_path: Path) -> None:
    from wavecast.models.composer import Composer, ComposerConfig, export_onnx, verify_parity

    model = Composer(ComposerConfig(hidden=32, layers=2, pitch_embed=8, duration_embed=4))
    onnx = export_onnx(model, tmp_path)
    parity = verify_parity(model, tmp_path / onnx["file"], steps=64)
    assert parity["steps"] == 64 and parity["batch"] == 3
    assert parity["max_abs_logits"] < 1e-5 and parity["max_abs_state"] < 1e-5


@needs_torch
@pytest.mark.slow
def test_quick_training_writes_a_verified_composer(tmp_path: Path) -> None:
    from wavecast.streaming.composer import ComposerModel
    from wavecast.streaming.notes import DURATIONS, FEATURES, PITCH_TOKENS, START

    out, work = tmp_path / "out", tmp_path / "work"
    cmd = [*wavecast_command(), "train", "composer", "--quick", "--threads", "1", "--work", str(work),
           "--out", str(out)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"wrote {out}" in result.stderr
    model = ComposerModel(out)
    m = model.manifest
    assert m.kind == "composer" and m.name == "quick-folk"
    assert json.loads((out / "model.json").read_text())["version"] == 1
    assert m.training["command"].startswith("wavecast train composer --quick")
    assert m.training["steps"] > 0 and m.training["code_revision"] and m.training["corpus_cache_key"]
    assert m.source["corpus"].startswith("music21 ") and m.source["heldout_tunes"] >= 1
    assert all("public-domain" in licence for licence in m.source["collections"].values())
    v = m.verification
    assert v["parity"]["steps"] >= 64 and v["parity"]["batch"] == 3 and v["parity"]["max_abs_logits"] < 1e-4
    q = v["quality"]
    assert all(math.isfinite(q[k]) for k in ("nll", "unigram_nll", "markov2_nll", "markov3_nll"))
    assert q["nll"] < q["markov3_nll"] < q["unigram_nll"] and q["markov2_nll"] < q["unigram_nll"]
    assert q["heldout_events"] > 0
    assert gate(v, "composer") == []
    # One step from the START state, as the sampler begins a melody.
    tokens = np.full((2, 1, 2), START, np.int64)
    pitch, duration, states = model.run(tokens, np.zeros((2, 1, FEATURES), np.float32),
                                        {s.name: np.zeros(s.concrete(2), np.float32) for s in m.states})
    assert pitch.shape == (2, 1, PITCH_TOKENS) and duration.shape == (2, 1, len(DURATIONS))
    assert np.isfinite(pitch).all() and set(states) == {"h", "c"}
    assert list((work / "runs").glob("quick-folk-*.pt")) == []  # a finished run leaves no checkpoint behind
    # Publishing checks it through the composer contract; one that does not beat the Markov chain is refused.
    store = ModelStore(tmp_path / "store", shipped=tmp_path / "no-shipped")
    entry = store.publish(out)
    assert entry.manifest.kind == "composer" and entry.manifest.version == 1
    ComposerModel(entry.directory)
    raw = json.loads((out / "model.json").read_text())
    raw["verification"]["quality"]["nll_ratio_to_markov3"] = 1.02
    (out / "model.json").write_text(json.dumps(raw))
    with pytest.raises(ModelError, match="nll_ratio_to_markov3"):
        store.publish(out)
