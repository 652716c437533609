"""``spo eval``: models against a base on one prompt set, the same noise per (prompt, seed).

The protocol of the paper (Tables 1-2): a prompt set x seeds, DDIM 20 steps, CFG 5, each
model's images made with the same noise per image; every metric's mean with its 95% interval,
and each model's paired difference to the base over the same (prompt, seed).

Layout of an evaluation directory::

    eval.json                    protocol, models, metrics, results, differences, grids, files
    scores.csv                   one row per (model, prompt, seed): every metric
    per_prompt.csv               one row per prompt: each model's mean over seeds, and differences
    images/MODEL/pNNNNN_sSS.png  the images, written as they are made
    images/MODEL/scores.jsonl    each image's scores, appended as they are computed
    images/MODEL/model.json      what made these images (protocol + model); a resume checks it
    grids/MODEL-NN.png           base | MODEL, same prompt and seed, with captions

An interrupted evaluation resumes: images on disk are not made again, scores on disk are not
computed again (a scorer added later scores the saved PNGs).
"""

from __future__ import annotations

import csv
import gc
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..backbones import Backbone
from ..files import atomic_write_text
from .generate import EvaluationError, ImageJob, generate_images, load_png
from .grids import write_comparison_grids
from .scorers.base import Scorer
from .stats import Estimate

FORMAT = "spo-eval/1"
BASE = "base"


@dataclass
class EvalModel:
    """One model of an evaluation: ``pretrained`` plus, for a fine-tuned model, a LoRA (a run's
    directory holding ``pytorch_lora_weights.safetensors``, or a LoRA file) and the run that made
    it, or ``unet``: the folder of a fine-tuned pipeline's denoiser, used in place of the base's.
    ``source`` is what the command line named (a hub id, ``REPO_ID/FILE``, a path) and
    ``lora_naming`` the key naming of a LoRA file (``diffusers``, ``peft``, ``diffusers-old``, ...)."""

    key: str
    pretrained: str
    lora: str | None = None
    run: str | None = None
    method: str | None = None
    unet: str | None = None
    source: str | None = None
    lora_naming: str | None = None

    def identity(self) -> dict[str, Any]:
        """What makes this model's images: the weights (the LoRA by its tensors: names, dtypes,
        shapes and values; not the file's bytes, whose metadata order safetensors does not fix;
        a fine-tuned denoiser by its files' bytes) and its key."""
        from .external import denoiser_weight_files, files_sha256, tensors_sha256

        lora_hash = None
        if self.lora is not None:
            lora = Path(self.lora)
            if lora.is_file():
                from ..weights import read_state_dict

                tensors = read_state_dict(lora, self.key)
            else:
                from safetensors.torch import load_file

                tensors = load_file(str(lora / "pytorch_lora_weights.safetensors"))
            lora_hash = tensors_sha256(tensors)
        identity: dict[str, Any] = {"key": self.key, "pretrained": self.pretrained, "lora_sha256": lora_hash}
        if self.unet is not None:
            identity["unet_sha256"] = files_sha256(denoiser_weight_files(Path(self.unet), self.key))
        return identity

    def describe(self) -> dict[str, Any]:
        """The model as eval.json lists it (the keys of a run's model always; the others when set)."""
        info: dict[str, Any] = {"pretrained": self.pretrained, "lora": self.lora, "run": self.run, "method": self.method}
        info.update({k: v for k, v in (("unet", self.unet), ("source", self.source),
                                       ("lora_naming", self.lora_naming)) if v is not None})
        return info


@dataclass
class Protocol:
    """How images are made: prompts x ``seeds`` seeds, DDIM settings, the noise layout."""

    prompts: list[str]
    source: str
    seeds: int = 1
    seed: int = 0
    num_inference_steps: int = 20
    eta: float = 1.0
    guidance_scale: float = 5.0
    noise: str = "per_image"
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """The protocol as eval.json holds it (prompts counted and hashed, not listed)."""
        digest = hashlib.sha256("\n".join(self.prompts).encode()).hexdigest()[:16]
        return {"prompts": self.source, "num_prompts": len(self.prompts), "prompts_sha256": digest,
                "seeds": self.seeds, "seed": self.seed, "num_inference_steps": self.num_inference_steps,
                "eta": self.eta, "guidance_scale": self.guidance_scale, "noise": self.noise, **self.extra}

    def jobs(self) -> list[ImageJob]:
        """Seed-major: every prompt for seed 0, then for seed 1, ..."""
        return [ImageJob(i, s, p) for s in range(self.seeds) for i, p in enumerate(self.prompts)]


class ScoreStore:
    """An append-only JSON-lines file of per-image scores (a torn last line is ignored)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.scores: dict[str, dict[str, float]] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                self.scores.setdefault(row.pop("image"), {}).update(row)

    def add(self, rows: dict[str, dict[str, float]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            for image, values in rows.items():
                f.write(json.dumps({"image": image, **values}) + "\n")
                self.scores.setdefault(image, {}).update(values)
            f.flush()
            os.fsync(f.fileno())

    def missing(self, image: str, metrics: Sequence[str]) -> list[str]:
        have = self.scores.get(image, {})
        return [m for m in metrics if m not in have]


def _score_batch(scorers: Sequence[Scorer], jobs: Sequence[ImageJob], images: torch.Tensor,
                 only: dict[str, list[str]] | None = None) -> dict[str, dict[str, float]]:
    """{image name: {metric: score}} for a batch (``only``: the metrics each image lacks)."""
    rows: dict[str, dict[str, float]] = {j.name: {} for j in jobs}
    prompts = [j.prompt for j in jobs]
    for scorer in scorers:
        values = scorer(images, prompts)
        for job, value in zip(jobs, values.tolist()):
            if only is None or scorer.name in only[job.name]:
                rows[job.name][scorer.name] = float(value)
    return rows


def check_record(path: Path, record: dict[str, Any]) -> None:
    """Write ``path`` (what makes a folder's images) on first use; on resume it must match, else
    images of two evaluations would mix."""
    directory = path.parent
    if path.exists():
        try:
            existing = json.loads(path.read_text())
        except json.JSONDecodeError:
            existing = None
        if existing != record:
            differs = sorted(k for k in set(record) | set(existing or {}) if (existing or {}).get(k) != record.get(k))
            raise EvaluationError(
                f"{directory} holds images of another evaluation (differs in: {', '.join(differs) or 'model.json'}); "
                "choose another --output, or delete that directory to start over"
            )
        return
    atomic_write_text(path, json.dumps(record, indent=2))


def evaluate(
    models: Sequence[EvalModel],
    protocol: Protocol,
    scorers: Sequence[Scorer],
    output: str | Path,
    *,
    load_model: Callable[[EvalModel], Backbone],
    batch_size: int = 8,
    image_dirs: dict[str, Path] | None = None,
    skipped: Sequence[str] = (),
    grid_seeds: int = 2,
    grid_cell: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate (what is missing), score (what is missing) and compare. ``models[0]`` must be
    the base (key ``"base"``); ``load_model`` makes a model's backbone (LoRA attached) and is
    called only when that model has images to make. ``image_dirs`` puts a model's images
    elsewhere (e.g. one base sampling shared by many evaluations). Writes the files listed in
    the module docstring and returns eval.json's content (plus ``output``)."""
    if not models or models[0].key != BASE:
        raise ValueError("the first model of an evaluation is the base, with key 'base'")
    if len({m.key for m in models}) != len(models):
        raise ValueError(f"model keys must be unique: {[m.key for m in models]}")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    metrics = [s.name for s in scorers]
    jobs = protocol.jobs()
    dirs = {m.key: Path((image_dirs or {}).get(m.key, output / "images" / m.key)) for m in models}
    stores: dict[str, ScoreStore] = {}
    seconds = {"generation": 0.0, "scoring": 0.0}
    for model in models:
        directory = dirs[model.key]
        check_record(directory / "model.json", {"protocol": protocol.describe(), "model": model.identity()})
        store = stores[model.key] = ScoreStore(directory / "scores.jsonl")
        path_of: Callable[[ImageJob], Path] = lambda j, d=directory: d / j.name  # noqa: E731
        need_images = [j for j in jobs if not path_of(j).exists()]
        if need_images:
            start = time.perf_counter()
            backbone = load_model(model)

            def on_batch(batch: Sequence[ImageJob], images: torch.Tensor, store: ScoreStore = store) -> None:
                t0 = time.perf_counter()
                store.add(_score_batch(scorers, batch, images))  # scores first: a kill then only redoes images
                seconds["scoring"] += time.perf_counter() - t0

            generate_images(backbone, jobs, path_of, seed=protocol.seed,
                            num_inference_steps=protocol.num_inference_steps, eta=protocol.eta,
                            guidance_scale=protocol.guidance_scale, noise=protocol.noise, batch_size=batch_size,
                            on_batch=on_batch, progress=progress, desc=f"generating {model.key}")
            del backbone
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            seconds["generation"] += time.perf_counter() - start
        # scores missing for images made earlier (an added scorer, or a kill between files)
        lacking = {j.name: store.missing(j.name, metrics) for j in jobs}
        todo = [j for j in jobs if lacking[j.name]]
        if todo:
            start = time.perf_counter()
            for i in tqdm(range(0, len(todo), batch_size), desc=f"scoring {model.key}", disable=not progress):
                batch = todo[i : i + batch_size]
                images = torch.stack([load_png(path_of(j)) for j in batch])
                store.add(_score_batch([s for s in scorers if any(s.name in lacking[j.name] for j in batch)], batch,
                                       images, only=lacking))
            seconds["scoring"] += time.perf_counter() - start
    previous = _previous_seconds(output / "eval.json")  # a resumed evaluation adds to the earlier time
    seconds = {k: v + previous.get(k, 0.0) for k, v in seconds.items()}
    result = _compile(models, protocol, scorers, stores, jobs, skipped, seconds)
    result["grids"] = _write_grids(models, protocol, dirs, output, grid_seeds, grid_cell)
    _write_csvs(models, protocol, metrics, stores, jobs, output)
    result["files"] = {"scores": "scores.csv", "per_prompt": "per_prompt.csv"}
    atomic_write_text(output / "eval.json", json.dumps(result, indent=2))
    return {**result, "output": str(output)}


def _previous_seconds(path: Path) -> dict[str, float]:
    try:
        saved = json.loads(path.read_text())
        return {k: float(v) for k, v in saved["seconds"].items()} if saved.get("format") == FORMAT else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _values(store: ScoreStore, jobs: Sequence[ImageJob], metric: str) -> list[float]:
    return [store.scores[j.name][metric] for j in jobs]


def _compile(models: Sequence[EvalModel], protocol: Protocol, scorers: Sequence[Scorer], stores: dict[str, ScoreStore],
             jobs: Sequence[ImageJob], skipped: Sequence[str], seconds: dict[str, float]) -> dict[str, Any]:
    metrics = [s.name for s in scorers]
    results = {m.key: {k: asdict(Estimate.of(_values(stores[m.key], jobs, k))) for k in metrics} for m in models}
    base = {k: _values(stores[BASE], jobs, k) for k in metrics}
    differences = {
        m.key: {k: asdict(Estimate.of([a - b for a, b in zip(_values(stores[m.key], jobs, k), base[k])])) for k in metrics}
        for m in models[1:]
    }
    return {
        "format": FORMAT,
        "protocol": protocol.describe(),
        "models": {m.key: m.describe() for m in models},
        "metrics": {s.name: {"label": s.label, "expected_range": s.expected_range,
                             "higher_is_better": s.higher_is_better} for s in scorers},
        "skipped": list(skipped),
        "results": results,
        "differences": differences,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }


def _write_grids(models: Sequence[EvalModel], protocol: Protocol, dirs: dict[str, Path], output: Path,
                 grid_seeds: int, grid_cell: int | None) -> dict[str, list[str]]:
    paths = {m.key: {(j.prompt_index, j.seed_index): dirs[m.key] / j.name for j in protocol.jobs()} for m in models}
    seeds = list(range(min(grid_seeds, protocol.seeds)))
    grids: dict[str, list[str]] = {}
    for model in models[1:] if len(models) > 1 else models:
        shown = [BASE, model.key] if model.key != BASE else [BASE]
        written = write_comparison_grids(output / "grids", model.key, protocol.prompts, paths, shown, seeds=seeds,
                                         cell=grid_cell)
        grids[model.key] = [str(p.relative_to(output)) for p in written]
    return grids


def _write_csvs(models: Sequence[EvalModel], protocol: Protocol, metrics: Sequence[str], stores: dict[str, ScoreStore],
                jobs: Sequence[ImageJob], output: Path) -> None:
    with open(output / "scores.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "prompt_index", "seed_index", "prompt", *metrics])
        for m in models:
            for j in jobs:
                s = stores[m.key].scores[j.name]
                writer.writerow([m.key, j.prompt_index, j.seed_index, j.prompt, *(repr(s[k]) for k in metrics)])
    with open(output / "per_prompt.csv", "w", newline="") as f:
        writer = csv.writer(f)
        columns = [f"{m.key}:{k}" for m in models for k in metrics]
        columns += [f"difference:{m.key}:{k}" for m in models[1:] for k in metrics]
        writer.writerow(["prompt_index", "prompt", *columns])
        for i, prompt in enumerate(protocol.prompts):
            names = [ImageJob(i, s, prompt).name for s in range(protocol.seeds)]

            def mean(key: str, metric: str, names: list[str] = names) -> float:
                return sum(stores[key].scores[n][metric] for n in names) / len(names)

            row = [mean(m.key, k) for m in models for k in metrics]
            row += [mean(m.key, k) - mean(BASE, k) for m in models[1:] for k in metrics]
            writer.writerow([i, prompt, *(f"{v:.6g}" for v in row)])


def format_table(result: dict[str, Any]) -> str:
    """Rows: metrics; columns: each model's mean [95% interval], then each paired difference."""
    models = list(result["results"])
    columns = [(m, "results") for m in models] + [(m, "differences") for m in result.get("differences", {})]
    heads = [m if kind == "results" else f"{m} - base (paired)" for m, kind in columns]
    metrics = list(result["metrics"])
    width = max([len("metric")] + [len(result["metrics"][k]["label"]) for k in metrics])
    cells = [[(Estimate(**result[kind][m][k]).signed() if kind == "differences" else str(Estimate(**result[kind][m][k])))
              for m, kind in columns] for k in metrics]
    widths = [max(len(h), *(len(row[c]) for row in cells)) for c, h in enumerate(heads)]
    lines = [f"{'metric':<{width}} | " + " | ".join(f"{h:<{w}}" for h, w in zip(heads, widths))]
    lines.append("-" * len(lines[0]))
    for k, row in zip(metrics, cells):
        lines.append(f"{result['metrics'][k]['label']:<{width}} | " + " | ".join(f"{c:<{w}}" for c, w in zip(row, widths)))
    return "\n".join(lines)
