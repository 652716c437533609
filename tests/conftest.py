"""Shared fixtures: tiny random pipelines saved to disk once per session, loaded via from_pretrained."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_sd15_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from spo.backbones.tiny import save_tiny_pipeline

    return save_tiny_pipeline("sd15", tmp_path_factory.mktemp("tiny-sd15"), seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from spo.backbones.tiny import save_tiny_pipeline

    return save_tiny_pipeline("sdxl", tmp_path_factory.mktemp("tiny-sdxl"), seed=0)


@pytest.fixture(params=["sd15", "sdxl"])
def tiny_path(request: pytest.FixtureRequest) -> tuple[str, Path]:
    """(kind, directory) for each tiny pipeline."""
    return request.param, request.getfixturevalue(f"tiny_{request.param}_path")
