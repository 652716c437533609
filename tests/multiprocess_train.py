"""Run under `accelerate launch` by test_multiprocess.py: SPO training on two CPU processes.

Round 0: process 1 finds no valid pair (all its scores tie). Round 1: no process finds one, so
the round must be skipped everywhere without a hang. Each process writes what it saw.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from spo.config import load_config
from spo.training import SPOTrainer


def main() -> None:
    model, prompts, run = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    preset = sys.argv[4] if len(sys.argv) > 4 else "sd15"  # sd3: the flow SDE through the same trainer
    extra = ["pools.kappa=null", "pools.divert_start_step=2", "lora.rank=4", "lora.alpha=4"] if preset == "sd3" else []
    config = load_config(preset, [*extra,
        f"model.pretrained={model}", "model.resolution=32", "model.device=cpu", "model.dtype=float32",
        "train.mixed_precision=no", f"data.prompts={prompts}", "train.rounds=4", "train.prompts_per_round=2",
        "train.batch_size=4", "sampling.num_inference_steps=8", "pools.threshold=0.0", "optimizer.lr=1e-3",
        "logging.tensorboard=false", "logging.checkpoint_every=2",
    ])
    trainer = SPOTrainer(config, run, scorer=lambda *a: torch.zeros(1), progress=False)
    rank = trainer.accelerator.process_index
    seen: list[int] = []

    def scorer(images: torch.Tensor, prompts: list[str], timesteps: torch.Tensor) -> torch.Tensor:
        round_index = trainer.rounds_done
        if round_index == 1 or (round_index == 0 and rank == 1):
            return torch.zeros(images.shape[0])  # every pool is a tie
        return images.mean(dim=(1, 2, 3)) * 100

    trainer.method.sampler.scorer = scorer
    original = trainer.train_on

    def train_on(records, round_index):  # noqa: ANN001, ANN202
        seen.append(len(records))
        return original(records, round_index)

    trainer.train_on = train_on  # type: ignore[method-assign]
    local_logs: list[dict] = []
    collect = trainer.method.collect

    def collect_and_keep(items, gen):  # noqa: ANN001, ANN202 - what this process alone saw
        collected = collect(items, gen)
        local_logs.append({"units": collected.units, "score_mean": collected.log["score_mean"],
                           "score_mean_per_t": collected.log["score_mean_per_t"]})
        return collected

    trainer.method.collect = collect_and_keep  # type: ignore[method-assign]
    result = trainer.train()
    weights = torch.cat([p.detach().flatten() for p in trainer.params])
    (run / f"rank-{rank}.json").write_text(json.dumps({
        "rank": rank, "num_processes": trainer.accelerator.num_processes, "steps": result.steps,
        "skipped": result.skipped_rounds, "local_records": seen, "local_logs": local_logs, "weights": weights.double().sum().item(),
        "weights_hash": float((weights.double() * torch.arange(weights.numel(), dtype=torch.float64)).sum()),
    }))


if __name__ == "__main__":
    main()
