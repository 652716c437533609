"""Run under `accelerate launch` (2 gloo CPU processes) with configs/accelerate/zero{2,3}.yaml:
what accelerate 1.16 + DeepSpeed do on CPU with a tiny diffusers UNet carrying a peft LoRA.

    python3.11 -m venv /tmp/dsvenv && /tmp/dsvenv/bin/pip install -c constraints/cpu.txt deepspeed
    spo tiny-pipeline sd15 /tmp/ds/sd15
    OMP_NUM_THREADS=1 PYTHONPATH=.venv/lib/python3.11/site-packages:src /tmp/dsvenv/bin/python \
        -m accelerate.commands.launch --config_file configs/accelerate/zero2.yaml --num_processes 2 \
        --main_process_port 29781 tools/deepspeed_accelerate_probe.py /tmp/ds/sd15 OUT --mode nocpu-gloo --loop boundary

Findings (issue 24): docs/scale-out.md, "DeepSpeed ZeRO-2 / ZeRO-3".

--mode (how the Accelerator is built):
  spo        Accelerator(cpu=True)                  (what spo.training.setup.make_accelerator does on CPU)
  nocpu      Accelerator()                          (cpu=False on a CPU-only host)
  nocpu-gloo Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
  force      Accelerator(cpu=True) then DEEPSPEED set on AcceleratorState and PartialState by hand
--loop (how one optimizer step of 2 micro-batches per rank is driven):
  spo        SPO trainer's pattern: no_sync on the 1st micro-batch, loss*0.5 each, acc.backward,
             acc.clip_grad_norm_, optimizer.step(), zero_grad
  boundary   the same, plus acc.gradient_state._set_sync_gradients(last) around each backward
  accumulate `with acc.accumulate(model)` per micro-batch, loss unweighted (needs gas=2)
Each rank writes OUT/rank-R.json and prints `RANK R: {...}`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import traceback
from pathlib import Path

import torch

# the same tiny LoRA UNet, micro-batches and loss as the FSDP probe beside this file
from fsdp_accelerate_probe import load_unet as _load_unet, loss_of, micro_batches


def load_unet(path: str) -> torch.nn.Module:
    return _load_unet(path, "lora")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--mode", choices=["spo", "nocpu", "nocpu-gloo", "force"], default="spo")
    parser.add_argument("--loop", choices=["spo", "boundary", "accumulate"], default="spo")
    parser.add_argument("--clip", type=float, default=1.0, help="max_grad_norm of the plain reference step")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--save-after", type=int, default=0, help="save_state after this step (then go on)")
    parser.add_argument("--resume", default=None, help="load_state(DIR) before step --resume-step")
    parser.add_argument("--resume-step", type=int, default=1)
    parser.add_argument("--persist-threshold", type=int, default=None,
                        help="zero_optimization.stage3_param_persistence_threshold (DeepSpeed default 1e5)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType

    if args.mode == "spo":
        acc = Accelerator(cpu=True, mixed_precision="no")
    elif args.mode == "nocpu":
        acc = Accelerator(mixed_precision="no")
    elif args.mode == "nocpu-gloo":
        from accelerate.utils import InitProcessGroupKwargs

        acc = Accelerator(mixed_precision="no", kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    else:
        acc = Accelerator(cpu=True, mixed_precision="no")
    rank, world = acc.process_index, acc.num_processes
    import torch.distributed as tdist

    report: dict = {
        "mode": args.mode, "loop": args.loop, "rank": rank, "world": world,
        "env_RANK": os.environ.get("RANK"), "env_WORLD_SIZE": os.environ.get("WORLD_SIZE"),
        "launched_distributed_type": str(acc.distributed_type), "device": str(acc.device),
        "backend": acc.state.backend, "torch_dist_initialized": tdist.is_initialized(),
        "torch_dist_backend": tdist.get_backend() if tdist.is_initialized() else None,
        "torch_dist_world": tdist.get_world_size() if tdist.is_initialized() else None,
        "env": {k: v for k, v in os.environ.items() if k.startswith("ACCELERATE_") or k == "DS_ACCELERATOR"},
        "acc_gradient_accumulation_steps": acc.gradient_accumulation_steps,
    }
    try:
        if args.mode == "force" and acc.distributed_type != DistributedType.DEEPSPEED:
            from accelerate.utils import DeepSpeedPlugin

            plugin = DeepSpeedPlugin()  # from the launch's ACCELERATE_DEEPSPEED_* environment
            plugin.set_mixed_precision("no")
            acc.state.distributed_type = DistributedType.DEEPSPEED
            PartialState().distributed_type = DistributedType.DEEPSPEED
            acc.state.deepspeed_plugins = plugin
            plugin.select(_from_accelerator_state=True)
            report["forced"] = True
        report["distributed_type"] = str(acc.distributed_type)
        is_ds = acc.distributed_type == DistributedType.DEEPSPEED
        if is_ds:
            plugin = acc.state.deepspeed_plugin
            report["ds_config_before_prepare"] = json.loads(json.dumps(plugin.deepspeed_config, default=str))
            # accelerate fills "auto" micro batch size from a prepared DataLoader; SPO prepares none
            if not os.environ.get("PROBE_KEEP_AUTO_MBS"):
                plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = 2
            if args.persist_threshold is not None:
                plugin.deepspeed_config["zero_optimization"]["stage3_param_persistence_threshold"] = args.persist_threshold
            stage = plugin.zero_stage
            report["zero_stage"] = stage
        else:
            stage = None

        unet = load_unet(args.model)
        params = [p for p in unet.parameters() if p.requires_grad]
        names = [n for n, p in unet.named_parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3)
        try:
            model, opt = acc.prepare(unet, opt)
        except Exception as err:
            report["prepare_error"] = f"{type(err).__name__}: {err}"
            raise
        named = dict(acc.unwrap_model(model).named_parameters())
        p0 = named[names[0]]
        report["prepared"] = {
            "model_class": type(model).__name__, "optimizer_class": type(opt).__name__,
            "inner_optimizer_class": type(getattr(opt, "optimizer", opt)).__name__,
            "module_is_original": getattr(model, "module", model) is unet,
            "unwrap_is_original": acc.unwrap_model(model) is unet,
            "distributed_type_after_prepare": str(acc.distributed_type),
            "acc_gradient_accumulation_steps": acc.gradient_accumulation_steps,
            "lora_param": names[0], "lora_param_shape": list(p0.shape),
            "lora_param_ds_shape": list(p0.ds_shape) if hasattr(p0, "ds_shape") else None,
            "frozen_param_shape": list(named["conv_in.weight"].shape),
            "old_param_objects_still_in_module": sum(any(p is q for q in named.values()) for p in params),
        }
        if is_ds:
            cfg = acc.deepspeed_config
            report["ds_config_used"] = {k: cfg.get(k) for k in ("train_micro_batch_size_per_gpu", "train_batch_size",
                                                             "gradient_accumulation_steps", "gradient_clipping",
                                                             "zero_allow_untested_optimizer")}
            report["ds_config_used"]["zero_optimization"] = cfg.get("zero_optimization")
            report["engine"] = {"gas": model.gradient_accumulation_steps(), "clip": model.gradient_clipping(),
                                "device": str(model.device), "world": model.world_size,
                                "optimizer": type(model.optimizer).__name__}

        def full_lora():
            """the full LoRA (name -> tensor), on every rank"""
            m = acc.unwrap_model(model)
            if stage == 3:
                import deepspeed

                ps = [p for p in m.parameters() if p.requires_grad]
                with deepspeed.zero.GatheredParameters(ps, modifier_rank=None):
                    return {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
            return {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}

        def one_step(step: int):
            batches = micro_batches(unet, rank, step)
            rec = {}
            model.train()
            for j, b in enumerate(batches):
                last = j == len(batches) - 1
                if args.loop == "accumulate":
                    with acc.accumulate(model):
                        rec[f"sync_gradients_mb{j}"] = acc.sync_gradients
                        acc.backward(loss_of(model, b))
                        rec.setdefault("clip", []).append(float(acc.clip_grad_norm_(params, args.clip) or float("nan"))
                                                          if acc.sync_gradients else None)
                        opt.step()
                        opt.zero_grad()
                    continue
                ctx = contextlib.nullcontext() if last else acc.no_sync(model)
                with ctx:
                    loss = loss_of(model, b) * 0.5
                if args.loop == "boundary":
                    acc.gradient_state._set_sync_gradients(last)
                acc.backward(loss)
                if args.loop == "boundary":
                    acc.gradient_state._set_sync_gradients(True)
                if is_ds:
                    rec[f"engine_global_steps_after_mb{j}"] = model.global_steps
            if args.loop != "accumulate":
                norm = acc.clip_grad_norm_(params, args.clip)
                rec["clip_grad_norm_returned"] = None if norm is None else float(norm)
                rec["clip_grad_norm_type"] = type(norm).__name__
                opt.step()
                opt.zero_grad(set_to_none=True)
            if is_ds:
                rec["engine_global_steps"] = model.global_steps
                rec["engine_global_grad_norm"] = float(model.get_global_grad_norm() or float("nan"))
            return rec

        start = 1
        if args.resume:
            acc.load_state(args.resume)
            report["resumed_from"] = args.resume
            start = args.resume_step
            if is_ds:
                report["engine_global_steps_after_load"] = model.global_steps
        for step in range(start, args.steps + 1):
            report[f"step{step}"] = one_step(step)
            m = acc.unwrap_model(model)
            report[f"step{step}"]["local_numel_after"] = sum(p.numel() for p in m.parameters())
            report[f"step{step}"]["lora_local_shape_after"] = list(dict(m.named_parameters())[names[0]].shape)
            lora = full_lora()
            if rank == 0:
                torch.save(lora, out / f"lora-step{step}.pt")
            digest = torch.tensor([sum(float(v.double().sum()) for v in lora.values())], dtype=torch.float64)
            report[f"lora_digest_step{step}_all_ranks"] = acc.gather(digest).tolist()
            if args.save_after == step:
                ck = out / f"ckpt-step{step}"
                acc.save_state(str(ck))
                acc.wait_for_everyone()
                report["saved"] = sorted(str(p.relative_to(ck)) for p in ck.rglob("*") if p.is_file())

        # the full weights: accelerate's get_state_dict and peft's
        from peft.utils import get_peft_model_state_dict

        try:
            state = acc.get_state_dict(model)
            report["get_state_dict"] = {"keys": len(state) if state is not None else None,
                                        "type": type(state).__name__,
                                        "lora_shape": list(state[names[0]].shape) if state and names[0] in state else None}
        except Exception as err:
            state = None
            report["get_state_dict_error"] = f"{type(err).__name__}: {err}"
        peft_sd = get_peft_model_state_dict(acc.unwrap_model(model), adapter_name="spo")
        k0 = next(iter(peft_sd))
        report["peft_state_dict_plain"] = {"keys": len(peft_sd), "sample": k0, "shape": list(peft_sd[k0].shape),
                                           "numel": sum(v.numel() for v in peft_sd.values())}
        lora_now = full_lora()
        peft_gathered = get_peft_model_state_dict(acc.unwrap_model(model), state_dict=lora_now, adapter_name="spo")
        report["peft_state_dict_from_gathered_params"] = {
            "keys": len(peft_gathered), "numel": sum(v.numel() for v in peft_gathered.values()),
            "plain_equals_gathered": all(peft_sd[k].shape == peft_gathered[k].shape and bool(torch.equal(peft_sd[k], peft_gathered[k]))
                                         for k in peft_gathered)}
        if state:
            report["get_state_dict"]["lora_equals_gathered"] = all(torch.equal(state[k], lora_now[k]) for k in lora_now)
            full_peft = get_peft_model_state_dict(acc.unwrap_model(model), state_dict=state, adapter_name="spo")
            report["peft_state_dict_from_get_state_dict"] = {
                "keys": len(full_peft), "same_keys": sorted(full_peft) == sorted(peft_sd),
                "shape": list(full_peft[k0].shape)}

        try:
            osd = opt.state_dict()
            inner = osd
            report["optimizer_state_dict"] = {
                "type": type(osd).__name__, "top_keys": sorted(osd)[:12] if isinstance(osd, dict) else None}
            if is_ds and stage == 2:
                fl = osd.get("single_partition_of_fp32_groups") or []
                report["optimizer_state_dict"]["fp32_partition_numel"] = [int(t.numel()) for t in fl]
            elif is_ds and stage == 3:
                fl = osd.get("fp32_flat_groups") or []
                report["optimizer_state_dict"]["fp32_flat_numel"] = [int(t.numel()) for t in fl]
        except Exception as err:
            report["optimizer_state_dict_error"] = f"{type(err).__name__}: {err}"
        # the same step(s) without DeepSpeed, one process over both ranks' micro-batches
        if rank == 0 and not args.resume:
            plain = load_unet(args.model)
            p_params = [p for p in plain.parameters() if p.requires_grad]
            p_opt = torch.optim.AdamW(p_params, lr=1e-3)
            for step in range(1, args.steps + 1):
                for r in range(world):
                    for b in micro_batches(plain, r, step):
                        (loss_of(plain, b) / (2 * world)).backward()
                report[f"plain_grad_norm_step{step}"] = float(torch.nn.utils.clip_grad_norm_(p_params, args.clip))
                p_opt.step()
                p_opt.zero_grad()
                sd = dict(plain.named_parameters())
                mine = torch.load(out / f"lora-step{step}.pt", weights_only=True)
                report[f"max_abs_ds_minus_plain_step{step}"] = max(float((v - sd[k]).abs().max()) for k, v in mine.items())
        report["ok"] = True
    except Exception as err:  # noqa: BLE001 - the probe reports
        report["ok"] = False
        report["error"] = f"{type(err).__name__}: {err}"
        report["traceback"] = traceback.format_exc()[-4000:]
    (out / f"rank-{rank}.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"RANK {rank}: " + json.dumps({k: v for k, v in report.items() if k not in ("traceback", "env",
                                         "ds_config_before_prepare")}, default=str), flush=True)
    if report.get("traceback"):
        print(report["traceback"], flush=True)
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    main()
