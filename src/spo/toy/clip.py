"""The toy world's CLIP: a tiny transformers ``CLIPModel`` trained contrastively on toy renders.

It stands where CLIP-H stands in the paper's world: an image-text model that knows what a prompt
asks for (layout) but was never asked which of two images is *better*. The toy PickScore is this
model fine-tuned on the generic preference pairs (``spo train-spm preference.variant=clean``),
and the toy SPM is built from the toy PickScore, as the paper builds its SPM from PickScore.

Training data, drawn on the fly from the seed: distinct training scenes per batch, each rendered
and, as in the base model's training set, often degraded in detail; the caption always describes
what is drawn (contrastive pairs must be true). Loss: CLIP's symmetric InfoNCE
(``CLIPModel(..., return_loss=True)``). The loop checkpoints itself and resumes exactly.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..preference.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_preprocess, save_clip_image_config
from .grammar import parse_prompt, training_prompts
from .loop_checkpoint import load_loop, resume_point, save_loop
from .model import MAX_LENGTH, RESOLUTION, build_toy_tokenizer
from .render import degrade_randomly, render, to_tensor_range


@dataclass
class ToyCLIPSettings:
    steps: int = 1500
    batch_size: int = 64
    lr: float = 5e-4
    degraded_share: float = 0.5
    seed: int = 0


def build_toy_clip(seed: int = 0) -> tuple[Any, Any]:
    """An untrained tiny CLIPModel (ViT 4x4 patches on 32x32, width 64) and the toy tokenizer."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    tokenizer = build_toy_tokenizer()
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=MAX_LENGTH, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(image_size=RESOLUTION, patch_size=4, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=3, num_attention_heads=4),
        projection_dim=64,
    )
    return CLIPModel(config), tokenizer


def contrastive_batch(rng: np.random.Generator, size: int, settings: ToyCLIPSettings) -> tuple[torch.Tensor, list[str]]:
    """``size`` distinct training scenes, rendered (some degraded in detail), with their prompts."""
    prompts = training_prompts()
    chosen = rng.choice(len(prompts), size=min(size, len(prompts)), replace=False)
    images, texts = [], []
    for i in chosen:
        prompt = prompts[int(i)]
        scene = parse_prompt(prompt)
        img = render(scene, rng)
        if rng.random() < settings.degraded_share:
            img, _ = degrade_randomly(img, rng, scene)
        images.append(to_tensor_range(img))
        texts.append(prompt)
    return torch.from_numpy(np.stack(images)), texts


def pretrain_toy_clip(output: str | Path, settings: ToyCLIPSettings | None = None, progress: bool = True, *,
                      resume: bool = False, checkpoint_every: int = 100, stop_after: int | None = None) -> dict[str, Any]:
    """Train the toy CLIP and save it as a CLIPModel directory (with tokenizer and image processor).

    Every ``checkpoint_every`` steps the loop state goes to ``OUTPUT-run/checkpoints`` (beside
    the model directory, so the shipped directory holds the model alone); ``resume`` continues
    from the latest one to the same weights as an uninterrupted run. ``stop_after``: stop after
    that many steps in total, as an interruption would (tests)."""
    settings = settings or ToyCLIPSettings()
    output = Path(output)
    run_dir = output.with_name(output.name + "-run")
    wanted = json.loads(json.dumps(asdict(settings)))
    resume_from = resume_point(run_dir, resume, "toy CLIP training")
    rng = np.random.default_rng(settings.seed)
    model, tokenizer = build_toy_clip(settings.seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.01)
    state_tensors = dict(model.named_parameters())
    done, history = 0, {"losses": [], "accuracies": [], "seconds": 0.0}
    if resume_from is not None:
        done, history = load_loop(resume_from, tensors=state_tensors, optimizer=optimizer, rng=rng, settings=wanted)
    losses, accuracies = list(history["losses"]), list(history["accuracies"])
    start = time.perf_counter() - float(history["seconds"])
    end = settings.steps if stop_after is None else min(stop_after, settings.steps)
    with tqdm(total=settings.steps, initial=done, desc="toy CLIP (contrastive)", unit="step", disable=not progress) as bar:
        for step in range(done + 1, end + 1):
            images, texts = contrastive_batch(rng, settings.batch_size, settings)
            tokens = tokenizer(texts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt")
            pixels = clip_preprocess(images, RESOLUTION, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
            out = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=pixels,
                        return_loss=True)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(float(out.loss.detach()))
            accuracies.append(float((out.logits_per_image.argmax(-1) == torch.arange(len(texts))).float().mean()))
            bar.update(1)
            if step % 25 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-25:]):.3f}", acc=f"{np.mean(accuracies[-25:]):.2f}")
            if step % checkpoint_every == 0 and step != settings.steps:
                save_loop(run_dir, step, tensors=state_tensors, optimizer=optimizer, rng=rng, settings=wanted,
                          history={"losses": losses, "accuracies": accuracies, "seconds": time.perf_counter() - start})
    if end < settings.steps:
        return {"settings": wanted, "stopped_after": end}
    model.eval()
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    save_clip_image_config(output, RESOLUTION)
    window = min(100, len(losses))
    summary = {"settings": asdict(settings), "seconds": round(time.perf_counter() - start, 1),
               "loss_first": float(np.mean(losses[:window])), "loss_last": float(np.mean(losses[-window:])),
               "batch_accuracy_last": float(np.mean(accuracies[-window:]))}
    (output / "toy_clip.json").write_text(json.dumps(summary, indent=2))
    return summary
