"""Run under `accelerate launch` by test_multiprocess_fsdp.py: SPO through the trainer on two CPU
processes, under whatever engine the launch set up (configs/accelerate/fsdp.yaml: FSDP2; the
plain launch: DDP). Usage::

    multiprocess_fsdp.py TINY_SD15 PROMPTS OUT SCENARIO[,SCENARIO...]

Scenarios (each trains into OUT/SCENARIO):

* ``lora``: 3 rounds of LoRA SPO, previews and a checkpoint every round, gradient accumulation
  carried across rounds (``train.carry_accumulation``), so a checkpoint falls inside an open
  accumulation;
* ``lora-resume``: the same, stopped after 2 rounds (as an interruption would) and resumed by a
  new trainer from the checkpoint;
* ``full`` / ``full-resume``: the same with ``model.finetune=full`` (2 rounds; stopped after 1);
* ``lora-dropout`` / ``lora-dropout-resume``: ``lora`` / ``lora-resume`` with ``lora.dropout=0.5``
  (a forward that draws random numbers: a replayed micro-batch must draw the same);
* ``full-bf16``: 1 round of full fine-tuning with ``train.mixed_precision=bf16`` (the engine's
  dtype for the policy, and the reference held alike);
* ``methods``: Diffusion-DPO, D3PO and DDPO, 1 round each (OUT/methods/METHOD);
* ``spm`` / ``spm-resume``: ``spo train-spm`` of a step-aware preference model from the tiny
  CLIP (4 steps, validated every 2 on an uneven split of the validation pairs; stopped after 3
  and resumed from step 2); ``lrm``: LPO's latent reward model, 3 steps.

DATA (a Pick-a-Pic-style data set) and CLIP (a tiny CLIP directory) follow the scenarios for
``methods`` and the SPM scenarios.

Each process writes OUT/SCENARIO/rank-R.json: the engine, whether the UNet's (and under full
fine-tuning the reference's) parameters are sharded, and the counts.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from fixed_scorers import brightness
from spo.config import load_config
from spo.training import SPOTrainer
from spo.training.engines import engine_of


def settings(model: str, prompts: str, rounds: int, extra: list[str]) -> list[str]:
    return [
        f"model.pretrained={model}", "model.resolution=32", "model.device=cpu", "model.dtype=float32",
        "train.mixed_precision=no", f"data.prompts={prompts}", f"train.rounds={rounds}", "train.prompts_per_round=2",
        "train.batch_size=2", "train.gradient_accumulation_steps=3", "train.carry_accumulation=true",
        "sampling.num_inference_steps=6", "pools.divert_start_step=2", "pools.threshold=0.0", "optimizer.lr=1e-3",
        "logging.tensorboard=false", "logging.checkpoint_every=1", "logging.sample_every=1",
        "logging.sample_prompts=[a red circle]", *extra,
    ]


def local_numel(p: torch.nn.Parameter) -> int:
    """How many of ``p``'s elements this process holds: an FSDP2 DTensor's local shard, a ZeRO-3
    parameter's partition (``ds_tensor``; the parameter itself is empty between forwards)."""
    if hasattr(p, "ds_tensor"):
        return p.ds_tensor.numel()
    return (p.to_local() if hasattr(p, "to_local") else p).numel()


def local_fraction(module: torch.nn.Module) -> float:
    """The share of the module's weights this process holds (1/N when sharded N ways)."""
    local = sum(local_numel(p) for p in module.parameters())
    return local / sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())


def report(trainer: SPOTrainer, run: Path, **extra: object) -> None:
    unet = trainer.backbone.unet
    reference = trainer.backbone.reference_unet
    rank = trainer.accelerator.process_index
    (run / f"rank-{rank}.json").write_text(json.dumps({
        "rank": rank, "num_processes": trainer.accelerator.num_processes, "engine": engine_of(trainer.accelerator),
        "sharded_params": sum(type(p).__name__ == "DTensor" or hasattr(p, "ds_tensor") for p in unet.parameters()),
        "params": sum(1 for _ in unet.parameters()),
        "sharded_reference": None if reference is None else sum(type(p).__name__ == "DTensor" or hasattr(p, "ds_tensor")
                                                                for p in reference.parameters()),
        "local_fraction": local_fraction(unet),
        "reference_local_fraction": None if reference is None else local_fraction(reference),
        "trainable": len(trainer.trainable), "steps": trainer.step, "rounds": trainer.rounds_done,
        "dtype": str(next(unet.parameters()).dtype),
        "reference_dtype": None if reference is None else str(next(reference.parameters()).dtype), **extra,
    }))


def main() -> None:
    model, prompts, out, scenarios = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4].split(",")
    for scenario in scenarios:
        run = out / scenario
        if scenario == "methods":
            run_methods(model, prompts, run)
            continue
        if scenario.startswith(("spm", "lrm")):
            run_spm(model, run, scenario)
            continue
        full = scenario.startswith("full")
        rounds = 1 if scenario == "full-bf16" else 2 if full else 3
        extra = ["model.finetune=full"] if full else []
        if scenario.startswith("lora-dropout"):
            extra.append("lora.dropout=0.5")
        if scenario == "full-bf16":
            extra.append("train.mixed_precision=bf16")
        config = load_config("sd15", settings(model, prompts, rounds, extra))
        trainer = SPOTrainer(config, run, scorer=brightness, progress=False)
        pending_at_stop = None
        if scenario.endswith("-resume"):
            trainer.train(stop_after=rounds - 1)
            pending_at_stop = trainer.pending["micro_batches"]
            trainer.accelerator.wait_for_everyone()
            del trainer
            trainer = SPOTrainer(config, run, scorer=brightness, progress=False, resume=True)
        trainer.train()
        report(trainer, run, pending_at_stop=pending_at_stop)
        trainer.accelerator.wait_for_everyone()


def run_methods(model: str, prompts: str, out: Path) -> None:
    data = Path(sys.argv[5])
    own = {"diffusion_dpo": ["objective.beta=5000"], "d3po": ["objective.beta=0.1"],
           "ddpo": ["objective.stat_min_count=2"]}
    for method, extra in own.items():
        config = load_config("sd15", [
            f"model.pretrained={model}", "model.resolution=32", "model.device=cpu", "model.dtype=float32",
            "train.mixed_precision=no", f"data.prompts={prompts}", f"data.preference_data={data}", "train.rounds=1",
            "train.prompts_per_round=3", "train.batch_size=6", "sampling.num_inference_steps=4", "optimizer.lr=1e-3",
            "logging.tensorboard=false", f"objective.name={method}", *extra,
        ])
        trainer = SPOTrainer(config, out / method, scorer=None if method == "diffusion_dpo" else brightness,
                             progress=False)
        trainer.train()
        report(trainer, out / method)
        trainer.accelerator.wait_for_everyone()


def run_spm(model: str, run: Path, scenario: str) -> None:
    from spo.training import SPMTrainer

    data, clip = sys.argv[5], sys.argv[6]
    common = [f"model.pretrained={model}", "model.resolution=32", "model.device=cpu", "model.dtype=float32",
              "preference.checkpoint=null", f"spm.data={data}", "spm.lr=1e-3", "spm.batch_size=2",
              "spm.gradient_accumulation_steps=2", "spm.validation_pairs=5", "spm.validation_timesteps=[1,500]",
              "spm.weight_decay=0", "spm.lr_schedule=constant", "spm.mixed_precision=no",
              "spm.validate_on_start=false", "spm.validation_ties=skip", "logging.tensorboard=false", "seed=0"]
    if scenario == "lrm":
        own = ["preference.kind=latent", f"preference.pretrained={model}", "preference.processor=null",
               "preference.text_projection=null", "preference.dtype=float32", "spm.steps=3",
               "spm.validate_every=1000", "spm.checkpoint_every=1000"]
    else:
        own = [f"preference.pretrained={clip}", "spm.steps=4", "spm.validate_every=2", "spm.checkpoint_every=2"]
    config = load_config("sd15", [*common, *own])
    trainer = SPMTrainer(config, run, progress=False)
    if scenario.endswith("-resume"):
        trainer.train(stop_after=3)
        trainer.accelerator.wait_for_everyone()
        del trainer
        trainer = SPMTrainer(config, run, progress=False, resume=True)
    result = trainer.train()
    rank = trainer.accelerator.process_index
    (run / f"rank-{rank}.json").write_text(json.dumps({
        "rank": rank, "num_processes": trainer.accelerator.num_processes, "engine": engine_of(trainer.accelerator),
        "local_fraction": local_fraction(trainer.spm), "steps": result.steps,
        "validation": {str(t): v for t, v in result.validation.items()},
    }))
    trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    from spo.cli import close_process_group

    main()
    close_process_group()
    # every result is written and flushed: leave without the interpreter's teardown, where gloo's
    # threads have aborted a finished launch on CPU (SIGABRT, "terminate called without an active
    # exception"; spo.cli.close_process_group says more) and failed a test that had passed
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
