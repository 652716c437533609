"""What the paper's evaluation costs at full size: `spo eval` of an SD-1.5 run with all five
scorers, random weights of the real shapes, on a GPU.

Builds on the device a random SD-1.5-shaped pipeline (as `real_size_methods.py`), a run directory
with a random LoRA, and each scorer's checkpoint in its RELEASED layout at full size (PickScore
and the aesthetic predictor's CLIP ViT-L/14 as transformers directories; the aesthetic MLP and the
HPSv2 open_clip ViT-H-14 state dict as torch pickles of plain tensors, HPS in fp16 as the
"compressed" release; ImageReward's BLIP ViT-L/16 + BERT state dict under the authors' key
names), then runs `spo eval` through the CLI (every scorer loaded by `--scorer NAME=PATH`) and
times each scorer alone. Random weights: the numbers are costs, not quality. Then a rerun of the
same command checks that a finished evaluation makes and scores nothing. Last, each scorer in
fp16 and bf16 (``spo eval --scorer-dtype``) on the same images as in fp32: throughput over fp32's,
the largest score difference from fp32 and whether the ranking of the images is the same.

    python benchmarks/eval_cost.py --output benchmarks/results/eval-cost.json          # CUDA
    python benchmarks/eval_cost.py --smoke --output /tmp/eval-cost-smoke.json          # CPU, tiny
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

PROMPTS = [f"a {a} {b} in the {c}, detailed photograph" for a in ("red", "small", "old", "shiny")
           for b in ("car", "cat", "house", "robot") for c in ("rain", "sun")]


def clip_config(vision: tuple[int, int, int, int, int], text: tuple[int, int, int], projection: int,
                vocab: int, act: str, tokenizer: Any) -> Any:
    """CLIPConfig from (width, layers, heads, patch, image) of the vision tower and (width, layers,
    heads) of the text tower."""
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    vw, vl, vh, patch, image = vision
    tw, tl, th = text
    t = CLIPTextConfig(vocab_size=vocab, hidden_size=tw, intermediate_size=4 * tw, num_hidden_layers=tl,
                       num_attention_heads=th, max_position_embeddings=77, projection_dim=projection, hidden_act=act,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    v = CLIPVisionConfig(hidden_size=vw, intermediate_size=4 * vw, num_hidden_layers=vl, num_attention_heads=vh,
                         image_size=image, patch_size=patch, projection_dim=projection, hidden_act=act)
    return CLIPConfig(text_config=t.to_dict(), vision_config=v.to_dict(), projection_dim=projection)


def save_clip_dir(model: Any, tokenizer: Any, directory: Path, image: int) -> Path:
    from spo.preference.preprocess import save_clip_image_config

    model.half().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    save_clip_image_config(directory, image)
    return directory


def to_open_clip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers CLIPModel state dict -> open_clip's key layout (the inverse of
    `spo.evaluation.scorers.hpsv2.convert_open_clip_state_dict`, written independently here)."""
    out: dict[str, torch.Tensor] = {}
    top = {"vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
           "vision_model.embeddings.class_embedding": "visual.class_embedding",
           "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
           "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight", "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
           "vision_model.post_layernorm.weight": "visual.ln_post.weight",
           "vision_model.post_layernorm.bias": "visual.ln_post.bias",
           "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
           "text_model.embeddings.position_embedding.weight": "positional_embedding",
           "text_model.final_layer_norm.weight": "ln_final.weight", "text_model.final_layer_norm.bias": "ln_final.bias",
           "logit_scale": "logit_scale"}
    parts = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for key, value in sd.items():
        if key in top:
            out[top[key]] = value
        elif key in ("visual_projection.weight", "text_projection.weight"):
            out["visual.proj" if key.startswith("visual") else "text_projection"] = value.t().contiguous()
        elif ".encoder.layers." in key:
            tower = "visual.transformer.resblocks." if key.startswith("vision_model") else "transformer.resblocks."
            index, rest = key.split(".encoder.layers.")[1].split(".", 1)
            if rest.startswith("self_attn.q_proj."):
                kind = rest.rsplit(".", 1)[1]
                qkv = [sd[key.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
                out[f"{tower}{index}.attn.in_proj_{kind}"] = torch.cat(qkv)
            elif rest.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
                continue
            else:
                name, kind = rest.rsplit(".", 1)
                out[f"{tower}{index}.{parts[name]}.{kind}"] = value
        elif key.endswith("position_ids"):
            continue
        else:
            raise KeyError(key)
    return out


def bert_vocab(directory: Path, size: int) -> Path:
    """A bert-style vocab.txt of ``size`` tokens (the specials, then plain words), offline."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted({w.strip(",") for p in PROMPTS for w in p.split()})
    words += [f"tok{i}" for i in range(size - len(words))]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(words) + "\n")
    return directory


def build_scorers(root: Path, smoke: bool) -> dict[str, str]:
    """Each scorer's checkpoint in its released layout; returns the `--scorer` values."""
    from transformers import CLIPModel

    from spo.backbones.tiny import build_tokenizer
    from spo.evaluation.scorers.image_reward import MED_CONFIG, ImageRewardModel, original_key, text_config, vision_config

    tok = build_tokenizer()
    h14 = ((1280, 32, 16, 14, 224), (1024, 24, 16), 1024) if not smoke else ((32, 2, 2, 14, 224), (32, 2, 2), 16)
    l14 = ((1024, 24, 16, 14, 224), (768, 12, 12), 768) if not smoke else ((32, 2, 2, 14, 224), (32, 2, 2), 16)
    specs: dict[str, str] = {}
    # PickScore: a transformers CLIPModel directory (ViT-H/14)
    pick = CLIPModel(clip_config(*h14, vocab=49408, act="gelu", tokenizer=tok))
    specs["pickscore"] = str(save_clip_dir(pick, tok, root / "pickscore", 224))
    # HPSv2: open_clip ViT-H-14 state dict, fp16, wrapped as {'state_dict': ...}
    hps = {k: v.half() for k, v in to_open_clip(CLIPModel(clip_config(*h14, vocab=49408, act="gelu", tokenizer=tok)).state_dict()).items()}
    torch.save({"state_dict": {f"module.{k}": v.cpu() for k, v in hps.items()}}, root / "HPS_v2_compressed.pt")
    specs["hpsv2"] = f"{root / 'HPS_v2_compressed.pt'},tokenizer={root / 'pickscore'}"
    if smoke:
        cfg = json.loads(pick.config.to_json_string())
        (root / "hps-config.json").write_text(json.dumps(cfg))
        specs["hpsv2"] += f",config={root / 'hps-config.json'}"
    del pick, hps
    # LAION aesthetic v2: CLIP ViT-L/14 directory + the MLP as a pickle of plain tensors
    clip_l = CLIPModel(clip_config(*l14, vocab=49408, act="quick_gelu", tokenizer=tok))
    save_clip_dir(clip_l, tok, root / "clip-l14", 224)
    widths = (l14[2], 1024, 128, 64, 16, 1)
    mlp = {}
    for index, (a, b) in zip((0, 2, 4, 6, 7), zip(widths[:-1], widths[1:])):
        mlp[f"layers.{index}.weight"], mlp[f"layers.{index}.bias"] = torch.randn(b, a) / a**0.5, torch.zeros(b)
    torch.save({k: v.cpu() for k, v in mlp.items()}, root / "sac+logos+ava1-l14-linearMSE.pth")
    specs["aesthetic"] = f"{root / 'sac+logos+ava1-l14-linearMSE.pth'},clip={root / 'clip-l14'}"
    del clip_l
    # ImageReward: BLIP ViT-L/16 + BERT-base under the authors' key names
    med = dict(MED_CONFIG)
    overrides = None
    if smoke:
        med.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
        overrides = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
        (root / "ir").mkdir()
        (root / "ir" / "med_config.json").write_text(json.dumps(med))
        (root / "ir" / "vision_config.json").write_text(json.dumps(overrides))
    vision = vision_config(overrides)
    reward = ImageRewardModel(vision, text_config(med, vision.hidden_size))
    (root / "ir").mkdir(exist_ok=True)
    torch.save({original_key(k): v.cpu() for k, v in reward.state_dict().items()}, root / "ir" / "ImageReward.pt")
    bert_vocab(root / "ir", int(med["vocab_size"]) - 2)  # [DEC] and [ENC] are added on load
    specs["image_reward"] = str(root / "ir")
    del reward
    return specs


def make_run(root: Path, model: Path, overrides: list[str]) -> Path:
    """A run directory as `spo train` leaves it (config.yaml + a random LoRA)."""
    from spo.backbones import load_backbone
    from spo.config import LoRAConfig
    from spo.config import load_config, save_config

    run = root / "sd15-run"
    config = load_config("sd15", [f"model.pretrained={model}", *overrides])
    save_config(config, run / "config.yaml")
    backbone = load_backbone(config.model)
    params = backbone.attach_lora(LoRAConfig(rank=4))
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.01)
    backbone.save_lora(run / "lora")
    return run


def time_scorers(specs: dict[str, str], device: str, dtype: torch.dtype, n: int, size: int,
                 reference: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Each scorer alone in ``dtype`` on the same ``n`` random images (seeded): load time,
    throughput, peak memory; with ``reference`` (the fp32 scores), the largest difference from it.
    The scores are kept in ``_scores`` (dropped before writing)."""
    from spo.evaluation.scorers import ScorerSpec

    gen = torch.Generator().manual_seed(0)
    images = (torch.rand(n, 3, size, size, generator=gen) * 2 - 1).to(device)
    prompts = (PROMPTS * n)[:n]
    out: dict[str, Any] = {}
    for name, text in specs.items():
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        scorer = ScorerSpec.parse(f"{name}={text}").load(device=device, dtype=dtype)
        load_s = time.perf_counter() - t0
        scorer(images[:2], prompts[:2])  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        values = scorer(images, prompts)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        out[name] = {"load_s": round(load_s, 2), "images": n, "seconds": round(seconds, 3),
                     "images_per_s": round(n / seconds, 1), "finite": bool(torch.isfinite(values).all()),
                     "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None}
        values = values.detach().double().cpu()
        if reference is not None and name in reference:
            fp32 = reference[name]
            out[name]["max_abs_diff_to_fp32"] = float((values - fp32).abs().max())
            out[name]["fp32_score_range"] = float(fp32.max() - fp32.min())
            out[name]["same_ranking_as_fp32"] = bool(torch.equal(values.argsort(), fp32.argsort()))
        out.setdefault("_scores", {})[name] = values
        del scorer
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU: checks the script, measures nothing")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--scorer-dtypes", default="float16,bfloat16",
                        help="16-bit dtypes timed against fp32, each scorer alone (default float16,bfloat16)")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("error: this benchmark needs a CUDA GPU (--smoke checks it on the CPU with tiny models)")
    from spo.cli import main as spo

    root = Path(tempfile.mkdtemp(prefix="eval-cost-"))
    start = time.perf_counter()
    device = "cpu" if args.smoke else "cuda"
    with torch.device(device):
        if args.smoke:
            from spo.backbones.tiny import save_tiny_pipeline

            model = save_tiny_pipeline("sd15", root / "sd15", seed=0)
        else:
            from real_size_methods import build_sd15

            model = build_sd15(root / "sd15")
        specs = build_scorers(root, args.smoke)
    overrides = (["model.device=cpu", "model.resolution=32", "model.dtype=float32", "train.mixed_precision=no"] if args.smoke
                 else ["model.device=cuda", "model.dtype=float16"])
    run = make_run(root, model, overrides)
    built = time.perf_counter() - start
    prompts_file = root / "prompts.txt"
    prompts_file.write_text("\n".join((PROMPTS * 100)[: args.prompts]) + "\n")
    out = root / "eval"
    argv = ["eval", str(run), *overrides, "--prompts", str(prompts_file), "--seeds", str(args.seeds),
            "--output", str(out), "--batch-size", "8", *[a for n, s in specs.items() for a in ("--scorer", f"{n}={s}")]]
    if args.smoke:
        argv += ["--steps", "3"]
    t0 = time.perf_counter()
    code = spo(argv)
    eval_s = time.perf_counter() - t0
    saved = json.loads((out / "eval.json").read_text()) if code == 0 else {}
    t0 = time.perf_counter()
    again = spo(argv)
    rerun_s = time.perf_counter() - t0
    resaved = json.loads((out / "eval.json").read_text()) if again == 0 else {}
    images = 2 * args.prompts * args.seeds
    result = {
        "device": torch.cuda.get_device_name() if not args.smoke else "cpu (smoke: tiny models, not a measure)",
        "torch": torch.__version__, "build_seconds": round(built, 1),
        "protocol": saved.get("protocol"), "exit_code": code,
        "eval_seconds": round(eval_s, 1), "images": images,
        "generation_seconds": saved.get("seconds", {}).get("generation"),
        "scoring_seconds": saved.get("seconds", {}).get("scoring"),
        "generation_s_per_image": round(saved["seconds"]["generation"] / images, 4) if saved else None,
        "results": saved.get("results"), "skipped": saved.get("skipped"),
        "rerun": {"exit_code": again, "seconds": round(rerun_s, 1),
                  "same_results": resaved.get("results") == saved.get("results"),
                  "same_seconds": resaved.get("seconds") == saved.get("seconds")},
    }
    n, size = (8, 64) if args.smoke else (64, 512)
    fp32 = time_scorers(specs, device, torch.float32, n, size)
    reference = fp32.pop("_scores")
    result["scorers_fp32"] = fp32
    for name in args.scorer_dtypes.split(","):  # spo eval --scorer-dtype: each scorer in 16 bits
        dtype = getattr(torch, name)
        timed = time_scorers(specs, device, dtype, n, size, reference)
        timed.pop("_scores")
        for scorer, entry in timed.items():
            entry["speedup_over_fp32"] = round(entry["images_per_s"] / fp32[scorer]["images_per_s"], 3)
        result[f"scorers_{'fp16' if name == 'float16' else 'bf16' if name == 'bfloat16' else name}"] = timed
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "results"}, indent=2))


if __name__ == "__main__":
    main()
