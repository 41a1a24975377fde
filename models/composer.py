"""The composer: a note-level LSTM that writes melodies one event (pitch or rest, duration) at a time.

Per step it reads the previous event as two tokens (pitch token, duration token; START for both at a
melody's beginning) and the next event's feature vector (bar position, key and mode, density, register,
metre; see streaming.notes.features), and predicts the next event's pitch and duration as two independent
distributions given the LSTM state: p(event) = p(pitch) * p(duration). All memory lives in the explicit
``h``/``c`` state, so the exported graph is pure and the same ``forward`` trains on crops and samples one
step at a time. This file also exports the model to ONNX and checks the export against torch.

ONNX contract (read by streaming.composer): inputs ``tokens`` int64 [B,T,2], ``features`` float32
[B,T,FEATURES], ``state_in.h`` / ``state_in.c`` float32 [L,B,H]; outputs ``pitch_logits`` [B,T,PITCH_TOKENS],
``duration_logits`` [B,T,len(DURATIONS)], ``state_out.h`` / ``state_out.c``. B and T are dynamic.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from wavecast.streaming.model import BATCH, GRAPH, file_sha256, session_options
from wavecast.streaming.notes import DURATIONS, FEATURES, PITCH_TOKENS, START

OPSET = 17
STATE_NAMES = ("h", "c")
INPUT_NAMES = ["tokens", "features", "state_in.h", "state_in.c"]
OUTPUT_NAMES = ["pitch_logits", "duration_logits", "state_out.h", "state_out.c"]


@dataclass(frozen=True)
class ComposerConfig:
    hidden: int = 256
    layers: int = 2
    pitch_embed: int = 64
    duration_embed: int = 16
    dropout: float = 0.1  # on the LSTM output, in training only

    def to_dict(self) -> dict:
        return asdict(self)


class Composer(nn.Module):
    def __init__(self, cfg: ComposerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.pitch_embed = nn.Embedding(PITCH_TOKENS + 1, cfg.pitch_embed)  # + START
        self.duration_embed = nn.Embedding(len(DURATIONS) + 1, cfg.duration_embed)  # START = PITCH_TOKENS
        self.lstm = nn.LSTM(cfg.pitch_embed + cfg.duration_embed + FEATURES, cfg.hidden, cfg.layers,
                            batch_first=True)
        self.drop = nn.Dropout(cfg.dropout)
        self.pitch_head = nn.Linear(cfg.hidden, PITCH_TOKENS)
        self.duration_head = nn.Linear(cfg.hidden, len(DURATIONS))

    def initial_state(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (self.cfg.layers, batch, self.cfg.hidden)
        return torch.zeros(shape), torch.zeros(shape)

    def forward(
        self, tokens: torch.Tensor, features: torch.Tensor, h: torch.Tensor, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """tokens [B,T,2] (previous pitch, previous duration), features [B,T,FEATURES], h/c [L,B,H]
        -> pitch logits [B,T,PITCH_TOKENS], duration logits [B,T,len(DURATIONS)], new h, new c."""
        # The START token shares one index for pitch and duration; the duration table keeps it as its last row.
        duration = torch.where(tokens[..., 1] == START, len(DURATIONS), tokens[..., 1])
        x = torch.cat([self.pitch_embed(tokens[..., 0]), self.duration_embed(duration), features], dim=-1)
        y, (h, c) = self.lstm(x, (h, c))
        y = self.drop(y)
        return self.pitch_head(y), self.duration_head(y), h, c


def event_nll(pitch_logits: torch.Tensor, duration_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log p(pitch) - log p(duration) per event [B,T], in nats; targets [B,T,2]."""
    lp = torch.log_softmax(pitch_logits, -1).gather(-1, targets[..., :1]).squeeze(-1)
    ld = torch.log_softmax(duration_logits, -1).gather(-1, targets[..., 1:]).squeeze(-1)
    return -(lp + ld)


def state_shapes(model: Composer) -> dict[str, list[int | str]]:
    c = model.cfg
    return {"h": [c.layers, BATCH, c.hidden], "c": [c.layers, BATCH, c.hidden]}


def export_onnx(model: Composer, directory: Path) -> dict:
    """Write `directory/model.onnx` with dynamic batch and time axes; returns the manifest's `onnx` block."""
    model = model.eval().cpu()
    batch, steps = 2, 3
    tokens = torch.full((batch, steps, 2), START, dtype=torch.int64)
    features = torch.zeros(batch, steps, FEATURES)
    dynamic = {"tokens": {0: "B", 1: "T"}, "features": {0: "B", 1: "T"},
               "pitch_logits": {0: "B", 1: "T"}, "duration_logits": {0: "B", 1: "T"}}
    for name in STATE_NAMES:
        dynamic[f"state_in.{name}"] = {1: "B"}
        dynamic[f"state_out.{name}"] = {1: "B"}
    path = directory / GRAPH
    with warnings.catch_warnings():  # it warns about LSTM batch sizes unless h0/c0 are inputs, which they are
        warnings.filterwarnings("ignore", message="Exporting a model to ONNX with a batch_size other than 1")
        torch.onnx.export(model, (tokens, features, *model.initial_state(batch)), str(path), dynamo=False,
                          opset_version=OPSET, input_names=INPUT_NAMES, output_names=OUTPUT_NAMES,
                          dynamic_axes=dynamic)
    return {"file": GRAPH, "sha256": file_sha256(path), "opset": OPSET}


def verify_parity(model: Composer, graph: Path, steps: int = 96, batch: int = 3, seed: int = 1) -> dict:
    """Run torch and ONNX Runtime side by side one step at a time on random tokens and features, carrying
    state in each; report the worst logit and state gaps."""
    model = model.eval().cpu()
    session = ort.InferenceSession(str(graph), session_options(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    pitch = rng.integers(0, PITCH_TOKENS, (batch, steps))
    duration = rng.integers(0, len(DURATIONS), (batch, steps))
    pitch[:, 0] = duration[:, 0] = START
    tokens = np.stack([pitch, duration], -1).astype(np.int64)
    features = rng.random((batch, steps, FEATURES), dtype=np.float32)
    t_state = model.initial_state(batch)
    o_state = [s.numpy() for s in t_state]
    logit_gap = state_gap = 0.0
    with torch.no_grad():
        for i in range(steps):
            tok, feat = tokens[:, i : i + 1], features[:, i : i + 1]
            t_pitch, t_dur, *t_state = model(torch.from_numpy(tok), torch.from_numpy(feat), *t_state)
            o_pitch, o_dur, *o_state = session.run(OUTPUT_NAMES, {
                "tokens": tok, "features": feat, "state_in.h": o_state[0], "state_in.c": o_state[1]})
            logit_gap = max(logit_gap, float(np.abs(t_pitch.numpy() - o_pitch).max()),
                            float(np.abs(t_dur.numpy() - o_dur).max()))
            state_gap = max(state_gap, *(float(np.abs(t.numpy() - o).max()) for t, o in zip(t_state, o_state,
                                                                                              strict=True)))
    return {"steps": steps, "batch": batch, "max_abs_logits": logit_gap, "max_abs_state": state_gap}
