"""Built-in references: ``toy:NAME`` names the toy world's shipped weights and prompt sets.

They let a preset point at files inside the installed package: ``model.pretrained: toy:base``,
``preference.pretrained: toy:spm``, ``data.prompts: toy:training-prompts``. Anything else passes
through unchanged (a local path or a hub id). The reward models ship in versions
(``toy:spm-v1``); the unversioned name is :data:`TOY_DEFAULT_VERSION`'s.
"""

from __future__ import annotations

from pathlib import Path

from .errors import ModelLoadError

PREFIX = "toy:"
#: the shipped toy weights: the base model at the top, each build's reward models (toy CLIP, toy
#: PickScore, toy SPM, as ``spo toy build --version V`` writes them to OUTPUT/{clip,pickscore,spm})
#: in a folder of its version
TOY_WEIGHTS = Path(__file__).parent / "toy" / "weights"
TOY_REWARD_MODELS = ("pickscore", "spm", "clip")
#: the builds ``spo toy build --version`` knows; the shipped ones (weights/VERSION) are named by ``toy:MODEL-VERSION``
TOY_BUILD_VERSIONS = ("v1", "v2")
TOY_REWARD_VERSIONS = ("v1",)
#: the version that ``toy:pickscore`` / ``toy:spm`` / ``toy:clip`` name (``toy:spm-v1`` names one)
TOY_DEFAULT_VERSION = "v1"
TOY_WEIGHT_NAMES = ("base", "base-flow", *TOY_REWARD_MODELS,
                    *(f"{m}-{v}" for v in TOY_REWARD_VERSIONS for m in TOY_REWARD_MODELS))
TOY_PROMPT_SETS = ("training-prompts", "validation-prompts")
#: the shipped toy generic preference pairs (Pick-a-Pic format, the v1 build's ``preference-data``):
#: what the toy PickScore and SPM were trained on, and what toy Diffusion-DPO trains on
TOY_DATA_SETS = {"preference-data": TOY_WEIGHTS / "v1" / "preference-data"}


class BuiltinError(ModelLoadError):
    """An unknown ``toy:`` reference (a model-loading error: the CLI prints it without a traceback)."""


def is_builtin(ref: str | Path | None) -> bool:
    return isinstance(ref, str) and ref.startswith(PREFIX)


def resolve_weights(ref: str, what: str = "weights") -> str:
    """``toy:NAME`` -> the shipped directory's path; any other string unchanged. ``what`` (the
    config field, e.g. ``model.pretrained``) leads the error message."""
    if not is_builtin(ref):
        return ref
    name = ref[len(PREFIX):]
    if name not in TOY_WEIGHT_NAMES:
        raise BuiltinError(f"{what}: unknown built-in weights {ref!r}; expected one of "
                           f"{[PREFIX + n for n in TOY_WEIGHT_NAMES]}")
    model, _, version = name.partition("-")
    path = TOY_WEIGHTS / name if model == "base" else TOY_WEIGHTS / (version or TOY_DEFAULT_VERSION) / model
    if not path.is_dir():
        raise BuiltinError(f"{what}: {ref!r}: the shipped weights are missing from this installation ({path})")
    return str(path)


def builtin_prompts(ref: str) -> list[str]:
    """``toy:training-prompts`` / ``toy:validation-prompts`` -> the toy grammar's prompt split."""
    from .toy.grammar import training_prompts, validation_prompts

    name = ref[len(PREFIX):]
    if name == "training-prompts":
        return training_prompts()
    if name == "validation-prompts":
        return validation_prompts()
    raise BuiltinError(f"unknown built-in prompt set {ref!r}; expected one of {[PREFIX + n for n in TOY_PROMPT_SETS]}")


def resolve_data(ref: str | None, what: str = "data") -> str | None:
    """``toy:preference-data`` -> the shipped directory's path; any other value unchanged."""
    if ref is None or not is_builtin(ref):
        return ref
    name = ref[len(PREFIX):]
    if name not in TOY_DATA_SETS:
        raise BuiltinError(f"{what}: unknown built-in data set {ref!r}; expected one of "
                           f"{[PREFIX + n for n in TOY_DATA_SETS]}")
    path = TOY_DATA_SETS[name]
    if not path.is_dir():
        raise BuiltinError(f"{what}: {ref!r}: the shipped data set is missing from this installation ({path})")
    return str(path)
