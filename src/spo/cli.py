"""The ``spo`` command line: thin argument parsing over the library."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from .builtin import TOY_BUILD_VERSIONS

DEMO_PROMPTS = [
    "a small red circle on a white background",
    "two large blue squares on a black background",
    "a large green triangle on a gray background",
    "two small yellow circles on a white background",
]


def _split_positionals(values: Sequence[str]) -> tuple[str | None, list[str]]:
    """``[SOURCE] [key=value ...]``: the one item without '=' is the preset or YAML file."""
    from .config import ConfigError

    sources = [v for v in values if "=" not in v]
    overrides = [v for v in values if "=" in v]
    if len(sources) > 1:
        raise ConfigError(f"expected at most one preset or config file, got {sources}")
    return (sources[0] if sources else None), overrides


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


#: what `spo train` (and friends) use when no preset or file is named: the toy world
DEFAULT_PRESET = "toy"


def _load(values: Sequence[str]):  # noqa: ANN202
    from .config import load_config

    source, overrides = _split_positionals(values)
    return load_config(source or DEFAULT_PRESET, overrides)


def cmd_config_show(args: argparse.Namespace) -> int:
    from .config import config_to_yaml

    print(config_to_yaml(_load(args.config)), end="")
    return 0


def cmd_config_presets(args: argparse.Namespace) -> int:
    """Each preset: its name, its method (``objective.name``), the first line of its comment."""
    from importlib.resources import files

    from .config import available_presets, load_config

    names = available_presets()
    width = max(len(n) for n in names)
    for name in names:
        text = files("spo.config").joinpath("presets", f"{name}.yaml").read_text(encoding="utf-8")
        about = next((line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#")), "")
        print(f"{name:<{width}}  {load_config(name).objective.name:<13}  {about}")
    return 0


def _prompts_for(args: argparse.Namespace, config) -> list[str]:  # noqa: ANN001
    from .data import load_prompts

    if args.prompt:
        return list(args.prompt)
    path = args.prompts or config.eval.prompts or config.data.prompts
    if path:
        return load_prompts(path)
    return list(DEMO_PROMPTS)


def cmd_sample(args: argparse.Namespace) -> int:
    from .evaluation.generate import generate

    config = _load(args.config)
    prompts = _prompts_for(args, config)
    result = generate(config, prompts, args.output, seeds=args.seeds, batch_size=args.batch_size,
                      grid_cell=args.grid_cell)
    _summary(
        [
            ("model", config.model.pretrained),
            ("prompts x seeds", f"{len(prompts)} x {args.seeds}"),
            ("DDIM steps / eta / CFG", f"{config.sampling.num_inference_steps} / {config.sampling.eta} / {config.sampling.guidance_scale}"),
            ("images", str(result.num_images)),
            ("seconds", f"{result.seconds:.1f}"),
            ("grid", str(result.grid)),
        ]
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .training import SPOTrainer

    config = _load(args.config)
    trainer = SPOTrainer(config, args.output, resume=args.resume)
    result = trainer.train()
    if not trainer.accelerator.is_main_process:
        return 0
    last = result.last_round
    rows = [
        ("run directory", str(result.run_dir)),
        ("processes", str(trainer.accelerator.num_processes)),
        ("rounds (skipped)", f"{result.rounds} ({result.skipped_rounds})"),
        ("optimiser steps", str(result.steps)),
    ]
    if last:
        rows.append(("method", trainer.config.objective.name))
        rows.append(("last round: valid-pair rate", f"{last['valid_pair_rate']:.3f}"))
        if not last.get("skipped"):
            rows += [(f"last round: {name.replace('_', ' ')}", f"{last[name]:.4g}") for name in trainer.metric_names]
    rows += [("final weights", str(result.lora_path)), ("metrics", str(result.run_dir / "metrics.jsonl"))]
    _summary(rows)
    return 0


def cmd_train_spm(args: argparse.Namespace) -> int:
    from .training import SPMTrainer

    config = _load(args.config)
    trainer = SPMTrainer(config, args.output, resume=args.resume)
    before = trainer.validate() if not args.resume and trainer.step == 0 else None
    result = trainer.train()
    if not trainer.accelerator.is_main_process:
        return 0
    print(format_accuracy_table(result.validation, before))
    _summary(
        [
            ("run directory", str(result.run_dir)),
            ("processes", str(trainer.accelerator.num_processes)),
            ("optimiser steps", str(result.steps)),
            ("rows skipped (bad data)", str(result.skipped_rows)),
            ("LRM", f"{result.spm_path} (use: preference.kind=latent preference.pretrained={result.spm_path} "
                    "preference.checkpoint=null)")
            if result.model == "lrm" else
            ("SPM", f"{result.spm_path} (use: preference.pretrained={result.spm_path})"),
        ]
    )
    return 0


def format_accuracy_table(after: dict[int, float], before: dict[int, float] | None = None) -> str:
    """Validation pair accuracy per timestep, as a text table."""
    header = "t      | " + ("before | " if before else "") + "accuracy"
    lines = [header, "-" * len(header)]
    for t, acc in after.items():
        lines.append(f"{t:<6} | " + (f"{before[t]:.3f}  | " if before else "") + f"{acc:.3f}")
    return "\n".join(lines)


def cmd_toy_pretrain(args: argparse.Namespace) -> int:
    from .toy.pretrain import PretrainSettings, pretrain

    settings = PretrainSettings(steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    summary = pretrain(args.output, settings, resume=args.resume, objective=args.objective, device=args.device)
    _summary([
        ("output", f"{args.output}/base (and snapshots)"),
        ("steps", str(settings.steps)),
        ("seconds", str(summary["seconds"])),
        ("loss first / last 100 steps", f"{summary['loss_first_100']:.4f} / {summary['loss_last_100']:.4f}"),
    ])
    return 0


def cmd_toy_score(args: argparse.Namespace) -> int:
    from .data import load_prompts
    from .images import image_grid, to_pil
    from .preference.clip_scorer import CLIPScorer
    from .toy.evaluate import sample_and_score
    from .toy.scorers import EVAL_REWARD
    from .toy.grammar import validation_prompts
    from .toy.model import ToyBackbone

    backbone = ToyBackbone.from_pretrained(args.model, device="cpu")
    prompts = load_prompts(args.prompts) if args.prompts else validation_prompts()
    reward = CLIPScorer.from_pretrained(EVAL_REWARD, device="cpu")
    images, scores, _ = sample_and_score(backbone, prompts, seeds=args.seeds, guidance_scale=args.guidance, reward=reward)
    rows = [(f"{name} (mean [95% interval], n={est.n})", str(est)) for name, est in scores.items()]
    if args.grid:
        image_grid(to_pil(images), cols=len(prompts), cell=64).save(args.grid)
        rows.append(("grid", args.grid))
    _summary(rows)
    return 0


#: the paper's metrics, in its tables' order; ``spo eval`` names each one it skips
PAPER_SCORERS = ("pickscore", "hpsv2", "hpsv21", "image_reward", "aesthetic")


def cmd_eval(args: argparse.Namespace) -> int:
    """Base vs fine-tuned (one or more runs of one base model) on a prompt set, same noise."""
    import torch

    from .backbones.base import resolve_device
    from .builtin import PREFIX, is_builtin
    from .data import is_preference_data, load_prompt_set
    from .evaluation.evaluate import EvaluationError, Protocol, evaluate, format_table
    from .evaluation.geneval import load_geneval_metadata, write_geneval_images
    from .evaluation.scorers import ScorerSpec, load_scorers
    from .evaluation.targets import base_config, eval_models, model_loader, prepare_targets, resolve_target

    targets, overrides = [v for v in args.config if "=" not in v], [v for v in args.config if "=" in v]
    if not targets and args.base is None:
        raise EvaluationError("spo eval needs a run directory, a preset or a config file, a fine-tuned pipeline or a "
                              "LoRA file (e.g. spo eval runs/demo/spo; spo eval --base sd15 OWNER/PIPELINE)")
    specs = [ScorerSpec.parse(text) for text in args.scorer]
    toy = _toy_targets(targets)
    resolved = [resolve_target(t, overrides) if t not in toy else toy[t] for t in targets]
    config = base_config(resolved, args.base, overrides)
    prepare_targets(resolved, config)  # downloads and checks before anything is written
    models = eval_models(resolved, config)
    compared = models[1:]
    if len(compared) > 1 and args.output is None:
        raise EvaluationError("--output is needed when several models are compared")
    first = targets[0] if targets else args.base
    if compared and compared[0].run is not None:
        default = Path(compared[0].run) / "eval"
    elif compared:
        default = Path("runs") / f"eval-{compared[0].key}"
    else:
        default = Path("runs") / (f"eval-{first[len(PREFIX):]}" if is_builtin(first) else f"eval-{Path(first).stem}")
    output = Path(args.output) if args.output else default
    if output.exists() and not output.is_dir():
        raise EvaluationError(f"--output {str(output)!r} is a file")
    is_toy = config.model.backbone == "toy"
    scorer_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.scorer_dtype]
    if is_toy and scorer_dtype != torch.float32:
        raise EvaluationError(f"--scorer-dtype {args.scorer_dtype}: the toy world's scorers and oracles run in float32")
    guidance = args.guidance if args.guidance is not None else (
        config.eval.guidance_scale if config.eval.guidance_scale is not None else config.sampling.guidance_scale)
    steps = args.steps or config.sampling.num_inference_steps
    eta = args.eta if args.eta is not None else config.sampling.eta
    load_model = model_loader(config)
    for m in compared:
        if m.unet is not None:
            print(f"{m.key}: the {Path(m.unet).name} of {m.source} in the base's pipeline; its other components are "
                  "not read (the base's text encoder(s), VAE and scheduler make its images)")
        elif m.source is not None:
            print(f"{m.key}: the LoRA file {m.lora} ({m.lora_naming} naming) on the base's {config.model.pretrained}")
    if args.geneval:
        metadata = load_geneval_metadata(args.geneval)
        folders = write_geneval_images(models, metadata, output, load_model=load_model,
                                       images_per_prompt=args.images_per_prompt, seed=args.seed,
                                       num_inference_steps=steps, eta=eta, guidance_scale=guidance,
                                       batch_size=args.batch_size)
        _summary([(f"GenEval images: {key}", str(folder)) for key, folder in folders.items()] + [
            ("next", "python evaluation/evaluate_images.py FOLDER --outfile results.jsonl --model-path MODELS "
                     "(in GenEval's own environment)")])
        return 0
    source = args.prompts or config.eval.prompts or ("toy:validation-prompts" if is_toy else None)
    if source is None:
        raise EvaluationError("spo eval needs --prompts (a prompts file, or Pick-a-Pic data for the paper's "
                              "500 validation_unique captions)")
    limit = args.num_prompts or (500 if is_preference_data(source) else None)
    prompts = load_prompt_set(source, split=args.split, limit=limit)
    seeds = args.seeds or config.eval.seeds
    device = resolve_device(config.model.device)
    skipped: list[str] = []
    if is_toy:
        from .toy.grammar import parse_prompt
        from .toy.scorers import toy_scorers

        for p in prompts:
            parse_prompt(p)  # before any image is made: the oracles read only the toy grammar
        scorers = toy_scorers(device=device) if not specs else []
    else:
        scorers = []
    scorers += load_scorers(specs, wanted=() if is_toy else PAPER_SCORERS, device=device,
                            dtype=scorer_dtype, log=skipped.append)
    for line in skipped:
        print(line)
    protocol = Protocol(prompts, str(source), seeds=seeds, seed=args.seed, num_inference_steps=steps, eta=eta,
                        guidance_scale=guidance, noise="per_seed" if is_toy else "per_image",
                        extra={"resolution": config.model.resolution, "dtype": config.model.dtype})
    batch = len(prompts) if is_toy else args.batch_size
    result = evaluate(models, protocol, scorers, output, load_model=load_model, batch_size=batch, skipped=skipped,
                      grid_cell=64 if is_toy else None)
    cards = _rewrite_model_cards(compared, output)
    if scorers:
        print(format_table(result))
        print(f"mean [95% interval] over {len(prompts)} prompts x {seeds} seeds; paired: same prompt, same noise")
    _summary([
        ("models", ", ".join(m.key for m in models)),
        ("prompts x seeds", f"{len(prompts)} x {seeds} ({source})"),
        ("DDIM steps / eta / CFG", f"{steps} / {eta} / {guidance}"),
        ("seconds: generation / scoring", f"{result['seconds']['generation']:.1f} / {result['seconds']['scoring']:.1f}"),
        ("results", str(output / "eval.json")),
        ("per image / per prompt", f"{output / 'scores.csv'} / {output / 'per_prompt.csv'}"),
        ("grids", ", ".join(str(output / g) for gs in result["grids"].values() for g in gs[:1])),
        *([("model cards", ", ".join(cards))] if cards else []),
    ])
    return 0


def _rewrite_model_cards(models: Sequence[Any], output: Path) -> list[str]:
    """The model cards (``README.md`` beside the final weights) of the evaluated runs, written
    again with this evaluation's table. A card that cannot be written is a warning line: the
    evaluation stands."""
    from .training.model_card import update_model_cards

    written: list[str] = []
    for model in models:
        if model.run is None:
            continue
        try:
            written += [str(p) for p in update_model_cards(model.run, eval_dirs=[output])]
        except (OSError, ValueError) as err:
            print(f"warning: the model card of {model.run} was not written: {type(err).__name__}: {err}")
    return written


def _toy_targets(targets: Sequence[str]) -> dict[str, Any]:
    """Targets that are toy model directories (``toy:base`` or a pretrained toy model): the toy
    preset with that model as base."""
    from .builtin import resolve_weights
    from .config import load_config
    from .evaluation.targets import Target
    from .toy.model import MARKER

    found: dict[str, Target] = {}
    for t in targets:
        path = Path(resolve_weights(t, "spo eval")).expanduser()
        if (path / MARKER).exists():
            found[t] = Target(path.name, load_config("toy", [f"model.pretrained={t}"]))
    return found


def cmd_report(args: argparse.Namespace) -> int:
    from .evaluation.evaluate import EvaluationError
    from .evaluation.report import write_report

    run = Path(args.run_dir)
    if not run.is_dir():
        raise EvaluationError(f"{args.run_dir!r} is not a run directory")
    try:
        path = write_report(run, eval_dirs=args.eval, output=args.output)
    except FileNotFoundError as err:
        raise EvaluationError(str(err)) from None
    print(f"report: {path}")
    return 0


def cmd_toy_build(args: argparse.Namespace) -> int:
    from .toy.build import STAGES, BuildSettings, ToyBuild, format_build_summary

    stages = tuple(args.stages.split(",")) if args.stages else STAGES
    settings = BuildSettings.tiny() if args.tiny else BuildSettings.for_version(args.version)
    record = ToyBuild(args.output, settings, version="tiny" if args.tiny else args.version).run(stages)
    _summary([("output", args.output), ("version", record["version"]), *format_build_summary(record)])
    return 0


def cmd_tiny_pipeline(args: argparse.Namespace) -> int:
    from .backbones.tiny import save_tiny_clip, save_tiny_pipeline

    path = save_tiny_pipeline(args.kind, args.output, seed=args.seed)
    print(f"saved a tiny random {args.kind} pipeline to {path}")
    if args.clip:
        print(f"saved a tiny random CLIPModel to {save_tiny_clip(Path(args.output) / 'clip', seed=args.seed)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job: SPO on the toy world from the shipped weights, then base vs fine-tuned."""
    from .toy.demo import run_demo
    from .toy.eval_run import format_table

    source, overrides = _split_positionals(args.config)
    if source is not None:
        from .config import ConfigError

        raise ConfigError(f"spo demo runs the toy preset; give only key=value overrides, not {source!r}")
    out = run_demo(args.output, [f"seed={args.seed}", *overrides], eval_seeds=args.seeds, eval_prompts=args.eval_prompts)
    ev, train = out["eval"], out["train"]
    print(format_table(ev))
    print(f"mean [95% interval] over {len(ev['prompts'])} prompts x {ev['seeds']} seeds "
          f"(difference: fine-tuned - base on the same prompt and seed)")
    last = train.last_round or {}
    _summary([
        ("SPO run", f"{out['run_dir']} ({train.rounds} rounds, {train.steps} optimiser steps, {out['train_seconds']:.0f} s)"),
        ("last round: valid-pair rate / loss",
         f"{last.get('valid_pair_rate', float('nan')):.3f} / {last.get('loss', float('nan')):.4f}" if last else "(resumed: see metrics.jsonl)"),
        ("evaluation", f"{ev['reward_model'] or 'no reward model'} + oracles, {out['eval_seconds']:.0f} s"),
        ("image grid (base | SPO per seed)", ev["grid"]),
        ("scores", str(Path(ev["output"]) / "eval.json")),
        ("TensorBoard", f"tensorboard --logdir {out['run_dir'] / 'logs'}"),
        ("report (open in a browser)", str(out["report"])),
    ])
    return 0


def _summary(rows: Sequence[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 3 + max(len(v) for _, v in rows))
    print(line)
    for key, value in rows:
        print(f"{key:<{width}} | {value}")
    print(line)


class _Parser(argparse.ArgumentParser):
    """argparse with the project's error format: one ``error:`` line (exit 2), the usage on
    ``--help`` only."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="spo",
        description="Step-by-step Preference Optimization (SPO) for text-to-image diffusion models.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    config = sub.add_parser("config", help="show resolved configurations and presets")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    show = config_sub.add_parser("show", help="print the resolved config: spo config show [PRESET|FILE] [key=value ...]")
    show.add_argument("config", nargs="*", metavar="PRESET|FILE|key=value")
    show.set_defaults(func=cmd_config_show)
    presets = config_sub.add_parser("presets", help="list the built-in presets")
    presets.set_defaults(func=cmd_config_presets)

    sample = sub.add_parser("sample", help="generate images with plain DDIM through a backbone")
    sample.add_argument("config", nargs="*", metavar="PRESET|FILE|key=value")
    sample.add_argument("--output", "-o", required=True, help="directory for images/, grid.png, generation.json")
    sample.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    sample.add_argument("--prompts", help="prompts file: one per line or a JSON list")
    sample.add_argument("--seeds", type=_positive_int, default=1, help="images per prompt, one seed each")
    sample.add_argument("--batch-size", type=int, default=8)
    sample.add_argument("--grid-cell", type=int, default=None, help="resize grid tiles to this many pixels")
    sample.set_defaults(func=cmd_sample)

    train = sub.add_parser(
        "train",
        help="SPO training: spo train [PRESET|FILE] --output RUN_DIR [--resume] [key=value ...]",
        description="Sample with candidate pools and train the UNet's LoRA with the SPO loss. "
        "Works the same under `accelerate launch`.",
    )
    train.add_argument("config", nargs="*", metavar="PRESET|FILE|key=value")
    train.add_argument("--output", "-o", required=True, help="run directory")
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output")
    train.set_defaults(func=cmd_train)

    spm = sub.add_parser(
        "train-spm",
        help="train a step-aware preference model: spo train-spm [PRESET|FILE] --output RUN_DIR spm.data=DATA",
        description="Train the SPM of preference.* on Pick-a-Pic-format pairs (spm.data), noised with the "
        "diffusion model of model.*; validation accuracy per timestep at the end.",
    )
    spm.add_argument("config", nargs="*", metavar="PRESET|FILE|key=value")
    spm.add_argument("--output", "-o", required=True, help="run directory")
    spm.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output")
    spm.set_defaults(func=cmd_train_spm)

    toy = sub.add_parser("toy", help="the toy world: build its weights from seeds, pretrain, score samples")
    toy_sub = toy.add_subparsers(dest="toy_command", required=True)
    pre = toy_sub.add_parser("pretrain", help="train the pixel-space toy base model from scratch")
    pre.add_argument("--output", "-o", required=True)
    pre.add_argument("--steps", type=_positive_int, default=3600)
    pre.add_argument("--batch-size", type=_positive_int, default=64)
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument("--objective", choices=["epsilon", "flow"], default="epsilon",
                     help="epsilon: DDPM noise prediction (the shipped toy:base); flow: rectified flow, as SD3 "
                     "(the shipped toy:base-flow)")
    pre.add_argument("--device", default="cpu", help="where the networks run (cuda: a GPU; the random draws stay "
                     "on the CPU)")
    pre.add_argument("--resume", action="store_true",
                     help="continue an interrupted run from its latest checkpoint (OUTPUT/pretrain-run)")
    pre.set_defaults(func=cmd_toy_pretrain, config=[])
    score = toy_sub.add_parser("score", help="sample a toy model and score with the oracles")
    score.add_argument("model", help="a toy model directory")
    score.add_argument("--prompts", help="prompts file (default: the built-in validation prompts)")
    score.add_argument("--seeds", type=_positive_int, default=3)
    score.add_argument("--guidance", type=float, default=3.0)
    score.add_argument("--grid", help="write a PNG grid of the samples here")
    score.set_defaults(func=cmd_toy_score, config=[])

    build = toy_sub.add_parser(
        "build", help="regenerate every toy weight from seeds: pretrain, data, clip, pickscore, spm",
        description="Runs the unfinished stages in order (a finished stage is kept; an interrupted pickscore or "
        "spm stage resumes from its checkpoint, the others start again). Wall times and label statistics go to "
        "OUTPUT/build.json and the summary.",
    )
    build.add_argument("--output", "-o", default="runs/toy-build")
    build.add_argument("--stages", help="comma-separated subset of pretrain,data,clip,pickscore,spm")
    build.add_argument("--tiny", action="store_true", help="minutes-scale budgets (tests): every stage, briefly")
    build.add_argument("--version", choices=TOY_BUILD_VERSIONS, default=TOY_BUILD_VERSIONS[-1],
                       help=f"which build's settings (default {TOY_BUILD_VERSIONS[-1]}; docs/toy-world.md)")
    build.set_defaults(func=cmd_toy_build, config=[])

    ev = sub.add_parser(
        "eval", help="base vs fine-tuned runs on a prompt set, same noise: the paper's metrics, grids, eval.json",
        description="Generates every prompt x seed with fixed noise per image for the base model and each run "
        "(DDIM, CFG and eta from the config: the paper's protocol is DDIM 20, CFG 5), scores them and writes "
        "eval.json, scores.csv, per_prompt.csv and side-by-side grids. Images are saved as they are made: "
        "rerunning resumes. Toy-world targets are scored by the toy PickScore and the oracles.",
    )
    ev.add_argument("config", nargs="*", metavar="TARGET|key=value",
                    help="run directories (config.yaml + lora/) of one base model, fine-tuned diffusers pipelines "
                    "(directory or hub id: only the UNet is taken), LoRA files (path or REPO_ID/FILE; diffusers, peft "
                    "or the older lora.down/up naming), or a preset / config file / toy model (base only); key=value "
                    "overrides apply to the model config (e.g. model.dtype=float16)")
    ev.add_argument("--base", metavar="PRESET_OR_CONFIG",
                    help="the base model and settings the targets are compared with (a preset, a config file or a "
                    "run directory; key=value overrides apply), e.g. --base sd15 SPO-Diffusion-Models/SPO-SD-v1-5_4k-p_10ep")
    ev.add_argument("--prompts", help="prompts file (one per line, or a JSON list), a built-in set (toy:...), or "
                    "Pick-a-Pic data (save_to_disk directory or parquet): its captions, deduplicated")
    ev.add_argument("--split", default="validation_unique", help="Pick-a-Pic split (default validation_unique)")
    ev.add_argument("--num-prompts", type=_positive_int, help="the first N prompts (default: all; 500 for Pick-a-Pic)")
    ev.add_argument("--seeds", type=_positive_int, default=None, help="images per prompt (default eval.seeds)")
    ev.add_argument("--seed", type=int, default=0, help="noise seed of the evaluation")
    ev.add_argument("--steps", type=_positive_int, default=None, help="DDIM steps (default sampling.num_inference_steps)")
    ev.add_argument("--guidance", type=float, default=None, help="CFG scale (default eval.guidance_scale or sampling's)")
    ev.add_argument("--eta", type=float, default=None, help="DDIM eta (default sampling.eta)")
    ev.add_argument("--scorer", action="append", default=[], metavar="NAME=WEIGHTS[,OPTION=VALUE...]",
                    help="a metric: pickscore, hpsv2, hpsv21, image_reward, aesthetic (weights: local path or hub id; "
                    "see the README); repeatable. Metrics without weights are skipped, named")
    ev.add_argument("--scorer-dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                    help="the scorers' networks in this dtype (embeddings normalised and scores in float32); below "
                    "float32 each metric is named NAME@DTYPE (e.g. pickscore@bfloat16) and kept apart from the float32 "
                    "scores (default float32)")
    ev.add_argument("--batch-size", type=_positive_int, default=8)
    ev.add_argument("--geneval", metavar="METADATA.jsonl",
                    help="write images in GenEval's layout for its evaluation_metadata.jsonl instead of scoring")
    ev.add_argument("--images-per-prompt", type=_positive_int, default=4, help="GenEval images per prompt (4)")
    ev.add_argument("--output", help="default: RUN/eval for one run, runs/eval-NAME otherwise")
    ev.set_defaults(func=cmd_eval)

    report = sub.add_parser("report", help="one self-contained HTML page for a run: curves, config, evaluations")
    report.add_argument("run_dir")
    report.add_argument("--eval", action="append", default=[], help="an evaluation directory to include (repeatable; "
                        "subdirectories of RUN_DIR holding eval.json are included anyway)")
    report.add_argument("--output", help="default: RUN_DIR/report.html")
    report.set_defaults(func=cmd_report, config=[])

    tiny = sub.add_parser("tiny-pipeline", help="save a tiny random pipeline of a backbone (sd15, sdxl, sd3, or any "
                          "registered backbone with a tiny builder), for tests and trials")
    tiny.add_argument("kind", help="the backbone (model.backbone) whose tiny pipeline to save")
    tiny.add_argument("output")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--clip", action="store_true", help="also save a tiny CLIPModel to OUTPUT/clip (a scorer)")
    tiny.set_defaults(func=cmd_tiny_pipeline)

    demo = sub.add_parser(
        "demo", help="the main job: SPO on the toy world from the shipped weights, then base vs fine-tuned",
        description="Fine-tunes the shipped toy base model with SPO (the toy preset, plus any key=value "
        "overrides) into OUTPUT/spo, then evaluates base vs fine-tuned on the validation prompts with the same "
        "seeds (toy PickScore, aesthetic and alignment oracles) into OUTPUT/eval. Rerunning resumes.",
    )
    demo.add_argument("config", nargs="*", metavar="key=value")
    demo.add_argument("--output", "-o", default="runs/demo")
    demo.add_argument("--seed", type=int, default=0, help="training seed")
    demo.add_argument("--seeds", type=_positive_int, default=None, help="evaluation seeds (default: eval.seeds = 3)")
    demo.add_argument("--eval-prompts", type=_positive_int, default=None, help="evaluate on the first N validation prompts")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .errors import SPOError

    parser = build_parser()
    # overrides may come after options (`spo train sd15 --output X pools.k=4`): argparse leaves
    # those as extras, which join the positionals
    args, extras = parser.parse_known_args(argv)
    unknown = [e for e in extras if e.startswith("-") or not hasattr(args, "config")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extras:
        args.config = [*args.config, *extras]
    try:
        return int(args.func(args) or 0)
    except SPOError as err:  # exit 2 for the user's input, 1 for a failed write (WriteError.exit_code)
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    finally:
        close_process_group()


def close_process_group() -> None:
    """Tear down the process group of a multi-process launch before the interpreter does (every
    process reaches here together: errors are raised on every rank alike). Left to interpreter
    exit, gloo's worker threads can still hold work (and tensors) of objects freed only then: CI
    runs on gloo aborted there twice ("terminate called without an active exception") after every
    result was written (pytorch/pytorch PR 179291 describes the mechanism). So what is left of
    the run (a trainer and its DDP reducer in a reference cycle) is collected first."""
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
