"""Peak GPU memory and round time of SPO under each distributed engine (DDP, FSDP2, DeepSpeed
ZeRO-2 / ZeRO-3), for full-size random-weight SD-1.5 and SDXL, LoRA and full fine-tuning.

Each (model, fine-tuning, engine) is its own ``accelerate launch`` of this file (``--worker``)
with the engine's shipped config (``configs/accelerate/{ddp,fsdp,zero2,zero3}.yaml``) and
``--processes`` processes (default 1: one GPU, where every engine still runs its own code path:
FSDP2's DTensors, ZeRO's partitions and its engine step). The worker builds ``SPOTrainer`` on the
model's release preset (``sd15``: 10 prompts x k 4; ``sdxl``: 2 prompts x k 2, MSPO j 4) in
fp16, with ``pools.threshold=0`` (every pool trains) and, unless ``--no-levers``, the memory
levers of ``fullsize.py``'s ``memory`` variant (decode in chunks, gradient checkpointing; else the
decode's peak hides the training state). It runs ``--rounds`` rounds (checkpoints and the final
write patched out) and records, per process: the memory resident after set-up and after the
rounds, the peak over the rounds (``torch.cuda.max_memory_allocated``), and each round's sampling and
training seconds (metrics.jsonl). A launch that fails (out of memory, ...) is recorded with its
error and the next one runs; the JSON is rewritten after each. Random weights: the numbers are
costs, not quality; the device is named in the JSON.

    python benchmarks/engines.py --output benchmarks/results/engines.json                 # CUDA
    python benchmarks/engines.py --models sd15 --finetune lora --engines ddp,zero2 --output ...
    python benchmarks/engines.py --tiny --output /tmp/engines-tiny.json                   # CPU, tiny

``--tiny`` builds the tiny models and launches 2 gloo CPU processes per engine (FSDP needs two on
CPU): it checks the script (16 launches in under 3 minutes on 2 cores), it measures nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch

sys.path.insert(0, str(Path(__file__).parent))

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("ddp", "fsdp", "zero2", "zero3")
GIB = 2**30


def engine_options(engine: str, tiny: bool) -> tuple[list[str], dict[str, str]]:
    """The launch options and environment of ``engine``. On CPU (``tiny``) DDP and FSDP need
    ``ACCELERATE_USE_CPU``, and DeepSpeed must not have it (SPO then picks gloo itself)."""
    options = ["--config_file", str(ROOT / "configs" / "accelerate" / f"{engine}.yaml")]
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    if tiny and not engine.startswith("zero"):
        env["ACCELERATE_USE_CPU"] = "true"
    env.setdefault("OMP_NUM_THREADS", "1" if tiny else env.get("OMP_NUM_THREADS", "8"))
    return options, env


#: the memory levers of benchmarks/fullsize.py's ``memory`` variant (decode in chunks, gradient
#: checkpointing), on by default so that the sampling's decode peak does not hide the training state
LEVERS = {"sd15": {"sampling.decode_batch_size": "8", "model.gradient_checkpointing": "true"},
          "sdxl": {"sampling.decode_batch_size": "1", "model.gradient_checkpointing": "true"}}


def overrides(model: str, paths: dict[str, Path], prompts: Path, finetune: str, rounds: int, tiny: bool,
              levers: bool) -> list[str]:
    common = {"model.pretrained": str(paths[model]), "preference.pretrained": str(paths["pickscore"]),
              "preference.processor": "null", "preference.checkpoint": "null", "preference.variant": "step_agnostic",
              "data.prompts": str(prompts), "logging.tensorboard": "false", "logging.checkpoint_every": "1000000",
              "pools.threshold": "0.0", "train.rounds": str(rounds), "model.finetune": finetune}
    if model == "sdxl":
        common["model.vae"] = "null"  # the random pipeline's own VAE (fp16-safe)
    if levers:
        common.update(LEVERS[model])
    if tiny:
        common.update({"model.device": "cpu", "model.dtype": "float32", "train.mixed_precision": "no",
                       "preference.dtype": "float32", "model.resolution": "32", "train.prompts_per_round": "2",
                       "sampling.num_inference_steps": "8"})
    else:
        common.update({"model.device": "cuda", "model.dtype": "float16", "train.mixed_precision": "fp16",
                       "preference.dtype": "float16"})
    return [f"{k}={v}" for k, v in common.items()]


# ----------------------------------------------------------------------------- worker
def worker(args: argparse.Namespace) -> None:
    """One launch: build the trainer, run the rounds, write OUT.rank-R.json."""
    from spo.config import load_config
    from spo.training import SPOTrainer, read_metrics
    from spo.training.engines import engine_of, zero_stage

    SPOTrainer.save_final = lambda self: None  # not part of a round, and neither are checkpoints
    SPOTrainer.checkpoint = lambda self: None  # (an SDXL full fine-tuning one is ~31 GB)
    cuda = torch.cuda.is_available() and not args.tiny
    config = load_config(args.model, args.set)
    run_dir = Path(args.run_dir)
    start = time.perf_counter()
    trainer = SPOTrainer(config, run_dir, progress=False)
    setup_seconds = time.perf_counter() - start
    acc = trainer.accelerator
    record: dict[str, Any] = {"rank": acc.process_index, "num_processes": acc.num_processes,
                              "engine": engine_of(acc), "zero_stage": zero_stage(acc),
                              "setup_seconds": round(setup_seconds, 1)}
    if cuda:
        torch.cuda.synchronize()
        record["resident_after_setup_gib"] = round(torch.cuda.memory_allocated() / GIB, 2)
        record["peak_setup_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    if cuda:
        torch.cuda.synchronize()
        record["peak_rounds_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
        # weights, gradients' buffers and AdamW's state (made at the first step), without activations
        record["resident_after_rounds_gib"] = round(torch.cuda.memory_allocated() / GIB, 2)
    record["max_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 2)
    rounds = [e for e in read_metrics(run_dir / "metrics.jsonl") if e["type"] == "round"]
    record["rounds"] = [{k: e.get(k) for k in ("round", "sampling_seconds", "training_seconds", "valid_records",
                                                "optimizer_steps")} for e in rounds]
    later = rounds[1:] or rounds
    record["round_seconds_after_first"] = round(
        sum(e["sampling_seconds"] + e["training_seconds"] for e in later) / max(1, len(later)), 3)
    Path(f"{args.json}.rank-{acc.process_index}.json").write_text(json.dumps(record, indent=2))
    acc.wait_for_everyone()


# ----------------------------------------------------------------------------- driver
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path)
    parser.add_argument("--models", default="sd15,sdxl")
    parser.add_argument("--finetune", default="lora,full")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--processes", type=int, default=None, help="processes per launch (default 1; tiny: 2)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per launch (the first pays the warm-up)")
    parser.add_argument("--timeout", type=int, default=None, help="seconds per launch (default 600; tiny 300)")
    parser.add_argument("--tiny", action="store_true", help="tiny models, 2 CPU processes: checks the script")
    parser.add_argument("--no-levers", action="store_true",
                        help="the presets as they are (default: decode in chunks + gradient checkpointing)")
    # worker mode (launched by the driver)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    parser.add_argument("--set", nargs="*", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.output is None:
        raise SystemExit("error: --output is required")
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("error: this benchmark needs a CUDA GPU (--tiny checks it on the CPU with tiny models)")
    models = [m for m in args.models.split(",") if m]
    finetunes = [f for f in args.finetune.split(",") if f]
    engines = [e for e in args.engines.split(",") if e]
    for value, allowed, what in ((models, ("sd15", "sdxl"), "--models"), (finetunes, ("lora", "full"), "--finetune"),
                                 (engines, ENGINES, "--engines")):
        unknown = [v for v in value if v not in allowed]
        if unknown:
            raise SystemExit(f"error: {what}: unknown {', '.join(unknown)}; choose from {', '.join(allowed)}")
    if "zero2" in engines or "zero3" in engines:
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise SystemExit("error: --engines has zero2/zero3, but deepspeed is not installed (pip install deepspeed)")
    processes = args.processes or (2 if args.tiny else 1)
    timeout = args.timeout or (300 if args.tiny else 600)

    import accelerate
    import diffusers
    import transformers

    from _report import write_partial
    from fullsize import build_all

    t0 = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="engines-"))
    try:
        result: dict[str, Any] = {
            "benchmark": "engines",
            "mode": "tiny (cpu, tiny models: checks the script, not a measure)" if args.tiny else "full size (cuda, fp16)",
            "device": "cpu" if args.tiny else torch.cuda.get_device_name(),
            "processes_per_launch": processes, "rounds_per_launch": args.rounds,
            "levers": None if args.no_levers else LEVERS,
            "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__, "python": platform.python_version(), "argv": sys.argv[1:],
            "notes": ["random weights of the real shapes: costs, not quality",
                      "peak_rounds_gib: torch.cuda.max_memory_allocated over the rounds, per process; "
                      "resident_after_setup_gib: allocated once the trainer is built; resident_after_rounds_gib: "
                      "allocated after the rounds (weights, AdamW state, gradient buffers; no activations)",
                      "pools.threshold=0: every pool trains; checkpoints and the final write patched out"],
            "runs": {},
        }

        def write() -> None:
            write_partial(result, args.output, t0)

        paths, build_seconds = build_all(models, root, args.tiny, "cpu" if args.tiny else "cuda")
        result["build_seconds"] = build_seconds
        prompts = root / "prompts.txt"
        prompts.write_text("\n".join(f"a photo of thing {i}, detailed, high quality" for i in range(64)) + "\n")
        write()
        for model in models:
            for finetune in finetunes:
                for engine in engines:
                    name = f"{model}/{finetune}/{engine}"
                    out = root / "out" / name.replace("/", "-")
                    out.parent.mkdir(parents=True, exist_ok=True)
                    options, env = engine_options(engine, args.tiny)
                    cmd = [sys.executable, "-m", "accelerate.commands.launch", *options, "--num_processes",
                           str(processes), "--main_process_port", str(free_port()), __file__, "--worker",
                           "--model", model, "--run-dir", str(root / "runs" / name.replace("/", "-")), "--json", str(out),
                           *(["--tiny"] if args.tiny else []),
                           "--set", *overrides(model, paths, prompts, finetune, args.rounds, args.tiny,
                                               not args.no_levers)]
                    start = time.perf_counter()
                    entry: dict[str, Any] = {"engine": engine, "model": model, "finetune": finetune}
                    try:
                        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
                        entry["returncode"] = proc.returncode
                        ranks = sorted(out.parent.glob(out.name + ".rank-*.json"))
                        entry["ranks"] = [json.loads(p.read_text()) for p in ranks]
                        if proc.returncode != 0 or not ranks:
                            entry["status"] = "error"
                            errors = [line for line in proc.stderr.splitlines() if "Error" in line or "error:" in line]
                            entry["error"] = errors[0] if errors else None  # the first rank's own line
                            entry["stderr_tail"] = proc.stderr[-3000:]
                        else:
                            entry["status"] = "ok"
                            peaks = [r.get("peak_rounds_gib") for r in entry["ranks"] if r.get("peak_rounds_gib") is not None]
                            entry["peak_gib"] = max(peaks) if peaks else None
                            entry["round_seconds"] = max(r["round_seconds_after_first"] for r in entry["ranks"])
                    except subprocess.TimeoutExpired:
                        entry.update(status="timeout", note=f"over {timeout} s")
                    entry["launch_seconds"] = round(time.perf_counter() - start, 1)
                    shutil.rmtree(root / "runs" / name.replace("/", "-"), ignore_errors=True)
                    result["runs"][name] = entry
                    print(f"{name}: " + json.dumps({k: entry.get(k) for k in ("status", "error", "peak_gib",
                                                                             "round_seconds", "launch_seconds")}), flush=True)
                    write()
        for model in models:  # memory and time relative to DDP, from the same run
            for finetune in finetunes:
                base = result["runs"].get(f"{model}/{finetune}/ddp", {})
                for engine in engines:
                    entry = result["runs"][f"{model}/{finetune}/{engine}"]
                    if entry.get("status") == "ok" and base.get("status") == "ok" and base.get("peak_gib"):
                        entry["peak_vs_ddp"] = round(entry["peak_gib"] / base["peak_gib"], 3)
                    if entry.get("status") == "ok" and base.get("status") == "ok" and base.get("round_seconds"):
                        entry["time_vs_ddp"] = round(entry["round_seconds"] / base["round_seconds"], 3)
        write()
        print(f"wrote {args.output} ({result['wall_seconds']} s)", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
