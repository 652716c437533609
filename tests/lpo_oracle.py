"""The LPO authors' release as a test oracle: its own modules, imported from ../shared/reference.

The release (casiatao/LPO, MIT) is read where the workplace keeps it, never copied into the
project. Its Python package is called ``lpo`` (``lpo/lpo``); its modules are imported here under
the package name ``lpo_release``, as tests/release_oracle.py imports the SPO release:

- ``custom_diffusers`` as the release has it (its ``__init__`` loads both pool pipelines and the
  DDIM step modules, which import with this project's diffusers);
- ``preference_models`` without its ``__init__`` (which imports mmengine for the registry) and
  with a stand-in ``builder`` whose registries only register;
- the latent reward models (``preference_models.models.*``) import torchvision for one thing, the
  ``val_transform`` their constructors build for PIL images (never used on latents):
  torchvision is not installed here, so a stand-in ``torchvision.transforms`` is in
  ``sys.modules`` only while those modules import (the rest of the test session never sees it).

``LPO_RELEASE_DIR`` overrides where the release is looked for. Where it is missing, the parity
tests skip, saying so, unless ``SPO_REQUIRE_RELEASE=1`` (set by ``.ci/run``): then they fail.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import os
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
RELEASE = Path(os.environ.get("LPO_RELEASE_DIR", REPO.parent / "shared" / "reference" / "lpo-release"))
ROOT = RELEASE / "lpo" / "lpo"
PACKAGE = "lpo_release"


def require_release() -> Path:
    """The release's directory; skips (or, with ``SPO_REQUIRE_RELEASE=1``, fails) without it."""
    if not (ROOT / "preference_models" / "models").is_dir() or not (ROOT / "custom_diffusers").is_dir():
        message = f"the LPO authors' release is not at {RELEASE} (set LPO_RELEASE_DIR)"
        if os.environ.get("SPO_REQUIRE_RELEASE") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return RELEASE


# a namespace package without its ``__init__``, and the builder stand-in with mmengine's registries: the SPO oracle's
from release_oracle import _package, stub_builder  # noqa: E402  (tests/ is on sys.path: conftest.py)


class _Transform:
    """A torchvision transform stand-in: built by the release's constructors, never applied."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __call__(self, value: Any) -> Any:
        raise NotImplementedError("the stand-in torchvision transforms are not meant to run (lpo_oracle.py)")


def _import_dependencies(path: Path) -> None:
    """Import what the release module at ``path`` imports from other packages (diffusers,
    transformers, accelerate, ...) and touch each imported name, before the torchvision stand-in
    exists: those libraries probe for torchvision (``importlib.util.find_spec``) as they load."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            sibling = path.parent / f"{node.module}.py"  # the release's own module beside it
            if sibling.is_file():
                _import_dependencies(sibling)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            if node.module.split(".")[0] == "torchvision":
                continue
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name):  # a submodule imported by name
                    importlib.import_module(f"{node.module}.{alias.name}")
                getattr(module, alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] != "torchvision":
                    importlib.import_module(alias.name)


@contextlib.contextmanager
def _torchvision_stand_in(path: Path) -> Iterator[None]:
    """``torchvision`` / ``torchvision.transforms`` in ``sys.modules`` while the release's model
    module at ``path`` imports, where torchvision itself is not installed; removed again afterwards."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        pass
    else:
        yield
        return
    _import_dependencies(path)
    transforms = types.ModuleType("torchvision.transforms")
    for name in ("Compose", "Resize", "ToTensor", "Normalize", "CenterCrop"):
        setattr(transforms, name, _Transform)
    transforms.InterpolationMode = types.SimpleNamespace(BILINEAR="bilinear", BICUBIC="bicubic")  # type: ignore[attr-defined]
    torchvision = types.ModuleType("torchvision")
    torchvision.transforms = transforms  # type: ignore[attr-defined]
    sys.modules["torchvision"], sys.modules["torchvision.transforms"] = torchvision, transforms
    try:
        yield
    finally:
        for name in ("torchvision.transforms", "torchvision"):
            if sys.modules.get(name) in (torchvision, transforms):
                del sys.modules[name]


def lpo_module(dotted: str) -> types.ModuleType:
    """Import ``lpo.<dotted>`` of the release as ``lpo_release.<dotted>``
    (``custom_diffusers.multi_sample_pipeline``, ``preference_models.compare_funcs``,
    ``preference_models.models.sd15_preference_model``, ...)."""
    require_release()
    _package(PACKAGE, ROOT)
    name = f"{PACKAGE}.{dotted}"
    if name in sys.modules:
        return sys.modules[name]
    if dotted.startswith("preference_models"):
        _package(f"{PACKAGE}.preference_models", ROOT / "preference_models")
        _package(f"{PACKAGE}.preference_models.models", ROOT / "preference_models" / "models")
        stub_builder(f"{PACKAGE}.preference_models.builder")
        path = ROOT / Path(*dotted.split(".")).with_suffix(".py")
        if "torchvision" in path.read_text():
            with _torchvision_stand_in(path):
                return importlib.import_module(name)
    return importlib.import_module(name)


def release_line(relative: str, text: str) -> str:
    """``file:line`` of the first line of the release file ``relative`` (under lpo/lpo) holding
    ``text``: for messages that cite the release."""
    path = ROOT / relative
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if text in line:
            return f"lpo/lpo/{relative}:{number}"
    raise AssertionError(f"{path}: no line holds {text!r}")


# ------------------------------------------------------------------ tiny pipelines the release can index
def multiscale_unet(kind: str, seed: int = 0) -> Any:
    """A tiny ``UNet2DConditionModel`` with the real models' block layout, which the release's
    hard-coded multi-scale indices assume (``down_block_res_samples[2, 5, 8, 11]``: two layers
    per down block): SD-1.5's three cross-attention down blocks and one plain (no downsampler),
    or SDXL's plain, cross-attention, cross-attention (text_time conditioning). The conftest's
    tiny pipelines have two blocks of one layer each, which those indices do not fit."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    if kind == "sd15":
        return UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=(16, 32, 32, 48), layers_per_block=2, cross_attention_dim=32,
            attention_head_dim=8, norm_num_groups=8,
        )
    if kind == "sdxl":
        return UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(16, 32, 48), layers_per_block=2, cross_attention_dim=64,
            attention_head_dim=(2, 4, 4), use_linear_projection=True, transformer_layers_per_block=(1, 1, 2),
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=8,
        )
    raise ValueError(f"unknown kind {kind!r}")


def save_multiscale_pipeline(kind: str, directory: Path, seed: int = 0) -> Path:
    """The tiny pipeline of ``kind`` (spo.backbones.tiny) with :func:`multiscale_unet` as its
    UNet, saved with ``save_pretrained`` to ``directory``."""
    from spo.backbones.tiny import build_tiny_sd15, build_tiny_sdxl

    pipeline = (build_tiny_sd15 if kind == "sd15" else build_tiny_sdxl)(seed=seed)
    pipeline.register_modules(unet=multiscale_unet(kind, seed))
    pipeline.save_pretrained(directory, safe_serialization=True)
    return directory


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread while a test module runs: the tiny models' ops are too small to share,
    and two threads on this two-core machine spin against any other process (a tiny UNet pass
    takes seconds instead of ~50 ms under load)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
