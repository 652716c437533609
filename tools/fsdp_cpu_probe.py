"""Does PyTorch FSDP run on this CPU machine? (groundwork for issue 24: FSDP / ZeRO)

A small MLP (one frozen layer, two trainable ones: like a LoRA'd UNet, only some weights
train) is sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``) or FSDP1
(``FullyShardedDataParallel``, ``use_orig_params=True``) on the gloo backend; each rank feeds
its own batch, backpropagates, clips the gradient norm, takes two AdamW steps, then gathers
the full weights and the full optimizer state
(``torch.distributed.checkpoint.state_dict.get_model_state_dict`` /
``get_optimizer_state_dict`` with ``full_state_dict=True``) and checks that

* every rank holds the same full weights (all-gathered hash),
* the result equals the same two steps without FSDP on one process over both batches
  (DDP's arithmetic), to 1e-6,
* the full optimizer state loads back (``set_optimizer_state_dict``) into a freshly sharded copy
  and a third step there equals the third step of the original.

Run it with 2 processes::

    OMP_NUM_THREADS=1 .venv/bin/python -m torch.distributed.run --nproc_per_node 2 \\
        tools/fsdp_cpu_probe.py --fsdp 2
    OMP_NUM_THREADS=1 .venv/bin/python -m torch.distributed.run --nproc_per_node 2 \\
        tools/fsdp_cpu_probe.py --fsdp 1

Prints one ``OK fsdpV rank R/W ...`` line per process, or the error.

Found with torch 2.13.0+cpu, 2 gloo processes: FSDP2 (``--fsdp 2``, with or without
``--everywhere``) and FSDP1 with the full state gathered on every rank (``--fsdp 1 --everywhere``)
both train, agree with the single-process result to 0.0 and resume exactly; every parameter
(the frozen layer's too) is sharded. FSDP1 with the full state gathered on rank 0 only
(``cpu_offload=True``, i.e. ``rank0_only``; plain ``--fsdp 1``) dies with a segmentation fault on
rank 0 in ``torch/distributed/fsdp/_state_dict_utils.py:332 param_hook`` (the clone of the unsharded
parameter). Two pitfalls: ``set_model_state_dict`` / ``set_optimizer_state_dict`` replace the full
tensors of the dict they are given by shards, in place, and an in-memory full optimizer state
aliases live tensors (AdamW's ``step``): loading it into a second optimizer in the same process
makes both advance one shared counter; pass state through bytes (a file) as a checkpoint does.
Without the final barrier one rank sometimes aborted at exit (``terminate called without an
active exception``).
"""

from __future__ import annotations

import argparse
import io
import os
import traceback


def build(torch):  # noqa: ANN001, ANN201
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 32), torch.nn.GELU(), torch.nn.Linear(32, 4)
    )
    model[0].requires_grad_(False)  # a frozen base layer
    return model


def batch(torch, rank: int):  # noqa: ANN001, ANN201
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(6, 16, generator=g), torch.randn(6, 4, generator=g)


def shard(torch, model, version: int):  # noqa: ANN001, ANN201
    if version == 2:
        from torch.distributed.fsdp import fully_shard

        for layer in (model[0], model[2], model[4]):
            fully_shard(layer)
        fully_shard(model)
        return model
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    return FSDP(model, auto_wrap_policy=ModuleWrapPolicy({torch.nn.Linear}), use_orig_params=True,
                device_id=torch.device("cpu"))


def step(torch, model, opt, rank: int, version: int) -> float:  # noqa: ANN001
    x, y = batch(torch, rank)
    loss = (model(x) - y).pow(2).mean()
    loss.backward()
    if version == 2:
        norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    else:
        norm = model.clip_grad_norm_(1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(norm)


def reference(torch, world: int, steps: int):  # noqa: ANN001, ANN201
    """The same steps on one process without FSDP: the gradient averaged over the ranks' batches."""
    model = build(torch)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        for r in range(world):
            x, y = batch(torch, r)
            ((model(x) - y).pow(2).mean() / world).backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {k: v.detach() for k, v in model.state_dict().items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fsdp", type=int, choices=[1, 2], default=2)
    parser.add_argument("--everywhere", action="store_true",
                        help="gather the full state on every rank (cpu_offload=False) instead of on rank 0 only")
    args = parser.parse_args()
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29518"), ("RANK", "0"), ("WORLD_SIZE", "1"),
                       ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, value)  # a plain `python` run is one process
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_optimizer_state_dict,
            set_model_state_dict,
        )

        model = shard(torch, build(torch), args.fsdp)
        kinds = sorted({type(p).__name__ for p in model.parameters()})
        local = {n: tuple((p.to_local() if hasattr(p, "to_local") else p).shape) for n, p in model.named_parameters()}
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        norms = [step(torch, model, opt, rank, args.fsdp) for _ in range(2)]
        full = StateDictOptions(full_state_dict=True, cpu_offload=not args.everywhere)
        weights = get_model_state_dict(model, options=full)
        optim = get_optimizer_state_dict(model, opt, options=full)
        # the full state is on every rank with cpu_offload=False; with cpu_offload=True on rank 0 only
        flat = torch.cat([v.flatten() for _, v in sorted(weights.items())]) if weights else torch.zeros(0)
        digest = torch.tensor([float((flat.double() * torch.arange(flat.numel(), dtype=torch.float64)).sum())
                               if flat.numel() else 0.0])
        every = [torch.zeros(1) for _ in range(world)]
        dist.all_gather(every, digest)
        expected = reference(torch, world, 2)
        diff = max((weights[k] - expected[k.removeprefix("_fsdp_wrapped_module.")]).abs().max().item()
                   for k in weights) if weights else float("nan")
        # resume: a fresh sharded model + optimizer get the full state back, then one more step each
        # through bytes, as through a file: the dicts alias live tensors (AdamW's `step`), and
        # set_*_state_dict replaces the full tensors of the dict it is given by shards, in place
        buffer = io.BytesIO()
        torch.save([weights, optim], buffer)
        obj = [buffer.getvalue()]
        dist.broadcast_object_list(obj, src=0)
        obj = torch.load(io.BytesIO(obj[0]), weights_only=True)
        model2 = shard(torch, build(torch), args.fsdp)
        opt2 = torch.optim.AdamW([p for p in model2.parameters() if p.requires_grad], lr=1e-2)
        set_model_state_dict(model2, obj[0], options=StateDictOptions(full_state_dict=True))
        set_optimizer_state_dict(model2, opt2, obj[1], options=StateDictOptions(full_state_dict=True))
        step(torch, model, opt, rank, args.fsdp)
        step(torch, model2, opt2, rank, args.fsdp)
        a = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        b = get_model_state_dict(model2, options=StateDictOptions(full_state_dict=True))
        resume_diff = max((a[k] - b[k]).abs().max().item() for k in a)
        state_keys = sorted(optim.get("state", {}))[:2]
        ok = (rank != 0 or diff < 1e-6) and resume_diff == 0
        print(f"{'OK' if ok else 'MISMATCH'} fsdp{args.fsdp} rank {rank}/{world} param types {kinds} "
              f"local shapes {local} grad norms {[round(n, 6) for n in norms]} "
              f"full-state keys on this rank {len(weights)} (rank-0 digest {float(every[0]):.6f}) "
              f"max |fsdp - single-process| {diff:.2e} resume max diff {resume_diff:.2e} "
              f"optimizer state keys {state_keys} (torch {torch.__version__})", flush=True)
    except Exception:  # noqa: BLE001 - the probe reports
        print(f"FAILED fsdp{args.fsdp} rank {rank}/{world}:\n{traceback.format_exc()}", flush=True)
        raise
    dist.barrier()  # without it one rank may tear gloo down while the other still reads: an abort at exit
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
