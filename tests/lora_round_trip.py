"""A trained run's LoRA, loaded into the plain diffusers pipeline, against the trained policy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fixed_scorers import PROMPTS
from spo.sampling import ddim_sample


def assert_lora_reproduces_policy(trainer: Any, model: Path, lora_dir: Path, flow: bool = False) -> None:
    """``lora_dir`` (diffusers format) loads with ``load_lora_weights`` into the pipeline at
    ``model``, changes its output, and then equals the trained policy's deterministic sample (DDIM
    eta 0, or for a flow model its own Euler scheduler = the flow SDE at noise level 0)."""
    from diffusers import DDIMScheduler, DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(model), **({"text_encoder_3": None, "tokenizer_3": None} if flow else {}))
    if not flow:
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=4, guidance_scale=5.0, height=32, width=32, output_type="latent",
              **({} if flow else {"eta": 0.0}))
    before = pipe(PROMPTS[:1], generator=torch.Generator().manual_seed(0), **kw).images
    pipe.load_lora_weights(str(lora_dir))
    after = pipe(PROMPTS[:1], generator=torch.Generator().manual_seed(0), **kw).images
    assert float((after - before).abs().max()) > 1e-3
    trainer.backbone.policy_forward = None
    ours = ddim_sample(trainer.backbone, PROMPTS[:1], num_inference_steps=4, eta=0.0, guidance_scale=5.0,
                       generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours, after, rtol=1e-4, atol=1e-4)
