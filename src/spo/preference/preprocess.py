"""CLIP image preprocessing in torch, on a batch: resize, centre crop, normalise.

Two image paths, both without leaving torch:

- :func:`clip_preprocess`: what CLIP's image processor does to a PIL image (antialiased bicubic
  resize of the short side, centre crop, normalise): the evaluation scorers' path.
- :func:`spm_preprocess`: what the authors' release does before its step-aware preference model
  (``StepAwarePreferenceModel.get_preference_score`` in
  ``spo_training_and_inference/spo/preference_models/models/step_aware_preference_model.py``):
  bicubic ``F.interpolate`` WITHOUT antialiasing of the short side to the CLIP size, new sizes
  ``int(x * scale + 0.5)``, torchvision's centre crop (offset ``int(round((h - size) / 2))``),
  THEN the map to [0, 1] with the clamp, then normalise. It takes the unclamped decoded image, as
  the release scores it; the SPM's training clamps before as well (``spm_task.py``), and for the
  square images it trains on the short-side resize is the release's resize to (size, size).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(
    images: Tensor,
    size: int,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
) -> Tensor:
    """Images in [-1, 1], (B, 3, H, W), any size -> CLIP pixel values (B, 3, size, size).

    Bicubic resize (antialiased) of the short side to ``size``, centre crop, map to [0, 1],
    then (x - mean) / std, as CLIP's image processor does, without leaving torch.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    x = images.float()
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    x = x[..., top : top + size, left : left + size]
    x = ((x + 1) / 2).clamp(0, 1)
    return _normalise(x, mean, std)


def _normalise(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """(x - mean) / std per channel, x in [0, 1], (B, 3, H, W)."""
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


def release_resize_size(height: int, width: int, size: int) -> tuple[int, int]:
    """The release's SPM resize: short side to ``size``, each side ``int(side * scale + 0.5)``."""
    scale = size / min(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def center_crop_offsets(height: int, width: int, size: int) -> tuple[int, int]:
    """(top, left) of torchvision's ``CenterCrop(size)``: ``int(round((side - size) / 2.0))``
    (Python's round: halves to even, so a margin of 3 puts 2 rows above, 1 below)."""
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def spm_preprocess(
    images: Tensor,
    size: int,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
) -> Tensor:
    """Images in [-1, 1] (unclamped allowed), (B, 3, H, W) -> pixel values (B, 3, size, size), as
    the authors' release feeds its step-aware preference model: bicubic resize of the short side
    without antialiasing (sizes ``int(x * scale + 0.5)``), torchvision's centre crop, then
    ``(x / 2 + 0.5).clamp(0, 1)``, then ``(x - mean) / std``. Computed in float32."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    x = images.float()
    h, w = x.shape[-2:]
    new_h, new_w = release_resize_size(h, w, size)
    if (new_h, new_w) != (h, w):  # at the same size the release's bicubic is the identity
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False)
    top, left = center_crop_offsets(new_h, new_w, size)
    x = x[..., top : top + size, left : left + size]
    x = (x / 2 + 0.5).clamp(0, 1)
    return _normalise(x, mean, std)


def save_clip_image_config(directory: str | Path, size: int, mean: Sequence[float] = OPENAI_CLIP_MEAN,
                           std: Sequence[float] = OPENAI_CLIP_STD) -> Path:
    """Write ``preprocessor_config.json`` as ``CLIPImageProcessor`` reads it (bicubic resize of the
    short side to ``size``, centre crop, CLIP normalisation), without instantiating the processor
    (which wants torchvision)."""
    path = Path(directory) / "preprocessor_config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": size, "width": size}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(mean), "image_std": list(std),
        "do_convert_rgb": True,
    }
    path.write_text(json.dumps(config, indent=2))
    return path
