"""Release fixtures of the step-aware preference model (SPM), made by running the authors' code.

The authors' release (RockeyCoss/SPO at 27a8642, MIT; a copy at ../shared/reference/spo-release)
is the test oracle. Its time-conditioned CLIP needs transformers 4.x while the project runs 5.x,
so this script runs the release's OWN modules in a separate virtual environment and writes small
files that the project's CI test (tests/test_release_parity_spm.py) compares against, without the
old stack. No line of the release is copied here: its modules are imported from where the
release lies, under other module names (its package is also called ``spo``).

Regenerate (about a minute on 2 CPU cores, after the venv exists)::

    bash tools/release_parity/build_release_venv.sh      # once: .release-venv/ (git-ignored)
    python3 tools/release_parity/make_spm_fixtures.py    # -> tests/fixtures/release/spm/

Options: ``--venv DIR`` (default .release-venv), ``--release DIR`` (default
../shared/reference/spo-release or $SPO_RELEASE_DIR), ``--out DIR``.

Two phases, each run by the venv's Python with one transformers first on ``sys.path``:

1. ``build`` with transformers 4.27.3, the SPM trainer's pin
   (step_aware_preference_model/requirements.txt): a tiny random CLIPConfig model is saved as the
   base CLIP (``base-clip/``: the stand-in for PickScore, with a byte-level CLIP tokenizer and a
   ``preprocessor_config.json`` at image size 30); the trainer's own
   ``trainer.models.step_aware_preference_model.StepAwarePreferenceModel`` loads it and applies its
   ``init_adaln_paras`` (the release's identity init). That identity model is kept aside (work
   directory) for the identity scores; then, standing in for training, the time modules get
   non-zero random weights (so t matters) and every CLIP weight a small random change (so the
   checkpoint's CLIP differs from the base CLIP, as a trained SPM's does). The state dict is
   written as the release writes its released checkpoint: DeepSpeed 0.12.3's
   ``convert_zero_checkpoint_to_fp32_state_dict`` (deepspeed/utils/zero_to_fp32.py) = a
   ``torch.save`` of an OrderedDict of tensors, the persistent buffers first converted with
   ``.float()`` (transformers 4.27.3 keeps ``position_ids`` persistent, so they are there, as
   float32), then the fp32 parameters; keys are the wrapper's, ``model.`` + CLIPModel keys.
2. ``score`` with transformers 4.40.1, the SPO side's pin (spo_training_and_inference/
   environment.yaml): the release's scoring class
   ``spo/preference_models/models/step_aware_preference_model.py::StepAwarePreferenceModel`` loads
   the base CLIP and the checkpoint (its own unexpected-key check runs on the float
   ``position_ids``) and ``get_preference_score`` scores unclamped images in about [-1.3, 1.3] at
   sizes that exercise its rounding (64x64, 48x80, 37x41: a crop margin of 3, 20x23: a side of
   exactly k + 0.5) at t in {0, 1, 251, 501, 751, 999}; the same for the identity model, and the
   plain base CLIP (transformers' CLIPModel) on the same pixel values. The pixel values the
   release's CLIP received are recorded too (observed by wrapping ``get_image_features``).

Stand-ins, inside this script only (the release is never edited): ``torchvision.transforms``
(``CenterCrop`` and ``Normalize`` with torchvision's semantics: crop offset
``int(round((h - size) / 2.0))``, ``(x - mean) / std``), because PyPI's torchvision does not import
beside this machine's local torch wheel; ``accelerate.logging.get_logger`` (a plain logger);
``spo.utils.huggingface_cache_dir`` (None); the trainer's package ``__init__`` files (they import
hydra only to register configs) are skipped by importing its modules through bare namespaces.

Written (about 0.4 MB): ``base-clip/`` (config, safetensors weights, tokenizer, image config),
``spm_release.bin``, ``inputs.safetensors`` (images, input_ids), ``pixels.safetensors`` (the
release's CLIP inputs), ``expected.json`` (prompts, timesteps, scores, versions).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.machinery
import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
import types
from collections import OrderedDict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_RELEASE = Path(os.environ.get("SPO_RELEASE_DIR", ROOT.parent / "shared" / "reference" / "spo-release"))
DEFAULT_OUT = ROOT / "tests" / "fixtures" / "release" / "spm"
RELEASE_COMMIT = "27a86428edcff3b25dcce8001be94a7a01608f58"
SEED = 20240604
IMAGE_SIZE = 30  # the tiny CLIP's input size (PickScore's is 224)
SHAPES = [(64, 64), (48, 80), (37, 41), (20, 23)]
TIMESTEPS = [0, 1, 251, 501, 751, 999]
PROMPTS = [
    "a watercolor fox in the snow", "two red apples on a table",
    "a lighthouse at dusk", "portrait of an old sailor",
    "a city street in the rain!", "macro photo of a bee",
    "a bowl of ramen", "an astronaut riding a horse",
]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


# ---------------------------------------------------------------------------------- the driver
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("phase", nargs="?", default="all", choices=["all", "build", "score"])
    parser.add_argument("--venv", type=Path, default=ROOT / ".release-venv")
    parser.add_argument("--release", type=Path, default=DEFAULT_RELEASE)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--work", type=Path, default=None, help="scratch directory shared by the phases")
    args = parser.parse_args(argv)
    if args.phase == "build":
        build(args.release, args.out, args.work)
        return 0
    if args.phase == "score":
        score(args.release, args.out, args.work)
        return 0
    python = args.venv / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"no release venv at {args.venv}: run bash tools/release_parity/build_release_venv.sh")
    if not (args.release / "step_aware_preference_model").is_dir():
        raise SystemExit(f"the authors' release is not at {args.release} (--release or SPO_RELEASE_DIR)")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        for phase, transformers_dir in (("build", "tf-4.27.3"), ("score", "tf-4.40.1")):
            env = {**os.environ, "PYTHONPATH": str(args.venv / transformers_dir), "HF_HUB_OFFLINE": "1",
                   "TRANSFORMERS_OFFLINE": "1", "PYTHONHASHSEED": "0"}
            command = [str(python), str(Path(__file__).resolve()), phase, "--release", str(args.release),
                       "--out", str(args.out), "--work", work]
            print(f"[{phase}] transformers from {transformers_dir}", flush=True)
            subprocess.run(command, env=env, check=True)
    total = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"fixtures written to {args.out} ({total / 1e6:.2f} MB)")
    return 0


# ---------------------------------------------------------------------------------- stand-ins
def _namespace(name: str, path: Path | None = None) -> types.ModuleType:
    """A bare package (no ``__init__`` run) so that the release's modules import by path."""
    if name in sys.modules:
        return sys.modules[name]
    module = types.ModuleType(name)
    module.__path__ = [str(path)] if path is not None else []  # type: ignore[attr-defined]
    # a spec, so that transformers' find_spec-based availability checks see "not installed"
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    sys.modules[name] = module
    return module


def _install_stand_ins() -> None:
    """torchvision.transforms (CenterCrop, Normalize) and accelerate.logging, for this process."""
    import torch

    class CenterCrop:
        """torchvision.transforms.CenterCrop on a tensor (B, C, H, W), as torchvision computes it."""

        def __init__(self, size: int) -> None:
            self.size = (size, size) if isinstance(size, int) else tuple(size)

        def __call__(self, img: Any) -> Any:
            height, width = img.shape[-2:]
            crop_h, crop_w = self.size
            if crop_h > height or crop_w > width:
                raise NotImplementedError("padding crops are not needed by these fixtures")
            top = int(round((height - crop_h) / 2.0))
            left = int(round((width - crop_w) / 2.0))
            return img[..., top : top + crop_h, left : left + crop_w]

    class Normalize:
        """torchvision.transforms.Normalize on a float tensor: (x - mean) / std per channel."""

        def __init__(self, mean: Any, std: Any) -> None:
            self.mean, self.std = list(mean), list(std)

        def __call__(self, tensor: Any) -> Any:
            mean = torch.as_tensor(self.mean, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
            std = torch.as_tensor(self.std, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
            return tensor.sub(mean).div(std)

    torchvision = _namespace("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    transforms.CenterCrop, transforms.Normalize = CenterCrop, Normalize  # type: ignore[attr-defined]
    torchvision.transforms = transforms  # type: ignore[attr-defined]
    sys.modules["torchvision.transforms"] = transforms
    accelerate = _namespace("accelerate")
    accelerate_logging = types.ModuleType("accelerate.logging")
    accelerate_logging.get_logger = logging.getLogger  # type: ignore[attr-defined]
    accelerate.logging = accelerate_logging  # type: ignore[attr-defined]
    sys.modules["accelerate.logging"] = accelerate_logging


def _load_trainer_model(release: Path) -> Any:
    """The SPM trainer's ``trainer.models.step_aware_preference_model`` (its package inits skipped)."""
    trainer_root = release / "step_aware_preference_model" / "trainer"
    _namespace("trainer", trainer_root)
    _namespace("trainer.models", trainer_root / "models")
    _namespace("trainer.utils", trainer_root / "utils")
    return importlib.import_module("trainer.models.step_aware_preference_model")


def _load_scoring_model(release: Path) -> Any:
    """The SPO side's ``spo/preference_models/models/step_aware_preference_model.py``, imported as
    ``spo_release.preference_models.models.step_aware_preference_model``."""
    root = release / "spo_training_and_inference" / "spo"
    _namespace("spo_release", root)
    utils = types.ModuleType("spo_release.utils")
    utils.huggingface_cache_dir = None  # type: ignore[attr-defined]
    sys.modules["spo_release.utils"] = utils
    sys.modules["spo.utils"] = utils  # the module imports `from spo.utils import huggingface_cache_dir`
    _namespace("spo", root)
    _namespace("spo_release.preference_models", root / "preference_models")
    _namespace("spo_release.preference_models.models", root / "preference_models" / "models")
    return importlib.import_module("spo_release.preference_models.models.step_aware_preference_model")


# ---------------------------------------------------------------------------------- phase 1
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, codes)}


def _write_tokenizer(directory: Path) -> Any:
    """A byte-level CLIP BPE without merges (no download): vocab.json, merges.txt, saved by the
    trainer's transformers; returns the tokenizer."""
    from transformers import CLIPTokenizer

    symbols = list(_bytes_to_unicode().values())
    vocab = {tok: i for i, tok in enumerate(symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"])}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
        tokenizer = CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=77)
        tokenizer.save_pretrained(str(directory))
    return tokenizer


def _tiny_config(tokenizer: Any) -> Any:
    from transformers import CLIPConfig

    text = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, projection_dim=16,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  image_size=IMAGE_SIZE, patch_size=6, projection_dim=16)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


def _write_image_config(directory: Path) -> None:
    """preprocessor_config.json as CLIPImageProcessor reads it (short side and crop = IMAGE_SIZE)."""
    config = {"image_processor_type": "CLIPImageProcessor", "processor_class": "CLIPProcessor",
              "do_resize": True, "size": {"shortest_edge": IMAGE_SIZE}, "resample": 3, "do_center_crop": True,
              "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}, "do_rescale": True,
              "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
              "do_convert_rgb": True}
    (directory / "preprocessor_config.json").write_text(json.dumps(config, indent=2))


def _deepspeed_fp32_state_dict(module: Any) -> "OrderedDict[str, Any]":
    """What DeepSpeed 0.12.3's zero_to_fp32 writes for ``module`` (the trainer's wrapper): the
    persistent buffers (``_get_buffer_names``), each ``.float()``, then the fp32 parameters."""
    state: "OrderedDict[str, Any]" = OrderedDict()

    def buffers(mod: Any, prefix: str) -> None:
        for name, buf in mod.named_buffers(recurse=False):
            if buf is not None and name not in mod._non_persistent_buffers_set:
                state[prefix + name] = buf.detach().clone().float()
        for name, child in mod.named_children():
            buffers(child, prefix + name + ".")

    buffers(module, "")
    for name, param in module.named_parameters():
        state[name] = param.detach().clone().float().contiguous()
    return state


def build(release: Path, out: Path, work: Path | None) -> None:
    import torch
    import transformers
    from safetensors.torch import save_file

    assert transformers.__version__ == "4.27.3", transformers.__version__  # the trainer's model needs no stand-in
    work = Path(work or out)
    base = out / "base-clip"
    base.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    tokenizer = _write_tokenizer(base)
    config = _tiny_config(tokenizer)
    clip = transformers.CLIPModel(config).eval()
    with torch.no_grad():
        clip.logit_scale.fill_(4.6052)  # exp = 100, PickScore's scale
    plain = {k: v.contiguous() for k, v in clip.state_dict().items() if not k.endswith("position_ids")}
    config.save_pretrained(str(base))
    save_file(plain, str(base / "model.safetensors"), metadata={"format": "pt"})
    _write_image_config(base)

    trainer_model = _load_trainer_model(release)
    cfg = trainer_model.StepAwarePreferenceModelConfig(
        pretrained_model_name_or_path=str(base), model_pretrained_model_name_or_path=str(base))
    spm = trainer_model.StepAwarePreferenceModel(cfg)
    spm.init_adaln_paras()  # the release's identity init, as train_spm.py applies it
    spm.eval()
    keys = list(spm.state_dict())
    assert "model.text_model.embeddings.position_ids" in keys, "transformers 4.27.3 keeps position_ids persistent"
    torch.save(_deepspeed_fp32_state_dict(spm), work / "identity.bin")

    generator = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():  # stands in for training: t matters, and the CLIP itself moved
        for name, p in spm.named_parameters():
            if "adaLN_modulation" in name or "t_embedder" in name:
                p.add_(torch.randn(p.shape, generator=generator) * (0.3 if name.endswith("weight") else 0.1))
            else:
                p.add_(torch.randn(p.shape, generator=generator) * 0.02 * (p.detach().std() if p.numel() > 1 else 1.0))
    state = _deepspeed_fp32_state_dict(spm)
    torch.save(state, out / "spm_release.bin")
    print(f"[build] {len(state)} tensors, position_ids dtype {state['model.text_model.embeddings.position_ids'].dtype}")


# ---------------------------------------------------------------------------------- phase 2
def _images(height: int, width: int, generator: Any) -> Any:
    """Two unclamped 'decoded' images in about [-1.3, 1.3]: smooth colour fields plus fine
    detail (what antialiasing would smooth away)."""
    import torch
    import torch.nn.functional as F

    coarse = torch.rand(2, 3, 4, 5, generator=generator) * 2 - 1
    smooth = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    fine = torch.randn(2, 3, height, width, generator=generator) * 0.45
    x = smooth + fine
    return (x / x.abs().amax(dim=(1, 2, 3), keepdim=True) * 1.3).contiguous()


def score(release: Path, out: Path, work: Path | None) -> None:
    import torch
    import transformers
    from safetensors.torch import save_file

    assert transformers.__version__ == "4.40.1", transformers.__version__
    import transformers.models.clip.modeling_clip  # noqa: F401  (before the stand-ins exist)
    from transformers.models.clip import CLIPProcessor  # noqa: F401

    _install_stand_ins()
    work = Path(work or out)
    base = out / "base-clip"
    module = _load_scoring_model(release)
    trained = module.StepAwarePreferenceModel(str(base), str(base), ckpt_path=str(out / "spm_release.bin")).eval()
    identity = module.StepAwarePreferenceModel(str(base), str(base), ckpt_path=str(work / "identity.bin")).eval()
    plain = transformers.CLIPModel.from_pretrained(str(base)).eval()
    processor = transformers.AutoProcessor.from_pretrained(str(base))

    seen: list[Any] = []
    for model in (trained, identity):
        original = model.model.get_image_features

        def observed(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            seen.append(kwargs["pixel_values"].detach().clone())
            return _original(*args, **kwargs)

        model.model.get_image_features = observed

    generator = torch.Generator().manual_seed(SEED + 2)
    inputs: dict[str, Any] = {}
    pixels: dict[str, Any] = {}
    groups = []
    with torch.no_grad():
        for i, (h, w) in enumerate(SHAPES):
            key = f"{h}x{w}"
            images = _images(h, w, generator)
            prompts = PROMPTS[2 * i : 2 * i + 2]
            input_ids = processor.tokenizer(prompts, padding="max_length", truncation=True, max_length=77,
                                            return_tensors="pt").input_ids
            inputs[f"images_{key}"], inputs[f"input_ids_{key}"] = images, input_ids
            scores, identity_scores, base_scores = {}, {}, {}
            for t in TIMESTEPS:
                timesteps = torch.full((2,), t, dtype=torch.long)
                seen.clear()
                scores[str(t)] = trained.get_preference_score(images.clone(), input_ids, timesteps).tolist()
                pixel_values = seen[-1]
                identity_scores[str(t)] = identity.get_preference_score(images.clone(), input_ids, timesteps).tolist()
                assert torch.equal(seen[-1], pixel_values)
                img = plain.get_image_features(pixel_values=pixel_values)
                txt = plain.get_text_features(input_ids=input_ids)
                img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
                base_scores[str(t)] = (plain.logit_scale.exp() * (img * txt).sum(-1)).tolist()
            pixels[f"pixels_{key}"] = pixel_values
            groups.append({"key": key, "shape": [h, w], "prompts": prompts, "scores": scores,
                           "identity_scores": identity_scores, "base_scores": base_scores})
    save_file(inputs, str(out / "inputs.safetensors"))
    save_file(pixels, str(out / "pixels.safetensors"))
    expected = {
        "what": "scores of the authors' StepAwarePreferenceModel.get_preference_score on a tiny random CLIP "
                "(tools/release_parity/make_spm_fixtures.py)",
        "release_commit": RELEASE_COMMIT,
        "versions": {"score": {"transformers": transformers.__version__, "torch": torch.__version__},
                     "build": {"transformers": "4.27.3"}},
        "image_size": IMAGE_SIZE, "timesteps": TIMESTEPS, "groups": groups,
    }
    (out / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    print(f"[score] {len(groups)} image groups x {len(TIMESTEPS)} timesteps")


if __name__ == "__main__":
    sys.exit(main())
