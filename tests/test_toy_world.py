"""The toy world's grammar, renderer and oracles: their own accuracy and consistency."""

from __future__ import annotations

import numpy as np
import pytest

from spo.toy import (
    DEGRADATIONS,
    PromptGrammarError,
    aesthetic,
    alignment,
    all_scenes,
    degrade,
    misalign,
    parse_prompt,
    render,
    training_prompts,
    validation_prompts,
    vocabulary,
)
from spo.toy.grammar import COLOURS

SCENES = all_scenes()


@pytest.fixture(scope="module")
def clean() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [render(s, rng) for s in SCENES]


def test_grammar_round_trip_and_errors() -> None:
    assert len(SCENES) == 216
    for scene in SCENES:
        assert parse_prompt(scene.prompt) == scene
    assert parse_prompt("  Two LARGE red circles on a black background ").count == 2
    for bad in ["a red dog", "two small red circle on a black background", "a small pink circle on a black background",
                "a small red circle on a green background", ""]:
        with pytest.raises(PromptGrammarError, match="cannot parse"):
            parse_prompt(bad)
    words = set(vocabulary())
    assert all(set(p.split()) <= words for p in training_prompts() + validation_prompts())
    assert not set(validation_prompts()) & set(training_prompts()) and len(validation_prompts()) == 24


def test_render_is_deterministic_and_clean(clean: list[np.ndarray]) -> None:
    again = render(SCENES[5], np.random.default_rng(0))
    assert clean[0].shape == (32, 32, 3) and clean[0].dtype == np.float32
    assert np.array_equal(render(SCENES[0], np.random.default_rng(0)), clean[0])
    assert not np.array_equal(again, render(SCENES[5], np.random.default_rng(1)))  # placement follows the seed
    assert clean[0].min() >= 0 and clean[0].max() <= 1


def test_alignment_oracle_accuracy(clean: list[np.ndarray]) -> None:
    own = np.array([alignment(x, s) for x, s in zip(clean, SCENES)])
    assert own.mean() > 0.98 and (own == 1).mean() > 0.93  # measured 0.993 / 0.963
    rng = np.random.default_rng(1)
    # one attribute changed in the prompt: the score must drop for almost every image
    changed = np.array([alignment(x, misalign(s, rng)) for x, s in zip(clean, SCENES)])
    assert (changed < own).mean() > 0.95 and changed.mean() < 0.85
    # mild degradations leave the layout readable
    blurred = [alignment(degrade(x, "blur", 0.3, rng), s) for x, s in zip(clean[:60], SCENES[:60])]
    assert np.mean(blurred) > 0.95


def test_aesthetic_oracle_is_layout_blind_and_ranks_degradations(clean: list[np.ndarray]) -> None:
    scores = np.array([aesthetic(x) for x in clean])
    assert scores.min() > 0.99  # every clean render, whatever its layout
    rng = np.random.default_rng(2)
    for kind in DEGRADATIONS:
        weak, strong = [], []
        # measured limitation (docs/toy-world.md): blur below sigma ~0.9 px is often invisible to it
        weak_strength = 0.6 if kind == "blur" else 0.3
        for x, s in zip(clean[:60], SCENES[:60]):
            colour = np.array(COLOURS[s.colour]) / 255
            weak.append(aesthetic(degrade(x, kind, weak_strength, rng, colour)))
            strong.append(aesthetic(degrade(x, kind, 1.0, rng, colour)))
        assert np.mean(np.array(weak) < 0.99) > 0.9, kind  # clean beats degraded
        assert np.mean(strong) < np.mean(weak), kind  # stronger is worse on average
    # a misaligned but clean render is not penalised: aesthetics ignores the prompt
    wrong = render(misalign(SCENES[0], rng), rng)
    assert aesthetic(wrong) > 0.99


def test_unknown_degradation() -> None:
    with pytest.raises(ValueError, match="unknown degradation"):
        degrade(np.zeros((32, 32, 3), np.float32), "rain", 0.5, np.random.default_rng(0))
