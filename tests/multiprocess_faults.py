"""Run under `accelerate launch` by test_multiprocess.py: writes that fail on one process.

Each scenario trains a tiny SD-1.5 LoRA on two CPU processes with one write made to fail on
one rank (a full disk), and every rank records the error it ended with. Without the broadcast
of each write's outcome, the other rank would wait at the next collective forever.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from fixed_scorers import brightness
from spo.config import load_config
from spo.training import SPOTrainer, WriteError, list_checkpoints
from spo.training import checkpoint as checkpoint_module
from spo.training.engines import engine_of


def disk_full(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201
    raise OSError(28, "No space left on device")


def main() -> None:
    model, prompts, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    scenarios = {  # name: (rounds, failing rank, what to break)
        "checkpoint": (2, 0, "save_file"),  # the main process's weights of the second checkpoint
        "rng": (1, 1, "rng_state"),  # the other process's own file of the first checkpoint
        "final_lora": (1, 0, "save_lora"),  # the final LoRA, written by the main process only
    }
    for name, (rounds, failing_rank, target) in scenarios.items():
        run = out / name
        config = load_config("sd15", [
            f"model.pretrained={model}", "model.resolution=32", "model.device=cpu", "model.dtype=float32",
            "train.mixed_precision=no", f"data.prompts={prompts}", f"train.rounds={rounds}",
            "train.prompts_per_round=2", "train.batch_size=4", "sampling.num_inference_steps=6",
            "pools.divert_start_step=2", "pools.threshold=0.0", "logging.tensorboard=false",
            "logging.checkpoint_every=1",
        ])
        trainer = SPOTrainer(config, run, scorer=brightness, progress=False)
        rank = trainer.accelerator.process_index
        if rank == failing_rank:
            if target == "save_file":
                original = checkpoint_module.save_file

                def save_file(tensors, path, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
                    if "round-000002" in str(path):
                        disk_full()
                    return original(tensors, path, *a, **k)

                checkpoint_module.save_file = save_file
            elif target == "rng_state":
                original_rng = checkpoint_module.rng_state
                checkpoint_module.rng_state = disk_full
            else:
                trainer.backbone.save_lora = disk_full  # type: ignore[method-assign]
        error = None
        try:
            trainer.train()
        except WriteError as err:
            error = str(err)
        finally:
            if rank == failing_rank and target == "save_file":
                checkpoint_module.save_file = original
            if rank == failing_rank and target == "rng_state":
                checkpoint_module.rng_state = original_rng
        trainer.accelerator.wait_for_everyone()
        (run / f"rank-{rank}.json").write_text(json.dumps({
            "rank": rank, "num_processes": trainer.accelerator.num_processes, "error": error,
            "engine": engine_of(trainer.accelerator),
            "checkpoints": [p.name for p in list_checkpoints(run)],
            "hidden": sorted(p.name for p in (run / "checkpoints").glob(".*")) if (run / "checkpoints").exists() else [],
        }))
        del trainer  # freed (with its DDP reducer) while the process group is alive


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
