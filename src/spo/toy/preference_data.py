"""The toy world's generic preference data (its Pick-a-Pic), labelled by the fixed noisy blend.

For every training prompt, each source model (the two weaker snapshots and the base model, like
Pick-a-Pic's several generators) draws ``images_per_model`` samples (DDIM, eta 1, fixed seeds).
Pairs of images of the same prompt are drawn at random (any two models, or one model twice) and
labelled with the blend fixed in docs/toy-world.md before any comparison:

    g = 0.7 alignment + 0.3 aesthetic + N(0, 0.05^2) per image;
    tie (0.5 / 0.5) when |g_0 - g_1| < 0.03, else the higher g wins (1 / 0).

The oracles read the images exactly as stored (8-bit PNG). Columns are Pick-a-Pic's (caption,
jpg_0, jpg_1, label_0, label_1) plus the ground truth (model_*, alignment_*, aesthetic_*), so
``spo train-spm`` reads this set and the real one through one code path. A held-out share of the
training prompts forms ``validation_unique`` (the grammar's validation prompts are never used).
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..sampling import ddim_sample
from ..training.seeding import derive_seed
from .grammar import training_prompts
from .model import ToyBackbone
from .batched_oracles import aesthetic_batch, alignment_batch

#: the fixed label blend of docs/toy-world.md (not tuned after seeing results)
ALIGNMENT_WEIGHT, AESTHETIC_WEIGHT, LABEL_NOISE, TIE_GAP = 0.7, 0.3, 0.05, 0.03


@dataclass
class PreferenceDataSettings:
    """How the generic preference data set is drawn (all draws seeded from ``seed``)."""

    models: list[str] = field(default_factory=lambda: ["snapshot-00540", "snapshot-01440", "base"])
    images_per_model: int = 3
    pairs_per_prompt: int = 8
    prompts: int | None = None  # None: every training prompt; else the first N (tiny builds)
    validation_prompts: float = 0.1  # share of the prompts whose pairs form validation_unique
    num_inference_steps: int = 20
    guidance_scale: float = 3.0
    batch_size: int = 96
    seed: int = 0
    channels_last: bool = False  # sample with the UNet in channels-last memory (faster on CPU; other rounding)


def generic_label(g0: float, g1: float) -> tuple[float, float]:
    """Pick-a-Pic labels from two blended scores: (1, 0), (0, 1) or the tie (0.5, 0.5)."""
    if abs(g0 - g1) < TIE_GAP:
        return 0.5, 0.5
    return (1.0, 0.0) if g0 > g1 else (0.0, 1.0)


def blend(alignment_score: float, aesthetic_score: float, rng: np.random.Generator) -> float:
    """The generic preference score of one image: alignment dominates, aesthetics counts less."""
    return ALIGNMENT_WEIGHT * alignment_score + AESTHETIC_WEIGHT * aesthetic_score + float(rng.normal(0.0, LABEL_NOISE))


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _quantise(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, as the PNG will hold them."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def sample_models(models_dir: Path, prompts: list[str], settings: PreferenceDataSettings,
                  progress: bool = True) -> dict[str, np.ndarray]:
    """Per model: uint8 images (images_per_model, len(prompts), H, W, 3), every draw seeded."""
    out: dict[str, np.ndarray] = {}
    total = len(settings.models) * settings.images_per_model * -(-len(prompts) // settings.batch_size)
    bar = tqdm(total=total, desc="sampling preference images", unit="batch", disable=not progress)
    for model in settings.models:
        backbone = ToyBackbone.from_pretrained(str(models_dir / model), device="cpu")
        if settings.channels_last:
            backbone.unet.to(memory_format=torch.channels_last)
        per_seed = []
        for i in range(settings.images_per_model):
            chunks = []
            for start in range(0, len(prompts), settings.batch_size):
                gen = torch.Generator().manual_seed(derive_seed(settings.seed, "toy-pairs", model, i, start))
                latents = ddim_sample(backbone, prompts[start : start + settings.batch_size],
                                      num_inference_steps=settings.num_inference_steps, eta=1.0,
                                      guidance_scale=settings.guidance_scale, generator=gen)
                chunks.append(_quantise(backbone.decode(latents).cpu()))
                bar.update(1)
            per_seed.append(np.concatenate(chunks))
        out[model] = np.stack(per_seed)
    bar.close()
    return out


def make_pairs(prompts: list[str], images: dict[str, np.ndarray], settings: PreferenceDataSettings) -> list[dict[str, Any]]:
    """Random pairs of distinct images of the same prompt, labelled by the blend; ground truth kept."""
    rng = np.random.default_rng(derive_seed(settings.seed, "toy-pair-draws"))
    pool = [(m, i) for m in settings.models for i in range(settings.images_per_model)]
    oracle = {}  # (model, i) -> (alignment, aesthetic) per prompt, batched over the prompts
    for m, i in pool:
        pictures = torch.from_numpy(images[m][i].astype(np.float32) / 255.0)
        oracle[(m, i)] = (alignment_batch(pictures, prompts).tolist(), aesthetic_batch(pictures).tolist())
    rows = []
    for p_index, prompt in enumerate(prompts):
        scores = {key: (al[p_index], ae[p_index]) for key, (al, ae) in oracle.items()}
        for _ in range(settings.pairs_per_prompt):
            a, b = rng.choice(len(pool), size=2, replace=False)
            (m0, i0), (m1, i1) = pool[int(a)], pool[int(b)]
            (al0, ae0), (al1, ae1) = scores[(m0, i0)], scores[(m1, i1)]
            g0, g1 = blend(al0, ae0, rng), blend(al1, ae1, rng)
            label_0, label_1 = generic_label(g0, g1)
            rows.append({
                "caption": prompt, "jpg_0": _png(images[m0][i0, p_index]), "jpg_1": _png(images[m1][i1, p_index]),
                "label_0": label_0, "label_1": label_1, "model_0": m0, "model_1": m1,
                "alignment_0": al0, "alignment_1": al1, "aesthetic_0": ae0, "aesthetic_1": ae1,
            })
    return rows


def label_statistics(rows: list[dict[str, Any]]) -> dict[str, float]:
    """How the generic labels relate to the ground truth.

    ``disagreement_with_aesthetic``: among pairs with a generic winner whose aesthetic scores
    differ, the share where the generic winner is the LESS aesthetic image (the rate the paper
    could not measure on Pick-a-Pic). Likewise for alignment (pairs whose alignment differs)."""
    n = len(rows)
    decided = [r for r in rows if r["label_0"] != r["label_1"]]

    def disagreement(key: str) -> tuple[float, int]:
        informative = [r for r in decided if r[f"{key}_0"] != r[f"{key}_1"]]
        wrong = sum((r[f"{key}_0"] > r[f"{key}_1"]) != (r["label_0"] > r["label_1"]) for r in informative)
        return (wrong / len(informative) if informative else float("nan")), len(informative)

    aesthetic_rate, aesthetic_n = disagreement("aesthetic")
    alignment_rate, alignment_n = disagreement("alignment")
    return {
        "pairs": n,
        "tie_rate": 1 - len(decided) / n if n else float("nan"),
        "disagreement_with_aesthetic": aesthetic_rate,
        "pairs_compared_aesthetic": aesthetic_n,
        "disagreement_with_alignment": alignment_rate,
        "pairs_compared_alignment": alignment_n,
    }


def model_statistics(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean oracle scores of each source model's images (as they appear in pairs)."""
    by_model: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        for side in ("0", "1"):
            by_model.setdefault(r[f"model_{side}"], []).append((r[f"alignment_{side}"], r[f"aesthetic_{side}"]))
    return {m: {"alignment": float(np.mean([v[0] for v in vals])), "aesthetic": float(np.mean([v[1] for v in vals])),
                "images_in_pairs": len(vals)} for m, vals in by_model.items()}


def build_preference_data(models_dir: str | Path, output: str | Path, settings: PreferenceDataSettings | None = None,
                          progress: bool = True) -> dict[str, Any]:
    """Sample, label and save the generic preference set (``datasets`` ``save_to_disk`` with the
    splits ``train`` and ``validation_unique``) into ``output``; returns its statistics (also
    written to ``output/statistics.json``)."""
    import datasets

    settings = settings or PreferenceDataSettings()
    models_dir, output = Path(models_dir), Path(output)
    missing = [m for m in settings.models if not (models_dir / m).is_dir()]
    if missing:
        raise FileNotFoundError(f"{models_dir}: no source model {missing} (run the pretraining stage first)")
    start = time.perf_counter()
    prompts = training_prompts()
    if settings.prompts is not None:
        prompts = prompts[: settings.prompts]
    order = np.random.default_rng(derive_seed(settings.seed, "toy-pair-split")).permutation(len(prompts))
    n_val = max(1, round(len(prompts) * settings.validation_prompts))
    val_prompts = {prompts[int(i)] for i in order[:n_val]}
    images = sample_models(models_dir, prompts, settings, progress)
    rows = make_pairs(prompts, images, settings)
    splits = {
        "train": [r for r in rows if r["caption"] not in val_prompts],
        "validation_unique": [r for r in rows if r["caption"] in val_prompts],
    }
    features = datasets.Features({
        "caption": datasets.Value("string"), "jpg_0": datasets.Value("binary"), "jpg_1": datasets.Value("binary"),
        "label_0": datasets.Value("float64"), "label_1": datasets.Value("float64"),
        "model_0": datasets.Value("string"), "model_1": datasets.Value("string"),
        "alignment_0": datasets.Value("float64"), "alignment_1": datasets.Value("float64"),
        "aesthetic_0": datasets.Value("float64"), "aesthetic_1": datasets.Value("float64"),
    })
    dataset = datasets.DatasetDict({
        name: datasets.Dataset.from_list(split_rows, features=features) for name, split_rows in splits.items()
    })
    dataset.save_to_disk(str(output))
    stats = {
        "settings": asdict(settings),
        "prompts": {"train": len(prompts) - n_val, "validation_unique": n_val},
        "rows": {name: len(r) for name, r in splits.items()},
        "labels": label_statistics(rows),
        "models": model_statistics(rows),
        "seconds": round(time.perf_counter() - start, 1),
    }
    (output / "statistics.json").write_text(json.dumps(stats, indent=2))
    return stats
