"""Time one SPO round and compare it to its floor.

The round is split into UNet passes (sampling), VAE decodes, preference scoring and training.
The *floor* of each part is the number of passes the algorithm needs (counted during the round)
times the measured time of one bare pass of the same shape (the UNet called directly, the VAE
decoder, the scorer; for training, one reference forward + one policy forward and backward).
A ratio near 1 means the implementation adds little on top of the passes SPO cannot avoid.

    python benchmarks/round_profile.py --pipeline tiny-sd15 --output benchmarks/results/tiny-sd15.json
    python benchmarks/round_profile.py --pipeline tiny-sdxl --output benchmarks/results/tiny-sdxl.json
    python benchmarks/round_profile.py --pipeline sd15-unet --steps 10 --divert 4 --prompts 2 --k 4 \\
        --output benchmarks/results/sd15-unet-latent16.json
    python benchmarks/round_profile.py --pipeline /path/to/diffusers/dir --resolution 512 ...

``sd15-unet`` is an SD-1.5-sized UNet (860 M parameters, random weights) with tiny text encoder
and VAE, at 16x16 latents: the UNet cost is real, the rest is small.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from spo.backbones import SD15Backbone, SDXLBackbone
from spo.config import LoRAConfig
from spo.backbones.tiny import build_tiny_sd15, build_tokenizer, save_tiny_clip, save_tiny_pipeline
from spo.objectives import SPOObjective
from spo.preference import CLIPScorer
from spo.sampling import PoolSampler

from _report import write_report  # benchmarks/_report.py (scripts run from this folder)


def sd15_sized_backbone() -> SD15Backbone:
    """SD-1.5's UNet architecture with random weights; tiny text encoder (width 768) and VAE."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    pipe = build_tiny_sd15()
    tokenizer = build_tokenizer()
    pipe.text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=1024, num_hidden_layers=1,
        num_attention_heads=12, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    pipe.unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8,
    )
    return SD15Backbone(pipe, device="cpu", resolution=32)


def load(kind: str, resolution: int | None, tmp: Path) -> Any:
    if kind == "sd15-unet":
        return sd15_sized_backbone()
    if kind in ("tiny-sd15", "tiny-sdxl"):
        name = kind.split("-")[1]
        path = save_tiny_pipeline(name, tmp / name)
        return {"sd15": SD15Backbone, "sdxl": SDXLBackbone}[name].from_pretrained(str(path), device="cpu")
    index = json.loads((Path(kind) / "model_index.json").read_text())
    cls = SDXLBackbone if "XL" in index["_class_name"] else SD15Backbone
    return cls.from_pretrained(kind, resolution=resolution)


class Timed:
    """Wraps a callable; records wall time and the batch size of each call."""

    def __init__(self, fn: Any, log: list[tuple[int, float]]) -> None:
        self.fn, self.log = fn, log

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = self.fn(x, *args, **kwargs)
        self.log.append((int(x.shape[0]), time.perf_counter() - start))
        return out


def median_time(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])  # the first call warms up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", default="tiny-sd15", help="tiny-sd15 | tiny-sdxl | sd15-unet | a diffusers dir")
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--divert", type=int, default=4)
    parser.add_argument("--inner-steps", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8, help="training micro-batch (pairs)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        backbone = load(args.pipeline, args.resolution, tmp)
        backbone.attach_lora(LoRAConfig(rank=4))
        scorer = CLIPScorer.from_pretrained(str(save_tiny_clip(tmp / "clip")))
        prompts = [f"a photo of object number {i}" for i in range(args.prompts)]

        logs: dict[str, list[tuple[int, float]]] = defaultdict(list)
        raw_unet, raw_decode = backbone.unet.forward, backbone.decode
        backbone.decode = Timed(raw_decode, logs["decode"])  # type: ignore[method-assign]
        timed_scorer = Timed(scorer, logs["score"])
        unet_log = logs["unet"]
        backbone.unet.forward = Timed(raw_unet, unet_log)  # type: ignore[method-assign]
        sampler = PoolSampler(backbone, timed_scorer, num_inference_steps=args.steps, k=args.k, threshold=0.0,
                              divert_start_step=args.divert, inner_steps=args.inner_steps)
        start = time.perf_counter()
        rollout = sampler.rollout(prompts, torch.Generator().manual_seed(0))
        sampling_total = time.perf_counter() - start
        sample_unet_calls = list(unet_log)
        unet_log.clear()

        records = rollout.records
        objective = SPOObjective(guidance_scale=5.0)
        schedule = sampler.schedule()
        params = backbone.trainable_parameters()
        optimizer = torch.optim.AdamW(params, lr=1e-5)
        micro = [list(range(i, min(i + args.batch_size, len(records)))) for i in range(0, len(records), args.batch_size)]
        start = time.perf_counter()
        for rows in micro:
            out = objective(backbone, schedule, records.index(rows))
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        training_total = time.perf_counter() - start
        train_unet_calls = list(unet_log)
        backbone.unet.forward = raw_unet  # type: ignore[method-assign]
        backbone.decode = raw_decode  # type: ignore[method-assign]

        # ---- floors: bare passes of the shapes the round used
        cond1 = backbone.encode_prompts(prompts[:1])
        shape = backbone.latent_shape

        def unet_pass(rows: int, grad: bool = False) -> None:
            x = torch.randn(rows, *shape)
            t = torch.full((rows,), 501)
            hidden = cond1.prompt_embeds.expand(rows, -1, -1)
            added = None
            if cond1.pooled is not None:
                added = {"text_embeds": cond1.pooled.expand(rows, -1), "time_ids": cond1.time_ids.expand(rows, -1)}
            with torch.set_grad_enabled(grad):
                y = raw_unet(x, t, encoder_hidden_states=hidden, added_cond_kwargs=added, return_dict=False)[0]
                if grad:
                    y.float().square().mean().backward()

        unet_single: dict[int, float] = {}
        for rows in sorted({r for r, _ in sample_unet_calls}):
            unet_single[rows] = median_time(lambda r=rows: unet_pass(r), args.repeats)
        decode_rows = sorted({r for r, _ in logs["decode"]})
        decode_single = {r: median_time(lambda r=r: raw_decode(torch.randn(r, *shape)), args.repeats) for r in decode_rows}
        images = torch.rand(decode_rows[-1], 3, backbone.resolution, backbone.resolution) * 2 - 1
        score_single = {
            r: median_time(lambda r=r: (scorer.clear_cache(), scorer(images[:r], prompts[:1] * r, torch.zeros(r))), args.repeats)
            for r in sorted({r for r, _ in logs["score"]})
        }
        # training floor per micro-batch: reference forward (no grad) + policy forward+backward,
        # on the rows the shared-x_t batching needs (win rows + lose rows with their own x_t), x2 for CFG
        train_single: dict[int, float] = {}
        for rows in sorted({r for r, _ in train_unet_calls}):
            train_single[rows] = median_time(lambda r=rows: (unet_pass(r), unet_pass(r, grad=True)), args.repeats)

    def part(calls: list[tuple[int, float]], single: dict[int, float]) -> dict[str, Any]:
        measured = sum(t for _, t in calls)
        floor = sum(single[r] for r, _ in calls)
        return {"calls": len(calls), "rows": sum(r for r, _ in calls), "seconds": round(measured, 4),
                "floor_seconds": round(floor, 4), "ratio_to_floor": round(measured / floor, 3) if floor else None}

    unet_part = part(sample_unet_calls, unet_single)
    decode_part = part(logs["decode"], decode_single)
    score_part = part(logs["score"], score_single)
    train_floor = sum(train_single[r] for r, _ in train_unet_calls[1::2])  # calls come as (reference, policy)
    sampling_floor = unet_part["floor_seconds"] + decode_part["floor_seconds"] + score_part["floor_seconds"]
    result = {
        "pipeline": args.pipeline,
        "unet_parameters": sum(p.numel() for p in backbone.unet.parameters()),
        "latent_shape": list(shape),
        "prompts": args.prompts, "k": args.k, "steps": args.steps, "divert_start_step": args.divert,
        "inner_steps": args.inner_steps, "records": len(records), "threads": args.threads,
        "torch": torch.__version__, "machine": platform.machine(), "processor": platform.processor(),
        "sampling": {
            "seconds": round(sampling_total, 4), "floor_seconds": round(sampling_floor, 4),
            "ratio_to_floor": round(sampling_total / sampling_floor, 3),
            "unet": unet_part, "decode": decode_part, "score": score_part,
            "other_seconds": round(sampling_total - unet_part["seconds"] - decode_part["seconds"] - score_part["seconds"], 4),
        },
        "training": {
            "seconds": round(training_total, 4), "micro_batches": len(micro),
            "unet_calls": len(train_unet_calls), "floor_seconds": round(train_floor, 4),
            "ratio_to_floor": round(training_total / train_floor, 3) if train_floor else None,
        },
    }
    result["round_seconds"] = round(sampling_total + training_total, 4)
    result["round_ratio_to_floor"] = round((sampling_total + training_total) / (sampling_floor + train_floor), 3)
    write_report(result, args.output)


if __name__ == "__main__":
    main()
