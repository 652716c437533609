"""The start every training run shares: ``spo train`` (:class:`~spo.training.SPOTrainer`) and
``spo train-spm`` (:class:`~spo.training.SPMTrainer`) both begin with :func:`start_run`, so every
check below applies to both.

Before anything is written: the output directory (:func:`~spo.training.output.output_problem`),
the device, dtype and autocast asked for, the accelerator (mixed precision, CPU flag, trackers,
``RUN_DIR/logs``), that ``model.device`` is where accelerate placed this process, and that
``train.num_processes`` is the launch's. Then, inside
:func:`~spo.training.output.removed_on_failure` (a start that fails leaves nothing): the run
directory (fresh; or ``--resume`` from the latest intact checkpoint, with the saved
``config.yaml``'s process count checked; existing checkpoints without ``--resume`` are refused),
and ``config.yaml`` written with ``train.num_processes`` set. :class:`Run` then gives the
trainers what they both need after their models are built: AdamW, the metrics log, the
checkpoint to resume and the trackers.

``toy:`` references are resolved here, once (:func:`spo.builtin.resolve_references`): the
trainers load from :attr:`Run.resolved`; ``config.yaml`` keeps the names as the user wrote them,
so a run stays portable and ``--resume`` compares like with like.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..backbones import check_device_request
from ..builtin import resolve_references
from ..config import SPOConfig, config_to_dict, load_config, save_config
from .checkpoint import CheckpointError, latest_good_checkpoint, list_checkpoints, load_checkpoint
from .distributed import process_count_problem, write_everywhere
from .engines import accelerator_options, adopt_cpu_fsdp, configure_deepspeed, deepspeed_install_problem, engine_problem
from .metrics import MetricsLog
from .output import output_problem, removed_on_failure


@dataclass(frozen=True)
class RunKind:
    """What differs between the trainers' runs."""

    name: str  #: the trackers' project name
    checkpoint_prefix: str  #: checkpoints are ``checkpoints/PREFIX-NNNNNN``
    error: type[Exception]  #: what a refused start raises, in the trainer's name
    mixed_precision: str  #: the config key of the autocast, e.g. ``"train.mixed_precision"``
    batch_size: str  #: the config key of the micro-batch size (DeepSpeed's ``train_micro_batch_size_per_gpu``)
    max_grad_norm: str  #: the config key of the clipping norm (DeepSpeed's ``gradient_clipping``)


@dataclass
class Run:
    """A started run: its accelerator, directory, configuration, and the checkpoint to resume."""

    kind: RunKind
    accelerator: Any
    run_dir: Path
    #: the configuration as given (``toy:`` names kept), ``train.num_processes`` the launch's: config.yaml
    config: SPOConfig
    #: the same with every ``toy:`` reference resolved: what the trainers load from
    resolved: SPOConfig
    resume_from: Path | None
    metrics: MetricsLog

    def optimizer(self, model: Any, params: Iterable[torch.nn.Parameter], settings: Any) -> tuple[Any, Any]:
        """AdamW over ``params`` with ``settings``' ``lr``, ``betas``, ``weight_decay`` and ``eps``
        (``config.optimizer`` or ``config.spm``), prepared with ``model``: (policy, optimizer)."""
        kind = torch.optim.AdamW
        if getattr(settings, "name", "adamw") == "adamw8bit":  # (checked in start_run: installed, engine)
            import bitsandbytes

            kind = bitsandbytes.optim.AdamW8bit
        adamw = kind(params, lr=settings.lr, betas=tuple(settings.betas), weight_decay=settings.weight_decay,
                     eps=settings.eps)
        return self.accelerator.prepare(model, adamw)

    def load_checkpoint(self, **parts: Any) -> dict[str, Any] | None:
        """The trainer state of the checkpoint to resume (``parts``: trainable, optimizer,
        lr_scheduler, restored in place), or ``None`` for a fresh run."""
        if self.resume_from is None:
            return None
        return load_checkpoint(self.accelerator, self.resume_from, **parts)

    def start_trackers(self) -> None:
        """TensorBoard / W&B as ``logging.*`` asks, with the configuration as flat hyperparameters."""
        if trackers(self.config):
            self.accelerator.init_trackers(self.kind.name, config=flat_config(self.config))
        if self.config.logging.wandb and self.accelerator.is_main_process:
            # round lines share wandb's one history step with the optimizer steps (MetricsLog):
            # their curves are drawn against the round
            self.accelerator.get_tracker("wandb", unwrap=True).define_metric("round/*", step_metric="round/round")


def trackers(config: SPOConfig) -> list[str]:
    return (["tensorboard"] if config.logging.tensorboard else []) + (["wandb"] if config.logging.wandb else [])


def make_accelerator(config: SPOConfig, run_dir: Path, mixed_precision: str) -> Any:
    from accelerate import Accelerator

    acc = Accelerator(mixed_precision=mixed_precision, log_with=trackers(config) or None,
                      project_dir=str(run_dir / "logs"), **accelerator_options(config.model.device))
    adopt_cpu_fsdp(acc)  # an FSDP launch on CPU processes trains FSDP, not DDP (spo.training.engines)
    return acc


@contextmanager
def start_run(config: SPOConfig, run_dir: str | Path, kind: RunKind, *, resume: bool = False, accelerator: Any = None,
              resolved: SPOConfig | None = None,
              check_resume: Callable[[SPOConfig, Path], None] | None = None) -> Iterator[Run]:
    """Check, create the accelerator, prepare ``run_dir`` and write its ``config.yaml``; the
    block under ``with`` builds the trainer, and a failure there removes what the start wrote.
    ``resolved``: ``resolve_references(config)`` when the trainer has already made it (for its own
    checks). ``check_resume(saved, path)`` may refuse a resumption (after the process count's check)."""
    run_dir = Path(run_dir)
    if resolved is None:  # an unknown toy: name fails here, before anything is written
        resolved = resolve_references(config)
    # (existing checkpoints without --resume have their own message below)
    problem = output_problem(run_dir, resume=resume or bool(list_checkpoints(run_dir, kind.checkpoint_prefix)))
    if problem:
        raise kind.error(problem)
    section, key = kind.mixed_precision.split(".")
    mixed_precision = getattr(getattr(config, section), key)
    check_device_request(config.model.device, config.model.dtype, mixed_precision, kind.mixed_precision)
    problem = None if accelerator is not None else deepspeed_install_problem()
    if problem:
        raise kind.error(problem)
    acc = accelerator or make_accelerator(config, run_dir, mixed_precision)
    if config.model.device is not None and torch.device(config.model.device).type != acc.device.type:
        raise kind.error(f"model.device: {config.model.device!r} was asked for, but accelerate placed this "
                         f"process on {str(acc.device)!r}")
    problem = process_count_problem(config.train.num_processes, acc.num_processes) or engine_problem(
        acc, compile=config.model.compile and kind.checkpoint_prefix == "round") or configure_deepspeed(
        acc, batch_size=_setting(config, kind.batch_size), max_grad_norm=_setting(config, kind.max_grad_norm),
        names=(kind.batch_size, kind.max_grad_norm)) or _optimizer_problem(config, acc, kind)
    if problem:
        raise kind.error(problem)
    with removed_on_failure(run_dir, acc.is_main_process):
        resume_from = _prepare_run_dir(acc, run_dir, kind, resume, check_resume)
        acc.wait_for_everyone()  # every process has read the old config.yaml before it is rewritten
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, num_processes=acc.num_processes))
        resolved = dataclasses.replace(resolved, train=config.train)
        write_everywhere(acc, f"writing {run_dir / 'config.yaml'}", lambda: save_config(config, run_dir / "config.yaml"))
        yield Run(kind, acc, run_dir, config, resolved, resume_from, MetricsLog(acc, run_dir / "metrics.jsonl"))


def _optimizer_problem(config: SPOConfig, accelerator: Any, kind: RunKind) -> str | None:
    """Why ``optimizer.name`` cannot be honoured here, or None."""
    import importlib.util

    from .engines import DEEPSPEED, FSDP, engine_of

    if kind.checkpoint_prefix != "round" or config.optimizer.name != "adamw8bit":
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        return "optimizer.name=adamw8bit needs bitsandbytes: pip install bitsandbytes (or optimizer.name=adamw)"
    if engine_of(accelerator) in (FSDP, DEEPSPEED):
        return (f"optimizer.name=adamw8bit is not supported under {engine_of(accelerator)} yet (not tested with its "
                "sharded state): use optimizer.name=adamw")
    return None


def _setting(config: SPOConfig, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(config, section), name)


def _prepare_run_dir(acc: Any, run_dir: Path, kind: RunKind, resume: bool,
                     check_resume: Callable[[SPOConfig, Path], None] | None) -> Path | None:
    """The checkpoint to resume from, or ``None`` after making a fresh run directory."""
    existing = list_checkpoints(run_dir, kind.checkpoint_prefix)
    if existing and not resume:
        raise kind.error(f"{run_dir} already holds checkpoints ({existing[-1].name}); "
                         "pass --resume to continue that run, or choose another --output")
    latest = None
    if resume:
        warn = print if acc.is_main_process else (lambda _: None)
        latest = latest_good_checkpoint(run_dir, kind.checkpoint_prefix, warn=warn)
    if latest is None:
        if resume and acc.is_main_process:
            print(f"--resume: no checkpoint in {run_dir}; starting from the beginning")

        def make() -> None:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)

        write_everywhere(acc, f"creating the run directory {run_dir}", make)
        return None
    saved_path = run_dir / "config.yaml"
    if saved_path.exists():
        saved = load_config(saved_path)
        if saved.train.num_processes not in (None, acc.num_processes):
            raise CheckpointError(f"this run used {saved.train.num_processes} processes and is resumed with "
                                  f"{acc.num_processes}; resume with the same number to continue exactly")
        if check_resume is not None:
            check_resume(saved, saved_path)
    return latest


def changed_keys(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two nested config dicts."""
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys.extend(changed_keys(va, vb, f"{prefix}{k}."))
        elif va != vb:
            keys.append(f"{prefix}{k}")
    return keys


def flat_config(config: SPOConfig) -> dict[str, Any]:
    """``section.key`` -> value (numbers, strings and booleans as they are, anything else as text)."""
    flat: dict[str, Any] = {}
    for section, values in config_to_dict(config).items():
        if isinstance(values, dict):
            for k, v in values.items():
                flat[f"{section}.{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
        else:
            flat[section] = values
    return flat
