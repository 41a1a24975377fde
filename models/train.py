"""`wavecast train instrument`: render data, train, export to ONNX, verify, publish. Read top to bottom.

Training is resumable: a checkpoint is written every CHECKPOINT_EVERY steps into the work directory and
picked up again by the same command (same recipe, settings and model code).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from wavecast.models import corpus, data, instrument, quality, runs
from wavecast.models.export import export_onnx, state_shapes, verify_parity, verify_pitch
from wavecast.models.instrument import Instrument, InstrumentConfig
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
from wavecast.models.store import NAME_RULE, POLICIES, ModelStore, default_name, default_work, valid_name
from wavecast.streaming.model import FrameModel, Manifest, ModelError
from wavecast.streaming.notes import MIDDLE_BRIGHTNESS, midi_hz

PITCH_CHECKS = (55.0, 110.0, 220.0, 440.0, 880.0, 1760.0)  # Hz, those inside the model's f0 range
# One-pole time constant of f0 and loudness changes. bench/engine.py counts no clicks from 30-40 dB and
# octave steps at any constant from 0 to 30 ms (the graph ramps amplitudes across a frame and keeps the
# phase); 10 ms still glides a slider's steps and is heard 2.4 frames sooner than 30 ms was.
CONTROL_SMOOTHING_SECONDS = 0.01
ONSET_LEAD = 5  # frames of what sounded before a note that an onset crop (`--crops onset`) starts with
# The note's velocity over the data's range (models/data.py `brightness_of`); its default is the middle of the
# data's velocities, and it glides as f0 and loudness do.
BRIGHTNESS_CONTROL = {"name": "brightness", "unit": "", "min": 0.0, "max": 1.0,
                      "default": MIDDLE_BRIGHTNESS, "smoothing": CONTROL_SMOOTHING_SECONDS}


def log(msg: str) -> None:
    runs.log(msg)


def code_revision() -> str:
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here.parent,
                               capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev.stdout.strip() + ("+dirty" if dirty else "")


def spectral_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Multi-scale spectral loss: L1 of linear and of log magnitudes over several FFT sizes."""
    loss = pred.new_zeros(())
    for n in quality.FFT_SIZES:
        window = torch.hann_window(n, device=pred.device)
        spec = [torch.stft(x, n, n // 4, window=window, return_complex=True).abs() for x in (pred, target)]
        log_gap = torch.log(spec[0] + 1e-5) - torch.log(spec[1] + 1e-5)
        loss = loss + (spec[0] - spec[1]).abs().mean() + log_gap.abs().mean()
    return loss / len(quality.FFT_SIZES)


def mel_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 of log-mel band powers (models/quality.py's `log_mel`: what the gate's timbre figures compare),
    which weighs every band alike where `spectral_loss` weighs the loud low bins and the gaps between
    harmonics."""
    window = torch.hann_window(quality.MEL_FFT, periodic=False, device=pred.device)  # numpy's hanning
    filters = torch.as_tensor(quality.MEL_FILTERS, dtype=pred.dtype, device=pred.device)
    frames = pred.shape[-1] // data.HOP
    mels = [torch.log10(filters @ (torch.stft(x, quality.MEL_FFT, data.HOP, window=window, pad_mode="constant",
                                              return_complex=True)[..., :frames].abs() ** 2 / quality.MEL_FFT)
                        + 1e-10) for x in (pred, target)]
    return (mels[0] - mels[1]).abs().mean()


def onset_starts(perfs: list[data.Performance], frames: int) -> list[np.ndarray]:
    """For each performance, the crop starts of `--crops onset`: ONSET_LEAD frames before each voiced frame that
    begins a note (`quality.note_frames`), where a crop of `frames` fits."""
    starts = []
    for p in perfs:
        _, voiced, since = quality.note_frames(p)
        onsets = np.flatnonzero(voiced & (since == 0)) - ONSET_LEAD
        starts.append(onsets[(onsets >= 0) & (onsets < len(p.f0) - frames)])
    return starts


def sample_batch(
    perfs: list[data.Performance], batch: int, frames: int, rng: np.random.Generator, noise_width: int,
    columns: int = 2, starts: list[np.ndarray] | None = None,
) -> tuple[torch.Tensor, ...]:
    """Random crops: controls [B,F,C] (f0, loudness[, brightness]), noise [B,F,N], target audio [B,F*hop],
    initial phases [B,1]. Crops start anywhere, or with `starts` (`onset_starts`) at one of those."""
    lengths = np.array([len(p.f0) - frames for p in perfs] if starts is None else [len(s) for s in starts], float)
    picks = rng.choice(len(perfs), size=batch, p=lengths / lengths.sum())
    control = np.empty((batch, frames, columns), np.float32)
    target = np.empty((batch, frames * data.HOP), np.float32)
    for i, k in enumerate(picks):
        p = perfs[k]
        start = rng.integers(0, len(p.f0) - frames) if starts is None else starts[k][rng.integers(len(starts[k]))]
        control[i, :, 0] = p.f0[start : start + frames]
        control[i, :, 1] = p.loudness[start : start + frames]
        if columns > 2:
            control[i, :, 2] = p.brightness[start : start + frames]
        target[i] = p.audio[start * data.HOP : (start + frames) * data.HOP]
    noise = rng.random((batch, frames, noise_width), dtype=np.float32)
    phase = rng.random((batch, 1), dtype=np.float32)
    return tuple(torch.from_numpy(a) for a in (control, noise, target, phase))


def evaluate(model: Instrument, perfs: list[data.Performance], frames: int, device: str) -> float:
    """Spectral loss on fixed crops of held-out performances, from zero state as the engine starts."""
    rng = np.random.default_rng(12345)
    with torch.no_grad():
        control, noise, target, _ = (t.to(device) for t in sample_batch(perfs, 8, frames, rng, model.noise_width,
                                                                         model.cfg.controls))
        state = [s.to(device) for s in model.initial_state(len(control))]
        return float(spectral_loss(model(control, noise, *state)[0], target))


def initial_weights(ref: str, store: Path | None, cfg: InstrumentConfig) -> tuple[dict, dict]:
    """The weights of instrument `ref` (NAME or NAME@VERSION in the store) to start training from, and what the
    manifest records of where they came from. A donor without brightness starts a model with it (`widen`)."""
    from wavecast.models.reexport import load_instrument  # it imports this module's control smoothing

    try:
        entry = ModelStore(store).resolve(ref)
    except KeyError as e:
        raise SystemExit(f"error: --init: {e.args[0]}") from None
    if entry.manifest.kind != "instrument":
        raise SystemExit(f"error: --init {ref}: '{entry.manifest.name}' is a {entry.manifest.kind}; start from an "
                         "instrument ('wavecast models' lists them), or leave --init out")
    try:
        donor, manifest = load_instrument(entry.directory)
    except ModelError as e:
        raise SystemExit(f"error: --init {ref}: {e}") from None
    if donor.cfg.brightness and not cfg.brightness:
        raise SystemExit(f"error: --init {ref}: '{manifest.name}' has a brightness control; train with --brightness, "
                         "or start from an instrument without it")
    if replace(donor.cfg, brightness=cfg.brightness) != cfg:
        raise SystemExit(f"error: --init {ref}: its model is {donor.cfg.to_dict()}, this run's {cfg.to_dict()}; "
                         "train with its --hidden, or leave --init out")
    weights = donor.state_dict() if donor.cfg == cfg else instrument.widen(donor.state_dict())
    return weights, {"model": manifest.name, "version": manifest.version, "sha256": manifest.onnx["sha256"]}


def run(args: argparse.Namespace, argv: list[str]) -> Path:
    started, revision = time.time(), code_revision()  # the code this run starts with
    args.name = args.name or default_name("instrument", args.quick, args.instrument)
    if not valid_name(args.name):  # refused before the training run, not at publish time after it
        raise SystemExit(f"error: --name '{args.name}' is not a model name: use {NAME_RULE}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    steps = args.steps or (600 if args.quick else 3000)
    batch = args.batch or (4 if args.quick else 8)
    frames = args.frames or (50 if args.quick else 100)
    if args.instrument:
        program, low, high = data.INSTRUMENTS[args.instrument]
        notes = {"program": program, "low_note": low, "high_note": high,
                 "level_db": data.LEVEL_DB.get(args.instrument, 0.0)}
    else:  # a GM program across the whole f0 control range
        notes = {"program": args.program}
    # --quick leaves the folk-tune phrases out: in 600 steps on 40 s of data their fast notes cost the pitch.
    recipe = data.Recipe(seed=args.seed, **notes,
                         **({"performances": 5, "seconds": 8.0, "heldout": 1, "melodies": 0} if args.quick else {}))
    # the f0 control covers every note the model was trained on (the violin's top C7 is 2093 Hz)
    f0_range = [max(30.0, round(midi_hz(recipe.low_note), 2)), round(midi_hz(recipe.high_note), 2)]
    cfg = InstrumentConfig(hidden=args.hidden, brightness=args.brightness)
    weights, init = initial_weights(args.init, args.store, cfg) if args.init else (None, None)  # refused before data
    work = args.work or default_work()
    log(f"data: GM program {recipe.program}, {recipe.performances} x {recipe.seconds:.0f} s (recipe {recipe.key()})")
    runs.report("data")
    dataset = data.build(recipe, work / "data", progress=lambda line: log(f"data: {line}"))

    # Trained with the exact oscillator, exported with the wavetable (the same sound to ~86 dB, half the
    # cost): early on, when the harmonic distribution is still flat, the wavetable's error on the highest
    # harmonics is large enough to steer training elsewhere (the --quick run ends at loss 0.65 and fails
    # its gates with it, 0.56 and passes without).
    model = Instrument(cfg, oscillator="blocks")
    if init:
        model.load_state_dict(weights)
        log(f"starting from the weights of {init['model']} v{init['version']}")
    model = model.to(args.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    model_code = hashlib.sha256(Path(instrument.__file__).read_bytes()).hexdigest()[:12]
    settings = {"recipe": recipe.key(), "model": cfg.to_dict(), "model_code": model_code, "steps": steps,
                "batch": batch, "frames": frames, "lr": args.lr, "seed": args.seed,
                "mel_weight": args.mel_weight, "init": init}
    if args.crops != "any":  # recorded only when used, so that earlier runs' checkpoints still resume
        settings["crops"] = args.crops
    starts = onset_starts(dataset.train, frames) if args.crops == "onset" else None
    checkpoint = Checkpoint(work, args.name, settings)
    first, history, earlier_seconds = checkpoint.resume(model, optimizer, args.device)
    if first:
        log(f"resuming from {checkpoint.path} at step {first}")

    rng = np.random.default_rng(args.seed + first)
    t0, last = time.time(), first
    for step in range(first, steps):
        lr = learning_rate(step, steps, args.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        control, noise, target, phase = (t.to(args.device) for t in sample_batch(
            dataset.train, batch, frames, rng, model.noise_width, cfg.controls, starts))
        h, c, _, amp, tail = (s.to(args.device) for s in model.initial_state(batch))
        audio = model(control, noise, h, c, phase, amp, tail)[0]
        loss = spectral_loss(audio, target)
        if args.mel_weight:
            loss = loss + args.mel_weight * mel_loss(audio, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        optimizer.step()
        history.append(loss.item())
        done = step + 1
        if done % PROGRESS_EVERY == 0 or done == steps:
            rate = (time.time() - t0) / (done - last)
            log(progress(done, steps, history, lr, rate))
        if done % CHECKPOINT_EVERY == 0 or done == steps:  # the last one too: a failed export resumes here
            checkpoint.save(model, optimizer, done, history, earlier_seconds + time.time() - started)
    trained_at = time.time()
    heldout_loss = evaluate(model, dataset.heldout, min(frames, 100), args.device)
    log(f"held-out spectral loss {heldout_loss:.4f}")

    trained = model.cpu().eval()
    model = Instrument(cfg).eval()  # the shipped synthesis, same weights
    model.load_state_dict(trained.state_dict())
    runs.report("export")
    with tempfile.TemporaryDirectory(prefix="wavecast-export-") as tmp:
        candidate = Path(tmp)
        onnx = export_onnx(model, candidate)
        manifest = Manifest.from_dict({
            "name": args.name, "version": 1, "kind": "instrument", "sample_rate": cfg.sample_rate, "hop": cfg.hop,
            "controls": [
                {"name": "f0", "unit": "Hz", "min": f0_range[0], "max": f0_range[1],
                 "default": min(max(220.0, f0_range[0]), f0_range[1]), "smoothing": CONTROL_SMOOTHING_SECONDS},
                {"name": "loudness", "unit": "dB", "min": -80.0, "max": 0.0, "default": -24.0,
                 "smoothing": CONTROL_SMOOTHING_SECONDS},
                *([BRIGHTNESS_CONTROL] if cfg.brightness else []),
            ],
            "states": [{"name": k, "shape": v} for k, v in state_shapes(model).items()],
            "noise": model.noise_width, "onnx": onnx,
        }, "candidate")
        manifest.write(candidate)
        frame_model = FrameModel(candidate, device="cpu")
        runs.report("verify")
        log(f"verifying: torch vs ONNX Runtime over 240 stateful steps, pitch within {f0_range} Hz")
        parity = verify_parity(model, frame_model)
        pitch = verify_pitch(frame_model, tuple(f for f in PITCH_CHECKS if f0_range[0] <= f <= f0_range[1]))
        log(f"parity max |torch-ORT| {parity['max_abs_audio']:.2e}, max f0 error {pitch['max_f0_relative_error']:.4%}")
        unseen = data.unseen(recipe, work / "data")
        log(f"quality on {len(unseen)} performance(s) of unseen seeds and tunes, through the engine, against the "
            "spectral table of the training data (by key, and by brightness band where the model has that control)")
        table = quality.spectral_table(dataset.train, quality.table_bands(frame_model))
        assessed, _ = quality.assess(frame_model, unseen, table,
                                     log=lambda line: log(f"quality: {line}"))
        verification = {"parity": parity, "pitch": pitch, "quality": quality.verification_quality(assessed),
                        **POLICIES["instrument"].record()}
        log("quality: " + ", ".join(f"{k} {v:.3g}" if v is not None else f"{k} unmeasured"
                                     for k, v in assessed["metrics"].items()))
        final = {
            **manifest.to_dict(),
            "source": {"soundfont": data.SOUNDFONT.name, "gm_program": recipe.program,
                       "instrument": next((n for n, (p, _, _) in data.INSTRUMENTS.items() if p == recipe.program),
                                          f"gm{recipe.program}"), "f0_range_hz": f0_range,
                       "loudness": "RMS dBFS per 10 ms frame (full-scale sine = -3 dB)",
                       "melodies": [f"music21 {name}: {corpus.COLLECTIONS[name].licence}"
                                    for name in corpus.SHIPPABLE] if recipe.melodies else []},
            "training": {
                "command": " ".join(["wavecast", *argv]), "data": asdict(recipe) | {"key": recipe.key()},
                "model": cfg.to_dict(), "steps": steps, "batch": batch, "frames": frames, "lr": args.lr,
                "mel_weight": args.mel_weight, **({"init": init} if init else {}),
                **({"crops": args.crops} if args.crops != "any" else {}),
                "seconds": round(earlier_seconds + time.time() - started, 1),
                "device": args.device,
                "final_loss": float(np.mean(history[-PROGRESS_EVERY:])), "heldout_loss": heldout_loss,
                "code_revision": revision, "torch": torch.__version__,
            },
            "verification": verification,
        }
        (candidate / "model.json").write_text(json.dumps(final, indent=2) + "\n")
        write_record(candidate, final, history, timings(started, t0, trained_at, first, steps), "spectral loss",
                     heldout_loss)
        where, done = deliver(candidate, "instrument", work, args.name, args.out, args.store,
                              lambda d: FrameModel(d, device="cpu"), "train longer with --steps, or check the data")
    checkpoint.remove()  # the run is complete; a rerun starts afresh
    log(f"{done} in {time.time() - started:.0f} s")
    return where
