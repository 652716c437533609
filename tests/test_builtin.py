"""Built-in ``toy:`` references: the shipped prompt sets, and a configuration resolved once."""

from __future__ import annotations

from pathlib import Path

import pytest

from spo.builtin import TOY_PROMPT_SETS, BuiltinError, resolve_prompts, resolve_references, resolve_weights
from spo.config import config_to_dict, load_config
from spo.data import load_prompts
from spo.toy.grammar import training_prompts, validation_prompts


def test_shipped_prompt_sets_are_the_grammars() -> None:
    """The files ``toy:training-prompts`` / ``toy:validation-prompts`` name are what the grammar
    generates, line for line (after a grammar change: ``python tools/write_toy_prompts.py``)."""
    generated = {"training-prompts": training_prompts(), "validation-prompts": validation_prompts()}
    assert set(TOY_PROMPT_SETS) == set(generated)
    for name, prompts in generated.items():
        text = TOY_PROMPT_SETS[name].read_text(encoding="utf-8")
        assert text == "".join(f"{p}\n" for p in prompts), f"{TOY_PROMPT_SETS[name]} differs from the grammar: " \
            "run python tools/write_toy_prompts.py"
        assert load_prompts(f"toy:{name}") == prompts
        assert load_prompts(resolve_prompts(f"toy:{name}")) == prompts


def test_resolve_references_resolves_every_toy_field_and_nothing_else() -> None:
    config = load_config("toy", ["spm.data=toy:preference-data", "spm.relabel=toy:pickscore",
                                 "preference.processor=toy:clip", "data.preference_data=toy:preference-data"])
    before = config_to_dict(config)
    resolved = resolve_references(config)
    assert config_to_dict(config) == before  # a copy: the config as written is kept
    assert resolved.model.pretrained == resolve_weights("toy:base")
    assert resolved.preference.pretrained == resolve_weights("toy:spm")
    assert resolved.preference.processor == resolve_weights("toy:clip")
    assert resolved.spm.relabel == resolve_weights("toy:pickscore")
    assert Path(resolved.spm.data).is_dir() and resolved.data.preference_data == resolved.spm.data
    assert resolved.data.prompts == str(TOY_PROMPT_SETS["training-prompts"])
    assert resolved.eval.prompts == str(TOY_PROMPT_SETS["validation-prompts"])
    assert "toy:" not in str(config_to_dict(resolved))
    # only the reference fields differ; a resolved config resolves to itself
    changed = {f"{s}.{k}" for s, values in before.items() if isinstance(values, dict)
               for k, v in values.items() if config_to_dict(resolved)[s][k] != v}
    assert changed == {"model.pretrained", "preference.pretrained", "preference.processor", "spm.relabel", "spm.data",
                       "data.preference_data", "data.prompts", "eval.prompts"}
    assert resolve_references(resolved) == resolved
    plain = load_config("sd15")
    assert resolve_references(plain) == plain  # hub ids and paths pass through


def test_an_unknown_reference_names_its_field() -> None:
    with pytest.raises(BuiltinError, match="model.pretrained: unknown built-in weights 'toy:bsae'"):
        resolve_references(load_config("toy", ["model.pretrained=toy:bsae"]))
    with pytest.raises(BuiltinError, match="data.prompts: unknown built-in prompt set 'toy:prompts'"):
        resolve_references(load_config("toy", ["data.prompts=toy:prompts"]))
    with pytest.raises(BuiltinError, match="spm.data: unknown built-in data set"):
        resolve_references(load_config("toy", ["spm.data=toy:nothing"]))


def test_the_unshipped_toy_lrm_names_how_to_build_it() -> None:
    """toy:lrm missed its registered targets and does not ship: the reference fails with the one
    command that builds it (docs/toy-world.md), not as an unknown name."""
    import pytest

    from spo.builtin import BuiltinError, resolve_weights

    with pytest.raises(BuiltinError, match="spo train-spm toy-lpo preference.pretrained=toy:base"):
        resolve_weights("toy:lrm", "preference.pretrained")
