"""Pretraining the toy base model from scratch on rendered scenes (``spo toy pretrain``).

The training set is drawn on the fly, deterministically from the seed: a training-split scene,
rendered at a random placement, then kept clean (50%), degraded in detail (40%: one or two
degradations, random strengths) or drawn misaligned with its prompt (10%: one attribute
changed). So the base model learns layout well and detail imperfectly, the room SPO should use.

Standard epsilon-prediction DDPM training (1000 steps, linear betas), the text encoder trained
jointly, 10% of prompts dropped to "" for classifier-free guidance, an EMA of the weights is what
gets saved. Step-based (not time-based), so the same seed rebuilds the same weights on the same
software; snapshots at given fractions of the run are the "weaker checkpoints" of the toy
preference data. The loop checkpoints itself (``OUTPUT/pretrain-run``) and ``--resume`` ends
with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..files import atomic_directory
from .grammar import parse_prompt, training_prompts
from .loop_checkpoint import load_loop, resume_point, save_loop
from .model import ToyPipeline, build_toy_pipeline
from .render import degrade_randomly, misalign, render, to_tensor_range


@dataclass
class PretrainSettings:
    steps: int = 3600
    batch_size: int = 64
    lr: float = 1e-3
    ema_decay: float = 0.999
    cfg_dropout: float = 0.1
    clean_share: float = 0.5
    degraded_share: float = 0.4  # the rest is misaligned
    snapshots: list[float] = field(default_factory=lambda: [0.15, 0.4])
    seed: int = 0

    def snapshot_steps(self) -> list[int]:
        return sorted({max(1, int(f * self.steps)) for f in self.snapshots})

    def snapshot_names(self) -> list[str]:
        """The snapshot directories the run writes (``snapshot-00540`` ... for the defaults)."""
        return [f"snapshot-{step:05d}" for step in self.snapshot_steps()]


def training_batch(rng: np.random.Generator, size: int, settings: PretrainSettings) -> tuple[torch.Tensor, list[str]]:
    """``size`` (image, prompt) pairs of the base model's training distribution."""
    prompts = training_prompts()
    images, texts = [], []
    for _ in range(size):
        prompt = prompts[int(rng.integers(0, len(prompts)))]
        scene = parse_prompt(prompt)
        u = rng.random()
        if u < settings.clean_share:
            img = render(scene, rng)
        elif u < settings.clean_share + settings.degraded_share:
            img, _ = degrade_randomly(render(scene, rng), rng, scene)
        else:
            img = render(misalign(scene, rng), rng)
        images.append(to_tensor_range(img))
        texts.append(prompt)
    return torch.from_numpy(np.stack(images)), texts


def _encode(pipeline: ToyPipeline, prompts: list[str]) -> torch.Tensor:
    ids = pipeline.tokenizer(prompts, padding="max_length", max_length=pipeline.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
    return pipeline.text_encoder(ids.to(pipeline.text_encoder.device))[0]


def pretrain(output: str | Path, settings: PretrainSettings | None = None, progress: bool = True, *,
             resume: bool = False, checkpoint_every: int = 100, stop_after: int | None = None,
             objective: str = "epsilon", device: str = "cpu") -> dict:
    """Train the toy base model; writes ``OUTPUT/base`` (EMA weights), snapshots
    ``OUTPUT/snapshot-NNNNN`` and ``OUTPUT/pretrain.json``; returns the summary.

    Every ``checkpoint_every`` steps the loop state goes to ``OUTPUT/pretrain-run/checkpoints``;
    ``resume`` continues from the latest one to the same weights as an uninterrupted run.
    ``stop_after``: stop after that many steps in total, as an interruption would (tests).

    ``objective="flow"`` trains the same networks on the same data with the rectified-flow
    objective instead (SD3's): x_s = (1 - s) x0 + s eps with s logit-normal(0, 1), target
    v = eps - x0, network timestep 1000 s; the model gets a flow-matching scheduler.

    ``device`` runs the networks there (a GPU); every random draw stays on the CPU, so the data,
    noise and timesteps are the CPU run's and only the arithmetic differs."""
    settings = settings or PretrainSettings()
    output = Path(output)
    run_dir = output / "pretrain-run"
    # the objective is recorded beside the settings (the epsilon build's records predate it)
    wanted = json.loads(json.dumps(asdict(settings)))
    if objective != "epsilon":
        wanted["objective"] = objective
    resume_from = resume_point(run_dir, resume, "toy pretraining")
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    pipeline = build_toy_pipeline(seed=settings.seed, objective=objective).to(device)
    unet, text_encoder = pipeline.unet.train(), pipeline.text_encoder.train()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    state_tensors = {**{f"unet.{n}": p for n, p in unet.named_parameters()},
                     **{f"text_encoder.{n}": p for n, p in text_encoder.named_parameters()},
                     **{f"ema.{i:04d}": e for i, e in enumerate(ema)}}
    done, history = 0, {"losses": [], "seconds": 0.0}
    if resume_from is not None:
        done, history = load_loop(resume_from, tensors=state_tensors, optimizer=optimizer, rng=rng, settings=wanted)
    alphas = getattr(pipeline.scheduler, "alphas_cumprod", None)
    snapshot_steps = set(settings.snapshot_steps())
    losses: list[float] = list(history["losses"])
    # where each stretch of steps ran (a resumed run may change device): part of the record
    segments = list(history.get("segments", [{"from_step": 0, "device": "not recorded"}] if done else []))
    segments.append({"from_step": done, "device": _device_name(device)})
    start = time.perf_counter() - float(history["seconds"])
    end = settings.steps if stop_after is None else min(stop_after, settings.steps)
    with tqdm(total=settings.steps, initial=done, desc="toy pretraining", unit="step", disable=not progress) as bar:
        for step in range(done + 1, end + 1):
            x0, prompts = training_batch(rng, settings.batch_size, settings)
            drop = rng.random(len(prompts)) < settings.cfg_dropout
            prompts = ["" if d else p for p, d in zip(prompts, drop)]
            if objective == "flow":
                s = torch.sigmoid(torch.randn(len(prompts)))  # logit-normal(0, 1), as SD3 trains
                noise = torch.randn_like(x0)
                x_t = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * noise
                t, target = s * 1000, noise - x0
            else:
                t = torch.randint(0, len(alphas), (len(prompts),))
                noise = torch.randn_like(x0)
                a = alphas[t].view(-1, 1, 1, 1)
                x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
                target = noise
            x_t, t, target = x_t.to(device), t.to(device), target.to(device)
            pred = unet(x_t, t, encoder_hidden_states=_encode(pipeline, prompts), return_dict=False)[0]
            loss = F.mse_loss(pred, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            with torch.no_grad():
                decay = min(settings.ema_decay, (1 + step) / (10 + step))
                for e, p in zip(ema, params):
                    e.mul_(decay).add_(p.detach(), alpha=1 - decay)
            losses.append(float(loss.detach()))
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
            if step in snapshot_steps or step == settings.steps:
                name = "base" if step == settings.steps else f"snapshot-{step:05d}"
                _save_ema(pipeline, params, ema, output / name)
            if step % checkpoint_every == 0 and step != settings.steps:
                save_loop(run_dir, step, tensors=state_tensors, optimizer=optimizer, rng=rng, settings=wanted,
                          history={"losses": losses, "seconds": time.perf_counter() - start, "segments": segments})
    if end < settings.steps:
        return {"settings": wanted, "stopped_after": end}
    seconds = time.perf_counter() - start
    summary = {"settings": asdict(settings), **({"objective": objective} if objective != "epsilon" else {}),
               **({"segments": segments} if len(segments) > 1 or torch.device(device).type != "cpu" else {}),
               "seconds": round(seconds, 1),
               "steps_per_second": round(settings.steps / seconds, 3),
               "loss_first_100": float(np.mean(losses[:100])), "loss_last_100": float(np.mean(losses[-100:]))}
    (output / "pretrain.json").write_text(json.dumps(summary, indent=2))
    return summary


def _device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return str(device)


def _save_ema(pipeline: ToyPipeline, params: list[torch.nn.Parameter], ema: list[torch.Tensor], directory: Path) -> None:
    saved = copy.deepcopy(pipeline)
    saved_params = list(saved.unet.parameters()) + list(saved.text_encoder.parameters())
    with torch.no_grad():
        for target, value in zip(saved_params, ema):
            target.copy_(value)
    saved.unet.eval()
    saved.text_encoder.eval()
    with atomic_directory(directory) as partial:  # a kill mid-save leaves no half model
        saved.save_pretrained(partial)
