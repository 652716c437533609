"""Run under `accelerate launch` by test_multiprocess.py: Diffusion-DPO, D3PO and DDPO on two CPU
processes, one after the other (or the methods of the optional 5th argument, comma-separated:
``lpo`` judges the pools' latents with a fixed latent scorer). Each process writes what it saw
per method."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from fixed_scorers import LatentBrightness
from spo.config import load_config
from spo.training import SPOTrainer


def brightness(images: torch.Tensor, prompts: list[str], timesteps: torch.Tensor) -> torch.Tensor:
    return images.mean(dim=(1, 2, 3)) * 100


OWN = {
    "diffusion_dpo": ["objective.beta=5000"],
    "d3po": ["objective.beta=0.1"],
    "ddpo": ["objective.stat_min_count=2"],
    # the sd15-lpo preset's pools (k 4 from the first step, the sigma tie threshold) and beta 500
    "lpo": ["preference.checkpoint=null", "preference.text_projection=null", "preference.dtype=float32"],
}


def main() -> None:
    model, prompts, data, out = sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])
    methods = sys.argv[5].split(",") if len(sys.argv) > 5 else ["diffusion_dpo", "d3po", "ddpo"]
    for method in methods:
        run = out / method
        lpo = method == "lpo"
        config = load_config("sd15-lpo" if lpo else "sd15", [
            f"model.pretrained={model}", "model.resolution=32", "model.device=cpu", "model.dtype=float32",
            "train.mixed_precision=no", f"data.prompts={prompts}", f"data.preference_data={data}", "train.rounds=2",
            "train.prompts_per_round=3", "train.batch_size=6", "sampling.num_inference_steps=4", "optimizer.lr=1e-3",
            "logging.tensorboard=false", "logging.checkpoint_every=2", f"objective.name={method}",
            *OWN[method], *([f"preference.pretrained={model}"] if lpo else []),
        ])
        scorer = None if method == "diffusion_dpo" else LatentBrightness() if lpo else brightness
        trainer = SPOTrainer(config, run, scorer=scorer, progress=False)
        prepared: list[float] = []
        original = trainer.method.prepare

        def prepare(records, original=original, prepared=prepared):  # noqa: ANN001, ANN202
            records = original(records)
            prepared.append(float(getattr(records, "advantage", torch.zeros(1)).double().sum()))
            return records

        trainer.method.prepare = prepare  # type: ignore[method-assign]
        result = trainer.train()
        rank = trainer.accelerator.process_index
        weights = torch.cat([p.detach().flatten() for p in trainer.params]).double()
        (run / f"rank-{rank}.json").write_text(json.dumps({
            "rank": rank, "num_processes": trainer.accelerator.num_processes, "steps": result.steps,
            "prepared": prepared, "weights_hash": float((weights * torch.arange(weights.numel())).sum()),
        }))
        trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
