"""The training loop on accelerate, for every method of ``spo.objectives`` (``objective.name``):
sample (or read) a round's data, then train on it.

One round, on every process:

1. take this process's items for the round (seeded epochs over the prompt list, or over the
   preference rows for Diffusion-DPO);
2. the method collects records from them (SPO: rollouts with candidate pools -> valid win/lose
   transitions; D3PO: trajectory pairs; DDPO: trajectories; Diffusion-DPO: encoded pairs);
3. gather every process's records; if fewer than the processes, skip the round (all agree);
   the method prepares the gathered records (DDPO: advantages);
4. shuffle them with one permutation shared by all processes and split them evenly;
5. update the policy (LoRA) in micro-batches with gradient accumulation, AdamW, clipping
   (with ``train.carry_accumulation``, as the release: a round's leftover micro-batches join
   the next round's first optimiser step);
6. every ``logging.sample_every`` rounds and after the last, draw the previews (main process:
   fixed prompts, fixed noise; :mod:`.previews`), log, and every ``logging.checkpoint_every``
   rounds write an atomic checkpoint.

All randomness of a round is derived from (seed, round, rank), so ``resume`` continues exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..backbones import Backbone, BackboneLoadError, load_backbone
from ..builtin import resolve_references
from ..config import SPOConfig, config_to_dict
from ..data import load_prompts
from ..errors import SPOError
from ..objectives import Method, method_class
from ..preference.selection import describe_preference, time_modules_problem
from ..preference.latent import load_latent_reward_model
from ..preference.spm import load_preference_model
from ..sampling import PoolScorer
from ..sampling.records import Records
from ..weights import check_reference, save_model_state
from .checkpoint import CheckpointError, latest_checkpoint, save_checkpoint
from .distributed import gather_counts, gather_records, reduce_log, write_everywhere
from .engines import (DEEPSPEED, accumulation_boundary, base_optimizer, engine_of, full_state, gathers, local_grads,
                      shard_frozen, sharded, trainable_parameters)
from .previews import Previews
from .model_card import write_card_everywhere
from .seeding import PromptSchedule, derive_seed, generator, rng_state, set_rng_state
from .setup import Run, RunKind, changed_keys, start_run

#: config keys that may change between an interrupted run and its resumption
RESUMABLE_CHANGES = ("train.rounds", "train.num_processes", "logging.")
#: memory levers a resumed run may switch (e.g. to ``PRESET-lowmem`` after running out of memory):
#: the first two leave every number as it is (the same device computes); the others recompute or
#: split the same work, which can change results at float-rounding level only
MEMORY_LEVERS = ("model.offload_text_encoders", "preference.offload", "model.gradient_checkpointing",
                 "sampling.decode_batch_size", "sampling.batch_size")
EXACT_MEMORY_LEVERS = MEMORY_LEVERS[:2]


class TrainingError(SPOError, RuntimeError):
    """Training cannot go on (non-finite loss, unusable run directory, ...); nothing was lost."""


#: what SPO runs' start differs in (spo.training.setup)
SPO_RUN = RunKind(name="spo", checkpoint_prefix="round", error=TrainingError, mixed_precision="train.mixed_precision",
                  batch_size="train.batch_size", max_grad_norm="optimizer.max_grad_norm")


@dataclass
class TrainResult:
    run_dir: Path
    rounds: int
    steps: int
    skipped_rounds: int
    lora_path: Path | None
    last_round: dict[str, Any]


def build_scorer(config: SPOConfig, device: torch.device) -> PoolScorer:
    """The preference scorer the config names: the step-aware preference model of
    ``preference.*`` (a CLIP/PickScore directory or hub id, an SPM directory, and/or the
    authors' released SPM state dict in ``preference.checkpoint``), or with
    ``preference.kind=latent`` LPO's latent reward model."""
    if config.preference.kind == "latent":
        return load_latent_reward_model(config, device)
    return load_preference_model(config, device)


class SPOTrainer:
    """Runs the training of ``config`` (the method ``objective.name``) into ``run_dir``.

    Args:
        config: the resolved configuration.
        run_dir: output directory (config.yaml, metrics.jsonl, checkpoints/, lora/, logs/).
        scorer: a :data:`~spo.sampling.PoolScorer`; default: built from ``config.preference``.
        prompts: the prompt list; default: read from ``config.data.prompts``.
        resume: continue from the latest checkpoint in ``run_dir``.
        accelerator: an ``accelerate.Accelerator``; default: one built from the config.
    """

    def __init__(
        self,
        config: SPOConfig,
        run_dir: str | Path,
        *,
        scorer: PoolScorer | None = None,
        prompts: Sequence[str] | None = None,
        resume: bool = False,
        accelerator: Any = None,
        progress: bool = True,
    ) -> None:
        resolved = resolve_references(config)  # the toy: references, resolved once for every loader
        method_type = method_class(config.objective.name)
        if config.sampling.eta <= 0 and method_type.needs_stochastic_steps:
            raise TrainingError(f"sampling.eta must be > 0 for {config.objective.name}: a deterministic step "
                                "has no log-probability")
        method_type.check_inputs(resolved)
        if scorer is None and method_type.needs_scorer:
            problem = time_modules_problem(config.preference)
            if problem:
                raise TrainingError(problem)
        scores = method_type.needs_scorer and config.preference.decoder is not None
        if scores:  # a missing local decoder fails before the run directory is written
            check_reference(config.preference.decoder, "preference.decoder", "directory", BackboneLoadError)
        self.config = config
        self.run_dir = Path(run_dir)
        self.progress = progress
        if prompts is not None:
            self.prompts = list(prompts)
        else:
            self.prompts = self._config_prompts(resolved) if method_type.needs_prompts else []
        with start_run(config, self.run_dir, SPO_RUN, resume=resume, accelerator=accelerator, resolved=resolved,
                       check_resume=self._check_resume) as run:
            self.accelerator, self.resume_from = run.accelerator, run.resume_from
            self._set_up(run, method_type, scores, scorer)

    def _set_up(self, run: Run, method_type: Any, scores: bool, scorer: PoolScorer | None) -> None:
        """Everything after the run directory: models, method, optimiser, resume state."""
        acc, config = self.accelerator, run.resolved  # the loaders get the toy: references resolved
        self.config = run.config  # as the user wrote it (config.yaml), train.num_processes the launch's
        if getattr(self, "_resume_note", None) and acc.is_main_process:
            print(self._resume_note)

        if torch.cuda.is_available():  # the release: allow_tf32 = True
            torch.backends.cuda.matmul.allow_tf32 = config.train.allow_tf32
        torch.manual_seed(derive_seed(config.seed, "init"))  # same adapter init on every process
        self.backbone: Backbone = load_backbone(
            dataclasses.replace(config.model, device=str(acc.device)), config.sampling.negative_prompt
        )
        self.backbone.check_prompts(self.prompts)
        self.backbone.sampling_batch_size = config.sampling.batch_size
        if scores:  # x0-hat decoded for the scorer only (pools, final-image rewards)
            self.backbone.load_score_decoder(config.preference.decoder)
        if method_type.needs_scorer:
            self.backbone.tile_score_decodes(config.sampling.decode_tile)
        if config.model.finetune == "lora":
            params = self.backbone.attach_lora(config.lora)
        else:
            params = self.backbone.enable_full_finetuning()
        if config.model.gradient_checkpointing:
            self.backbone.enable_gradient_checkpointing()
        if config.model.offload_text_encoders:
            self.backbone.offload_text_encoders()
        if config.model.channels_last:
            self.backbone.to_channels_last()
        if config.model.compile:
            self.backbone.compile()
        #: preference.offload: the scorer lives in host memory outside the sampling phase, and
        #: this is the device it samples on (the accelerator's, or where a scorer passed in sits)
        self._scorer_home: torch.device | None = None
        if scorer is None and method_type.needs_scorer:
            offload = config.preference.offload
            scorer = build_scorer(config, torch.device("cpu") if offload else acc.device)  # never whole on the GPU
            self._scorer_home = acc.device if offload and isinstance(scorer, torch.nn.Module) else None
            if self.progress and acc.is_main_process:
                print(describe_preference(self.config.preference))
        elif config.preference.offload and isinstance(scorer, torch.nn.Module):
            self._scorer_home = next(iter(scorer.parameters()), torch.empty(0, device=acc.device)).device
        self.scorer = scorer
        if self._scorer_home is not None:
            scorer.to("cpu")
        self.method: Method = method_type(config, self.backbone, scorer)
        self.schedule = self.method.schedule()
        self.metric_names = self.method.metric_names
        self.previews = Previews.from_config(config, self.backbone, acc, self.run_dir, self.prompts)

        o = config.optimizer
        policy, self.optimizer = run.optimizer(self.backbone.unet, params, o)
        self.backbone.policy_forward = policy
        self.policy = policy
        # read after prepare: FSDP2 replaces every parameter object (spo.training.engines)
        self.trainable = trainable_parameters(self.backbone.unet)
        self.params = list(self.trainable.values())
        if gathers(acc) and self.backbone.reference_unet is not None:
            # full fine-tuning: the frozen reference sharded like the policy, 1/N of a UNet per process
            # (FSDP2, ZeRO-3; under ZeRO-2 it stays whole, as the policy's weights do, in the policy's dtype)
            self.backbone.reference_unet = shard_frozen(acc, self.backbone.reference_unet)
        from diffusers.optimization import get_scheduler

        self.lr_scheduler = get_scheduler(
            o.lr_scheduler, base_optimizer(self.optimizer),
            num_warmup_steps=o.warmup_rounds, num_training_steps=config.train.rounds,
        )
        self.metrics = run.metrics
        self.prompt_schedule = PromptSchedule(
            self.method.items(self.prompts), config.seed, config.train.prompts_per_round, acc.num_processes
        )
        self.rounds_done = 0
        self.step = 0
        self.skipped_rounds = 0
        #: micro-batches backpropagated since the last optimiser step (train.carry_accumulation),
        #: with their summed diagnostics and pairs
        self.pending = {"micro_batches": 0, "pairs": 0, "sums": dict.fromkeys(self.metric_names, 0.0)}
        #: under DeepSpeed, this process's micro-batches of the open accumulation with the torch RNG
        #: states they ran under (ZeRO keeps their gradients in buffers no checkpoint can hold: a
        #: resumed run backpropagates them again)
        self.replay: list[tuple[Records, dict[str, torch.Tensor]]] = []
        state = run.load_checkpoint(trainable=self.trainable, optimizer=self.optimizer, lr_scheduler=self.lr_scheduler,
                                    model=self.backbone.unet)
        if state is not None:
            self.rounds_done, self.step = int(state["rounds_done"]), int(state["step"])
            self.skipped_rounds = int(state.get("skipped_rounds", 0))
            self.pending = state.get("pending", self.pending)
            self.method.load_state_dict(state.get("method", {}))
            self.metrics.truncate_after(self.rounds_done)
            if state.get("replay"):
                self._replay(state["replay"], state.get("replay_tensors", {}))
        run.start_trackers()

    # ------------------------------------------------------------------ set-up helpers
    @staticmethod
    def _config_prompts(config: SPOConfig) -> list[str]:
        if not config.data.prompts:
            raise TrainingError("data.prompts: give a prompts file (one prompt per line, or a JSON list)")
        return load_prompts(config.data.prompts)

    def _check_resume(self, saved: SPOConfig, saved_path: Path) -> None:
        """``--resume`` continues a run only with the configuration it was started with."""
        changed = changed_keys(config_to_dict(saved), config_to_dict(self.config))
        if "train.rounds" in changed and self.config.optimizer.lr_scheduler != "constant":
            raise CheckpointError(
                f"--resume with train.rounds changed would reshape the {self.config.optimizer.lr_scheduler} "
                "learning-rate schedule; keep train.rounds, or use optimizer.lr_scheduler=constant"
            )
        levers = [k for k in changed if k in MEMORY_LEVERS]
        changed = [k for k in changed if not k.startswith(RESUMABLE_CHANGES) and k not in MEMORY_LEVERS]
        if changed:
            raise CheckpointError(
                f"--resume with a different configuration: {', '.join(changed)} differ from "
                f"{saved_path}; only train.rounds, logging.* and the memory levers ({', '.join(MEMORY_LEVERS)}) "
                "may change"
            )
        rounding = [k for k in levers if k not in EXACT_MEMORY_LEVERS]
        if rounding:  # said once the accelerator exists (the main process only)
            self._resume_note = (f"note: --resume with {', '.join(rounding)} changed: the run goes on with the same "
                                 "work, but its numbers may differ from an uninterrupted run at float-rounding level")

    # ------------------------------------------------------------------ one round
    def _round_prompts(self, round_index: int) -> list[str]:
        return self.prompt_schedule.prompts_for(round_index, self.accelerator.process_index)

    def sample_round(self, round_index: int) -> Any:
        """Collect this process's share of the round (the method's :class:`~spo.objectives.Collected`)."""
        acc = self.accelerator
        self.policy.eval()
        gen = generator(self.config.seed, "sample", round_index, acc.process_index)
        with self._scorer_on_device(), acc.autocast():
            return self.method.collect(self._round_prompts(round_index), gen)

    @contextlib.contextmanager
    def _scorer_on_device(self) -> Iterator[None]:
        """``preference.offload``: the scorer on the device for the sampling phase only."""
        if self._scorer_home is None:
            yield
            return
        self.scorer.to(self._scorer_home)
        try:
            yield
        finally:
            self.scorer.to("cpu")

    def train_on(self, records: Records, round_index: int) -> list[dict[str, float]]:
        """Optimiser steps over this process's share of the round's records: micro-batches of
        ``train.batch_size``, ``train.gradient_accumulation_steps`` per step; with
        ``train.carry_accumulation`` a step may take micro-batches of the previous round."""
        acc, cfg = self.accelerator, self.config.train
        self.policy.train()
        logs = []
        n = len(records)
        for epoch in range(cfg.epochs_per_round):
            order = torch.arange(n) if epoch == 0 else torch.randperm(
                n, generator=generator(self.config.seed, "epoch", round_index, epoch, acc.process_index)
            )
            micro = [order[i : i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]
            if cfg.carry_accumulation:
                for rows in micro:
                    entry = self._carried_micro_batch(records, rows, round_index)
                    if entry is not None:
                        logs.append(entry)
                continue
            for g in range(0, len(micro), cfg.gradient_accumulation_steps):
                group = micro[g : g + cfg.gradient_accumulation_steps]
                logs.append(self._optimizer_step(records, group, round_index))
        return logs

    def _backward(self, records: Records, rows: torch.Tensor, weight: float, sync: bool, round_index: int) -> dict[str, float]:
        """One micro-batch: the method's loss times ``weight``, backpropagated (gradients reduced
        across processes only with ``sync``, and always under FSDP: its shards then hold the
        gradients, which an accumulation open at a checkpoint needs); a non-finite loss on any
        process stops all."""
        acc = self.accelerator
        last = sync  # this micro-batch ends an optimiser step (DeepSpeed's engine steps in its backward)
        sync = sync or sharded(acc) or engine_of(acc) == DEEPSPEED
        batch = records.index(rows)
        with (contextlib.nullcontext() if sync else acc.no_sync(self.policy)), acc.autocast():
            out = self.method.loss(self.backbone, self.schedule, batch)
            loss = out.loss * weight
        bad = torch.tensor([0.0 if torch.isfinite(out.loss) else 1.0], device=acc.device)
        if float(acc.reduce(bad, reduction="sum")) > 0:
            latest = latest_checkpoint(self.run_dir)
            raise TrainingError(
                f"non-finite {self.config.objective.name} loss in round {round_index} (step {self.step}); nothing was saved after "
                f"{latest.name if latest else 'the start'}: lower optimizer.lr or check the scorer, then --resume"
            )
        with accumulation_boundary(acc, last):
            acc.backward(loss)
        return {k: float(out.metrics[k]) for k in self.metric_names}

    def _optimizer_step(self, records: Records, group: list[torch.Tensor], round_index: int) -> dict[str, float]:
        """One step on ``group``'s micro-batches, each weighted by its share of the pairs."""
        total = sum(len(rows) for rows in group)
        sums = dict.fromkeys(self.metric_names, 0.0)
        for j, rows in enumerate(group):
            metrics = self._backward(records, rows, len(rows) / total, j == len(group) - 1, round_index)
            for k in self.metric_names:
                sums[k] += metrics[k] * len(rows) / total
        return self._step(sums, total, round_index)

    def _carried_micro_batch(self, records: Records, rows: torch.Tensor, round_index: int) -> dict[str, float] | None:
        """One micro-batch of an accumulation that may span rounds (the release's accelerate
        counter): its mean loss divided by the accumulation steps; the step comes with the
        micro-batch that completes the count (returns its log entry), else None."""
        steps = self.config.train.gradient_accumulation_steps
        pending = self.pending
        completes = pending["micro_batches"] + 1 == steps
        replaying = engine_of(self.accelerator) == DEEPSPEED and not completes
        rng = _torch_rng() if replaying else {}  # what LoRA dropout draws from in this backward
        metrics = self._backward(records, rows, 1.0 / steps, completes, round_index)
        if engine_of(self.accelerator) == DEEPSPEED:
            self.replay = [*self.replay, (records.index(rows).to("cpu"), rng)] if replaying else []
        pending["micro_batches"] += 1
        pending["pairs"] += len(rows)
        for k in self.metric_names:
            pending["sums"][k] += metrics[k]
        if not completes:
            return None
        means = {k: v / steps for k, v in pending["sums"].items()}
        pairs = pending["pairs"]
        self.pending = {"micro_batches": 0, "pairs": 0, "sums": dict.fromkeys(self.metric_names, 0.0)}
        return self._step(means, pairs, round_index)

    def _step(self, metrics: dict[str, float], pairs: int, round_index: int) -> dict[str, float]:
        """Clip (``optimizer.max_grad_norm``), step, zero the gradients; log the step."""
        acc = self.accelerator
        grad_norm = float("nan")
        if self.config.optimizer.max_grad_norm is not None:
            # (under DeepSpeed the engine clipped inside the last backward; this reads its norm)
            norm = acc.clip_grad_norm_(self.params, self.config.optimizer.max_grad_norm)
            grad_norm = float(norm) if norm is not None else float("nan")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        local = torch.tensor([metrics[k] for k in self.metric_names], device=acc.device, dtype=torch.float64)
        mean = (acc.reduce(local, reduction="sum") / acc.num_processes).tolist()
        entry = {"type": "step", "step": self.step, "round": round_index, **dict(zip(self.metric_names, mean))}
        entry.update(lr=self.lr_scheduler.get_last_lr()[0], grad_norm=grad_norm, pairs=pairs * acc.num_processes,
                     num_processes=acc.num_processes)
        if self.step % self.config.logging.log_every == 0:
            self.metrics.write(entry, self.step, "train")
        return entry

    def run_round(self, round_index: int) -> dict[str, Any]:
        acc = self.accelerator
        t0 = time.perf_counter()
        collected = self.sample_round(round_index)
        records = collected.records
        counts = gather_counts(acc, len(records))
        pools = sum(gather_counts(acc, collected.units))
        t_sample = time.perf_counter() - t0
        total = sum(counts)
        # "pools": the units a round drew (SPO pools, D3PO trajectory pairs, DDPO trajectories,
        # Diffusion-DPO rows); "valid_pair_rate": the share that gave training records
        entry: dict[str, Any] = {
            "type": "round", "round": round_index, "num_processes": acc.num_processes,
            "valid_records": total, "records_per_process": counts, "pools": pools,
            "valid_pair_rate": (sum(gather_counts(acc, collected.valid)) / pools) if pools else 0.0,
            # every process's statistics, not the main process's alone
            **reduce_log(acc, collected.log, collected.units),
        }
        t1 = time.perf_counter()
        steps: list[dict[str, float]] = []
        if total < acc.num_processes:
            self.skipped_rounds += 1
            entry["skipped"] = True
        else:
            everything = self.method.prepare(gather_records(acc, records, counts))
            perm = torch.randperm(total, generator=generator(self.config.seed, "shuffle", round_index))
            share = total // acc.num_processes
            mine = perm[acc.process_index * share : (acc.process_index + 1) * share]
            steps = self.train_on(everything.index(mine), round_index)
            entry["skipped"] = False
        with warnings.catch_warnings():  # a skipped round has no optimizer.step(); the schedule still advances
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`")
            self.lr_scheduler.step()
        entry.update(
            optimizer_steps=len(steps), sampling_seconds=round(t_sample, 3),
            training_seconds=round(time.perf_counter() - t1, 3),
        )
        if steps:
            entry.update({k: sum(s[k] for s in steps) / len(steps) for k in self.metric_names})
        preview_seconds = self.previews.draw(round_index + 1)
        if preview_seconds is not None:
            entry["preview_seconds"] = round(preview_seconds, 3)
        self.metrics.write(entry, round_index, "round")
        self.previews.publish(getattr(self.metrics, "wandb_step", None))  # after the round's line (wandb's order)
        return entry

    # ------------------------------------------------------------------ the loop
    def checkpoint(self) -> Path:
        """Write the checkpoint after ``rounds_done`` rounds. An accumulation left open
        (``train.carry_accumulation``) is saved as each process's gradients, or under DeepSpeed
        (whose ZeRO buffers hold them) as the micro-batches themselves, which a resumed run
        backpropagates again (:meth:`_replay`): same weights, same inputs, same order."""
        open_accumulation = self.pending["micro_batches"] > 0
        replay = replay_state = None
        if open_accumulation and engine_of(self.accelerator) == DEEPSPEED:
            if len(self.replay) != self.pending["micro_batches"]:  # (a resumption that lost them is refused)
                raise TrainingError(f"{self.pending['micro_batches']} micro-batches are accumulating but "
                                    f"{len(self.replay)} are held for the checkpoint")
            replay, replay_state = _pack_replay(self.replay)
        return save_checkpoint(
            self.accelerator, self.run_dir, self.rounds_done, trainable=self.trainable, optimizer=self.optimizer,
            lr_scheduler=self.lr_scheduler, keep=self.config.logging.keep_checkpoints,
            state={"step": self.step, "skipped_rounds": self.skipped_rounds, "seed": self.config.seed,
                   "method": self.method.state_dict(), "pending": self.pending,
                   **({"replay": replay_state} if replay_state else {})},
            grads=local_grads(self.trainable) if open_accumulation and replay is None else None,
            model=self.backbone.unet, replay=replay,
        )

    def _replay(self, saved: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Backpropagate the open accumulation's micro-batches of the checkpoint again
        (DeepSpeed), each with its saved weight, without ending the optimiser step; the RNG is
        left as the checkpoint restored it."""
        if engine_of(self.accelerator) != DEEPSPEED:
            raise CheckpointError("this checkpoint holds an open accumulation as micro-batches to replay, written "
                                  "under DeepSpeed: resume it under DeepSpeed")
        self.replay = _unpack_replay(saved, tensors, type(self.method).__module__)
        if len(self.replay) != self.pending["micro_batches"]:
            raise CheckpointError(f"the checkpoint's open accumulation has {self.pending['micro_batches']} micro-batches "
                                  f"but {len(self.replay)} to replay")
        state = rng_state()
        self.policy.train()
        steps = self.config.train.gradient_accumulation_steps
        for records, rng in self.replay:
            _set_torch_rng(rng)  # the draws the original backward made (LoRA dropout)
            self._backward(records.to(self.accelerator.device), torch.arange(len(records)), 1.0 / steps, False,
                           self.rounds_done)
        set_rng_state(state)

    def train(self, stop_after: int | None = None) -> TrainResult:
        """Run the remaining rounds (``stop_after``: stop early after that many rounds in total,
        as an interruption would; tests use it)."""
        acc, cfg = self.accelerator, self.config
        end = cfg.train.rounds if stop_after is None else min(stop_after, cfg.train.rounds)
        bar = tqdm(total=cfg.train.rounds, initial=self.rounds_done, desc=f"{cfg.objective.name} rounds", unit="round",
                   disable=not (self.progress and acc.is_main_process))
        last: dict[str, Any] = {}
        try:  # the bar ends its line even when a round fails, so the error starts a line of its own
            while self.rounds_done < end:
                last = self.run_round(self.rounds_done)
                self.rounds_done += 1
                bar.update(1)
                if "loss" in last:  # a round with an optimiser step (a carried accumulation may have none)
                    key = self.method.progress_metric
                    bar.set_postfix({"loss": f"{last['loss']:.4f}", key: f"{last[key]:.3g}",
                                     "valid": f"{last['valid_pair_rate']:.2f}"})
                if self.rounds_done % cfg.logging.checkpoint_every == 0 or self.rounds_done == cfg.train.rounds:
                    self.checkpoint()
        finally:
            bar.close()
        lora_path = None
        if self.rounds_done == cfg.train.rounds:
            self.previews.draw(self.rounds_done)  # a run finished before previews were on: the last one
            self.previews.publish(getattr(self.metrics, "wandb_step", None))
            lora_path = self.save_final()
        acc.wait_for_everyone()
        if acc.trackers:
            acc.end_training()
        return TrainResult(self.run_dir, self.rounds_done, self.step, self.skipped_rounds, lora_path, last)

    def save_final(self) -> Path | None:
        """The final weights: ``lora/pytorch_lora_weights.safetensors`` (diffusers format), or
        ``unet/`` under full fine-tuning; then their model card, ``README.md`` beside them (one
        that cannot be written is a warning: the weights are saved)."""
        acc, unet = self.accelerator, self.backbone.unet
        # the weights whole on the main process, gathered by every process (FSDP's shards)
        state = full_state(acc, unet, list(self.trainable)) if gathers(acc) else None

        def save() -> Path:
            if self.config.model.finetune == "lora":
                return self.backbone.save_lora(self.run_dir / "lora", state_dict=state)
            if state is None:
                unet.save_pretrained(self.run_dir / "unet")
            else:
                save_model_state(unet, state, self.run_dir / "unet")
            return self.run_dir / "unet"

        what = "writing the final " + ("LoRA" if self.config.model.finetune == "lora" else "UNet")
        path = write_everywhere(self.accelerator, f"{what} to {self.run_dir}", save)
        folder = self.run_dir / ("lora" if self.config.model.finetune == "lora" else "unet")
        write_card_everywhere(self.accelerator, self.run_dir, folder, self.config)
        return path


def _torch_rng() -> dict[str, torch.Tensor]:
    """torch's generator states (CPU, and each CUDA device's), as tensors."""
    states = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return states


def _set_torch_rng(states: dict[str, torch.Tensor]) -> None:
    if "rng.cpu" in states:
        torch.set_rng_state(states["rng.cpu"])
    cuda = sorted((int(k.rsplit(".", 1)[1]), v) for k, v in states.items() if k.startswith("rng.cuda."))
    if cuda:
        torch.cuda.set_rng_state_all([v for _, v in cuda])


def _pack_replay(batches: list[tuple[Records, dict[str, torch.Tensor]]]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Micro-batches of records, with their RNG states, as one flat tensor dict (``"J.field"``)
    and what rebuilds them (their class, the fields that are None)."""
    tensors: dict[str, torch.Tensor] = {}
    empty: list[str] = []
    for j, (batch, rng) in enumerate(batches):
        for name, value in {**batch.tensors(), **rng}.items():
            if value is None:
                if j == 0:
                    empty.append(name)
            else:
                tensors[f"{j}.{name}"] = value
    kind = type(batches[0][0]) if batches else Records
    return tensors, {"records": f"{kind.__module__}:{kind.__qualname__}", "micro_batches": len(batches), "none": empty}


def _unpack_replay(saved: dict[str, Any], tensors: dict[str, torch.Tensor],
                   method_module: str) -> list[tuple[Records, dict[str, torch.Tensor]]]:
    """:func:`_pack_replay`'s micro-batches back. The records class is looked up only in SPO's
    own modules or the method's (a checkpoint names no other code to import)."""
    import importlib

    module, _, name = str(saved["records"]).partition(":")
    kind = None
    if module.split(".")[0] == "spo" or module == method_module:
        kind = getattr(importlib.import_module(module), name, None)
    if not (isinstance(kind, type) and issubclass(kind, Records)):
        raise CheckpointError(f"the checkpoint's open accumulation names {saved['records']!r}, which is not a "
                              "records class of SPO or of this method")
    batches = []
    for j in range(int(saved["micro_batches"])):
        mine = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".", 1)[0] == str(j)}
        fields: dict[str, torch.Tensor | None] = {n: None for n in saved["none"]}
        fields.update({k: v for k, v in mine.items() if not k.startswith("rng.")})
        batches.append((kind.from_tensors(fields), {k: v for k, v in mine.items() if k.startswith("rng.")}))
    return batches


