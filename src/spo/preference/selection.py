"""Which preference model a config asks for, said before it is loaded.

A step-aware run needs trained time modules: the released SPM state dict
(``preference.checkpoint``) or an SPM directory of ours (``preference.pretrained``). A plain CLIP
or PickScore alone would score with its time modules at identity, i.e. exactly as PickScore does;
that is a legitimate choice (the paper's "clean" rows) but it must be asked for, as
``preference.variant=clean``, so the config and the run's log say what scored the pools.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..builtin import BuiltinError, resolve_weights
from .spm import SPM_CONFIG


def is_spm_directory(pretrained: str | None) -> bool:
    """Whether ``pretrained`` names a saved SPM of ours (time modules included)."""
    if not pretrained:
        return False
    try:
        path = Path(resolve_weights(pretrained)).expanduser()
    except BuiltinError:
        return False  # the loader reports the unknown reference
    return (path / SPM_CONFIG).is_file()


def time_modules_problem(preference: Any) -> str | None:
    """Why ``preference`` (the config section) cannot score step-aware as asked, or ``None``."""
    if getattr(preference, "kind", "clip") == "latent":
        return None  # a latent reward model is step-aware by construction (the UNet reads t)
    if preference.variant != "step_aware" or preference.checkpoint or is_spm_directory(preference.pretrained):
        return None
    return (
        f"preference.variant=step_aware needs trained time modules, and preference.pretrained="
        f"{preference.pretrained!r} has none: set preference.checkpoint to the released SPM "
        "(SPO-Diffusion-Models/Step-Aware_Preference_Models/sd-v1-5_step-aware_preference_model.bin, or the "
        "sdxl_ one; a local path or REPO_ID/FILE) or preference.pretrained to an SPM directory, or score with "
        "the plain model on purpose: preference.variant=clean"
    )


def describe_preference(preference: Any) -> str:
    """One line saying what scores the samples (printed at the start of a run)."""
    if getattr(preference, "kind", "clip") == "latent":
        over = f" with the released LRM {preference.checkpoint}" if preference.checkpoint else ""
        return (f"preference model: latent reward model of {preference.pretrained}{over} "
                f"(scores latents at t; its guidance {preference.guidance_scale:g})")
    if preference.variant == "clean":
        return f"preference model: {preference.pretrained}, no time conditioning (preference.variant=clean)"
    if preference.checkpoint:
        source = f"{preference.pretrained} with the time modules of {preference.checkpoint}"
    else:
        source = f"{preference.pretrained} (an SPM directory)"
    if preference.variant == "step_agnostic":
        return f"preference model: {source}, fed t = 0 (preference.variant=step_agnostic)"
    return f"preference model: step-aware, {source}"
