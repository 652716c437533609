"""Built-in references: ``toy:NAME`` names the toy world's shipped weights and prompt sets.

They let a preset point at files inside the installed package: ``model.pretrained: toy:base``,
``preference.pretrained: toy:spm``, ``data.prompts: toy:training-prompts``. Anything else passes
through unchanged (a local path or a hub id). The reward models ship in versions
(``toy:spm-v1``); the unversioned name is :data:`TOY_DEFAULT_VERSION`'s. The prompt sets ship as
text files written from the toy grammar (``tools/write_toy_prompts.py``; a test keeps them equal).

A configuration's references are resolved once, where it enters the running code
(:func:`resolve_references`); the configuration a run saves keeps the names as written.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ModelLoadError

if TYPE_CHECKING:
    from .config import SPOConfig

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
#: built-in names of models a recipe needs but that do not ship, and why (docs/toy-world.md)
NOT_SHIPPED = {
    "lrm": ("the toy latent reward model missed the capability targets registered before it was trained "
            "(docs/toy-world.md, 'LPO on the toy world'), so it ships only as a recipe. Build it (its 600 steps took 4.5 minutes "
            "on one core here): spo train-spm toy-lpo preference.pretrained=toy:base --output runs/toy-lrm, then give "
            "preference.pretrained=runs/toy-lrm/lrm"),
}
#: the toy grammar's prompt splits, one prompt per line (``tools/write_toy_prompts.py`` writes them)
TOY_PROMPT_SETS = {name: TOY_WEIGHTS / "prompts" / f"{name}.txt" for name in ("training-prompts", "validation-prompts")}
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
    if name in NOT_SHIPPED:
        raise BuiltinError(f"{what}: {ref!r} is not shipped: {NOT_SHIPPED[name]}")
    if name not in TOY_WEIGHT_NAMES:
        raise BuiltinError(f"{what}: unknown built-in weights {ref!r}; expected one of "
                           f"{[PREFIX + n for n in TOY_WEIGHT_NAMES]}")
    model, _, version = name.partition("-")
    path = TOY_WEIGHTS / name if model == "base" else TOY_WEIGHTS / (version or TOY_DEFAULT_VERSION) / model
    if not path.is_dir():
        raise BuiltinError(f"{what}: {ref!r}: the shipped weights are missing from this installation ({path})")
    return str(path)


def _shipped(ref: str | None, what: str | None, table: dict[str, Path], noun: str) -> str | None:
    """``toy:NAME`` of ``table`` -> the shipped path; any other value unchanged."""
    if ref is None or not is_builtin(ref):
        return ref
    name, lead = ref[len(PREFIX):], f"{what}: " if what else ""
    if name not in table:
        raise BuiltinError(f"{lead}unknown built-in {noun} {ref!r}; expected one of {[PREFIX + n for n in table]}")
    path = table[name]
    if not path.exists():
        raise BuiltinError(f"{lead}{ref!r}: the shipped {noun} is missing from this installation ({path})")
    return str(path)


def resolve_prompts(ref: str | None, what: str | None = "prompts") -> str | None:
    """``toy:training-prompts`` / ``toy:validation-prompts`` -> the shipped prompts file's path; any
    other value unchanged. ``what`` (the config field) leads the error message."""
    return _shipped(ref, what, TOY_PROMPT_SETS, "prompt set")


def builtin_prompts(ref: str) -> list[str]:
    """``toy:training-prompts`` / ``toy:validation-prompts`` -> the toy grammar's prompt split, as shipped."""
    path = Path(resolve_prompts(ref, None))  # type: ignore[arg-type]
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def resolve_data(ref: str | None, what: str = "data") -> str | None:
    """``toy:preference-data`` -> the shipped directory's path; any other value unchanged."""
    return _shipped(ref, what, TOY_DATA_SETS, "data set")


def resolve_references(config: "SPOConfig") -> "SPOConfig":
    """A copy of ``config`` with every ``toy:`` reference replaced by the shipped file's path: the
    weights (``model.pretrained``, ``model.vae``, ``preference.pretrained`` / ``processor`` /
    ``checkpoint`` / ``text_projection``, ``spm.relabel``), the data sets (``data.preference_data``, ``spm.data``) and the prompt sets
    (``data.prompts``, ``eval.prompts``). An unknown name raises :class:`BuiltinError` naming the field."""
    r = dataclasses.replace
    m, p, d, e, s = config.model, config.preference, config.data, config.eval, config.spm
    return r(
        config,
        model=r(m, pretrained=resolve_weights(m.pretrained, "model.pretrained"),
                vae=resolve_weights(m.vae, "model.vae") if m.vae is not None else None),
        preference=r(p, pretrained=resolve_weights(p.pretrained, "preference.pretrained"),
                     processor=resolve_weights(p.processor, "preference.processor") if p.processor is not None else None,
                     checkpoint=resolve_weights(p.checkpoint, "preference.checkpoint") if p.checkpoint is not None else None,
                     text_projection=(resolve_weights(p.text_projection, "preference.text_projection")
                                      if p.text_projection is not None else None)),
        data=r(d, prompts=resolve_prompts(d.prompts, "data.prompts"),
               preference_data=resolve_data(d.preference_data, "data.preference_data")),
        eval=r(e, prompts=resolve_prompts(e.prompts, "eval.prompts")),
        spm=r(s, data=resolve_data(s.data, "spm.data"),
              relabel=resolve_weights(s.relabel, "spm.relabel") if s.relabel is not None else None),
    )
