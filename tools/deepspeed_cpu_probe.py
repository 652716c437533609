"""Does DeepSpeed ZeRO run on this CPU machine? (groundwork for issue 24: FSDP / ZeRO)

One AdamW step of a small linear model under ``deepspeed.initialize`` with ZeRO stage 2 or 3,
on DeepSpeed's CPU accelerator and the gloo backend. DeepSpeed is not a dependency of the
project; try it in a throwaway virtual environment that keeps the CPU torch of the project
(without the constraint, ``pip install deepspeed`` pulls a multi-GB CUDA torch)::

    python3 -m venv /tmp/dsvenv
    /tmp/dsvenv/bin/pip install -c constraints/cpu.txt deepspeed   # or reuse .venv's torch:
    PYTHONPATH=.venv/lib/python3.11/site-packages /tmp/dsvenv/bin/python tools/deepspeed_cpu_probe.py --stage 3
    PYTHONPATH=.venv/lib/python3.11/site-packages /tmp/dsvenv/bin/python -m torch.distributed.run \\
        --nproc_per_node 2 tools/deepspeed_cpu_probe.py --stage 2

Prints one ``OK stage S rank R/W loss L`` line per process, or DeepSpeed's error.
"""

from __future__ import annotations

import argparse
import os


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", type=int, choices=[1, 2, 3], default=2)
    args = parser.parse_args()
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29517"), ("RANK", "0"), ("WORLD_SIZE", "1"),
                       ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, value)  # a plain `python` run is one process

    import deepspeed
    import torch

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": args.stage},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    loss = engine(torch.randn(2, 8)).pow(2).mean()
    engine.backward(loss)
    engine.step()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    print(f"OK stage {args.stage} rank {rank}/{world} loss {loss.item():.6f} "
          f"(deepspeed {deepspeed.__version__}, torch {torch.__version__})")


if __name__ == "__main__":
    main()
