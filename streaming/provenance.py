"""What a listener of wavecast's audio is told about it: that it is AI-generated, by what, from what data.

One JSON-safe dict, `provenance(...)`, goes with every output: the stream info, the first message on a
peer's data channel, the overlay, and a rendered file's tags and MIDI text. The training data and their
licences come from the models' manifests (`source`), so a model trained on other data says so itself.
"""

from __future__ import annotations

import copy
import functools
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Any

from wavecast.streaming.model import Manifest

# A manifest names its SoundFont but not its licence; these are the ones the training recipe uses.
SOUNDFONT_LICENCES = {
    # Debian fluid-soundfont-gm, /usr/share/doc/fluid-soundfont-gm/copyright: "I hereby release Fluid under
    # the MIT license" (Frank Wen)
    "FluidR3_GM.sf2": "MIT (Frank Wen; Debian package fluid-soundfont-gm)",
}
UNKNOWN_LICENCE = "not stated in the model's manifest"
WATERMARK_OFF = "the daemon runs with --watermark off"

_models: dict[tuple[str, str, int, str], dict[str, Any]] = {}


@functools.cache
def generator_version() -> str:
    try:
        return package_version("wavecast")
    except PackageNotFoundError:
        return "0+unknown"


def training_data(manifest: Manifest) -> list[dict[str, str]]:
    """[{"source", "licence"}] from the manifest's `source`: an instrument's SoundFont and melodies
    ("music21 NAME: licence"), a composer's corpus collections ({NAME: licence}). Manifests are written by
    whoever trained the model, so anything else in `source` is left out rather than guessed at."""
    source = manifest.source
    data = []
    soundfont = source.get("soundfont")
    if isinstance(soundfont, str):
        program = source.get("gm_program")
        name = f"{soundfont} SoundFont" + (f", GM program {program}" if isinstance(program, int) else "")
        data.append({"source": name, "licence": SOUNDFONT_LICENCES.get(soundfont, UNKNOWN_LICENCE)})
    melodies = source.get("melodies")
    for melody in melodies if isinstance(melodies, list) else []:
        if isinstance(melody, str):
            name, _, licence = melody.partition(": ")
            data.append({"source": f"{name} (melodies)", "licence": licence or UNKNOWN_LICENCE})
    collections = source.get("collections")
    corpus = source.get("corpus")
    for name, licence in collections.items() if isinstance(collections, dict) else []:
        where = f" ({corpus} corpus)" if isinstance(corpus, str) else ""
        data.append({"source": f"{name}{where}", "licence": licence if isinstance(licence, str) else UNKNOWN_LICENCE})
    return data


def model_entry(manifest: Manifest) -> dict[str, Any]:
    """The manifest's part of the provenance, worked out once per model version (stream info asks often)."""
    key = (manifest.kind, manifest.name, manifest.version, str(manifest.onnx.get("sha256", "")))
    if key not in _models:
        command = manifest.training.get("command")
        _models[key] = {"name": manifest.name, "version": manifest.version, "kind": manifest.kind,
                        "trained_by": command if isinstance(command, str) else None,
                        "data": training_data(manifest)}
    return copy.deepcopy(_models[key])


def provenance(model: Manifest, composer: Manifest | None, seed: int, mark: dict | None,
               why_unmarked: str = WATERMARK_OFF) -> dict[str, Any]:
    """The provenance of audio made by the instrument `model`, composed by `composer` (None: played from
    controls alone) from `seed`. `mark` is {"key_id", "payload"} (hex) of the watermark it carries, or None
    when it carries none, for the reason `why_unmarked`."""
    version = generator_version()
    made_with = f"the '{model.name}' v{model.version} instrument"
    if composer is not None:
        made_with += f" and the '{composer.name}' v{composer.version} composer"
    models = [model_entry(model)] + ([model_entry(composer)] if composer is not None else [])
    watermark = ({"on": True, "key_id": mark["key_id"], "payload": mark["payload"]} if mark is not None
                 else {"on": False, "why": why_unmarked})
    return {"ai_generated": True,
            "statement": f"AI-generated music, made by wavecast {version} with {made_with}, seed {seed}.",
            "generator": {"name": "wavecast", "version": version},
            "models": models, "seed": seed, "watermark": watermark}
