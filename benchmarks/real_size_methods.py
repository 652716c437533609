"""SPO and the baselines at full SD-1.5 size on a GPU: seconds per round, peak memory, the first
loss (log 2 / PPO ratio 1 in fp16), and a resume, with random weights of the real shapes.

Builds, on the GPU, a random SD-1.5-shaped pipeline (UNet 860 M, CLIP ViT-L/14 text encoder, the
SD VAE; an offline byte-level tokenizer), a random PickScore-shaped CLIP (ViT-H/14) as reward /
preference model and a small Pick-a-Pic-format set of random 512 px pairs, saves them, then
runs each method's SD-1.5 preset (`sd15`, `sd15-diffusion-dpo`, `sd15-d3po`, `sd15-ddpo`) for a
few rounds through the trainer with fp16 weights and autocast. Random weights: the numbers are
costs, not quality. Needs CUDA (exits otherwise).

    python benchmarks/real_size_methods.py --output benchmarks/results/real-size-methods.json
"""

from __future__ import annotations

import argparse
import io
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def build_sd15(directory: Path) -> Path:
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from spo.backbones.tiny import _sd15_scheduler, build_tokenizer

    tokenizer = build_tokenizer()
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # the defaults are SD-1.5's blocks
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=_sd15_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory


def build_pickscore(directory: Path) -> Path:
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    from spo.backbones.tiny import build_tokenizer
    from spo.preference.preprocess import save_clip_image_config

    tokenizer = build_tokenizer()
    text = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                          num_attention_heads=16, max_position_embeddings=77, projection_dim=1024, hidden_act="gelu",
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
    vision = CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                              image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu")
    model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=1024))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    save_clip_image_config(directory, 224)
    return directory


def build_pairs(directory: Path, n: int = 96) -> Path:
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)

    def png() -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, size=(512, 512, 3), dtype=np.uint8)).save(buffer, format="PNG")
        return buffer.getvalue()

    rows = {"caption": [f"a photo of thing {i}" for i in range(n)], "jpg_0": [png() for _ in range(n)],
            "jpg_1": [png() for _ in range(n)], "label_0": [float(i % 2) for i in range(n)],
            "label_1": [float(1 - i % 2) for i in range(n)]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(directory))
    return directory


def run(preset: str, rounds: int, resume_to: int | None, overrides: list[str], root: Path) -> dict:
    from spo.config import load_config
    from spo.training import SPOTrainer, read_metrics

    run_dir = root / preset
    config = load_config(preset, [*overrides, f"train.rounds={rounds}", "logging.checkpoint_every=1"])
    cuda = torch.cuda.is_available() and "model.device=cuda" in overrides
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer = SPOTrainer(config, run_dir, progress=False)
    loaded = time.perf_counter() - start
    trainer.train()
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    del trainer
    torch.cuda.empty_cache()
    result = {"preset": preset, "rounds": rounds, "load_seconds": round(loaded, 1), "peak_gib": round(peak, 1)}
    if resume_to:
        config = load_config(preset, [*overrides, f"train.rounds={resume_to}", "logging.checkpoint_every=1"])
        trainer = SPOTrainer(config, run_dir, resume=True, progress=False)
        result["resumed_from"] = trainer.rounds_done
        trainer.train()
        del trainer
        torch.cuda.empty_cache()
    metrics = read_metrics(run_dir / "metrics.jsonl")
    rounds_seen = [m for m in metrics if m["type"] == "round"]
    steps = [m for m in metrics if m["type"] == "step"]
    result.update(
        rounds_done=len(rounds_seen), optimizer_steps=len(steps),
        sampling_seconds=[r["sampling_seconds"] for r in rounds_seen],
        training_seconds=[r["training_seconds"] for r in rounds_seen],
        records=[r["valid_records"] for r in rounds_seen],
        first_step={k: v for k, v in steps[0].items() if isinstance(v, float)} if steps else None,
        finite=all(math.isfinite(s["loss"]) for s in steps),
        lora=(run_dir / "lora" / "pytorch_lora_weights.safetensors").exists(),
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--methods", nargs="+", default=["sd15-diffusion-dpo", "sd15-d3po", "sd15-ddpo", "sd15"])
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU: check the script, not a measure")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("error: this benchmark needs a CUDA GPU (--smoke checks it on the CPU with tiny models)")
    root = Path(tempfile.mkdtemp(prefix="real-size-"))
    t0 = time.perf_counter()
    if args.smoke:
        from spo.backbones.tiny import save_tiny_clip, save_tiny_pipeline
        from spo.preference.preprocess import save_clip_image_config

        model = save_tiny_pipeline("sd15", root / "sd15")
        reward = save_clip_image_config(save_tiny_clip(root / "pickscore"), 32).parent
    else:
        with torch.device("cuda"):
            model = build_sd15(root / "sd15")
            reward = build_pickscore(root / "pickscore")
    try:
        data = build_pairs(root / "pairs", n=8 if args.smoke else 96)
    except Exception as err:  # noqa: BLE001 - e.g. datasets missing: the online methods still run
        print(f"no preference pairs ({type(err).__name__}: {err}); Diffusion-DPO is skipped", flush=True)
        data, args.methods = root / "pairs", [m for m in args.methods if m != "sd15-diffusion-dpo"]
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(f"a photo of thing {i}" for i in range(64)) + "\n")
    built = time.perf_counter() - t0
    common = [f"model.pretrained={model}", "model.dtype=float16", "train.mixed_precision=fp16", "model.device=cuda",
              f"preference.pretrained={reward}", "preference.processor=null", "preference.dtype=float16",
              f"data.prompts={prompts}", f"data.preference_data={data}", "logging.tensorboard=false"]
    if args.smoke:
        common = [*common[:1], "model.device=cpu", "model.dtype=float32", "train.mixed_precision=no",
                  "model.resolution=32", *common[4:7], "train.prompts_per_round=2",
                  "sampling.num_inference_steps=4", *common[7:]]
    plans = {"sd15-diffusion-dpo": (3, 4, []), "sd15-d3po": (1, 2, []), "sd15-ddpo": (1, None, []),
             # a random PickScore: its time modules at identity (step_agnostic runs them, as a trained SPM would)
             "sd15": (1, None, ["pools.threshold=0.0", "preference.checkpoint=null", "preference.variant=step_agnostic"])}
    results = {"device": torch.cuda.get_device_name() if not args.smoke else "cpu (smoke)", "torch": torch.__version__, "build_seconds": round(built, 1),
               "runs": []}
    for preset in args.methods:
        rounds, resume_to, extra = plans[preset]
        start = time.perf_counter()
        try:
            entry = run(preset, rounds, resume_to, [*common, *extra], root / "runs")
        except Exception as err:  # noqa: BLE001 - report and go on with the next method
            entry = {"preset": preset, "error": f"{type(err).__name__}: {err}"}
        entry["wall_seconds"] = round(time.perf_counter() - start, 1)
        results["runs"].append(entry)
        print(json.dumps(entry), flush=True)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
