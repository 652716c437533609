"""The LAION aesthetic predictor v2: score = MLP(e / |e|), e = CLIP ViT-L/14's projected image embedding.

The MLP (``sac+logos+ava1-l14-linearMSE.pth``, christophschuhmann/improved-aesthetic-predictor) is
Linear(768,1024), Dropout, Linear(1024,128), Dropout, Linear(128,64), Dropout, Linear(64,16),
Linear(16,1) with its ReLUs commented out: in eval an affine map of the normalised embedding.
Images are preprocessed as CLIP's processor does (shortest side 224 bicubic, centre crop, OpenAI
mean/std). The prompt is not used. Scores lie on a 1-10 rating scale.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ...errors import ModelLoadError
from ...preference.clip_scorer import load_clip_parts
from ...preference.preprocess import clip_preprocess
from ...weights import read_state_dict, resolve_reference
from .base import Scorer

MLP_FILE = "sac+logos+ava1-l14-linearMSE.pth"
DEFAULT_CLIP = "openai/clip-vit-large-patch14"
_LAYER_KEY = re.compile(r"layers\.(\d+)\.(weight|bias)")


def mlp_from_state_dict(sd: Mapping[str, Tensor]) -> nn.Sequential:
    """The predictor's Linear layers (keys ``layers.N.{weight,bias}``, applied in order of N; the
    dropouts between them hold no tensors), widths taken from the tensors; ends in one output."""
    found: dict[int, set[str]] = {}
    for key in sd:
        match = _LAYER_KEY.fullmatch(key)
        if match is None:
            raise ValueError(f"unexpected tensor {key!r} (expected layers.N.weight / layers.N.bias)")
        found.setdefault(int(match.group(1)), set()).add(match.group(2))
    if not found or any(kinds != {"weight", "bias"} for kinds in found.values()):
        raise ValueError(f"expected layers.N.weight and layers.N.bias pairs, got {sorted(sd)}")
    linears: list[nn.Linear] = []
    for index in sorted(found):
        weight, bias = sd[f"layers.{index}.weight"], sd[f"layers.{index}.bias"]
        if weight.ndim != 2 or bias.shape != weight.shape[:1]:
            raise ValueError(f"layers.{index}: weight {tuple(weight.shape)} and bias {tuple(bias.shape)} are not a Linear")
        if linears and weight.shape[1] != linears[-1].out_features:
            raise ValueError(f"layers.{index} takes {weight.shape[1]} inputs but the layer before gives {linears[-1].out_features}")
        layer = nn.Linear(weight.shape[1], weight.shape[0])
        layer.load_state_dict({"weight": weight.float(), "bias": bias.float()})
        linears.append(layer)
    if linears[-1].out_features != 1:
        raise ValueError(f"the last layer gives {linears[-1].out_features} outputs, expected 1")
    return nn.Sequential(*linears).eval().requires_grad_(False)


class AestheticScorer(Scorer):
    name = "aesthetic"
    label = "LAION aesthetic (v2)"
    expected_range = ("about 1-10 (a rating scale), typically 5-6.5; SPO paper: SD-1.5 5.365-5.887, "
                      "SDXL 5.950-6.364")
    weights_help = (f"the predictor's MLP: {MLP_FILE} (or a safetensors file of its tensors), a directory "
                    "holding it, a hub repo id holding it, or REPO_ID/FILE of a hub repo")
    options = {
        "clip": (DEFAULT_CLIP, "the CLIP ViT-L/14 tower (transformers CLIPModel directory or hub id) and its "
                               "processor settings"),
    }

    def __init__(self, clip: Any, mlp: nn.Sequential, *, size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.clip, self.mlp = clip.eval().requires_grad_(False), mlp
        self.size, self.mean, self.std = size, tuple(mean), tuple(std)

    @classmethod
    def load(cls, weights: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             **options: str) -> "AestheticScorer":
        path = Path(resolve_reference(weights, cls.name, "file", filename=MLP_FILE))
        try:
            mlp = mlp_from_state_dict(read_state_dict(path, cls.name))
        except ValueError as err:
            raise ModelLoadError(f"{cls.name}: {str(path)!r} is not the aesthetic predictor's MLP: {err}") from None
        clip, _, settings = load_clip_parts(options.get("clip") or DEFAULT_CLIP, None, what=f"{cls.name}: clip")
        width = int(clip.config.projection_dim)
        if mlp[0].in_features != width:
            raise ModelLoadError(f"{cls.name}: the MLP {str(path)!r} takes {mlp[0].in_features}-d embeddings but the "
                                 f"CLIP tower gives {width}-d (the v2 predictor wants ViT-L/14, 768)")
        return cls(clip.to(device=device, dtype=dtype), mlp.to(device), **settings)

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        device = next(self.clip.parameters()).device
        pixels = clip_preprocess(images.to(device), self.size, self.mean, self.std)
        emb = self.clip.get_image_features(pixel_values=pixels.to(self.clip.dtype))
        emb = getattr(emb, "pooler_output", emb).float()
        return self.mlp(emb / emb.norm(dim=-1, keepdim=True)).squeeze(-1).cpu()


SCORER = AestheticScorer
