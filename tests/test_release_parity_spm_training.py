"""SPM training against the authors' release, run from its own modules in this environment.

The release's SPM trainer (``step_aware_preference_model/trainer``) is read from
../shared/reference/spo-release and imported under its own package name ``trainer`` through bare
namespaces: its package ``__init__`` files only register hydra configs. Stand-ins, here only:
``omegaconf.II`` (a config interpolation marker; every field used is set explicitly),
``torchvision`` (imported at module level; the normalisation the task uses is given below with
torchvision's semantics) and ``trainer.accelerators.base_accelerator`` (a type annotation only).

What is compared on identical inputs:

- the criterion (``criterions/spm_criterion.py::SPMCriterion.calc_loss``) against
  :func:`spo.preference.preference_pair_loss`, including ties, example weights and the
  normalisation over the batch gathered from every process, values and gradients;
- the noised-pair construction (``tasks/spm_task.py::SPMTask.get_noised_imgs`` and the image path
  of ``train_step``) on the tiny SD-1.5 pipeline against
  :func:`spo.training.spm_trainer.noised_x0_images` + the SPM's image path: one t and one noise per
  pair, CFG 5, the x0 estimate, decoding, clamp -> bicubic resize -> clamp -> normalise;
- validation (``SPMTask.run_inference`` at t = 0: the clean images, and its accuracy formula)
  against :func:`spo.preference.loss.release_accuracy` and the SPM's scores.

Both sides draw the VAE posterior once: ours with its generator; the release's
``vae.encode(...).latent_dist.sample()`` is handed those same latents by a test double of the VAE
encoder, so that the release's only random draws are its own ``torch.randint`` (t) and
``torch.randn_like`` (the pair's noise), reproduced here from the same seed.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.machinery
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from release_oracle import RELEASE, require_release
from spo.preference import StepAwarePreferenceModel, preference_pair_loss, spm_preprocess
from spo.preference.loss import release_accuracy
from spo.training.spm_trainer import noised_x0_images, warmup_decay_factor

TRAINER = RELEASE / "step_aware_preference_model" / "trainer"
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _namespace(name: str, path: Path | None = None) -> types.ModuleType:
    if name not in sys.modules:
        module = types.ModuleType(name)
        module.__path__ = [str(path)] if path is not None else []  # type: ignore[attr-defined]
        module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        sys.modules[name] = module
    return sys.modules[name]


class _Normalize:
    """torchvision.transforms.Normalize on a float tensor (B, C, H, W): (x - mean) / std."""

    def __init__(self, mean: Any, std: Any) -> None:
        self.mean, self.std = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.sub(self.mean.to(x)).div(self.std.to(x))


def _trainer_module(dotted: str) -> types.ModuleType:
    """``trainer.<dotted>`` of the release. The stand-ins for ``omegaconf`` and ``torchvision``
    exist only while the release's modules import (they use them at import time only), so that
    nothing else in the test session sees them."""
    require_release()
    name = f"trainer.{dotted}"
    if name in sys.modules:
        return sys.modules[name]
    # what the release imports from real packages, imported before any stand-in exists
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline  # noqa: F401
    from transformers import AutoModel, AutoProcessor  # noqa: F401

    omegaconf = types.ModuleType("omegaconf")
    omegaconf.II = lambda key: f"${{{key}}}"  # type: ignore[attr-defined]
    torchvision = types.ModuleType("torchvision")
    torchvision.transforms = types.SimpleNamespace(Normalize=_Normalize)  # type: ignore[attr-defined]
    stand_ins = {"omegaconf": omegaconf, "torchvision": torchvision}
    saved = {key: sys.modules.get(key) for key in stand_ins}
    _namespace("trainer", TRAINER)
    for package in ("accelerators", "criterions", "tasks", "utils", "models", "datasetss"):
        _namespace(f"trainer.{package}", TRAINER / package)
    if "trainer.accelerators.base_accelerator" not in sys.modules:
        stub = types.ModuleType("trainer.accelerators.base_accelerator")
        stub.BaseAccelerator = object  # type: ignore[attr-defined]
        sys.modules["trainer.accelerators.base_accelerator"] = stub
    try:
        for key, module in stand_ins.items():
            if saved[key] is None:
                sys.modules[key] = module
        return importlib.import_module(name)
    finally:
        for key, module in stand_ins.items():
            if sys.modules.get(key) is module:
                del sys.modules[key]


# ------------------------------------------------------------------------------ the criterion
def _features(n: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, dim, generator=generator, dtype=torch.float64)
    return (x / x.norm(dim=-1, keepdim=True)).requires_grad_(True)


def test_criterion_matches_the_release_with_the_weights_of_every_process() -> None:
    """Two processes of 4 pairs: the release gathers features, labels and num_example_per_prompt
    from both and normalises the weights over all 8; each of our processes computes its share
    with the gathered weight sum (and DDP averages num_processes x share): same loss, same
    gradients for every feature."""
    criterion_module = _trainer_module("criterions.spm_criterion")
    config = criterion_module.SPMCriterionConfig(is_distributed=False)
    criterion = criterion_module.SPMCriterion(config)
    g = torch.Generator().manual_seed(0)
    text, img0, img1 = _features(8, 6, g), _features(8, 6, g), _features(8, 6, g)
    label_0 = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 0.5, 1.0, 0.0], dtype=torch.float64)
    label_1 = 1 - label_0
    n = torch.tensor([1.0, 3.0, 3.0, 2.0, 5.0, 1.0, 2.0, 4.0], dtype=torch.float64)  # the data set's column
    logit_scale = torch.tensor(100.0, dtype=torch.float64)
    release = criterion.calc_loss(text, img0, img1, logit_scale, label_0, label_1, n)
    release_grads = torch.autograd.grad(release, (text, img0, img1))

    text2, a, b = (x.detach().clone().requires_grad_(True) for x in (text, img0, img1))
    s0, s1 = logit_scale * (text2 * a).sum(-1), logit_scale * (text2 * b).sum(-1)
    labels, w = torch.stack([label_0, label_1], dim=-1), 1 / n
    processes = 2
    shares = [preference_pair_loss(s0[p * 4:(p + 1) * 4], s1[p * 4:(p + 1) * 4], labels[p * 4:(p + 1) * 4],
                                   w[p * 4:(p + 1) * 4], weight_sum=float(w.sum())) for p in range(processes)]
    ours = sum(shares)
    # the release adds log 0.5 for a tie as a float32 constant (torch.log(torch.tensor(0.5))):
    # ~1e-8 per tie, a constant without gradient
    assert abs(float(ours.detach()) - float(release.detach())) < 1e-7
    ddp_average = sum(processes * share for share in shares) / processes
    ours_grads = torch.autograd.grad(ddp_average, (text2, a, b))
    for r, o in zip(release_grads, ours_grads):
        torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-12)
    # per-process normalisation (ours before) is a different loss when the weight sums differ
    per_process = sum(preference_pair_loss(s0[p * 4:(p + 1) * 4], s1[p * 4:(p + 1) * 4], labels[p * 4:(p + 1) * 4],
                                           w[p * 4:(p + 1) * 4]) for p in range(processes)) / processes
    assert abs(float(per_process.detach()) - float(release.detach())) > 1e-3


# ------------------------------------------------------------------------------ the noised pairs
def _task(tiny_sd15_path: Path, clip_size: int) -> Any:
    """The release's SPMTask without its __init__ (which loads SD-1.5 in fp16 from the hub): the
    attributes that __init__ sets (spm_task.py, about 74-117), made the same way in fp32 from the
    tiny pipeline: its scheduler loaded as the release's BatchableDDIMScheduler with 1000
    inference steps, the negative prompt embedding of "" padded to the tokenizer's length."""
    from diffusers import StableDiffusionPipeline

    spm_task = _trainer_module("tasks.spm_task")
    ddim = _trainer_module("utils.batchable_ddim_scheduler")
    task = spm_task.SPMTask.__new__(spm_task.SPMTask)
    fields = {f.name for f in dataclasses.fields(spm_task.SPMTaskConfig)}
    names = {name: name for name in fields if name.endswith("_column_name")}
    names.update(pixels_0_column_name="pixel_values_0", pixels_1_column_name="pixel_values_1",
                 label_0_column_name="label_0", label_1_column_name="label_1", input_ids_column_name="input_ids",
                 sdv15_input_ids_column_name="sdv15_input_ids", timesteps_column_name="timesteps")
    task.cfg = spm_task.SPMTaskConfig(**names, model_type="sd1.5", use_pickscore_label=False, cfg_scale=5.0)
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd15_path), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = ddim.BatchableDDIMScheduler.from_pretrained(str(tiny_sd15_path), subfolder="scheduler")
    pipe.scheduler.set_timesteps(1000)
    task.diff_pipe = pipe
    with torch.no_grad():
        ids = pipe.tokenizer([""], return_tensors="pt", padding="max_length", truncation=True,
                             max_length=pipe.tokenizer.model_max_length).input_ids
        task.sd_neg_prompt_embeds = pipe.text_encoder(ids)[0]
    task.normalize = _Normalize(MEAN, STD)
    task.processed_img_size = clip_size
    return task, spm_task


class _EncoderDouble:
    """Hands the release's ``vae.encode(img).latent_dist.sample()`` the given (unscaled)
    latents, one batch per call, drawing nothing."""

    def __init__(self, batches: list[torch.Tensor]) -> None:
        self.batches = list(batches)

    def __call__(self, images: torch.Tensor) -> Any:
        latents = self.batches.pop(0)
        assert latents.shape[0] == images.shape[0]
        # as a diffusers VAE returns them: contiguous (torch.randn_like follows the memory layout)
        return types.SimpleNamespace(latent_dist=types.SimpleNamespace(sample=lambda: latents.contiguous().clone()))


def test_noised_pairs_match_the_release(tiny_sd15_path: Path) -> None:
    from spo.backbones import SD15Backbone

    n, size, seed = 3, 24, 7  # 32 px images resized to a 24 px CLIP: the resize is exercised
    backbone = SD15Backbone.from_pretrained(str(tiny_sd15_path), device="cpu")
    captions = ["a red circle", "two blue squares", "a green star at night"]
    g = torch.Generator().manual_seed(1)
    images = (torch.rand(n, 2, 3, 32, 32, generator=g) * 2 - 1)

    # the release's draws, reproduced: t first (train_step), then the pair's noise (get_noised_imgs)
    torch.manual_seed(seed)
    timesteps = torch.randint(0, 1000, (n,)).long()
    noise = torch.randn(n, 4, 16, 16)

    seen: list[torch.Tensor] = []
    encode = backbone.encode_images
    backbone.encode_images = lambda x, generator=None: seen.append(encode(x, generator)) or seen[-1]  # type: ignore[method-assign]
    cond = backbone.encode_prompts(captions)
    ours_x0 = noised_x0_images(backbone, images, cond, timesteps, noise, 5.0, torch.Generator().manual_seed(2))
    latents = seen[0].view(n, 2, *seen[0].shape[1:])

    task, _ = _task(tiny_sd15_path, size)
    factor = task.diff_pipe.vae.config.scaling_factor
    task.diff_pipe.vae.encode = _EncoderDouble([latents[:, 0] / factor, latents[:, 1] / factor])
    ids = task.diff_pipe.tokenizer(captions, padding="max_length", max_length=task.diff_pipe.tokenizer.model_max_length,
                                   truncation=True, return_tensors="pt").input_ids
    batch = {"pixel_values_0": images[:, 0].clone(), "pixel_values_1": images[:, 1].clone(), "sdv15_input_ids": ids}
    captured: dict[str, Any] = {}
    torch.manual_seed(seed)
    task.train_step(None, lambda model, b: captured.update(b), batch)  # type: ignore[arg-type]
    assert torch.equal(captured["timesteps"], timesteps)

    # the release's decoded x0 estimates (get_noised_imgs) against ours, same t, same noise
    task.diff_pipe.vae.encode = _EncoderDouble([latents[:, 0] / factor, latents[:, 1] / factor])
    torch.manual_seed(seed)
    torch.randint(0, 1000, (n,))
    with torch.no_grad():
        rel_0, rel_1 = task.get_noised_imgs({**batch, "pixel_values_0": images[:, 0], "pixel_values_1": images[:, 1]},
                                            timesteps)
    x0_gap = max(float((ours_x0[:, k] - r.clamp(-1, 1)).abs().max()) for k, r in enumerate((rel_0, rel_1)))
    assert x0_gap < 1e-4, x0_gap

    # the pixels the release's SPM trains on: clamp -> bicubic to (size, size) -> clamp -> normalise
    pixel_gap = 0.0
    for k in range(2):
        ours_pixels = spm_preprocess(ours_x0[:, k].clamp(-1, 1), size, MEAN, STD)
        pixel_gap = max(pixel_gap, float((ours_pixels - captured[f"pixel_values_{k}"]).abs().max()))
    assert pixel_gap < 1e-4, pixel_gap
    print(f"max |x0 image - release| = {x0_gap:.2e}, max |SPM input - release| = {pixel_gap:.2e}")


def test_validation_at_t0_scores_the_clean_images_as_the_release(tiny_sd15_path: Path, tiny_clip_path: Path) -> None:
    """``SPMTask.run_inference`` at t = 0 on our SPM (through an adapter with the release model's
    interface): it scores the clean images (no UNet call) and counts accuracy by its formula, ties
    half; :func:`release_accuracy` on our scores of the clean images gives the same."""
    spm = StepAwarePreferenceModel.from_pretrained(str(tiny_clip_path))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in spm.named_parameters():
            if "adaLN" in name or "t_embedder" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    task, _ = _task(tiny_sd15_path, spm.size)
    calls = []
    task.diff_pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    prompts = ["a red circle", "two blue squares", "a green star", "a cat", "a dog", "a tree"]
    images = torch.rand(6, 2, 3, 40, 40, generator=g) * 2.4 - 1.2  # unclamped, resized to 32
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    token_rows = {}

    class Adapter(torch.nn.Module):
        """The release's model interface over our SPM: (text ids, pixel values, t) -> features."""

        logit_scale = spm.model.logit_scale

        def forward(self, text_inputs: torch.Tensor, image_inputs: torch.Tensor, time_cond: torch.Tensor) -> tuple:
            texts = [token_rows[tuple(row.tolist())] for row in text_inputs]
            return spm.text_embeddings(texts, cache=False), spm.pixel_embeddings(image_inputs, time_cond)

    ids = spm.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    token_rows.update({tuple(row.tolist()): p for row, p in zip(ids, prompts)})
    criterion = _trainer_module("criterions.spm_criterion").SPMCriterion(
        _trainer_module("criterions.spm_criterion").SPMCriterionConfig(is_distributed=False))
    batch = {"pixel_values_0": images[:, 0].clone(), "pixel_values_1": images[:, 1].clone(), "input_ids": ids,
             "label_0": labels[:, 0], "label_1": labels[:, 1]}
    from accelerate import PartialState

    PartialState(cpu=True)  # the release's accelerate logger wants one
    result = task.run_inference(Adapter(), criterion, [batch], 0)
    assert calls == []  # t = 0: no noising, no UNet
    with torch.no_grad():
        flat = images.flatten(0, 1).clamp(-1, 1)  # our trainer clamps first, as the release
        scores = spm(flat, [p for p in prompts for _ in range(2)], torch.zeros(12)).view(6, 2)
    correct, counted = release_accuracy(scores[:, 0], scores[:, 1], labels, ties=True)
    assert counted == len(result["is_correct"]) == 6
    assert correct == pytest.approx(sum(result["is_correct"]))
    assert release_accuracy(scores[:, 0], scores[:, 1], labels, ties=False)[1] == 4


def test_the_learning_rate_follows_deepspeed_warmup_decay() -> None:
    """DeepSpeed 0.12.3's own WarmupDecayLR formula, as the release configures it (log warm-up
    over 500 steps from 0, linear decay to 0 at 8000), stepped only after each optimiser step:
    the first step runs at the peak rate, the second at 0."""
    w, total = 500, 8000
    expected = [1.0, 0.0, math_log(2) / math_log(500), math_log(3) / math_log(500)]
    assert [warmup_decay_factor(s, w, total) for s in range(4)] == pytest.approx(expected)
    assert warmup_decay_factor(500, w, total) == pytest.approx(1.0)  # i = 499: log(500) / log(500)
    assert warmup_decay_factor(501, w, total) == pytest.approx(1.0)
    assert warmup_decay_factor(7999, w, total) == pytest.approx(2 / 7500)
    assert warmup_decay_factor(9000, w, total) == 0.0
    assert warmup_decay_factor(11, 10, 20, "linear") == pytest.approx(1.0)
    assert warmup_decay_factor(6, 10, 20, "linear") == pytest.approx(0.5)


def math_log(x: float) -> float:
    import math

    return math.log(x)
