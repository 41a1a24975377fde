"""The composer's held-out split is by tune content: the same melody in another key, edition or collection
lands on the same side as its family, whatever its id."""

from __future__ import annotations

import numpy as np
import pytest

from wavecast.models import corpus
from wavecast.models.corpus import SAME_TUNE, SHINGLE, Tune


def tune(tune_id: str, pitches: list[int], collection: str = "ryansMammoth") -> Tune:
    return Tune(tune_id, collection, "D major", "4/4", 4.0, 0.0, [(p, 0.5) for p in pitches])


def test_editions_and_transpositions_are_one_family() -> None:
    rng = np.random.default_rng(0)
    melody = (62 + np.cumsum(rng.integers(-3, 4, 60))).tolist()
    edition = melody[:30] + [melody[30] + 2] + melody[31:]  # one note changed
    other = (60 + np.cumsum(rng.integers(-4, 5, 60))).tolist()
    tunes = [tune("a#1", melody), tune("b#7", [p + 5 for p in melody], "oneills1850"),
             tune("c#2", edition, "airdsAirs"), tune("d#1", other)]
    family = corpus.families(tunes)
    assert family[0] == family[1] == family[2] != family[3]
    # the split follows the family, never the id: renaming every tune changes nothing
    renamed = [Tune(f"x#{i}", t.collection, t.scale, t.metre, t.bar, t.start, t.events) for i, t in enumerate(tunes)]
    assert corpus.heldout_split(renamed) == corpus.heldout_split(tunes)
    held = corpus.heldout_split(tunes)
    assert held[0] == held[1] == held[2]


@pytest.fixture(scope="module")
def shipped_corpus(tmp_path_factory: pytest.TempPathFactory) -> list[Tune]:
    return corpus.load(corpus.SHIPPABLE, 50, cache_dir=tmp_path_factory.mktemp("corpus"))


def test_no_held_out_tune_is_a_training_tune_in_another_key_or_edition(shipped_corpus: list[Tune]) -> None:
    held = corpus.heldout_split(shipped_corpus)
    train = [t for t, h in zip(shipped_corpus, held, strict=True) if not h]
    heldout = [t for t, h in zip(shipped_corpus, held, strict=True) if h]
    assert heldout and len(train) > 10 * len(heldout)

    def grams(t: Tune) -> set[tuple[int, ...]]:
        c = t.contour
        return {c[k : k + SHINGLE] for k in range(max(1, len(c) - SHINGLE + 1))}

    for h in heldout:
        g = grams(h)
        for t in train:
            assert t.contour != h.contour, (h.id, t.id)
            other = grams(t)
            assert len(g & other) < SAME_TUNE * len(g | other), (h.id, t.id)
