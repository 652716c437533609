"""Shared fixtures: tiny random pipelines saved to disk once per session, loaded via from_pretrained."""

from __future__ import annotations

import os
from pathlib import Path

import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, str(Path(__file__).parent))  # test helpers (pickapic_fixture)
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_sd15_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from spo.backbones.tiny import save_tiny_pipeline

    return save_tiny_pipeline("sd15", tmp_path_factory.mktemp("tiny-sd15"), seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from spo.backbones.tiny import save_tiny_pipeline

    return save_tiny_pipeline("sdxl", tmp_path_factory.mktemp("tiny-sdxl"), seed=0)


@pytest.fixture(scope="session")
def tiny_sd3_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from spo.backbones.tiny import save_tiny_pipeline

    return save_tiny_pipeline("sd3", tmp_path_factory.mktemp("tiny-sd3"), seed=0)


@pytest.fixture(params=["sd15", "sdxl"])
def tiny_path(request: pytest.FixtureRequest) -> tuple[str, Path]:
    """(kind, directory) for each tiny UNet pipeline."""
    return request.param, request.getfixturevalue(f"tiny_{request.param}_path")


@pytest.fixture(params=["sd15", "sdxl", "sd3"])
def tiny_any_path(request: pytest.FixtureRequest) -> tuple[str, Path]:
    """(kind, directory) for each tiny pipeline, the flow model (SD3) included: for what must work
    through the backbone interface whatever the model family."""
    return request.param, request.getfixturevalue(f"tiny_{request.param}_path")


@pytest.fixture(scope="session")
def tiny_clip_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from spo.backbones.tiny import save_tiny_clip

    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"), seed=0)


@pytest.fixture(scope="session")
def lrm_sd15_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD-1.5 pipeline whose UNet has SD-1.5's block layout (4 down blocks of 2 layers: the
    LPO release's fixed multi-scale indices), built once for the LRM tests (tests/lpo_oracle.py)."""
    from lpo_oracle import save_multiscale_pipeline

    return save_multiscale_pipeline("sd15", tmp_path_factory.mktemp("lrm-sd15"))


@pytest.fixture(scope="session")
def lrm_sdxl_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same with SDXL's layout (3 down blocks of 2 layers)."""
    from lpo_oracle import save_multiscale_pipeline

    return save_multiscale_pipeline("sdxl", tmp_path_factory.mktemp("lrm-sdxl"))


@pytest.fixture(scope="session")
def tiny_sd15_fitted_vae_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD-1.5 pipeline whose VAE keeps layout through encode/decode (SPM training tests)."""
    from spo.backbones.tiny import save_tiny_pipeline

    return save_tiny_pipeline("sd15", tmp_path_factory.mktemp("tiny-sd15-vae"), seed=0, fit_vae_steps=150)


@pytest.fixture(scope="session")
def pickapic_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pickapic_fixture import save_pickapic

    return save_pickapic(tmp_path_factory.mktemp("pickapic") / "data", train=96, validation=48, ties=4, corrupt=2)


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():  # noqa: ANN202
    """accelerate keeps one AcceleratorState per process; tests build trainers with different
    mixed-precision settings, so each test starts from a fresh one (the process group stays)."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()


@pytest.fixture()
def prompts_file(tmp_path: Path) -> Path:
    """The trainer tests' prompts (``fixed_scorers.PROMPTS``), one per line."""
    from fixed_scorers import PROMPTS

    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


@pytest.fixture(scope="session")
def engine_runs(tiny_sd15_path: Path, pickapic_path: Path, tiny_clip_path: Path,
                tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """``engine_runs("fsdp")`` -> the directory of tests/multiprocess_fsdp.py's scenarios under
    that engine (engine_launch.py), launched once per session."""
    from engine_launch import EngineRuns

    return EngineRuns(tmp_path_factory.mktemp("engines"), tiny_sd15_path, pickapic_path, tiny_clip_path)
