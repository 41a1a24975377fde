"""`wavecast train composer`: parse the folk corpus, train the note LSTM, export to ONNX, verify, publish.

Read top to bottom. Each tune becomes per-event tokens (pitch, duration) and features (bar position, key,
density, register, metre; streaming.notes.features, exactly as the live sampler builds them). Training crops
are transposed by a random -6..+5 semitones; held-out tunes (whole tune families, 1 in 20, untransposed; see
models/corpus.py) measure the model's negative log-likelihood per event against a unigram and key-relative
Markov chains counted on the training tunes.
Training is resumable: a checkpoint is written every CHECKPOINT_EVERY steps into the work directory and
picked up again by the same command (same corpus, settings and model code).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from wavecast.models import composer, corpus, runs
from wavecast.models.composer import Composer, ComposerConfig, event_nll, export_onnx, state_shapes, verify_parity
from wavecast.models.runs import (
    CHECKPOINT_EVERY,
    PROGRESS_EVERY,
    Checkpoint,
    deliver,
    learning_rate,
    progress,
    timings,
    write_record,
)
from wavecast.models.store import NAME_RULE, POLICIES, default_name, default_work, valid_name
from wavecast.models.train import code_revision
from wavecast.streaming import notes
from wavecast.streaming.composer import ComposerModel
from wavecast.streaming.model import Manifest
from wavecast.streaming.notes import DURATIONS, FEATURES, MODES, PITCH_HIGH, PITCH_LOW, PITCH_TOKENS, START, Scale

PARITY_STEPS = 96
QUICK_TUNES = 50  # --quick: the first tunes of each of (at most) the first two collections
SHIFTS = range(-6, 6)  # transposition augmentation, semitones
START_CROP = 0.25  # share of training crops that begin at a tune's first event (from the START state)
EVAL_BATCH = 32


def log(msg: str) -> None:
    runs.log(msg)


@dataclass(frozen=True)
class Song:
    """One tune, untransposed, as arrays over its events."""

    midi: np.ndarray  # [n] int, -1 = rest
    durations: np.ndarray  # [n] duration tokens
    positions: np.ndarray  # [n] quarter notes from the start of the first bar to each event's onset
    bar: float
    scale: Scale
    density: float
    triple: bool

    @classmethod
    def of(cls, tune: corpus.Tune) -> Song:
        quarters = np.array([q for _, q in tune.events], float)
        onsets = tune.start + np.concatenate([[0.0], np.cumsum(quarters)[:-1]])
        return cls(np.array([-1 if m is None else m for m, _ in tune.events]),
                   np.array([notes.duration_token(q) for q in quarters]), onsets, tune.bar, Scale.parse(tune.scale),
                   notes.density_value(len(quarters) / quarters.sum()), tune.triple)

    def __len__(self) -> int:
        return len(self.midi)

    def sequence(self, shift: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Transposed by `shift` semitones (notes fold into range by octaves): inputs [n,2] (the previous
        event's tokens, START first), features [n,FEATURES] for each event, targets [n,2]."""
        pitch = np.array([0 if m < 0 else notes.pitch_token(int(m) + shift) for m in self.midi])
        targets = np.stack([pitch, self.durations], -1)
        inputs = np.concatenate([[[START, START]], targets[:-1]])
        sounding = [notes.token_midi(int(p)) for p in pitch if p]
        register = notes.register_value(float(np.median(sounding)))
        scale = Scale((self.scale.tonic + shift) % 12, self.scale.mode)
        feats = np.empty((len(self), FEATURES), np.float32)
        for i, pos in enumerate(self.positions):
            notes.features(feats[i], float(pos), self.bar, scale, self.density, register, self.triple)
        return inputs, feats, targets


def sample_batch(songs: list[Song], batch: int, length: int, rng: np.random.Generator
                 ) -> tuple[torch.Tensor, ...]:
    """Random transposed crops: inputs [B,L,2], features [B,L,F], targets [B,L,2], mask [B,L] (short tunes pad)."""
    sizes = np.array([len(s) for s in songs], float)
    picks = rng.choice(len(songs), size=batch, p=sizes / sizes.sum())  # every event about equally likely
    inputs = np.zeros((batch, length, 2), np.int64)
    feats = np.zeros((batch, length, FEATURES), np.float32)
    targets = np.zeros((batch, length, 2), np.int64)
    mask = np.zeros((batch, length), np.float32)
    for i, k in enumerate(picks):
        song = songs[k]
        first = 0 if rng.random() < START_CROP else int(rng.integers(0, max(1, len(song) - length + 1)))
        x, f, y = (a[first : first + length] for a in song.sequence(int(rng.choice(SHIFTS))))
        inputs[i, : len(x)], feats[i, : len(x)], targets[i, : len(x)], mask[i, : len(x)] = x, f, y, 1.0
    return tuple(torch.from_numpy(a) for a in (inputs, feats, targets, mask))


def model_nll(model: Composer, songs: list[Song], device: str) -> float:
    """Mean nats per held-out event, each tune read whole from the START token and zero state."""
    total, count = 0.0, 0
    order = sorted(songs, key=len)
    model.eval()
    with torch.no_grad():
        for lo in range(0, len(order), EVAL_BATCH):
            group = [s.sequence() for s in order[lo : lo + EVAL_BATCH]]
            n = max(len(x) for x, _, _ in group)
            inputs = torch.zeros((len(group), n, 2), dtype=torch.int64)
            feats = torch.zeros((len(group), n, FEATURES))
            targets = torch.zeros((len(group), n, 2), dtype=torch.int64)
            mask = torch.zeros((len(group), n))
            for i, (x, f, y) in enumerate(group):
                inputs[i, : len(x)], feats[i, : len(x)] = torch.from_numpy(x), torch.from_numpy(f)
                targets[i, : len(x)], mask[i, : len(x)] = torch.from_numpy(y), 1.0
            h, c = (s.to(device) for s in model.initial_state(len(group)))
            pitch, duration, _, _ = model(inputs.to(device), feats.to(device), h, c)
            total += float((event_nll(pitch, duration, targets.to(device)) * mask.to(device)).sum())
            count += int(mask.sum())
    model.train()
    return total / count


MARKOV_ORDER = 3
MARKOV_WEIGHTS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)  # Witten-Bell weights tried; the held-out's best is kept
RELATIVE = PITCH_TOKENS + 11  # key-relative pitch symbols: 0 rest, pitch token - tonic pitch class + 11


class Markov:
    """An interpolated Witten-Bell n-gram over symbols 0..size-1 (histories padded with `size`, the start):
    p_k(x | h) = (c(h, x) + w t(h) p_{k-1}(x | h')) / (c(h) + w t(h)), t(h) the distinct symbols seen
    after h, down to an add-one unigram."""

    def __init__(self, order: int, size: int) -> None:
        self.order, self.size = order, size
        self.counts: list[dict[tuple[int, ...], np.ndarray]] = [{} for _ in range(order + 1)]

    def fit(self, sequences: list[np.ndarray]) -> None:
        for seq in sequences:
            padded = [self.size] * self.order + [int(x) for x in seq]
            for i in range(self.order, len(padded)):
                for k in range(self.order + 1):
                    table = self.counts[k].setdefault(tuple(padded[i - k : i]), np.zeros(self.size))
                    table[padded[i]] += 1.0

    def probabilities(self, history: list[int], weight: float, order: int) -> np.ndarray:
        """p(x | the last `order` symbols of `history`) for every x (`order` up to the fitted one)."""
        padded = [self.size] * order + history
        p = (self.counts[0][()] + 1.0) / (self.counts[0][()].sum() + self.size)
        for k in range(1, order + 1):
            c = self.counts[k].get(tuple(padded[len(padded) - k :]))
            if c is not None:
                w = weight * np.count_nonzero(c)
                p = (c + w * p) / (c.sum() + w)
        return p


def _relative(song: Song) -> np.ndarray:
    """The tune's pitches relative to its tonic's pitch class (0 = rest): the same melody in any key reads
    the same."""
    return np.array([0 if m < 0 else notes.pitch_token(int(m)) - song.scale.tonic + 11 for m in song.midi])


def baseline_nll(train: list[Song], heldout: list[Song]) -> dict:
    """Held-out nats per event of count models on the untransposed training tunes: key-relative Markov
    chains p(pitch relative to the tonic | the previous ones) p(duration | the previous ones) of order 0
    (add-one unigram), 2 and 3, interpolated down to the unigram (Witten-Bell). A chain's pitch distribution
    is renormalised over the pitches the vocabulary holds in the tune's key. Each chain's weight is the one
    that suits the held-out tunes best, which favours the baselines."""
    pitch_chain, duration_chain = Markov(MARKOV_ORDER, RELATIVE), Markov(MARKOV_ORDER, len(DURATIONS))
    pitch_chain.fit([_relative(s) for s in train])
    duration_chain.fit([s.durations for s in train])
    tokens = np.arange(1, PITCH_TOKENS)
    events = int(sum(len(s) for s in heldout))
    out: dict = {"heldout_events": events}
    for order in (0, 2, MARKOV_ORDER):
        nll = []
        for weight in MARKOV_WEIGHTS[:1] if order == 0 else MARKOV_WEIGHTS:
            total = 0.0
            for song in heldout:
                relative, durations = _relative(song).tolist(), [int(d) for d in song.durations]
                # each pitch token's key-relative symbol in this tune's key (the rest stays 0)
                symbol = np.concatenate([[0], tokens - song.scale.tonic + 11])
                for i, m in enumerate(song.midi):
                    p = pitch_chain.probabilities(relative[:i], weight, order)[symbol]
                    q = duration_chain.probabilities(durations[:i], weight, order)
                    target = 0 if m < 0 else notes.pitch_token(int(m))
                    total -= math.log(p[target] / p.sum()) + math.log(q[durations[i]])
            nll.append((total / events, weight))
        best = min(nll)
        out["unigram_nll" if order == 0 else f"markov{order}_nll"] = best[0]
        if order:
            out[f"markov{order}_weight"] = best[1]
    return out


def run(args: argparse.Namespace, argv: list[str]) -> Path:
    started, revision = time.time(), code_revision()  # the code this run starts with
    args.name = args.name or default_name("composer", args.quick)
    if not valid_name(args.name):  # refused before the training run, not at publish time after it
        raise SystemExit(f"error: --name '{args.name}' is not a model name: use {NAME_RULE}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    steps = args.steps or (600 if args.quick else 4000)
    args.hidden = args.hidden or (128 if args.quick else 256)
    args.lr = args.lr or (0.008 if args.quick else 0.003)
    batch = args.batch or (16 if args.quick else 32)
    length = args.length or (32 if args.quick else 64)
    collections = tuple(args.collections)[:2] if args.quick else tuple(args.collections)
    limit = QUICK_TUNES if args.quick else None
    work = args.work or default_work()
    corpus_key = corpus.cache_key(collections, limit)
    log(f"corpus: music21 {', '.join(collections)}" + (f", first {limit} tunes each" if limit else "")
        + f" (cache {corpus_key})")
    runs.report("data")
    tunes = corpus.load(collections, limit, cache_dir=work / "data", progress=lambda line: log(f"corpus: {line}"))
    held = corpus.heldout_split(tunes)
    train = [Song.of(t) for t, h in zip(tunes, held, strict=True) if not h]
    heldout = [Song.of(t) for t, h in zip(tunes, held, strict=True) if h]
    log(f"corpus: {len(train)} training tunes ({sum(map(len, train))} events), {len(heldout)} held out "
        f"({sum(map(len, heldout))} events)")

    cfg = ComposerConfig(hidden=args.hidden)
    model = Composer(cfg).to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    model_code = hashlib.sha256(Path(composer.__file__).read_bytes()).hexdigest()[:12]
    settings = {"corpus": corpus_key, "model": cfg.to_dict(), "model_code": model_code, "steps": steps,
                "batch": batch, "length": length, "lr": args.lr, "seed": args.seed}
    checkpoint = Checkpoint(work, args.name, settings)
    first, history, earlier_seconds = checkpoint.resume(model, optimizer, args.device)
    if first:
        log(f"resuming from {checkpoint.path} at step {first}")

    rng = np.random.default_rng(args.seed + first)
    t0, last = time.time(), first
    model.train()
    for step in range(first, steps):
        lr = learning_rate(step, steps, args.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        inputs, feats, targets, mask = (t.to(args.device) for t in sample_batch(train, batch, length, rng))
        h, c = (s.to(args.device) for s in model.initial_state(batch))
        pitch, duration, _, _ = model(inputs, feats, h, c)
        loss = (event_nll(pitch, duration, targets) * mask).sum() / mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        history.append(loss.item())
        done = step + 1
        if done % PROGRESS_EVERY == 0 or done == steps:
            rate = (time.time() - t0) / (done - last)
            log(progress(done, steps, history, lr, rate, " nats/event"))
        if done % CHECKPOINT_EVERY == 0 or done == steps:  # the last one too: a failed export resumes here
            checkpoint.save(model, optimizer, done, history, earlier_seconds + time.time() - started)

    trained_at = time.time()
    log(f"held-out NLL on {len(heldout)} tunes, against unigram and key-relative Markov baselines")
    baselines = baseline_nll(train, heldout)
    nll = model_nll(model, heldout, args.device)
    ratio = nll / baselines["markov3_nll"]
    log(f"held-out nats/event: model {nll:.4f}, unigram {baselines['unigram_nll']:.4f}, order-2 Markov "
        f"{baselines['markov2_nll']:.4f}, order-3 {baselines['markov3_nll']:.4f} (ratio {ratio:.3f})")

    model = model.cpu().eval()
    runs.report("export")
    with tempfile.TemporaryDirectory(prefix="wavecast-export-") as tmp:
        candidate = Path(tmp)
        onnx = export_onnx(model, candidate)
        runs.report("verify")
        log(f"verifying: torch vs ONNX Runtime over {PARITY_STEPS} stateful steps")
        parity = verify_parity(model, candidate / onnx["file"], steps=PARITY_STEPS)
        log(f"parity max |torch-ORT| logits {parity['max_abs_logits']:.2e}")
        verification = {
            "parity": parity,
            "quality": {"nll": nll, **baselines, "nll_ratio_to_markov3": ratio,
                        "heldout": "whole tune families (the same melody in any key, edition or collection, "
                                   "models/corpus.py), one in 20 by a hash of their content",
                        "baselines": "counted on the untransposed training tunes: add-one unigram, key-relative "
                                     "Markov chains of order 2 and 3 interpolated down to it (Witten-Bell, the "
                                     "weight that suits the held-out tunes best)"},
            **POLICIES["composer"].record(),
        }
        final = {
            "name": args.name, "version": 1, "kind": "composer", "controls": [],
            "states": [{"name": k, "shape": v} for k, v in state_shapes(model).items()], "onnx": onnx,
            "vocabulary": {"pitch_low": PITCH_LOW, "pitch_high": PITCH_HIGH, "durations": list(DURATIONS),
                           "features": FEATURES, "modes": list(MODES)},
            "source": {"corpus": f"music21 {corpus_version()}",
                       "collections": {name: corpus.COLLECTIONS[name].licence for name in collections},
                       "tunes": len(tunes), "heldout_tunes": len(heldout)},
            "training": {
                "command": " ".join(["wavecast", *argv]), "model": cfg.to_dict(), "steps": steps, "batch": batch,
                "length": length, "lr": args.lr, "seed": args.seed, "augmentation": "transpose -6..+5 semitones",
                "seconds": round(earlier_seconds + time.time() - started, 1), "device": args.device,
                "final_loss": float(np.mean(history[-PROGRESS_EVERY:])), "code_revision": revision,
                "torch": torch.__version__,
                "corpus_cache_key": corpus_key,
            },
            "verification": verification,
        }
        Manifest.from_dict(final, "candidate")  # the fields the loader needs, checked before anything is written
        (candidate / "model.json").write_text(json.dumps(final, indent=2) + "\n")
        write_record(candidate, final, history, timings(started, t0, trained_at, first, steps), "nats per event", nll)
        where, done = deliver(candidate, "composer", work, args.name, args.out, args.store, ComposerModel,
                              "train longer with --steps, or use more tunes")
    checkpoint.remove()  # the run is complete; a rerun starts afresh
    log(f"{done} in {time.time() - started:.0f} s")
    return where


def corpus_version() -> str:
    import music21

    return str(music21.__version__)
