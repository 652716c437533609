"""The toy world's evaluation scorers, through the evaluation's :class:`~spo.evaluation.scorers.Scorer`
interface: the toy PickScore (the paper's PickScore column), the aesthetic oracle (for the LAION
aesthetic score) and the alignment oracle (for GenEval). Ground truth, not learned judges, except
the toy PickScore."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..builtin import resolve_weights
from ..evaluation.scorers.base import Scorer
from ..preference.clip_scorer import CLIPScorer
from .batched_oracles import aesthetic_batch, alignment_batch, to_oracle_images
from .grammar import parse_prompt

#: the evaluation's generic reward: the v1 toy PickScore, fixed so that every run is measured by
#: the same yardstick (later builds' reward models are judges, not the metric)
EVAL_REWARD = "toy:pickscore-v1"


class ToyPickScore(Scorer):
    """exp(logit_scale) * cos(image, text) of the toy PickScore (a CLIPModel trained on the toy
    generic preference pairs)."""

    name = "pickscore"
    label = "toy PickScore"
    expected_range = "about 4-8 on toy images (base model: 5.94 on the validation prompts)"
    weights_help = "toy:pickscore-v1 or any CLIPModel directory"

    def __init__(self, model: CLIPScorer) -> None:
        self.model = model

    @classmethod
    def load(cls, weights: str = EVAL_REWARD, *, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32, **options: str) -> "ToyPickScore":
        return cls(CLIPScorer.from_pretrained(resolve_weights(weights, "toy PickScore"), device=device, dtype=dtype))

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return self.model(images, prompts)


class ToyAesthetic(Scorer):
    """The aesthetic oracle: exp(-(noise + off-line + excess defects)), in (0, 1]."""

    name = "aesthetic"
    label = "aesthetic (oracle)"
    expected_range = "(0, 1]; base model 0.53 on the validation prompts"

    @classmethod
    def load(cls, weights: str = "", **_: object) -> "ToyAesthetic":
        return cls()

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return aesthetic_batch(to_oracle_images(images))


class ToyAlignment(Scorer):
    """The alignment oracle: the share of the prompt's five attributes the image shows, in [0, 1]."""

    name = "alignment"
    label = "alignment (oracle)"
    expected_range = "[0, 1] in steps of 0.2; base model 0.65 on the validation prompts"

    @classmethod
    def load(cls, weights: str = "", **_: object) -> "ToyAlignment":
        return cls()

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        for p in prompts:
            parse_prompt(p)  # a prompt outside the grammar fails here, named
        return alignment_batch(to_oracle_images(images), list(prompts))


def toy_scorers(reward: str | None = EVAL_REWARD, device: str | torch.device = "cpu") -> list[Scorer]:
    """The toy evaluation's scorers: the toy PickScore (unless ``reward`` is None), then the oracles."""
    scorers: list[Scorer] = [ToyPickScore.load(reward, device=device)] if reward else []
    return [*scorers, ToyAesthetic(), ToyAlignment()]
