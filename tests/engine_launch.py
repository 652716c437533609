"""Launching the tiny SPO runs of tests/multiprocess_fsdp.py under each distributed engine on two
gloo CPU processes, once per test session (the FSDP and DeepSpeed tests compare against the same
DDP runs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).with_name("multiprocess_fsdp.py")
PROMPTS = "a red circle\na blue square\ntwo green stars\na yellow cat\n"
LORA = Path("lora") / "pytorch_lora_weights.safetensors"
UNET = Path("unet") / "diffusion_pytorch_model.safetensors"
ALL = "lora,lora-resume,full,full-resume,methods,spm,spm-resume,lrm"

#: engine -> the launch's options (ZeRO-3 twice: a config that partitions even the tiny models'
#: small tensors, and the shipped zero3.yaml, whose default threshold keeps them whole)
OPTIONS = {
    "ddp": ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"],
    "fsdp": ["--config_file", str(ROOT / "configs" / "accelerate" / "fsdp.yaml")],
    "zero2": ["--config_file", str(ROOT / "configs" / "accelerate" / "zero2.yaml")],
    "zero3": ["--use_deepspeed", "--deepspeed_config_file", str(Path(__file__).parent / "deepspeed" / "zero3-tiny.json"),
              "--zero3_init_flag", "false"],
    "zero3-yaml": ["--config_file", str(ROOT / "configs" / "accelerate" / "zero3.yaml")],
}
OPTIONS["zero2-bf16"] = OPTIONS["zero2"]
#: engine -> the scenarios of multiprocess_fsdp.py each session runs
SCENARIOS = {"ddp": "lora,full,spm,lrm", "fsdp": ALL, "zero2": ALL + ",lora-dropout,lora-dropout-resume",
             "zero3": "lora,lora-resume,full,full-resume,spm,spm-resume,lrm", "zero3-yaml": "methods",
             "zero2-bf16": "full-bf16"}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(engine: str, script: Path, *args: str, timeout: int = 600,
           extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """``accelerate launch`` of two CPU processes under ``engine`` (a key of :data:`OPTIONS`).
    DDP and FSDP run with ``ACCELERATE_USE_CPU``; DeepSpeed must not (accelerate starts it only
    without the CPU flag; SPO then picks the gloo backend itself)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *OPTIONS[engine], "--num_processes", "2", *extra,
           "--main_process_port", str(free_port()), str(script), *args]
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env["OMP_NUM_THREADS"] = "1"
    if not engine.startswith("zero"):
        env["ACCELERATE_USE_CPU"] = "true"
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=script.parent)


class EngineRuns:
    """The scenarios of :data:`SCENARIOS` under each engine, each launched once, into ``root/ENGINE``."""

    def __init__(self, root: Path, model: Path, data: Path, clip: Path) -> None:
        self.root, self.model, self.data, self.clip = root, model, data, clip
        self.prompts = root / "prompts.txt"
        self.prompts.write_text(PROMPTS)

    def __call__(self, engine: str) -> Path:
        out = self.root / engine
        if not (out / "done").exists():
            proc = launch(engine, SCRIPT, str(self.model), str(self.prompts), str(out), SCENARIOS[engine],
                          str(self.data), str(self.clip))
            assert proc.returncode == 0, proc.stderr[-4000:]
            (out / "done").write_text("")
        return out


def ranks(run: Path) -> list[dict]:
    found = [json.loads((run / f"rank-{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in found] == [0, 1] and all(r["num_processes"] == 2 for r in found)
    return found


def max_diff(a: Path, b: Path, skip: str | None = None) -> float:
    """The largest difference between two weight files (``skip``: leave out keys ending so)."""
    first, second = load_file(str(a)), load_file(str(b))
    assert first.keys() == second.keys()
    return max(float((first[k].double() - second[k].double()).abs().max()) for k in first
               if skip is None or not k.endswith(skip))


FAULTS_SCRIPT = Path(__file__).with_name("multiprocess_faults.py")


def check_failed_writes(engine: str, model: Path, out: Path, expected_engine: str) -> None:
    """Launch multiprocess_faults.py under ``engine`` into ``out``: a full disk at a checkpoint
    (main process or the other) or at the final LoRA must end both ranks with the same error,
    the earlier checkpoints kept and no half-written one left."""
    prompts = out / "prompts.txt"
    prompts.write_text(PROMPTS)
    proc = launch(engine, FAULTS_SCRIPT, str(model), str(prompts), str(out), timeout=420)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = {"checkpoint": ("writing checkpoint", "round-000002", "failed on the main process", ["round-000001"]),
                "rng": ("writing checkpoint", "round-000001", "failed on process 1", []),
                "final_lora": ("writing the final LoRA", "final_lora", "failed on the main process", ["round-000001"])}
    for name, (what, where, who, checkpoints) in expected.items():
        found = ranks(out / name)
        assert found[0]["error"] == found[1]["error"] is not None, (name, found)
        message = found[0]["error"]
        assert message.startswith(what) and where in message and who in message, message
        assert "OSError: [Errno 28] No space left on device" in message, message
        assert found[0]["checkpoints"] == checkpoints and found[0]["hidden"] == [], (name, found[0])
        assert found[0]["engine"] == expected_engine
    assert not (out / "final_lora" / "lora").exists()


def check_spm_and_lrm_against_ddp(runs: Path, ddp: Path) -> None:
    """The ``spm``, ``spm-resume`` and ``lrm`` scenarios under an engine (``runs``) against DDP's:
    the SPM's weights within 1e-5, CLIP's key biases aside (their true gradient is exactly 0:
    softmax ignores a shift shared by a query's logits, so AdamW steps on rounding noise, 3.5e-4
    under FSDP); a resumed SPM run bit for bit the uninterrupted one; CLIP's scalar logit scale
    saved as the scalar (engines hold it as a 1-element vector); the LRM's head and text encoder
    within 1e-5 and its whole UNet within 2e-4 (AdamW amplifies tiny gradient differences, as
    under full fine-tuning)."""
    spm = Path("spm") / "spm.safetensors"
    assert max_diff(runs / "spm" / spm, ddp / "spm" / spm, skip="k_proj.bias") < 1e-5
    assert max_diff(runs / "spm" / spm, runs / "spm-resume" / spm) == 0.0
    assert load_file(str(runs / "spm" / spm))["model.logit_scale"].shape == ()
    for part, tolerance in (("lrm.safetensors", 1e-5), ("unet/diffusion_pytorch_model.safetensors", 2e-4),
                            ("text_encoder/model.safetensors", 1e-5)):
        assert max_diff(runs / "lrm" / "lrm" / part, ddp / "lrm" / "lrm" / part, skip="k_proj.bias") < tolerance, part
