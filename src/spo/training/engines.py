"""The distributed engine a run trains under, as accelerate chose it from the launch: one
process, DDP, PyTorch FSDP2 (``accelerate launch --config_file configs/accelerate/fsdp.yaml``) or
DeepSpeed ZeRO-2 / ZeRO-3 (``zero2.yaml``, ``zero3.yaml``).

Under DDP every process holds the whole model, so a checkpoint is written from the main
process's parameters and read back into every process's. Under FSDP2 every parameter is a
``DTensor`` sharded across the processes (the frozen base weights too), so this module gathers
and scatters through ``torch.distributed.checkpoint.state_dict``:

* :func:`full_state` / :func:`full_optimizer_state`: the trainable weights and AdamW's state as
  plain full tensors on the main process (``{}`` on the others); a collective: every process
  calls it, before the main process writes. Under every engine the optimiser state is keyed by
  parameter name (``...to_q.lora_A.spo.weight``), so a checkpoint does not depend on the engine.
* :func:`load_full_state` / :func:`load_full_optimizer_state`: the reverse (the main process's
  copy broadcast and sliced into each process's shards under FSDP).

Under DeepSpeed the same functions go through DeepSpeed's tensor-fragment API over the ZeRO
optimiser's fp32 partitions (the checkpoint format is DDP's); :func:`configure_deepspeed` fills
the DeepSpeed config from the run, :func:`accumulation_boundary` tells the engine which backward
ends a step, and an open accumulation is replayed rather than saved (``SPOTrainer.checkpoint``).
* :func:`local_grads` / :func:`set_local_grads`: each process's own gradients (its shard under
  FSDP), for a checkpoint inside an open accumulation (``train.carry_accumulation``).

accelerate 1.16 turns an FSDP launch on CPU into plain DDP without a word (its state picks
FSDP only on accelerator devices); :func:`adopt_cpu_fsdp` honours the launch instead, which is
how the CPU tests run FSDP on gloo. FSDP1 is refused (:func:`engine_problem`): its LoRA-only
gradient clipping would norm local shards only, and accelerate cannot start it on CPU.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch

#: the engines' names, as errors and the tests give them
SINGLE, DDP, FSDP, DEEPSPEED = "single", "ddp", "fsdp", "deepspeed"


def engine_of(accelerator: Any) -> str:
    """``"fsdp"``, ``"deepspeed"``, ``"ddp"`` (several processes, whole models) or ``"single"``."""
    kind = str(getattr(accelerator, "distributed_type", "NO")).rsplit(".", 1)[-1]
    if kind == "FSDP":
        return FSDP
    if kind == "DEEPSPEED":
        return DEEPSPEED
    return DDP if getattr(accelerator, "num_processes", 1) > 1 else SINGLE


def zero_stage(accelerator: Any) -> int | None:
    """DeepSpeed's ZeRO stage under a DeepSpeed engine, else None."""
    if engine_of(accelerator) != DEEPSPEED:
        return None
    return int(accelerator.state.deepspeed_plugin.zero_stage)


def sharded(accelerator: Any) -> bool:
    """Whether the models' parameters are split across processes (FSDP2, ZeRO-3): every
    forward is then a collective that every process must take part in."""
    return engine_of(accelerator) == FSDP or zero_stage(accelerator) == 3


def deepspeed_launch() -> bool:
    """Whether ``accelerate launch`` asked for DeepSpeed (``distributed_type: DEEPSPEED``)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def accelerator_options(device: str | None) -> dict[str, Any]:
    """``Accelerator`` keyword arguments for ``model.device`` under this launch. accelerate starts
    DeepSpeed only with ``cpu=False`` (accelerate/state.py), and DeepSpeed's default backend is
    NCCL: on a machine without CUDA a DeepSpeed launch gets ``cpu=False`` and the gloo backend
    (DeepSpeed's CPU accelerator), which is how the CPU tests run ZeRO. Only under a DeepSpeed
    launch: under DDP the gloo handler would give two processes that silently train apart."""
    if deepspeed_launch() and not torch.cuda.is_available():
        from accelerate.utils import InitProcessGroupKwargs

        return {"cpu": False, "kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}
    return {"cpu": device == "cpu"}


def deepspeed_install_problem() -> str | None:
    """Why a DeepSpeed launch cannot start here (DeepSpeed not installed), or None."""
    import importlib.util

    if deepspeed_launch() and importlib.util.find_spec("deepspeed") is None:
        return ("this launch asked for DeepSpeed, which is not installed: pip install deepspeed "
                "(on a CPU-only machine: pip install -c constraints/cpu.txt deepspeed), or launch with "
                "configs/accelerate/fsdp.yaml")
    return None


def configure_deepspeed(accelerator: Any, *, batch_size: int, max_grad_norm: float | None,
                        names: tuple[str, str]) -> str | None:
    """Fill the DeepSpeed configuration of this launch from the run's own settings, before
    ``prepare``; or say why it cannot train (None: fine, or not DeepSpeed).

    The trainers accumulate themselves (weighted micro-batches, an accumulation that may span
    rounds): DeepSpeed's ``gradient_accumulation_steps`` must be 1 (or ``auto``), and
    :func:`accumulation_boundary` tells the engine which backward ends an optimiser step. The
    engine clips inside its step, so ``gradient_clipping`` is ``max_grad_norm`` (``names``: the
    config keys of the batch size and of the clipping, for the messages); a different number in
    the accelerate config is refused, not overridden. ``train_micro_batch_size_per_gpu`` (and
    ``train_batch_size``), which accelerate takes from a DataLoader the trainers do not have,
    become the micro-batch size when the config leaves them ``auto`` (a number given there is
    kept: it is DeepSpeed's bookkeeping, SPO's micro-batches are the run's)."""
    if engine_of(accelerator) != DEEPSPEED:
        return None
    plugin = accelerator.state.deepspeed_plugin
    ds = plugin.deepspeed_config
    # what the launch asked for, kept from the first run of this process (the config is filled in
    # place, and a process may start several runs: a resumption, the tests)
    asked = getattr(plugin, "_spo_launch", None)
    if asked is None:
        asked = {k: ds.get(k, "auto") for k in ("gradient_accumulation_steps", "gradient_clipping",
                                               "train_micro_batch_size_per_gpu", "train_batch_size")}
        plugin._spo_launch = asked
    stage = int(plugin.zero_stage)
    if stage not in (2, 3):
        return (f"DeepSpeed zero_stage {stage} is not supported: SPO trains under ZeRO stage 2 or 3 "
                "(configs/accelerate/zero2.yaml, zero3.yaml)")
    if stage == 3 and plugin.zero3_init_flag:
        return ("zero3_init_flag: true is not supported: it builds transformers models partitioned as they load, the "
                "frozen text encoders too, which SPO runs outside the engine; set zero3_init_flag: false (prepare "
                "partitions the trained model, as configs/accelerate/zero3.yaml does)")
    if stage == 3:
        # accelerate 1.16 registers its config with transformers under every ZeRO-3 launch
        # (DeepSpeedPlugin.set_deepspeed_weakref ignores the flag), so from_pretrained would build
        # every transformers model partitioned, the frozen text encoders too: honour the flag
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    gas = asked["gradient_accumulation_steps"]
    if gas not in ("auto", 1):
        return (f"the DeepSpeed config's gradient_accumulation_steps is {gas}: SPO accumulates itself "
                f"({names[0].split('.')[0]}.gradient_accumulation_steps); set it to 1 in the accelerate config")
    ds["gradient_accumulation_steps"] = 1
    accelerator.gradient_accumulation_steps = 1
    clip = asked["gradient_clipping"]
    want = float(max_grad_norm) if max_grad_norm is not None else 0.0
    if clip not in ("auto", None) and float(clip) != want:
        return (f"the DeepSpeed config's gradient_clipping is {clip}, but {names[1]} is "
                f"{max_grad_norm}: SPO clips with {names[1]}; leave gradient_clipping out of the accelerate "
                "config (or make them equal)")
    ds["gradient_clipping"] = want
    if asked["train_micro_batch_size_per_gpu"] == "auto":
        ds["train_micro_batch_size_per_gpu"] = int(batch_size)
    if asked["train_batch_size"] == "auto":
        ds["train_batch_size"] = int(ds["train_micro_batch_size_per_gpu"]) * accelerator.num_processes
    return None


@contextlib.contextmanager
def accumulation_boundary(accelerator: Any, last: bool) -> Iterator[None]:
    """Within this context ``accelerator.backward`` is told whether it ends an optimiser step
    (``last``). Under DeepSpeed, accelerate steps the engine after every backward unless
    ``sync_gradients`` is false (and ``no_sync`` does nothing under ZeRO-2/3), so a micro-batch
    that does not complete the accumulation must say so; the engine then clips, steps and zeroes
    inside the backward of the last one. Nothing changes under the other engines."""
    if engine_of(accelerator) != DEEPSPEED:
        yield
        return
    accelerator.gradient_state._set_sync_gradients(last)
    try:
        yield
    finally:
        accelerator.gradient_state._set_sync_gradients(True)


def base_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The ``torch.optim`` optimiser inside accelerate's (and DeepSpeed's) wrappers: its
    parameter groups carry the learning rate a scheduler sets."""
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def adopt_cpu_fsdp(accelerator: Any) -> None:
    """Run the FSDP the launch asked for on CPU processes too (accelerate would train DDP).

    ``accelerate launch`` with an FSDP configuration sets ``ACCELERATE_USE_FSDP=true`` and the
    plugin's ``FSDP_*`` variables in every process; on CPU, ``AcceleratorState`` ignores them
    (accelerate/state.py picks FSDP only for accelerator devices). The distributed type is set on
    both shared states (each ``AcceleratorState()`` copies ``PartialState``'s over its own)."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if (os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true" or accelerator.device.type != "cpu"
            or accelerator.distributed_type != DistributedType.MULTI_CPU):
        return
    plugin = FullyShardedDataParallelPlugin()  # read from the launch's FSDP_* environment
    if plugin.fsdp_version != 2:
        return  # engine_problem refuses it with the reason
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState().distributed_type = DistributedType.FSDP


def engine_problem(accelerator: Any, *, compile: bool) -> str | None:
    """Why the engine this launch asked for cannot train (``compile``: ``model.compile`` asked
    for), or None. What was asked is honoured or refused, never replaced by another engine."""
    engine = engine_of(accelerator)
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        if engine != FSDP and accelerator.device.type == "cpu" and accelerator.num_processes > 1:
            return ("FSDP version 1 is not supported: set fsdp_version: 2 in the accelerate config (FSDP2, "
                    "fully_shard), as configs/accelerate/fsdp.yaml does")
        if engine != FSDP:
            return (f"this launch asked for FSDP, but accelerate set up {engine!r} on {accelerator.device.type} with "
                    f"{accelerator.num_processes} process(es): FSDP on CPU needs at least 2 processes")
        if not accelerator.is_fsdp2:
            return ("FSDP version 1 is not supported: set fsdp_version: 2 in the accelerate config (FSDP2, "
                    "fully_shard), as configs/accelerate/fsdp.yaml does")
        if compile:
            return "model.compile with FSDP is not supported yet: leave model.compile false under an FSDP launch"
    if deepspeed_launch() or engine == DEEPSPEED:
        if engine != DEEPSPEED:
            hint = (": accelerate starts DeepSpeed only without --cpu and ACCELERATE_USE_CPU"
                    if os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("true", "1", "yes") else "")
            return (f"this launch asked for DeepSpeed, but accelerate set up {engine!r} on {accelerator.device.type} "
                    f"with {accelerator.num_processes} process(es){hint}")
        if compile:
            return "model.compile with DeepSpeed is not supported yet: leave model.compile false under a DeepSpeed launch"
    return None


def shard_frozen(accelerator: Any, module: torch.nn.Module) -> torch.nn.Module:
    """``module`` (frozen, forward only: the reference UNet of full fine-tuning) sharded like the
    trained model, 1/N of it per process.

    * FSDP2: prepared like the policy; its root is told to reshard after each forward too (FSDP2
      keeps the root's parameters gathered for the backward that never comes).
    * ZeRO-3: an inference engine of its own (``deepspeed.initialize`` with the launch's ZeRO-3
      settings and no optimiser; accelerate ties one engine to one ``Accelerator``). Its
      parameters are gathered layer by layer in each forward, as the policy's.
    * ZeRO-2 (which shards no weights): ``module`` whole on every process, in the dtype DeepSpeed
      gives the policy (``bf16`` / ``fp16``; else as it is).
    * otherwise: ``module`` as it is."""
    if engine_of(accelerator) == FSDP:
        prepared = accelerator.prepare(module)
        prepared.set_reshard_after_forward(True, recurse=False)
        return prepared
    if zero_stage(accelerator) != 3:
        dtype = _deepspeed_dtype(accelerator)
        return module.to(dtype) if dtype is not None else module  # the policy's dtype: DeepSpeed casts it
    import deepspeed

    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    config = {"train_micro_batch_size_per_gpu": ds["train_micro_batch_size_per_gpu"],
              "train_batch_size": ds["train_batch_size"], "gradient_accumulation_steps": 1,
              "zero_optimization": {k: v for k, v in ds["zero_optimization"].items()
                                    if not k.startswith("offload_optimizer")},
              **{k: ds[k] for k in ("fp16", "bf16") if k in ds}}
    engine, *_ = deepspeed.initialize(model=module, config=config)
    engine.eval()
    return engine.module


def _deepspeed_dtype(accelerator: Any) -> torch.dtype | None:
    """The dtype DeepSpeed casts the trained model to (its ``bf16`` / ``fp16`` sections), or None."""
    if engine_of(accelerator) != DEEPSPEED:
        return None
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    for key, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if str(ds.get(key, {}).get("enabled", False)).lower() == "true":
            return dtype
    return None


#: the attribute naming a module's scalar parameters held as 1-element vectors under FSDP
_SCALARS = "_spo_fsdp_scalars"


def prepare_for_fsdp(accelerator: Any, module: torch.nn.Module) -> None:
    """Make a model of ours (the SPM, the LRM: plain ``nn.Module`` wrappers around CLIP or a
    UNet) fit FSDP2, before ``accelerator.prepare``:

    * the blocks to shard one by one: the union of its submodules' ``_no_split_modules`` (as
      diffusers and transformers models declare them; accelerate's TRANSFORMER_BASED_WRAP reads
      that list, unless the launch names classes). Without it, the whole model would be one
      unit, gathered whole;
    * scalar parameters (CLIP's ``logit_scale``), which ``fully_shard`` refuses, become
      1-element vectors (the score broadcasts the same); :func:`full_state` and
      :func:`full_optimizer_state` give them back their shape, so files do not change."""
    plugin = accelerator.state.fsdp_plugin
    if not os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP"):  # the launch named none: this model's own
        plugin.transformer_cls_names_to_wrap = None  # (accelerate keeps the first model's list)
    if not getattr(module, "_no_split_modules", None):
        names: list[str] = []
        for sub in module.modules():
            for name in getattr(sub, "_no_split_modules", None) or []:
                if name not in names:
                    names.append(name)
        module._no_split_modules = names  # type: ignore[assignment]
    hold_scalars(module)


def hold_scalars(module: torch.nn.Module) -> None:
    """Hold ``module``'s scalar parameters (CLIP's ``logit_scale``) as 1-element vectors, which
    FSDP2 shards and DeepSpeed broadcasts (both refuse 0-dimensional ones); the score broadcasts
    the same. :func:`full_state` and :func:`full_optimizer_state` give them back their shape."""
    scalars = []
    for name, p in module.named_parameters():
        if p.ndim == 0:
            p.data = p.data.reshape(1)
            scalars.append(name)
    setattr(module, _SCALARS, scalars)


def _scalars(module: torch.nn.Module) -> list[str]:
    return list(getattr(module, _SCALARS, []))


def _reshape_optimizer_state(state: dict[str, Any], names: list[str], shape: tuple[int, ...]) -> dict[str, Any]:
    """AdamW's moments of the scalar parameters ``names`` in ``shape`` (the step count untouched)."""
    for name in names:
        entry = state.get("state", {}).get(name)
        if entry:
            for key, value in entry.items():
                if key != "step" and isinstance(value, torch.Tensor) and value.numel() == 1:
                    entry[key] = value.reshape(shape)
    return state


def trainable_parameters(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """``module``'s trainable parameters by name. Read after ``accelerator.prepare``: FSDP2
    replaces every parameter object (the ones taken before are no longer the model's)."""
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def _options(**kwargs: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def gathers(accelerator: Any) -> bool:
    """Whether the weights must be gathered (:func:`full_state`, a collective) before they are
    saved: under FSDP2 (shards) and DeepSpeed (the fp32 master weights live in the ZeRO
    optimiser's partitions; under mixed precision the module holds 16-bit copies)."""
    return engine_of(accelerator) in (FSDP, DEEPSPEED)


def full_state(accelerator: Any, module: torch.nn.Module, names: list[str] | set[str]) -> dict[str, torch.Tensor]:
    """The parameters ``names`` of ``module`` as full CPU tensors on the main process (``{}`` on
    the others under FSDP and DeepSpeed; every process's own copy otherwise). A collective under
    FSDP and DeepSpeed: every process must call it."""
    names = set(names)
    if engine_of(accelerator) == DEEPSPEED:
        return _deepspeed_full_state(accelerator, module, names)
    if not sharded(accelerator):
        return {n: p.detach() for n, p in module.named_parameters() if n in names}
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    reshard(module)
    state = get_model_state_dict(module, options=_options(cpu_offload=True, ignore_frozen_params=len(names) > 0
                                                          and _all_trainable(module, names)))
    state = {n: v for n, v in state.items() if n in names}
    for name in _scalars(module):
        if name in state:
            state[name] = state[name].reshape(())
    return state


def reshard(module: torch.nn.Module) -> None:
    """Free FSDP's unsharded parameters. FSDP2 leaves the root module's unsharded after a
    forward without a backward (previews, sampling), to spare the all-gather a backward would
    repeat; its parameters are then plain views of a buffer that a later reshard frees, so a
    state dict taken meanwhile would hold dead storage. No-op for an unsharded module."""
    from torch.distributed.fsdp import FSDPModule

    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.reshard()


def _all_trainable(module: torch.nn.Module, names: set[str]) -> bool:
    return all(p.requires_grad for n, p in module.named_parameters() if n in names)


def full_optimizer_state(accelerator: Any, module: torch.nn.Module, optimizer: Any) -> dict[str, Any]:
    """``optimizer``'s state keyed by parameter name, full tensors on the main process (``{}``
    on the others under FSDP and DeepSpeed). A collective under FSDP and DeepSpeed."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    if engine_of(accelerator) == DEEPSPEED:
        return _deepspeed_optimizer_state(accelerator, module, optimizer)
    inner = getattr(optimizer, "optimizer", optimizer)
    if not sharded(accelerator):
        return get_optimizer_state_dict(module, inner, options=_options())
    reshard(module)
    state = get_optimizer_state_dict(module, inner, options=_options(cpu_offload=True))
    return _reshape_optimizer_state(state, _scalars(module), ())


def load_full_state(accelerator: Any, module: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Copy ``saved`` (full tensors, by name; read by the main process, ``{}`` elsewhere under
    FSDP; read by every process otherwise) into ``module``'s parameters of those names. A
    collective under FSDP and DeepSpeed."""
    if engine_of(accelerator) == DEEPSPEED:
        _deepspeed_load_state(accelerator, module, saved)
        return
    if not sharded(accelerator):
        params = dict(module.named_parameters())
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value.to(params[name].device, params[name].dtype))
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    reshard(module)
    saved = {n: v.reshape(1) if n in _scalars(module) else v for n, v in saved.items()}
    set_model_state_dict(module, saved if accelerator.is_main_process else {},
                         options=_options(broadcast_from_rank0=True, strict=False))


def load_full_optimizer_state(accelerator: Any, module: torch.nn.Module, optimizer: Any, saved: dict[str, Any]) -> None:
    """Restore ``optimizer`` from :func:`full_optimizer_state`'s dict (``{}`` on the processes
    other than the main one under FSDP). A collective under FSDP and DeepSpeed."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    if engine_of(accelerator) == DEEPSPEED:
        _deepspeed_load_optimizer_state(module, optimizer, saved)
        return
    inner = getattr(optimizer, "optimizer", optimizer)
    if not sharded(accelerator):
        set_optimizer_state_dict(module, inner, saved, options=_options())
        return
    if accelerator.is_main_process:
        saved = _reshape_optimizer_state(saved, _scalars(module), (1,))
    set_optimizer_state_dict(module, inner, saved if accelerator.is_main_process else {},
                             options=_options(broadcast_from_rank0=True))


def _deepspeed_full_state(accelerator: Any, module: torch.nn.Module, names: set[str]) -> dict[str, torch.Tensor]:
    """:func:`full_state` under DeepSpeed: each trained weight from the ZeRO optimiser's fp32
    partitions (``safe_get_full_fp32_param``, an all-reduce), each frozen one as the module holds
    it (gathered under ZeRO-3). Every process walks the parameters in the same order."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    out: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters():
        if name not in names:
            continue
        value = safe_get_full_fp32_param(p) if p.requires_grad else None
        if value is None:
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None, enabled=hasattr(p, "ds_id")):
                value = p.detach().clone()
        if accelerator.is_main_process:
            out[name] = value.detach().to("cpu", copy=True)
            if name in _scalars(module):
                out[name] = out[name].reshape(())
    return out


def _deepspeed_load_state(accelerator: Any, module: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """:func:`load_full_state` under DeepSpeed (``saved`` read by every process): the fp32
    partition of each trained weight, and the module's own copy (under ZeRO-3 through a gather
    that the main process fills and every process re-partitions)."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_local_fp32_param

    for name, p in module.named_parameters():
        if name not in saved:
            continue
        value = saved[name].to(p.device, torch.float32)
        if p.requires_grad and hasattr(p, "ds_id"):
            safe_set_local_fp32_param(p, _zero3_partition(p, value))
        elif p.requires_grad:
            safe_set_full_fp32_param(p, value)
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0, enabled=hasattr(p, "ds_id")), torch.no_grad():
            if accelerator.is_main_process or not hasattr(p, "ds_id"):
                p.data.copy_(value.reshape(p.shape).to(p.dtype))


def _zero3_partition(p: torch.nn.Parameter, value: torch.Tensor) -> torch.Tensor:
    """This process's partition of the whole tensor ``value`` of the ZeRO-3 parameter ``p``:
    ``p.ds_tensor.numel()`` elements, the last partition padded with zeros as ZeRO-3 pads it.
    (DeepSpeed's own ``safe_set_full_*`` cuts past the end of a padded one.)"""
    import torch.distributed as dist

    size = p.ds_tensor.numel()
    rank = dist.get_rank(group=getattr(p, "ds_process_group", None))  # its rank among the partitions
    flat = value.flatten()
    part = torch.zeros(size, dtype=flat.dtype, device=flat.device)
    piece = flat[rank * size : (rank + 1) * size]
    part[: piece.numel()] = piece
    return part


def _zero_optimizer(module_optimizer: Any) -> Any:
    """DeepSpeed's ZeRO optimiser inside accelerate's wrapper (it holds the fp32 partitions)."""
    optimizer = module_optimizer
    while hasattr(optimizer, "optimizer") and not hasattr(optimizer, "_link_all_hp_params"):
        optimizer = optimizer.optimizer
    return optimizer


def _zero2_internals(zero: Any) -> Any:
    """``zero`` (DeepSpeed's ZeRO-1/2 optimiser), after checking that it has the private members
    the checkpoint code relies on (DeepSpeed 0.19; failing loudly rather than restoring half)."""
    missing = [a for a in ("_hp_optimizer_states_linked", "_lazy_init_hp_params_optimizer_state",
                           "single_partition_of_fp32_groups") if not hasattr(zero, a)]
    if missing:
        import deepspeed

        raise RuntimeError(f"DeepSpeed {deepspeed.__version__}'s ZeRO-2 optimiser lacks {missing}: SPO's checkpoints "
                           "were written for DeepSpeed 0.19")
    return zero


def loss_scale_state(accelerator: Any, optimizer: Any) -> dict[str, Any] | None:
    """The fp16 loss scaler's state, for an exact resume: accelerate's ``GradScaler``, or under
    DeepSpeed its ZeRO optimiser's dynamic scaler (which accelerate does not hold); None when
    there is none (fp32, bf16)."""
    if engine_of(accelerator) == DEEPSPEED:
        scaler = getattr(_zero_optimizer(optimizer), "loss_scaler", None)
        if scaler is None or not getattr(scaler, "dynamic", False):
            return None
        return {"deepspeed": {k: getattr(scaler, k) for k in _DEEPSPEED_SCALER if hasattr(scaler, k)}}
    scaler = getattr(accelerator, "scaler", None)
    return None if scaler is None else scaler.state_dict()


#: what DeepSpeed's DynamicLossScaler changes as it trains
_DEEPSPEED_SCALER = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def load_loss_scale_state(accelerator: Any, optimizer: Any, state: dict[str, Any]) -> None:
    """Restore :func:`loss_scale_state`."""
    if "deepspeed" in state:
        scaler = getattr(_zero_optimizer(optimizer), "loss_scaler", None)
        if scaler is None:
            raise ValueError("the checkpoint holds DeepSpeed's fp16 loss scale, but this run has no loss scaler")
        for key, value in state["deepspeed"].items():
            setattr(scaler, key, value)
    elif getattr(accelerator, "scaler", None) is not None:
        accelerator.scaler.load_state_dict(state)


def _deepspeed_optimizer_state(accelerator: Any, module: torch.nn.Module, optimizer: Any) -> dict[str, Any]:
    """:func:`full_optimizer_state` under DeepSpeed, in the format of
    ``torch.distributed.checkpoint``'s full optimiser state dict: AdamW's moments of each trained
    weight assembled from the ZeRO partitions (``safe_get_full_optimizer_state``), its step
    count, and the group's hyperparameters. Empty before the first optimiser step."""
    from deepspeed.utils import safe_get_full_optimizer_state

    inner = base_optimizer(optimizer)
    if len(inner.param_groups) != 1:
        raise NotImplementedError("checkpoints under DeepSpeed hold one parameter group")
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    group = {k: v for k, v in inner.param_groups[0].items() if k != "params"}
    entries = [s for s in inner.state.values() if s]
    if not entries:
        return {"state": {}, "param_groups": [{**group, "params": names}]}
    keys = sorted(k for k, v in entries[0].items() if k != "step" and torch.is_tensor(v) and v.ndim > 0)
    zero = _zero_optimizer(optimizer)
    if zero_stage(accelerator) == 2:  # ZeRO-2 links the moments to the parameters on first use
        _zero2_internals(zero)._lazy_init_hp_params_optimizer_state()
    step = entries[0]["step"]
    state: dict[str, Any] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        moments = {k: safe_get_full_optimizer_state(p, k) for k in keys}
        if accelerator.is_main_process:
            state[name] = {"step": step.detach().clone().cpu() if torch.is_tensor(step) else step,
                           **{k: v.detach().to("cpu", copy=True) for k, v in moments.items()}}
    if not accelerator.is_main_process:
        return {}
    return _reshape_optimizer_state({"state": state, "param_groups": [{**group, "params": names}]}, _scalars(module), ())


def _deepspeed_load_optimizer_state(module: torch.nn.Module, optimizer: Any, saved: dict[str, Any]) -> None:
    """:func:`load_full_optimizer_state` under DeepSpeed (``saved`` read by every process): the
    group's hyperparameters, then AdamW's moments scattered into each process's partitions. A
    fresh engine has no state yet (AdamW makes it at its first step): it is made here, zero,
    with the saved step count, then filled."""
    from deepspeed.utils import safe_set_full_optimizer_state, safe_set_local_optimizer_state

    inner = base_optimizer(optimizer)
    for key, value in saved["param_groups"][0].items():
        if key != "params":
            inner.param_groups[0][key] = value
    state = saved.get("state") or {}
    if not state:
        return
    first = next(iter(state.values()))
    keys = [k for k in first if k != "step"]
    zero = _zero_optimizer(optimizer)
    stage3 = hasattr(zero, "fp32_partitioned_groups_flat")
    # the fp32 partitions AdamW steps (ZeRO-3 hands them to it one sub-group at a time)
    flats = getattr(zero, "fp32_partitioned_groups_flat", None) or zero.single_partition_of_fp32_groups
    for flat in flats:
        entry = inner.state[flat]
        entry["step"] = first["step"].clone() if torch.is_tensor(first["step"]) else first["step"]
        for key in keys:
            if key not in entry:
                entry[key] = torch.zeros_like(flat, memory_format=torch.preserve_format)
    if not stage3:  # ZeRO-2: (re)link the moments just made
        _zero2_internals(zero)._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()
    for name, p in module.named_parameters():
        if p.requires_grad and name in state:  # (a weight that never had a gradient has no moments: zero)
            for key in keys:
                value = state[name][key].to(p.device, torch.float32)
                if hasattr(p, "ds_id"):
                    safe_set_local_optimizer_state(p, _zero3_partition(p, value), key)
                else:
                    safe_set_full_optimizer_state(p, value, key)


def local_grads(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """This process's gradients (its shard of each under FSDP), by name. (Under DeepSpeed the
    accumulated gradients live in ZeRO's buffers: the SPO trainer replays the open
    accumulation's micro-batches instead, see ``SPOTrainer.checkpoint``.)"""
    out = {}
    for name, p in params.items():
        if p.grad is not None:
            grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            out[name] = grad.detach()
    return out


def set_local_grads(params: dict[str, torch.nn.Parameter], grads: dict[str, torch.Tensor]) -> None:
    """Restore :func:`local_grads` (parameters without a saved gradient get none)."""
    for name, p in params.items():
        if name not in grads:
            p.grad = None
            continue
        if hasattr(p, "to_local"):  # a DTensor: this process's shard of the gradient
            grad = torch.zeros_like(p)
            grad.to_local().copy_(grads[name].to(grad.dtype))
            p.grad = grad
        else:
            p.grad = grads[name].to(p.device, p.dtype)

