"""Side by side with the authors' release on one GPU: the release's own training script against
``spo train``, same full-size random weights, prompts and recipe; round time and peak memory.

**The release's side runs its own code**, read from ``../shared/reference/spo-release`` (MIT;
``SPO_RELEASE_DIR`` overrides), never copied: ``train_scripts/train_spo.py`` (SD-1.5) or
``train_spo_sdxl.py`` (SDXL) is parsed and executed as written, its ``main`` called once with
the release's own config file (``configs/spo_sd-v1-5_4k-prompts_num-sam-4_10ep_bs10.py`` /
``configs/spo_sdxl_4k-prompts_num-sam-2_3-is_10ep_bs2_gradacc2.py``). So its set-up (fp16
pipeline, a deep copy of the UNet as the reference, LoRA by ``add_adapter``, AdamW, accelerate
with fp16 mixed precision as its ``1m4g_fp16.yaml``), its rollout (``multi_sample_pipeline`` /
``multi_sample_pipeline_sdxl``), its training loop and loss lines run unchanged. What is
replaced, and why:

* ``from spo.X import`` reads ``from spo_release.X import`` (our package is also ``spo``), and
  the one absolute import inside its package (``spo.utils``, which this project does not have)
  is pointed at its ``utils``;
* ``ml_collections`` and ``mmengine`` are not installed here: small stand-ins give its config
  dict (attribute access), ``Config`` and the ``Registry`` / ``build_from_cfg`` its builders use
  (and ``absl`` / ``wandb`` where missing: its flags are set directly, wandb serves only its
  validation, which is off);
* its step-aware preference model needs transformers 4.x (``time_conditioned_clip``): the
  builder the config names is registered as **this project's SPM at the same size, in fp32 as
  the release loads its own**, called the release's way (``preference_fn(img, extra_info)``),
  every row's text through the text tower on every call, as the release's;
* config values that are paths or not part of a round: the local model directories (the SDXL
  VAE from the pipeline's ``vae`` folder, fp16 as the fp16-fix), the prompt file, one epoch,
  no checkpoint or validation at the epoch's end, no wandb, dataloader workers 0,
  ``compare_func_cfg.threshold = 0`` on both sides (every pool trains: with random weights the
  score gaps are arbitrary, and the same pairs count is the same work).

Timing hooks wrap, from outside, the rollout call (a round starts when it is called, sampling
ends when it returns) and the accelerator's ``backward`` / the optimizer's ``step`` (the last
one ends the round), each CUDA-synchronised; peak memory is ``max_memory_allocated`` reset when
the phase starts. Our side is ``SPOTrainer`` on the model's preset with the same threshold, the
same random SPM (``preference.variant=step_agnostic``, fp32 by default) and prompts, measured as
``benchmarks/fullsize.py`` measures it (metrics.jsonl round lines, per-phase peaks).

Each side runs in its own process, one after the other on the same GPU (the release's module
patches nothing of ours; each side's memory starts empty). Per side ``--rounds`` rounds (default
3); the ratios use the median of the rounds after the first (its one-off CUDA costs).

Sides: ``release``; ``ours`` (the preset's defaults); ``ours_lowmem`` (``PRESET-lowmem``);
``ours_speed`` (the speed switches: the tiny decoder for scoring, ``model.compile``).

    python benchmarks/release_side_by_side.py --output benchmarks/results/release-side-by-side.json   # CUDA
    python benchmarks/release_side_by_side.py --models sd15 --sides release,ours --output ...
    python benchmarks/release_side_by_side.py --tiny --output /tmp/side-by-side.json                 # CPU

``--tiny`` runs both sides with the tiny pipelines on the CPU (fp32, 8 steps): it checks that the
release's script runs here and that both sides did the same work; it measures nothing.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RELEASE = Path(os.environ.get("SPO_RELEASE_DIR", REPO.parent / "shared" / "reference" / "spo-release"))
TRAINING = RELEASE / "spo_training_and_inference"
PACKAGE = "spo_release"
SCRIPTS = {"sd15": ("train_scripts/train_spo.py", "configs.spo_sd-v1-5_4k-prompts_num-sam-4_10ep_bs10",
                    "multi_sample_pipeline"),
           "sdxl": ("train_scripts/train_spo_sdxl.py", "configs.spo_sdxl_4k-prompts_num-sam-2_3-is_10ep_bs2_gradacc2",
                    "multi_sample_pipeline_sdxl")}
SIDES = ("release", "ours", "ours_lowmem", "ours_speed")
DEFAULT_SIDES = ("release", "ours", "ours_lowmem", "ours_speed")
TINY_STEPS = 8
GIB = 2**30


# ============================================================================ timing
class Clock:
    """Per round: start (the rollout is called), sampled (it returned), the last training
    backward / optimizer step; CUDA-synchronised, with each phase's peak memory."""

    def __init__(self) -> None:
        import torch

        self.torch = torch
        self.cuda = torch.cuda.is_available()
        self.rounds: list[dict[str, Any]] = []

    def _now(self) -> float:
        if self.cuda:
            self.torch.cuda.synchronize()
        return time.perf_counter()

    def _peak(self) -> float | None:
        return round(self.torch.cuda.max_memory_allocated() / GIB, 2) if self.cuda else None

    def _reserved(self) -> float | None:
        return round(self.torch.cuda.max_memory_reserved() / GIB, 2) if self.cuda else None

    def _reset(self) -> None:
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()

    def start(self) -> None:
        now = self._now()
        self._reset()
        resident = round(self.torch.cuda.memory_allocated() / GIB, 2) if self.cuda else None
        self.rounds.append({"start": now, "resident_gib": resident, "micro_batches": 0, "optimizer_steps": 0})

    def sampled(self, records: int) -> None:
        now = self._now()
        current = self.rounds[-1]
        current.update(sampled=now, records=records, peak_sampling=self._peak(), reserved_sampling=self._reserved())
        self._reset()

    def trained(self, what: str) -> None:
        if not self.rounds or "sampled" not in self.rounds[-1]:
            return  # not inside a round (nothing of the release trains outside one)
        current = self.rounds[-1]
        current["end"] = self._now()
        current["peak_training"] = self._peak()
        current["reserved_training"] = self._reserved()
        if what:
            current[what] += 1

    def summary(self) -> list[dict[str, Any]]:
        """The completed rounds (a rollout that raised leaves a round without its end: left out)."""
        out = []
        for i, r in enumerate(self.rounds):
            if "sampled" not in r:
                continue
            sampling = r["sampled"] - r["start"]
            training = r.get("end", r["sampled"]) - r["sampled"]
            out.append({"round": i, "sampling_seconds": round(sampling, 3), "training_seconds": round(training, 3),
                        "round_seconds": round(sampling + training, 3), "records": r["records"],
                        "micro_batches": r["micro_batches"], "optimizer_steps": r["optimizer_steps"],
                        "resident_gib": r["resident_gib"],
                        "peak_gib": {"sampling": r["peak_sampling"], "training": r.get("peak_training")},
                        "reserved_gib": {"sampling": r.get("reserved_sampling"),
                                         "training": r.get("reserved_training")}})
        return out


# ============================================================================ the release, as written
class AttrDict(dict):
    """What the release's config objects give it: a dict with attribute access (ml_collections'
    ``ConfigDict``, mmengine's ``Config``), ``to_dict`` and ``pretty_text``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for key, value in self.items():
            if isinstance(value, dict) and not isinstance(value, AttrDict):
                self[key] = AttrDict(value)

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as err:
            raise AttributeError(name) from err

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = AttrDict(value) if isinstance(value, dict) and not isinstance(value, AttrDict) else value

    def to_dict(self) -> dict[str, Any]:
        return {k: v.to_dict() if isinstance(v, AttrDict) else v for k, v in self.items()}

    @property
    def pretty_text(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)


class Registry:
    """mmengine's ``Registry`` as far as the release uses it: ``register_module`` and ``get``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.entries: dict[str, Any] = {}

    def register_module(self, name: str | None = None, module: Any = None, force: bool = False) -> Any:
        def register(obj: Any) -> Any:
            self.entries[name or obj.__name__] = obj
            return obj

        return register(module) if module is not None else register

    def get(self, name: str) -> Any:
        if name not in self.entries:
            raise KeyError(f"{name!r} is not in the {self.name} registry")
        return self.entries[name]


def build_from_cfg(cfg: dict[str, Any], registry: Registry) -> Any:
    args = dict(cfg)
    return registry.get(args.pop("type"))(**args)


def _module(name: str, **attributes: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    sys.modules[name] = module
    return module


def _package(name: str, path: Path) -> types.ModuleType:
    """A namespace for one of the release's packages without running its ``__init__``."""
    module = _module(name)
    module.__path__ = [str(path)]  # type: ignore[attr-defined]
    return module


def install_release(scorer_builder: Callable[[Any], Any]) -> None:
    """Stand-ins for the two packages the release needs and this environment lacks
    (``ml_collections``, ``mmengine``), and the release's ``spo`` package as ``spo_release``:
    its own ``custom_diffusers``, ``datasets``, ``utils``, the preference builders and pair rule,
    with ``scorer_builder`` registered as its ``step_aware_preference_model_func``."""
    if not (TRAINING / "spo").is_dir():
        raise SystemExit(f"error: the authors' release is not at {RELEASE} (set SPO_RELEASE_DIR)")
    import importlib.util

    if importlib.util.find_spec("wandb") is None:  # imported at its top, used only by its validation (off)
        _module("wandb")
    if importlib.util.find_spec("absl") is None:  # its flags: FLAGS is replaced before main() runs
        absl = _module("absl")
        absl.app = _module("absl.app", run=lambda main: main(None))  # type: ignore[attr-defined]
        absl.flags = _module("absl.flags", FLAGS=types.SimpleNamespace())  # type: ignore[attr-defined]
    ml = _module("ml_collections", ConfigDict=AttrDict)
    ml.config_flags = _module("ml_collections.config_flags", DEFINE_config_file=lambda *a, **k: None)  # type: ignore[attr-defined]
    mm = _module("mmengine", Registry=Registry, build_from_cfg=build_from_cfg)
    mm.config = _module("mmengine.config", Config=AttrDict)  # type: ignore[attr-defined]
    if str(TRAINING) not in sys.path:
        sys.path.append(str(TRAINING))  # its ``configs`` package (after ours: ``spo`` stays this project's)
    root = TRAINING / "spo"
    _package(PACKAGE, root)
    preference = _package(f"{PACKAGE}.preference_models", root / "preference_models")
    builder = importlib.import_module(f"{PACKAGE}.preference_models.builder")
    compare = importlib.import_module(f"{PACKAGE}.preference_models.compare_funcs")
    builder.PREFERENCE_MODEL_FUNC_BUILDERS.register_module(name="step_aware_preference_model_func")(scorer_builder)
    preference.get_compare_func = builder.get_compare_func  # type: ignore[attr-defined]
    preference.get_preference_model_func = builder.get_preference_model_func  # type: ignore[attr-defined]
    preference.preference_score_compare = compare.preference_score_compare  # type: ignore[attr-defined]
    utils = importlib.import_module(f"{PACKAGE}.utils")
    if "spo.utils" in sys.modules and sys.modules["spo.utils"] is not utils:
        raise SystemExit("error: this project now has a spo.utils module: the release's `from spo.utils import` "
                         "would read ours")
    sys.modules["spo.utils"] = utils  # its datasets module imports it absolutely (this project has none)
    for name in ("custom_diffusers", "datasets"):
        importlib.import_module(f"{PACKAGE}.{name}")


class _ReleaseImports(ast.NodeTransformer):
    """``from spo.X import ...`` -> ``from spo_release.X import ...``; nothing else changes."""

    def visit_ImportFrom(self, node: ast.ImportFrom) -> ast.ImportFrom:
        if node.module and (node.module == "spo" or node.module.startswith("spo.")):
            node.module = PACKAGE + node.module[len("spo"):]
        return node


def load_release_script(script: str) -> dict[str, Any]:
    """The namespace of the release's training script after running its module level (imports,
    flags; ``main`` is defined, not called)."""
    path = TRAINING / script
    tree = _ReleaseImports().visit(ast.parse(path.read_text(), filename=str(path)))
    namespace: dict[str, Any] = {"__name__": f"{PACKAGE}_{path.stem}", "__file__": str(path)}
    exec(compile(tree, str(path), "exec"), namespace)  # noqa: S102 - the release's own script
    sys.path[:] = [p for p in sys.path if Path(p).resolve() != TRAINING.resolve()] + [str(TRAINING)]
    return namespace


def release_config(model: str, paths: dict[str, str], prompts_json: Path, logdir: Path, tiny: bool) -> AttrDict:
    """The release's own config file for ``model``, with the values that name places or are not
    part of a round set for this run (module docstring)."""
    config = importlib.import_module(SCRIPTS[model][1]).get_config()
    config = AttrDict(config.to_dict())
    config.pretrained.model = paths[model]
    if model == "sdxl":  # the fp16-fix VAE's place: the random pipeline's own (force_upcast false)
        config.pretrained.vae_model_name_or_path = str(Path(paths[model]) / "vae")
    config.dataset_cfg.meta_json_path = str(prompts_json)
    config.dataset_cfg.pretrained_tokenzier_path = paths["pickscore"]
    config.preference_model_func_cfg.model_pretrained_model_name_or_path = paths["pickscore"]
    config.compare_func_cfg.threshold = 0.0
    config.num_epochs = 1
    config.save_interval = config.eval_interval = 10**9
    config.debug = True  # no wandb
    config.logdir, config.run_name = str(logdir), "release"
    config.dataloader_num_workers = 0
    if tiny:
        config.sample.num_steps = TINY_STEPS
    return config


def run_release(model: str, paths: dict[str, str], rounds: int, root: Path, tiny: bool) -> dict[str, Any]:
    import torch
    from accelerate import Accelerator

    from spo.preference.spm import StepAwarePreferenceModel

    os.environ["ACCELERATE_MIXED_PRECISION"] = "no" if tiny else "fp16"  # its 1m4g_fp16.yaml
    clock = Clock()
    prompts = [f"a photo of thing {i}, detailed, high quality" for i in range(rounds * (10 if model == "sd15" else 2))]
    lookup: dict[tuple[int, ...], str] = {}

    def scorer_builder(cfg: Any) -> Callable[[Any, dict[str, Any]], Any]:
        """Registered as the release's ``step_aware_preference_model_func``: our SPM at the
        release's size and dtype (fp32), called as the release calls its own."""
        spm = StepAwarePreferenceModel.from_pretrained(cfg.model_pretrained_model_name_or_path, None,
                                                       variant="step_agnostic", device=cfg.device,
                                                       dtype=torch.float32).eval()
        for prompt in prompts:
            ids = spm.tokenizer(prompt, max_length=spm.tokenizer.model_max_length, padding="max_length",
                                truncation=True, return_tensors="pt").input_ids[0]
            lookup[tuple(ids.tolist())] = prompt

        @torch.no_grad()
        def preference_fn(img: Any, extra_info: dict[str, Any]) -> Any:
            texts = [lookup[tuple(ids.tolist())] for ids in extra_info["input_ids"].cpu()]
            # cache=False: every row's text through the text tower, as the release's get_text_features
            return spm.score(img, texts, extra_info["timesteps"], cache=False)

        return preference_fn

    install_release(scorer_builder)
    script, _, rollout_name = SCRIPTS[model]
    namespace = load_release_script(script)
    prompts_json = root / f"release-{model}-prompts.json"
    prompts_json.write_text(json.dumps([{"caption": p} for p in prompts]))
    config = release_config(model, paths, prompts_json, root / f"release-{model}", tiny)
    namespace["FLAGS"] = types.SimpleNamespace(config=config)

    rollout = namespace[rollout_name]

    def timed_rollout(*args: Any, **kwargs: Any) -> Any:
        clock.start()
        out = rollout(*args, **kwargs)
        clock.sampled(records=int(out[0].shape[0]))
        return out

    class TimedAccelerator(Accelerator):
        def backward(self, loss: Any, **kwargs: Any) -> None:
            super().backward(loss, **kwargs)
            clock.trained("micro_batches")

        def prepare(self, *args: Any, **kwargs: Any) -> Any:
            prepared = super().prepare(*args, **kwargs)
            for obj in prepared if isinstance(prepared, tuple) else (prepared,):
                if isinstance(obj, torch.optim.Optimizer) or hasattr(obj, "optimizer"):
                    step = obj.step

                    def timed_step(*a: Any, _step: Callable[..., Any] = step, _obj: Any = obj, **k: Any) -> Any:
                        # accelerate's optimizer steps only at the end of an accumulation
                        stepping = getattr(getattr(_obj, "gradient_state", None), "sync_gradients", True)
                        out = _step(*a, **k)
                        clock.trained("optimizer_steps" if stepping else "")
                        return out

                    obj.step = timed_step
            return prepared

    namespace[rollout_name] = timed_rollout
    namespace["Accelerator"] = TimedAccelerator
    start = time.perf_counter()
    error = None
    try:
        namespace["main"](None)
    except Exception as err:  # noqa: BLE001 - recorded with the rounds done so far
        error = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=8)}
    out = {"status": "ok" if error is None and clock.rounds else "error", "wall_seconds": round(time.perf_counter() - start, 1),
           "rounds": clock.summary(), "script": script, "config": SCRIPTS[model][1],
           "recipe": {"prompts": config.sample.sample_batch_size, "k": config.sample.num_sample_each_step,
                      "inner_steps": config.sample.get("num_inner_step", 0) + 1, "steps": config.sample.num_steps,
                      "train_batch_size": config.train.train_batch_size,
                      "gradient_accumulation_steps": config.train.gradient_accumulation_steps,
                      "lora_rank": config.lora_rank, "mixed_precision": os.environ["ACCELERATE_MIXED_PRECISION"],
                      "allow_tf32": config.allow_tf32, "use_checkpointing": config.use_checkpointing,
                      "use_8bit_adam": config.train.use_8bit_adam}}
    lora = Path(config.logdir) / config.run_name / "pytorch_lora_weights.safetensors"
    if lora.exists():  # written by the release's main() after its last round
        from safetensors import safe_open

        with safe_open(str(lora), "pt") as f:
            out["final_lora_tensors"] = len(list(f.keys()))
    if error:
        out.update(error)
    return out


# ============================================================================ ours
def our_overrides(model: str, paths: dict[str, str], prompts: Path, rounds: int, tiny: bool, side: str) -> list[str]:
    overrides = {"model.pretrained": paths[model], "preference.pretrained": paths["pickscore"],
                 "preference.processor": "null", "preference.checkpoint": "null", "preference.variant": "step_agnostic",
                 "data.prompts": str(prompts), "logging.tensorboard": "false", "pools.threshold": "0.0",
                 "train.rounds": str(rounds)}
    if model == "sdxl":
        overrides["model.vae"] = "null"
    if tiny:
        overrides.update({"model.device": "cpu", "model.dtype": "float32", "train.mixed_precision": "no",
                          "sampling.num_inference_steps": str(TINY_STEPS)})
    else:
        overrides["model.device"] = "cuda"
    if side == "ours_speed":
        overrides["preference.decoder"] = paths["tiny_decoder"]
        if not tiny:
            overrides["model.compile"] = "true"
    return [f"{k}={v}" for k, v in overrides.items()]


def run_ours(model: str, paths: dict[str, str], rounds: int, root: Path, tiny: bool, side: str) -> dict[str, Any]:
    from fullsize import run_variant

    from spo.config import load_config
    from spo.training import SPOTrainer

    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(f"a photo of thing {i}, detailed, high quality" for i in range(64)) + "\n")
    preset = f"{model}-lowmem" if side == "ours_lowmem" else model
    overrides = our_overrides(model, paths, prompts, rounds, tiny, side)
    cfg = load_config(preset, overrides)
    run_dir = root / f"{side}-{model}"
    start = time.perf_counter()
    trainer = SPOTrainer(cfg, run_dir, progress=False)
    load = time.perf_counter() - start
    result = run_variant(trainer, run_dir, None)
    agreement = pair_agreement(trainer, load_config(model).pools.threshold, rounds) if side == "ours_speed" else None
    rounds_out = [{"round": r["round"], "sampling_seconds": r["sampling_seconds"],
                   "training_seconds": r["training_seconds"], "round_seconds": r["round_seconds"],
                   "records": r["work"].get("records"), "optimizer_steps": r["optimizer_steps"],
                   "micro_batches": r["work"].get("training_policy_calls"),
                   "resident_gib": (r.get("resident_gib") or {}).get("sampling"), "peak_gib": r["peak_gib"],
                   "reserved_gib": r.get("reserved_gib")}
                  for r in result["rounds"]]
    return {"status": result["status"], "preset": preset, "overrides": overrides, "load_seconds": round(load, 1),
            "wall_seconds": result["wall_seconds"], "rounds": rounds_out, "pair_agreement": agreement,
            "recipe": {"prompts": cfg.train.prompts_per_round, "k": cfg.pools.k, "inner_steps": cfg.pools.inner_steps,
                       "steps": cfg.sampling.num_inference_steps, "train_batch_size": cfg.train.batch_size,
                       "gradient_accumulation_steps": cfg.train.gradient_accumulation_steps, "lora_rank": cfg.lora.rank,
                       "mixed_precision": cfg.train.mixed_precision, "allow_tf32": cfg.train.allow_tf32,
                       "use_checkpointing": cfg.model.gradient_checkpointing,
                       "decode_batch_size": cfg.sampling.decode_batch_size,
                       "preference_dtype": cfg.preference.dtype, "optimizer": cfg.optimizer.name}}


def pair_agreement(trainer: Any, preset_threshold: float, rollouts: int) -> dict[str, Any] | None:
    """On the same pools (the same candidates, after the timed rounds): the pairs chosen from the
    scores of images the tiny decoder made against those of the full VAE. Per pool: the same
    (win, lose) at threshold 0, and the same outcome (tie, or the same pair) at the preset's
    threshold. Untimed: each pool is decoded and scored twice."""
    import torch

    from spo.sampling import RolloutStats, choose_pairs

    sampler, backbone = getattr(trainer.method, "sampler", None), trainer.backbone
    if sampler is None or backbone.score_decoder is None:
        return None
    counts = {"pools": 0, "same_pair_threshold_0": 0, "same_outcome_preset_threshold": 0}
    original = sampler._score

    def shadow(x0: Any, prompts: Any, t: int, stats: Any) -> Any:
        scores = original(x0, prompts, t, stats)
        decoder, backbone.score_decoder = backbone.score_decoder, None
        try:
            full = original(x0, prompts, t, RolloutStats())
        finally:
            backbone.score_decoder = decoder
        tiny_scores, full_scores = scores.view(-1, sampler.k), full.view(-1, sampler.k)
        for threshold, key in ((0.0, "same_pair_threshold_0"), (preset_threshold, "same_outcome_preset_threshold")):
            draws = torch.Generator().manual_seed(counts["pools"])  # the random rule: the same draws for both
            a = choose_pairs(tiny_scores, threshold, sampler.pair, torch.Generator().set_state(draws.get_state()))
            b = choose_pairs(full_scores, threshold, sampler.pair, draws)
            same = (a.valid == b.valid) & (~a.valid | ((a.win == b.win) & (a.lose == b.lose)))
            counts[key] += int(same.sum())
        counts["pools"] += tiny_scores.shape[0]
        return scores

    sampler._score = shadow
    try:  # as a round samples (autocast, eval mode, the scorer on the device), past the timed rounds
        for i in range(rollouts):
            trainer.sample_round(trainer.config.train.rounds + i)
    finally:
        sampler._score = original
    pools = counts["pools"]
    return {**counts, "rollouts": rollouts, "preset_threshold": preset_threshold, "pair_rule": sampler.pair,
            "share_changed_threshold_0": round(1 - counts["same_pair_threshold_0"] / pools, 4) if pools else None,
            "share_changed_preset_threshold": round(1 - counts["same_outcome_preset_threshold"] / pools, 4) if pools else None}


# ============================================================================ the comparison
def steady(side: dict[str, Any]) -> dict[str, Any] | None:
    """Median round time over the rounds after the first (all of them if only one), and the
    largest peak over every round."""
    rounds = side.get("rounds") or []
    if not rounds:
        return None
    later = rounds[1:] or rounds

    def largest(key: str) -> float | None:  # over every round and phase (None off CUDA)
        values = [v for r in rounds for v in (r.get(key) or {}).values() if v is not None]
        return max(values) if values else None

    median = lambda key: round(statistics.median(r[key] for r in later), 3)  # noqa: E731
    return {"round_seconds": median("round_seconds"), "sampling_seconds": median("sampling_seconds"),
            "training_seconds": median("training_seconds"), "rounds_used": len(later),
            "records_per_round": [r["records"] for r in rounds],
            "peak_gib": largest("peak_gib"), "reserved_gib": largest("reserved_gib")}


def compare(entry: dict[str, Any]) -> None:
    """``ratio_to_release`` for every side of ours: round time and peak, ours / theirs."""
    theirs = entry["sides"].get("release", {}).get("steady")
    if not theirs:
        return
    for name, side in entry["sides"].items():
        ours = side.get("steady")
        if name == "release" or not ours:
            continue
        ratio = {p: round(ours[f"{p}_seconds"] / theirs[f"{p}_seconds"], 3) if theirs[f"{p}_seconds"] else None
                 for p in ("round", "sampling", "training")}
        if ours["peak_gib"] and theirs["peak_gib"]:
            ratio["peak"] = round(ours["peak_gib"] / theirs["peak_gib"], 3)
        side["ratio_to_release"] = ratio


def run_side(args: argparse.Namespace) -> None:
    """One side in this process (``--side``): its JSON to ``--output``."""
    paths = json.loads(args.paths)
    root = Path(args.root)
    sys.path.insert(0, str(HERE))
    if args.side == "release":
        out = run_release(args.model, paths, args.rounds, root, args.tiny)
    else:
        out = run_ours(args.model, paths, args.rounds, root, args.tiny, args.side)
    args.output.write_text(json.dumps(out, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--models", nargs="+", choices=["sd15", "sdxl"], default=["sd15", "sdxl"])
    parser.add_argument("--sides", default=",".join(DEFAULT_SIDES), help=f"comma-separated, of {', '.join(SIDES)}")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per side (default 3; the first is not used)")
    parser.add_argument("--budget-seconds", type=float, default=None,
                        help="do not start a side after this many seconds (default: none)")
    parser.add_argument("--side-timeout", type=float, default=None, help="seconds one side may run (default: none)")
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU: checks the script, measures nothing")
    parser.add_argument("--build-dir", type=Path, default=None,
                        help="build the random models here and reuse what an earlier run built there")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--paths", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        run_side(args)
        return
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown = [s for s in sides if s not in SIDES]
    if unknown:
        raise SystemExit(f"error: unknown side(s) {', '.join(unknown)}; choose from {', '.join(SIDES)}")
    if args.rounds < 1:
        raise SystemExit(f"error: --rounds must be at least 1, got {args.rounds}")
    if not (TRAINING / "spo").is_dir() and "release" in sides:
        raise SystemExit(f"error: the authors' release is not at {RELEASE} (set SPO_RELEASE_DIR)")

    import torch

    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("error: this benchmark needs a CUDA GPU (--tiny checks it on the CPU with tiny models)")
    sys.path.insert(0, str(HERE))
    import accelerate
    import diffusers
    import peft
    import transformers
    from _report import write_partial
    from fullsize import build_all

    t0 = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="side-by-side-"))
    result: dict[str, Any] = {
        "benchmark": "release_side_by_side",
        "mode": "tiny (cpu, tiny models: checks the script, not a measure)" if args.tiny else "full size (cuda, fp16)",
        "device": "cpu" if args.tiny else torch.cuda.get_device_name(),
        "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "accelerate": accelerate.__version__, "python": platform.python_version(),
        "release": str(RELEASE), "argv": sys.argv[1:], "rounds_per_side": args.rounds,
        "notes": ["random weights of the real shapes: costs, not quality",
                  "release: its train_spo(_sdxl).py main() as written, its own config file; its SPM (transformers "
                  "4.x) stood in for by ours at the same size in fp32, every row's text encoded per call as the release does",
                  "the release runs on this environment's stack (torch, diffusers, transformers as listed here), "
                  "not its pinned one (torch 2.3, transformers 4.40)",
                  "compare threshold 0 on both sides: every pool trains",
                  "ratios: median round after the first; peak: max_memory_allocated over the rounds",
                  "each side in its own process, one after the other, on the same device"],
        "models": {}}

    def write() -> None:
        write_partial(result, args.output, t0)

    try:
        if args.build_dir:
            args.build_dir.mkdir(parents=True, exist_ok=True)
        built, seconds = build_all(args.models, args.build_dir or root, args.tiny, "cpu" if args.tiny else "cuda")
        paths = {k: str(v) for k, v in built.items()}
        result["build_seconds"] = seconds
        write()
        for model in args.models:
            entry: dict[str, Any] = {"sides": {}}
            result["models"][model] = entry
            for side in sides:
                if args.budget_seconds is not None and time.perf_counter() - t0 > args.budget_seconds:
                    entry["sides"][side] = {"status": "skipped", "note": f"time budget ({args.budget_seconds:.0f} s) spent"}
                    continue
                target = root / f"{side}-{model}.json"
                command = [sys.executable, str(Path(__file__).resolve()), "--output", str(target), "--side", side,
                           "--model", model, "--paths", json.dumps(paths), "--root", str(root),
                           "--rounds", str(args.rounds)] + (["--tiny"] if args.tiny else [])
                start = time.perf_counter()
                try:
                    done = subprocess.run(command, capture_output=True, text=True, timeout=args.side_timeout)
                    record = json.loads(target.read_text()) if target.exists() else {
                        "status": "error", "error": f"exit {done.returncode}", "stderr": done.stderr[-3000:]}
                    if done.returncode != 0:
                        record.setdefault("stderr", done.stderr[-3000:])
                except subprocess.TimeoutExpired:
                    record = {"status": "error", "error": f"timed out after {args.side_timeout} s"}
                record["side_wall_seconds"] = round(time.perf_counter() - start, 1)
                record["steady"] = steady(record)
                entry["sides"][side] = record
                compare(entry)
                print(f"{model} {side}: " + json.dumps({k: record.get(k) for k in (
                    "status", "error", "steady", "ratio_to_release")}), flush=True)
                write()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    write()
    print(f"wrote {args.output} ({result['wall_seconds']} s)", flush=True)


if __name__ == "__main__":
    main()
