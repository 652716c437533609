"""The model card (``README.md``) written beside a run's final weights.

``spo train`` writes it into ``RUN_DIR/lora/`` (or ``unet/`` under full fine-tuning) and
``spo train-spm`` into ``RUN_DIR/spm/`` (or ``reward/``, or ``lrm/`` for a latent reward model)
once the weights are saved; ``spo eval``
writes it again when it evaluates the run, so the evaluation table appears. It has what the
diffusers training scripts put in theirs (``save_model_card``: a ``huggingface_hub`` model card
whose YAML metadata holds ``base_model``, ``library_name`` and ``tags``), from the run's own
files only:

- the metadata: ``base_model`` (``model.pretrained`` as written; the SPM's CLIP,
  ``preference.pretrained``), ``library_name`` (``diffusers``; ``transformers`` for an SPM or a
  reward model), ``tags`` (``text-to-image``, ``diffusers``, ``lora`` or ``full-fine-tune``, the
  method's name, the backbone's family; an SPM: ``step-aware-preference-model``). No ``license``:
  the weights derive from the base model, whose license the user sets;
- the recipe: the backbone, the method's own settings (its ``objective`` section, whatever its
  fields), SPO's pools, the optimiser, the LoRA, the rounds (SPM: the ``spm`` section), and what
  ``metrics.jsonl`` counted (rounds, optimiser steps, seconds; SPM: validation accuracy);
- the evaluation table of every ``eval.json`` under the run directory (``spo eval``'s);
- links to the latest preview images (``RUN_DIR/samples/*.png``) when there are any;
- how to load the weights (two lines of diffusers; the SPM through
  ``StepAwarePreferenceModel.from_pretrained``; the LRM through
  ``LatentRewardModel.from_pretrained``, or ``preference.kind=latent preference.pretrained=DIR``).

Links are relative to the card, so they hold while the run directory stays together.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from ..files import atomic_write_text

CARD = "README.md"
#: the folders of final weights a run may hold, in the order cards are listed
WEIGHT_DIRS = ("lora", "unet", "spm", "reward", "lrm")
#: the preference models ``spo train-spm`` trains (their cards share one layout)
JUDGES = ("spm", "reward", "lrm")
#: how many of the latest preview images a card links
PREVIEWS = 3
#: method names as people write them, and what each does (a plugin's name stands as it is)
METHOD_TITLES = {"spo": "SPO", "diffusion_dpo": "Diffusion-DPO", "d3po": "D3PO", "ddpo": "DDPO"}
METHOD_SUMMARIES = {
    "spo": "step-aware preference optimization: DPO at each denoising step on the best and worst of a pool of "
           "candidates, judged by a step-aware preference model",
    "diffusion_dpo": "DPO on the denoising errors of offline preference pairs",
    "d3po": "DPO on pairs of whole sampling trajectories judged by a reward model",
    "ddpo": "PPO-clip on sampling trajectories weighted by a reward model",
}
#: the tags diffusers' training scripts give each family of pipelines
BACKBONE_TAGS = {"sd15": ["stable-diffusion", "stable-diffusion-diffusers"],
                 "sdxl": ["stable-diffusion-xl", "stable-diffusion-xl-diffusers"],
                 "sd3": ["sd3", "sd3-diffusers"]}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ------------------------------------------------------------------------------------ reading the run
def _config_dict(run_dir: Path, config: Any) -> dict[str, Any]:
    """The configuration as a plain dict: ``config`` (an ``SPOConfig`` or a dict), else the run's
    ``config.yaml`` read as YAML (no method needs importing: a plugin's section reads as it is)."""
    if config is not None:
        if isinstance(config, dict):
            return config
        from ..config import config_to_dict

        return config_to_dict(config)
    try:
        loaded = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _get(cfg: dict[str, Any], dotted: str, default: Any = None) -> Any:
    value: Any = cfg
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            return default
        value = value[key]
    return value


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The lines of ``metrics.jsonl`` that parse (a torn last line is skipped)."""
    entries = []
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _eval_files(run_dir: Path, extra: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """``eval.json`` of the run directory and of its direct subdirectories (``spo eval``'s default
    ``RUN_DIR/eval``), then those of ``extra`` evaluation directories, without repeats."""
    found = [run_dir / "eval.json"] if (run_dir / "eval.json").is_file() else []
    if run_dir.is_dir():
        found += [d / "eval.json" for d in sorted(run_dir.iterdir()) if d.is_dir() and (d / "eval.json").is_file()]
    found += [Path(d) / "eval.json" for d in extra if (Path(d) / "eval.json").is_file()]
    unique: dict[Path, Path] = {}
    for path in found:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def _previews(run_dir: Path, count: int = PREVIEWS) -> tuple[Path | None, list[Path]]:
    """The base model's preview (``samples/reference.png``) and the latest ``count`` round previews
    (``samples/round-NNNNNN.png``, else any other PNGs there), oldest first."""
    folder = run_dir / "samples"
    if not folder.is_dir():
        return None, []
    reference = folder / "reference.png"
    pngs = sorted(p for p in folder.glob("*.png") if p.is_file() and p.name != reference.name)
    rounds = [p for p in pngs if p.name.startswith("round-")]
    latest = (rounds or pngs)[-count:] if count > 0 else []
    return (reference if reference.is_file() else None), latest


# ------------------------------------------------------------------------------------ writing it
def _link(target: Path, card_dir: Path) -> str:
    return Path(os.path.relpath(target.resolve(), card_dir.resolve())).as_posix()


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_value(v) for v in value) if value else "[]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(rows: Sequence[tuple[str, Any]], heads: tuple[str, str] = ("setting", "value"),
           code: bool = True) -> list[str]:
    lines = [f"| {heads[0]} | {heads[1]} |", "| --- | --- |"]
    lines += [f"| {f'`{_cell(key)}`' if code else _cell(key)} | {_cell(_value(value))} |" for key, value in rows]
    return lines


def _section(cfg: dict[str, Any], name: str, skip: Sequence[str] = ()) -> list[tuple[str, Any]]:
    section = cfg.get(name)
    if not isinstance(section, dict):
        return []
    return [(f"{name}.{k}", v) for k, v in section.items() if k not in skip]


def _kind(weights_dir: Path, cfg: dict[str, Any]) -> str:
    """``lora``, ``unet``, ``spm``, ``reward`` or ``lrm``: the folder's name, else the config's choice."""
    if weights_dir.name in WEIGHT_DIRS:
        return weights_dir.name
    return "unet" if _get(cfg, "model.finetune") == "full" else "lora"


def _metadata(kind: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """The YAML front matter, keyed as ``huggingface_hub.ModelCardData`` writes it."""
    if kind == "lrm":  # diffusers' UNet and transformers' text encoder(s) with the LRM's head
        return {"base_model": str(_get(cfg, "preference.pretrained", "")), "library_name": "diffusers",
                "tags": ["latent-reward-model", "reward-model", "lpo", "diffusers", "transformers"]}
    if kind in ("spm", "reward"):
        tags = (["step-aware-preference-model"] if kind == "spm" else []) + ["clip", "reward-model", "spo"]
        return {"base_model": str(_get(cfg, "preference.pretrained", "")), "library_name": "transformers",
                "tags": tags}
    method = str(_get(cfg, "objective.name", "spo"))
    tags = ["text-to-image", "diffusers", "lora" if kind == "lora" else "full-fine-tune", method]
    tags += BACKBONE_TAGS.get(str(_get(cfg, "model.backbone", "")), [])
    return {"base_model": str(_get(cfg, "model.pretrained", "")), "library_name": "diffusers",
            "tags": list(dict.fromkeys(tags))}


def _front_matter(metadata: dict[str, Any]) -> str:
    return "---\n" + yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True) + "---\n"


def _license_note(base: str) -> str:
    where = f"`{base}`" if base else "the base model"
    return (f"**License: not set.** These weights derive from {where}: add `license:` to the metadata above "
            "(the base model's license, e.g. `creativeml-openrail-m` for Stable Diffusion 1.5, `openrail++` for "
            "SDXL) before you share them.")


def _base_note(base: str) -> str | None:
    if _HUB_ID.match(base) and not Path(base).expanduser().exists():
        return None
    return (f"`base_model` is `{base}` as the run's configuration wrote it, not a hub id: replace it with the hub id "
            "of that model before you upload this folder.")


def _load_snippet(kind: str, cfg: dict[str, Any], weights_dir: Path) -> list[str]:
    where = json.dumps(str(weights_dir))
    base = json.dumps(str(_get(cfg, "model.pretrained", "")))
    if kind == "spm":
        return ["```python", "from spo.preference.spm import StepAwarePreferenceModel", "",
                f"spm = StepAwarePreferenceModel.from_pretrained({where})  # scores = spm(images, prompts, timesteps)",
                "```", "",
                f"Or let a run score with it: `spo train PRESET preference.pretrained={weights_dir} "
                "preference.checkpoint=null`."]
    if kind == "lrm":
        return ["```python", "from spo.preference.latent import LatentRewardModel", "",
                f"lrm = LatentRewardModel.from_pretrained({where})  # scores = lrm(noisy_latents, prompts, timesteps)",
                "```", "",
                f"Or let a run score with it: `spo train PRESET preference.kind=latent preference.pretrained={weights_dir} "
                "preference.checkpoint=null` (`null`: no released LRM loaded over it). Its `unet/` and "
                "`text_encoder/` folders load on their own with diffusers' `UNet2DConditionModel` and "
                "transformers' `CLIPTextModel`."]
    if kind == "reward":
        return ["```python", "from transformers import AutoProcessor, CLIPModel", "",
                f"model, processor = CLIPModel.from_pretrained({where}), AutoProcessor.from_pretrained({where})",
                "```", "",
                "A step-aware preference model starts from it: "
                f"`spo train-spm PRESET preference.pretrained={weights_dir}`."]
    if _get(cfg, "model.backbone") == "toy":
        return [f"A LoRA of the toy world's model (`{_get(cfg, 'model.pretrained')}`, no diffusers pipeline): "
                f"`spo eval {weights_dir.parent}` makes and scores its images, `spo report {weights_dir.parent}` "
                "shows the run."]
    if kind == "lora":
        return ["```python", "from diffusers import DiffusionPipeline", "",
                f"pipe = DiffusionPipeline.from_pretrained({base})",
                f"pipe.load_lora_weights({where})  # this folder, or the hub repository you upload it to",
                "```"]
    try:
        denoiser = json.loads((weights_dir / "config.json").read_text()).get("_class_name") or "UNet2DConditionModel"
    except (OSError, ValueError, AttributeError):
        denoiser = "UNet2DConditionModel"
    argument = "transformer" if "Transformer" in denoiser else "unet"
    return ["```python", f"from diffusers import DiffusionPipeline, {denoiser}", "",
            f"{argument} = {denoiser}.from_pretrained({where})  # this folder, or the hub repository you upload it to",
            f"pipe = DiffusionPipeline.from_pretrained({base}, {argument}={argument})",
            "```"]


def _recipe(kind: str, cfg: dict[str, Any]) -> list[tuple[str, Any]]:
    model = [(f"model.{k}", _get(cfg, f"model.{k}")) for k in ("backbone", "pretrained", "vae", "revision", "variant",
                                                               "resolution", "dtype")
             if _get(cfg, f"model.{k}") is not None or k in ("backbone", "pretrained")]
    if kind in JUDGES:
        keys = (("kind", "pretrained", "checkpoint", "text_projection", "guidance_scale", "multi_scale",
                 "multi_scale_cfg") if kind == "lrm" else
                ("pretrained", "processor", "checkpoint", "variant", "time_frequencies", "decoder"))
        preference = [(f"preference.{k}", _get(cfg, f"preference.{k}")) for k in keys]
        rows = preference + _section(cfg, "spm")
        if kind in ("spm", "lrm"):  # the diffusion model that noised the images (its VAE, the LRM's)
            rows = model + rows
        return rows + [("seed", cfg.get("seed"))]
    method = str(_get(cfg, "objective.name", "spo"))
    rows = model + [("model.finetune", _get(cfg, "model.finetune"))]
    rows += [("objective.name", method)] + _section(cfg, "objective", skip=("name",))
    if method == "spo":
        rows += _section(cfg, "pools")
    if method == "diffusion_dpo":
        rows += [(f"data.{k}", _get(cfg, f"data.{k}")) for k in ("preference_data", "preference_split", "keep_ties",
                                                                "empty_caption_probability")]
    else:
        rows += [("data.prompts", _get(cfg, "data.prompts"))]
        rows += [(f"preference.{k}", _get(cfg, f"preference.{k}")) for k in ("pretrained", "checkpoint", "variant")]
        rows += [(f"sampling.{k}", _get(cfg, f"sampling.{k}"))
                 for k in ("num_inference_steps", "eta", "guidance_scale")]
    rows += _section(cfg, "optimizer")
    if kind == "lora":
        rows += [(f"lora.{k}", _get(cfg, f"lora.{k}")) for k in ("rank", "alpha", "target_modules", "init")]
    rows += [(f"train.{k}", _get(cfg, f"train.{k}")) for k in ("rounds", "prompts_per_round", "batch_size",
                                                              "gradient_accumulation_steps", "epochs_per_round",
                                                              "mixed_precision", "num_processes")]
    return rows + [("seed", cfg.get("seed"))]


def _training_counts(kind: str, entries: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    """What ``metrics.jsonl`` counted: rounds, optimiser steps, seconds (SPM: steps and pairs)."""
    steps = [e for e in entries if e.get("type") == "step"]
    if kind in JUDGES:
        rows: list[tuple[str, Any]] = [("optimiser steps", len(steps))]
        pairs = sum(int(e.get("pairs", 0) or 0) for e in steps)
        if pairs:
            rows.append(("pairs trained on", pairs))
        if steps and steps[-1].get("skipped_rows") is not None:
            rows.append(("bad rows skipped", steps[-1]["skipped_rows"]))
        return rows
    rounds = [e for e in entries if e.get("type") == "round"]
    rows = [("rounds", len(rounds)),
            ("rounds skipped (too few valid records)", sum(1 for r in rounds if r.get("skipped"))),
            ("optimiser steps", len(steps))]
    sampling = sum(_number(r.get("sampling_seconds")) or 0.0 for r in rounds)
    training = sum(_number(r.get("training_seconds")) or 0.0 for r in rounds)
    if rounds:
        rows += [("seconds sampling / training", f"{sampling:.0f} / {training:.0f} "
                                                 f"({(sampling + training) / 3600:.2f} h)")]
        processes = rounds[-1].get("num_processes")
        if processes is not None:
            rows.append(("processes", processes))
    return rows


def _validation(entries: list[dict[str, Any]], latent: bool = False) -> list[str]:
    """The SPM's (the LRM's) pair accuracy per timestep: the first validation and the last."""
    checks = [e for e in entries if e.get("type") == "validation"]
    if not checks:
        return []
    first, last = checks[0], checks[-1]
    keys = [k for k in last if k.startswith("accuracy_t")]
    if not keys:
        return []
    lines = ["## Validation", "",
             f"Pair accuracy on the validation pairs ({last.get('pairs', '?')} counted) at each timestep t "
             + ("(VAE latents noised to t, scored at t; t = 0: the clean latents)." if latent else
                "(images noised to t, scored at t; t = 0: the clean images)."), ""]
    both = first is not last
    if both:
        lines += [f"| t | at step {first.get('step', '?')} | at step {last.get('step', '?')} |", "| --- | --- | --- |"]
    else:
        lines += [f"| t | at step {last.get('step', '?')} |", "| --- | --- |"]
    for key in keys:
        cells = [first.get(key), last.get(key)] if both else [last.get(key)]
        shown = [f"{v:.3f}" if _number(v) is not None else "-" for v in cells]
        lines.append(f"| {key[len('accuracy_t'):]} | " + " | ".join(shown) + " |")
    return lines + [""]


def _estimate(value: Any, signed: bool = False) -> str:
    if not isinstance(value, dict):
        return "-"
    mean, low, high = (_number(value.get(k)) for k in ("mean", "low", "high"))
    if mean is None:
        return "-"
    form = "+.3f" if signed else ".3f"
    if low is None or high is None:
        return format(mean, form)
    return f"{mean:{form}} [{low:{form}}, {high:{form}}]"


def _this_model(models: dict[str, Any], run_dir: Path, eval_file: Path) -> list[str]:
    """The keys of an evaluation's models that are this run (by path; else by the run folder's
    name; else, for an evaluation inside the run directory, its one run)."""
    runs = {k: m.get("run") for k, m in models.items() if isinstance(m, dict) and m.get("run")}
    mine = [k for k, r in runs.items() if Path(r).expanduser().resolve() == run_dir.resolve()]
    if not mine:
        mine = [k for k, r in runs.items() if Path(r).name == run_dir.name]
    if not mine and len(runs) == 1 and run_dir.resolve() in eval_file.resolve().parents:
        mine = list(runs)
    return mine


def _evaluation(run_dir: Path, card_dir: Path, eval_files: list[Path]) -> list[str]:
    lines: list[str] = []
    for path in eval_files:
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(result, dict) or not result.get("metrics") or not isinstance(result.get("results"), dict):
            continue
        models = result.get("models") if isinstance(result.get("models"), dict) else {}
        mine = _this_model(models, run_dir, path) or [k for k in result["results"] if k != "base"]
        shown = [k for k in ("base", *mine) if k in result["results"]]
        differences = result.get("differences") if isinstance(result.get("differences"), dict) else {}
        heads = shown + [f"{k} - base (paired)" for k in mine if k in differences]
        protocol = result.get("protocol") if isinstance(result.get("protocol"), dict) else {}
        if not lines:
            lines += ["## Evaluation", ""]
        lines += [f"`spo eval` ([{_link(path, card_dir)}]({_link(path, card_dir)})): "
                  f"{protocol.get('num_prompts', '?')} prompts ({protocol.get('prompts', '?')}) x "
                  f"{protocol.get('seeds', '?')} seeds, DDIM {protocol.get('num_inference_steps', '?')} steps, "
                  f"eta {protocol.get('eta', '?')}, CFG {protocol.get('guidance_scale', '?')}; mean [95% interval]; "
                  "paired: the same prompt and noise for both models.", ""]
        lines += ["| metric | " + " | ".join(heads) + " |", "| --- |" + " --- |" * len(heads)]
        for metric, info in result["metrics"].items():
            label = info.get("label", metric) if isinstance(info, dict) else metric
            cells = [_estimate(result["results"][k].get(metric)) for k in shown]
            cells += [_estimate(differences[k].get(metric), signed=True) for k in mine if k in differences]
            lines.append(f"| {_cell(str(label))} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def build_model_card(run_dir: str | Path, weights_dir: str | Path | None = None, config: Any = None, *,
                     eval_dirs: Iterable[str | os.PathLike[str]] = ()) -> str:
    """The card of the final weights in ``weights_dir`` (default: the run's first of
    :data:`WEIGHT_DIRS`) of the run in ``run_dir``. ``config``: the run's configuration (an
    ``SPOConfig`` or its dict); default: ``config.yaml``. ``eval_dirs``: evaluation directories
    outside the run directory whose ``eval.json`` also counts."""
    run_dir = Path(run_dir)
    cfg = _config_dict(run_dir, config)
    if weights_dir is None:
        found = final_weight_dirs(run_dir)
        weights_dir = found[0] if found else run_dir / ("unet" if _get(cfg, "model.finetune") == "full" else "lora")
    weights_dir = Path(weights_dir)
    kind = _kind(weights_dir, cfg)
    metadata = _metadata(kind, cfg)
    base = metadata["base_model"]
    entries = _metrics(run_dir)
    lines = [_front_matter(metadata)]
    if kind == "lrm":
        lines += [f"# Latent reward model from `{base}`", "",
                  f"LPO's latent reward model (LRM) trained by `spo train-spm` (`preference.kind=latent`) on the "
                  f"preference pairs of `{_get(cfg, 'spm.data')}`: the down and mid blocks of the diffusion model's "
                  "own UNet score a noisy latent at its timestep t against the prompt, without decoding it. Its "
                  "folder holds the trained components in their libraries' formats (`unet/`: diffusers; "
                  "`text_encoder/` and `tokenizer/`: transformers; `_2` as well for SDXL), `lrm.safetensors` (the "
                  "visual and text projections and the logit scale) and `lrm_config.json`.", ""]
    elif kind in ("spm", "reward"):
        what = "Step-aware preference model" if kind == "spm" else "Clean-image reward model"
        variant = _get(cfg, "preference.variant", "step_aware")
        lines += [f"# {what} from `{base}`", "",
                  (f"A CLIP preference model ({variant}) trained by `spo train-spm` on the preference pairs of "
                   f"`{_get(cfg, 'spm.data')}`: it scores an image at a diffusion timestep t, the noised pair's "
                   "x0 estimate from the denoiser of " f"`{_get(cfg, 'model.pretrained')}`, as SPO's step-aware "
                   "preference model does. Its folder holds the CLIP config, the tokenizer, `spm.safetensors` "
                   "and `spm_config.json`.")
                  if kind == "spm" else
                  (f"A CLIP reward model trained by `spo train-spm` (`preference.variant=clean`, PickScore's recipe) "
                   f"on the preference pairs of `{_get(cfg, 'spm.data')}`: it scores clean images against "
                   "their prompt. A CLIPModel folder with its tokenizer and image processor."), ""]
    else:
        method = str(_get(cfg, "objective.name", "spo"))
        title = METHOD_TITLES.get(method, method)
        summary = f", {METHOD_SUMMARIES[method]}" if method in METHOD_SUMMARIES else ""
        if kind == "lora":
            what, weights = "LoRA", f"LoRA weights (rank {_get(cfg, 'lora.rank')}, diffusers format)"
        else:
            what, weights = "fully fine-tuned denoiser", "The fully fine-tuned denoiser (diffusers format)"
        lines += [f"# {title} {what} for `{base}`", "",
                  f"{weights} of the `{_get(cfg, 'model.backbone')}` model `{base}`, post-trained by `spo train` "
                  f"with {title} (`objective.name={method}`){summary}.", ""]
    lines += [_license_note(base), ""]
    note = _base_note(base)
    if note:
        lines += [note, ""]
    lines += ["## How to use it", "", *_load_snippet(kind, cfg, weights_dir), ""]
    if kind not in JUDGES:
        lines += _evaluation(run_dir, weights_dir, _eval_files(run_dir, eval_dirs))
        reference, latest = _previews(run_dir)
        if reference is not None or latest:
            lines += ["## Previews", "",
                      "Fixed prompts and noise through training (links into the run directory):", ""]
            if reference is not None:
                lines.append(f"![the base model]({_link(reference, weights_dir)})")
            lines += [f"![{p.stem}]({_link(p, weights_dir)})" for p in latest]
            lines.append("")
    else:
        lines += _validation(entries, latent=kind == "lrm")
    lines += ["## Training", "", "How the run was configured (its `config.yaml`, as written):", "",
              *_table(_recipe(kind, cfg)), ""]
    counts = _training_counts(kind, entries)
    if entries:
        lines += ["What the run's `metrics.jsonl` counted:", "", *_table(counts, ("", "count"), code=False), ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def write_model_card(run_dir: str | Path, weights_dir: str | Path | None = None, config: Any = None, *,
                     eval_dirs: Iterable[str | os.PathLike[str]] = ()) -> Path:
    """Write :func:`build_model_card` to ``WEIGHTS_DIR/README.md`` atomically; returns its path."""
    if weights_dir is None:
        found = final_weight_dirs(run_dir)
        if not found:
            raise FileNotFoundError(f"{run_dir}: no final weights ({', '.join(WEIGHT_DIRS)}) to write a card for")
        weights_dir = found[0]
    card = build_model_card(run_dir, weights_dir, config, eval_dirs=eval_dirs)
    return atomic_write_text(Path(weights_dir) / CARD, card)


def final_weight_dirs(run_dir: str | Path) -> list[Path]:
    """The folders of final weights the run directory holds (``lora``, ``unet``, ``spm``, ``reward``, ``lrm``)."""
    return [Path(run_dir) / name for name in WEIGHT_DIRS if (Path(run_dir) / name).is_dir()]


def update_model_cards(run_dir: str | Path, *, eval_dirs: Iterable[str | os.PathLike[str]] = ()) -> list[Path]:
    """Write the card of every final weights folder of ``run_dir`` again (``spo eval`` calls this
    after evaluating the run, so the table appears); returns the cards written."""
    extra = list(eval_dirs)
    return [write_model_card(run_dir, d, eval_dirs=extra) for d in final_weight_dirs(run_dir)]


def write_card_everywhere(accelerator: Any, run_dir: str | Path, weights_dir: str | Path, config: Any) -> Path | None:
    """The card of the final weights just saved, written on the main process through
    :func:`~spo.training.distributed.write_everywhere` (every process learns the outcome). A card
    that cannot be written does not fail the run, whose weights are already saved: every process
    warns and goes on; returns ``None`` then."""
    from .distributed import WriteError, write_everywhere

    path = Path(weights_dir) / CARD
    try:
        return write_everywhere(accelerator, f"writing the model card {path}",
                                lambda: write_model_card(run_dir, weights_dir, config))
    except WriteError as err:
        if accelerator.is_main_process:
            warnings.warn(f"the weights in {weights_dir} are saved, but their model card is not: {err}", stacklevel=2)
        return None
