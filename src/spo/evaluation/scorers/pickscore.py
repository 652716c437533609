"""PickScore: score = exp(logit_scale) * cos(image embedding, text embedding).

A fine-tuned CLIP-H in transformers form (hub ``yuvalkirstain/PickScore_v1``), run by
:class:`~spo.preference.clip_scorer.CLIPScorer`: shortest side resized to 224 (bicubic), centre
crop, OpenAI mean/std; prompts padded/truncated to 77 tokens. exp(logit_scale) is 100 for the
release, so scores are 100 x cosine, as the SPO paper prints them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from ...errors import ModelLoadError
from ...preference.clip_scorer import CLIPScorer, load_clip_parts
from ...weights import error_line, resolve_reference
from .base import Scorer

DEFAULT_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class PickScoreScorer(Scorer):
    name = "pickscore"
    label = "PickScore"
    expected_range = ("exp(logit_scale)=100 x cosine, about 18-24 for typical generations; SPO paper: "
                      "SD-1.5 20.53-21.43, SDXL 21.95-23.06")
    weights_help = ("a transformers CLIPModel directory, hub id (e.g. yuvalkirstain/PickScore_v1) or folder of a hub "
                    "repo (REPO_ID/FOLDER)")
    options = {
        "processor": (DEFAULT_PROCESSOR, "tokenizer and image settings (directory or hub id), used only "
                                         "when WEIGHTS is not a directory holding a tokenizer"),
    }

    def __init__(self, clip: CLIPScorer) -> None:
        self.clip = clip

    @classmethod
    def load(cls, weights: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             **options: str) -> "PickScoreScorer":
        weights = resolve_reference(weights, cls.name, "directory")
        if Path(weights).is_file():
            raise ModelLoadError(f"{cls.name}: {weights!r} is a file; expected a CLIPModel directory or hub id")
        processor = options.get("processor") or DEFAULT_PROCESSOR
        try:
            model, tokenizer, settings = load_clip_parts(weights, processor, what=cls.name,
                                                         processor_what=f"{cls.name}: processor")
        except Exception as err:  # noqa: BLE001 - e.g. a corrupt weights file inside the directory
            if isinstance(err, ModelLoadError) and "weights_only" not in str(err):
                raise ModelLoadError(str(err).strip().splitlines()[0]) from None  # one line
            raise ModelLoadError(f"{cls.name}: could not load a CLIPModel from {weights!r}: {error_line(err)}") from None
        return cls(CLIPScorer(model, tokenizer, **settings).to(device=device, dtype=dtype))

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        with torch.no_grad():  # (a metric: no gradients; a 16-bit model then scores with its fp32 logit scale)
            return self.clip.score(images, prompts, cache=True).cpu()


SCORER = PickScoreScorer
