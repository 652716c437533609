"""The distributed engine a run trains under, as accelerate chose it from the launch: one
process, DDP, or PyTorch FSDP2 (``accelerate launch --config_file configs/accelerate/fsdp.yaml``).

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
* :func:`local_grads` / :func:`set_local_grads`: each process's own gradients (its shard under
  FSDP), for a checkpoint inside an open accumulation (``train.carry_accumulation``).

accelerate 1.16 turns an FSDP launch on CPU into plain DDP without a word (its state picks
FSDP only on accelerator devices); :func:`adopt_cpu_fsdp` honours the launch instead, which is
how the CPU tests run FSDP on gloo. FSDP1 is refused (:func:`engine_problem`): its LoRA-only
gradient clipping would norm local shards only, and accelerate cannot start it on CPU.
"""

from __future__ import annotations

import os
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


def sharded(accelerator: Any) -> bool:
    """Whether the models' parameters are split across processes: every forward is then a
    collective that every process must take part in."""
    return engine_of(accelerator) == FSDP


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
    if engine == DEEPSPEED or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return ("DeepSpeed is not supported yet (docs/scale-out.md says why): launch with "
                "configs/accelerate/fsdp.yaml (FSDP2) to shard the model, or ddp.yaml")
    return None


def shard_frozen(accelerator: Any, module: torch.nn.Module) -> torch.nn.Module:
    """``module`` (frozen, forward only: the reference UNet of full fine-tuning) sharded like the
    trained model, 1/N of it per process. Its root is told to reshard after each forward too:
    FSDP2 keeps the root's parameters gathered for the backward that never comes."""
    prepared = accelerator.prepare(module)
    prepared.set_reshard_after_forward(True, recurse=False)
    return prepared


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


def full_state(accelerator: Any, module: torch.nn.Module, names: list[str] | set[str]) -> dict[str, torch.Tensor]:
    """The parameters ``names`` of ``module`` as full CPU tensors on the main process (``{}`` on
    the others under FSDP; every process's own copy otherwise). A collective under FSDP: every
    process must call it."""
    names = set(names)
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
    on the others under FSDP). A collective under FSDP."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    inner = getattr(optimizer, "optimizer", optimizer)
    if not sharded(accelerator):
        return get_optimizer_state_dict(module, inner, options=_options())
    reshard(module)
    state = get_optimizer_state_dict(module, inner, options=_options(cpu_offload=True))
    return _reshape_optimizer_state(state, _scalars(module), ())


def load_full_state(accelerator: Any, module: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Copy ``saved`` (full tensors, by name; read by the main process, ``{}`` elsewhere under
    FSDP) into ``module``'s parameters of those names. A collective under FSDP."""
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
    other than the main one under FSDP). A collective under FSDP."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    inner = getattr(optimizer, "optimizer", optimizer)
    if not sharded(accelerator):
        set_optimizer_state_dict(module, inner, saved, options=_options())
        return
    if accelerator.is_main_process:
        saved = _reshape_optimizer_state(saved, _scalars(module), (1,))
    set_optimizer_state_dict(module, inner, saved if accelerator.is_main_process else {},
                             options=_options(broadcast_from_rank0=True))


def local_grads(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """This process's gradients (its shard of each under FSDP), by name."""
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

