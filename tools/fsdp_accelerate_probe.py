"""Run under `accelerate launch` (2 gloo CPU processes): what accelerate's FSDP does with a tiny
diffusers UNet2DConditionModel carrying a peft LoRA adapter (only the LoRA trainable).

Groundwork for issue 24 (its findings are in docs/scale-out.md). Usage::

    ACCELERATE_USE_CPU=true OMP_NUM_THREADS=1 python -m accelerate.commands.launch \\
        --config_file configs/accelerate/fsdp.yaml --main_process_port 29631 \\
        tools/fsdp_accelerate_probe.py TINY_SD15 OUT [--force-fsdp] [--finetune lora|full]

``TINY_SD15``: ``spo tiny-pipeline sd15 DIR``. Each rank writes ``OUT/rank-R.json`` and prints one
``RANK R: ...`` summary line. What it records:

* the accelerator's ``distributed_type`` as launched, and whether FSDP took effect;
* ``--force-fsdp``: on CPU accelerate drops the FSDP plugin (its state picks FSDP only on an
  accelerator device, ``MULTI_CPU`` otherwise); this flag sets ``distributed_type = FSDP`` and the
  plugin on the shared states (AcceleratorState's and PartialState's) by hand after ``Accelerator()``, to see whether the rest of
  accelerate's FSDP path (``prepare``, ``clip_grad_norm_``, ``no_sync``, ``get_state_dict``) works on
  CPU once chosen;
* after ``prepare(unet, optimizer)``: the wrapper class, which parameters are DTensors and their
  local (shard) shapes, frozen base weights included; whether the parameter objects the trainer
  held before ``prepare`` are still the module's and the optimizer's;
* one optimizer step of two micro-batches (the first under ``no_sync``), gradient clipping through
  ``accelerator.clip_grad_norm_`` with the LoRA parameters only (what the trainer passes), the
  reference output with adapters disabled on the same wrapped module;
* the full LoRA on rank 0 (``accelerator.get_state_dict`` and ``get_peft_model_state_dict``) and its
  difference from the same step without FSDP on one process over both ranks' micro-batches (what
  DDP computes);
* the full optimizer state (``get_optimizer_state_dict``) and its round trip into a second copy;
* ``--finetune lora``: the full LoRA of rank 0 loaded back (``set_model_state_dict``,
  ``broadcast_from_rank0``, ``strict=False``) after the sharded LoRA was zeroed;
  ``--finetune full``: a frozen reference copy prepared on its own (sharded, no optimizer).

Found (accelerate 1.16.0, torch 2.13.0+cpu, diffusers 0.42.1, peft 0.21.2): launched with
configs/accelerate/fsdp.yaml the run is ``MULTI_CPU`` DDP (FSDP silently dropped). With
``--force-fsdp`` accelerate's FSDP2 path works on CPU: the UNet becomes ``FSDPUNet2DConditionModel``
in place, every parameter (frozen base weights too) a DTensor sharded on dim 0, the parameter objects
taken before ``prepare`` are no longer the module's (0 of 64) while the optimizer's are remapped;
``clip_grad_norm_`` with the new LoRA parameters gives the plain result, with the old ones 0.0;
after a ``no_sync`` backward no parameter has a ``.grad``; ``get_state_dict`` is full on rank 0
and empty elsewhere, ``get_peft_model_state_dict`` gives DTensor shards unless handed the full
state dict; one AdamW step equals the plain step to 1.6e-7 (LoRA) / 2.2e-6 (full).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import traceback
import zlib
from pathlib import Path

import torch

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def load_unet(path: str, finetune: str) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=torch.float32)
    if finetune == "full":
        return unet.requires_grad_(True)
    unet.requires_grad_(False)
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS, init_lora_weights="gaussian"),
                     adapter_name="spo")
    for n, p in unet.named_parameters():
        if "lora_" in n:
            p.requires_grad_(True)
    with torch.no_grad():  # B != 0, so the adapter changes the output from the start
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(zlib.crc32(n.encode())))
    return unet


def micro_batches(unet: torch.nn.Module, rank: int, step: int = 0) -> list[dict[str, torch.Tensor]]:
    c = unet.config
    g = torch.Generator().manual_seed(1000 + rank + 100 * step)
    out = []
    for _ in range(2):
        out.append({"sample": torch.randn(2, c.in_channels, c.sample_size, c.sample_size, generator=g),
                    "timestep": torch.randint(0, 1000, (2,), generator=g),
                    "encoder_hidden_states": torch.randn(2, 7, c.cross_attention_dim, generator=g)})
    return out


def loss_of(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch, return_dict=False)[0].pow(2).mean()


def local_shape(p: torch.Tensor) -> list[int]:
    return list(p.to_local().shape) if hasattr(p, "to_local") else list(p.shape)


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--force-fsdp", action="store_true")
    parser.add_argument("--finetune", choices=["lora", "full"], default="lora")
    parser.add_argument("--sync-every-micro-batch", action="store_true",
                        help="no no_sync: gradients reduced after each micro-batch (then held, sharded, in p.grad)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    acc = Accelerator(cpu=True, mixed_precision="no")
    rank, world = acc.process_index, acc.num_processes
    report: dict = {"rank": rank, "world": world, "launched_distributed_type": str(acc.distributed_type),
                    "ACCELERATE_USE_FSDP": os.environ.get("ACCELERATE_USE_FSDP"),
                    "FSDP_VERSION": os.environ.get("FSDP_VERSION")}
    try:
        if args.force_fsdp and acc.distributed_type != DistributedType.FSDP:
            plugin = FullyShardedDataParallelPlugin()  # from the launch's FSDP_* environment
            acc.state.distributed_type = DistributedType.FSDP
            acc.state.fsdp_plugin = plugin
            # every AcceleratorState() call copies PartialState's shared dict over its own: set both
            PartialState().distributed_type = DistributedType.FSDP
            report["forced"] = {"fsdp_version": plugin.fsdp_version, "auto_wrap_policy": str(plugin.auto_wrap_policy),
                                "reshard_after_forward": str(plugin.reshard_after_forward),
                                "use_orig_params": plugin.use_orig_params, "state_dict_type": str(plugin.state_dict_type)}
        report["distributed_type"] = str(acc.distributed_type)
        report["is_fsdp2"] = bool(acc.distributed_type == DistributedType.FSDP and acc.is_fsdp2)

        unet = load_unet(args.model, args.finetune)
        batches = micro_batches(unet, rank)
        with torch.no_grad():  # the base model's output (the reference) before anything is wrapped
            if args.finetune == "lora":
                unet.disable_adapters()
            base_out = unet(**batches[0], return_dict=False)[0].clone()
            if args.finetune == "lora":
                unet.enable_adapters()
        params = [p for p in unet.parameters() if p.requires_grad]
        reference = None
        if args.finetune == "full":  # a frozen copy, sharded on its own (prepare without an optimizer)
            import copy

            reference = copy.deepcopy(unet).requires_grad_(False).eval()
        opt = torch.optim.AdamW(params, lr=1e-3)
        model, opt = acc.prepare(unet, opt)
        if reference is not None:
            reference = acc.prepare(reference)
            ref_params = list(reference.parameters())
            report["reference_prepared"] = {
                "class": type(reference).__name__,
                "local_numel": sum(torch.Size(local_shape(p)).numel() for p in ref_params),
                "global_numel": sum(p.numel() for p in ref_params)}
            with torch.no_grad():
                report["reference_prepared"]["output_minus_base"] = float(
                    (reference(**batches[0], return_dict=False)[0] - base_out).abs().max())
        named = dict(model.named_parameters())
        report.setdefault("distributed_type_trace", []).append(("after prepare", str(acc.distributed_type)))
        frozen = next(n for n, p in named.items() if not p.requires_grad) if args.finetune == "lora" else None
        lora = next(n for n, p in named.items() if p.requires_grad)
        report["prepared"] = {
            "class": type(model).__name__, "module_is_original": model is unet,
            "unwrap_is_original": acc.unwrap_model(model) is unet,
            "param_types": sorted({type(p.data).__name__ if not hasattr(p, "to_local") else "DTensor" for p in named.values()}),
            "frozen_param": frozen, "frozen_global_shape": list(named[frozen].shape) if frozen else None,
            "frozen_local_shape": local_shape(named[frozen]) if frozen else None,
            "lora_param": lora, "lora_global_shape": list(named[lora].shape) if lora in named else None,
            "lora_local_shape": local_shape(named[lora]) if lora in named else None,
            "named_param_keys_sample": list(named)[:2],
            "trainable_after_prepare": sum(p.requires_grad for p in named.values()),
            "trainable_before_prepare": len(params),
            "old_param_objects_still_in_module": sum(any(p is q for q in named.values()) for p in params),
            "optimizer_params_are_module_params": all(any(p is q for q in named.values())
                                                      for g in opt.optimizer.param_groups for p in g["params"]),
            "local_numel": sum(local_shape(p) and torch.Size(local_shape(p)).numel() for p in named.values()),
            "global_numel": sum(p.numel() for p in named.values()),
        }
        new_params = [p for p in model.parameters() if p.requires_grad]
        report.setdefault("distributed_type_trace", []).append(("before step", str(acc.distributed_type)))

        # one optimizer step: micro-batch 1 under no_sync, micro-batch 2 synchronised
        model.train()
        with (contextlib.nullcontext() if args.sync_every_micro_batch else acc.no_sync(model)):
            acc.backward(loss_of(model, batches[0]) / 2)
        # what a checkpoint in the middle of an accumulation (train.carry_accumulation) could save
        report["grads_visible_after_no_sync_backward"] = sum(p.grad is not None for p in new_params)
        acc.backward(loss_of(model, batches[1]) / 2)
        # what the trainer does today: the parameter list it took before prepare()
        report["clip_grad_norm_with_pre_prepare_params"] = float(full(acc.clip_grad_norm_(params, 1.0)))
        norm = acc.clip_grad_norm_(new_params, 1.0)
        report["grad_norm"] = float(full(norm))
        report["grad_norm_type"] = type(norm).__name__
        opt.step()
        opt.zero_grad(set_to_none=True)

        report.setdefault("distributed_type_trace", []).append(("after step", str(acc.distributed_type)))
        # the reference: the same wrapped module with its adapters off
        if args.finetune == "lora":
            with torch.no_grad():
                acc.unwrap_model(model).disable_adapters()
                ref = model(**batches[0], return_dict=False)[0]
                acc.unwrap_model(model).enable_adapters()
                pol = model(**batches[0], return_dict=False)[0]
            report["reference_minus_base"] = float((ref - base_out).abs().max())
            report["policy_minus_base"] = float((pol - base_out).abs().max())

        # full weights: accelerate's get_state_dict (rank 0) and peft's
        from peft.utils import get_peft_model_state_dict

        report.setdefault("distributed_type_trace", []).append(("before get_state_dict", str(acc.distributed_type)))
        state = acc.get_state_dict(model)
        report["get_state_dict"] = {"keys": len(state), "types": sorted({type(v).__name__ for v in state.values()})}
        if acc.distributed_type == DistributedType.FSDP:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            for name, options in (("full+cpu_offload", dict(full_state_dict=True, cpu_offload=True)),
                                  ("full+cpu_offload+broadcast", dict(full_state_dict=True, cpu_offload=True,
                                                                      broadcast_from_rank0=True)),
                                  ("full", dict(full_state_dict=True))):
                sd = get_model_state_dict(model, options=StateDictOptions(**options))
                report[f"get_model_state_dict[{name}]"] = {"keys": len(sd), "types": sorted({type(v).__name__ for v in sd.values()})}
            state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        lora_full = {k: v for k, v in state.items() if "lora_" in k} if args.finetune == "lora" else state
        if args.finetune == "lora":
            peft_sd = get_peft_model_state_dict(acc.unwrap_model(model), adapter_name="spo")
            report["peft_state_dict"] = {"keys": len(peft_sd), "types": sorted({type(v).__name__ for v in peft_sd.values()}),
                                         "sample": next(iter(peft_sd)),
                                         "local_vs_full_shape": [local_shape(next(iter(peft_sd.values()))),
                                                                 list(next(iter(peft_sd.values())).shape)]}
            if acc.distributed_type == DistributedType.FSDP and state:  # peft's keys from the gathered weights
                full_peft = get_peft_model_state_dict(acc.unwrap_model(model), state_dict=state, adapter_name="spo")
                report["peft_state_dict_from_full"] = {
                    "keys": len(full_peft), "types": sorted({type(v).__name__ for v in full_peft.values()}),
                    "same_keys_as_sharded": sorted(full_peft) == sorted(peft_sd),
                    "shapes_full": all(list(full_peft[k].shape) == list(peft_sd[k].shape) for k in full_peft)}
        digest = torch.tensor([sum(float(v.double().sum()) for v in lora_full.values())], dtype=torch.float64)
        report["lora_digest_all_ranks"] = acc.gather(digest).tolist()

        # the same step without FSDP, one process over both ranks' micro-batches (DDP's arithmetic)
        if rank == 0 and state:
            plain = load_unet(args.model, args.finetune)
            p_params = [p for p in plain.parameters() if p.requires_grad]
            p_opt = torch.optim.AdamW(p_params, lr=1e-3)
            for r in range(world):
                for b in micro_batches(plain, r):
                    (loss_of(plain, b) / (2 * world)).backward()
            report["plain_grad_norm"] = float(torch.nn.utils.clip_grad_norm_(p_params, 1.0))
            p_opt.step()
            plain_sd = plain.state_dict()
            report["max_abs_fsdp_minus_plain"] = max(float((v - plain_sd[k]).abs().max()) for k, v in lora_full.items())

        # the optimizer state, full on rank 0, and back into a second copy
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict,
        )

        if acc.distributed_type == DistributedType.FSDP:
            osd = get_optimizer_state_dict(model, opt.optimizer,
                                           options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            report["optimizer_full_state"] = {"params": len(osd.get("state", {})),
                                              "sample_key": next(iter(osd.get("state", {})), None)}
            buffer = io.BytesIO()
            torch.save(osd, buffer)
            osd = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
            set_optimizer_state_dict(model, opt.optimizer, osd,
                                     options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
            report["optimizer_round_trip"] = "ok"
        else:
            report["optimizer_state_dict_keys_sample"] = list(opt.state_dict()["state"])[:2]
        # resume of the trainable weights: the full LoRA (rank 0's) back into the sharded module
        if acc.distributed_type == DistributedType.FSDP and args.finetune == "lora":
            from torch.distributed.checkpoint.state_dict import set_model_state_dict

            saved = {k: v.clone() for k, v in lora_full.items()} if rank == 0 else {}
            with torch.no_grad():
                for p in new_params:
                    p.zero_()
            set_model_state_dict(model, saved, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                                        strict=False))
            back = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if rank == 0:
                report["lora_resume_max_diff"] = max(float((back[k] - lora_full[k]).abs().max()) for k in lora_full)
            with torch.no_grad():  # the frozen base weights did not move
                acc.unwrap_model(model).disable_adapters()
                ref = model(**batches[0], return_dict=False)[0]
                acc.unwrap_model(model).enable_adapters()
            report["lora_resume_reference_minus_base"] = float((ref - base_out).abs().max())
        report["ok"] = True
    except Exception as err:  # noqa: BLE001 - the probe reports
        report["ok"] = False
        report["error"] = f"{type(err).__name__}: {err}"
        report["traceback"] = traceback.format_exc()[-3000:]
    (out / f"rank-{rank}.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"RANK {rank}: " + json.dumps({k: v for k, v in report.items() if k != "traceback"}, default=str), flush=True)
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    main()
