"""Tests of the typed configuration package :mod:`spo.config`."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from spo.config import (
    ConfigError,
    LoRAConfig,
    PoolsConfig,
    SPOConfig,
    available_presets,
    config_to_dict,
    config_to_yaml,
    load_config,
    save_config,
    validate,
)

PRESETS = ["sd15", "sd15-d3po", "sd15-ddpo", "sd15-diffusion-dpo", "sd15-lpo", "sd3", "sdxl", "sdxl-d3po",
           "sdxl-ddpo", "sdxl-diffusion-dpo", "sdxl-lpo", "toy", "toy-d3po", "toy-ddpo", "toy-diffusion-dpo",
           "toy-flow", "toy-lpo"]


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- presets


def test_available_presets_lists_bundled_yaml_files():
    assert available_presets() == PRESETS


def test_sd15_preset_carries_release_values():
    c = load_config("sd15")
    assert c.model.backbone == "sd15"
    assert c.model.pretrained == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert c.model.resolution is None  # the pipeline's native size: 512 for SD-1.5
    assert c.sampling.decode_batch_size == 8
    assert (c.sampling.num_inference_steps, c.sampling.eta, c.sampling.guidance_scale) == (20, 1.0, 5.0)
    assert (c.pools.k, c.pools.divert_start_step, c.pools.threshold, c.pools.inner_steps) == (4, 4, 0.3, 1)
    assert (c.objective.beta, c.objective.eps) == (10.0, 0.1)
    assert c.optimizer.lr == pytest.approx(6e-5)
    assert c.optimizer.betas == (0.9, 0.999)
    assert c.optimizer.weight_decay == pytest.approx(1e-4)
    assert c.optimizer.eps == pytest.approx(1e-8)
    assert c.optimizer.max_grad_norm is None  # the release's clip_grad_norm_ gets an exhausted iterator
    assert c.seed == 42
    assert (c.pools.kappa, c.pools.fold_last_step) == (None, False)
    assert c.train.carry_accumulation is False
    assert (c.lora.rank, c.lora.alpha) == (4, 4.0)
    assert c.lora.target_modules == ["to_q", "to_k", "to_v", "to_out.0"]
    assert (c.train.prompts_per_round, c.train.batch_size, c.train.gradient_accumulation_steps) == (10, 10, 1)
    assert c.preference.pretrained == "yuvalkirstain/PickScore_v1"
    assert c.preference.processor == "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    assert c.preference.checkpoint == ("SPO-Diffusion-Models/Step-Aware_Preference_Models/"
                                       "sd-v1-5_step-aware_preference_model.bin")
    assert c.preference.variant == "step_aware"
    assert c.train.rounds == 1000  # 10 epochs of 4k prompts at 10 prompts x 4 GPUs


def test_sdxl_preset_carries_release_values():
    c = load_config("sdxl")
    assert c.model.backbone == "sdxl"
    assert c.model.pretrained == "stabilityai/stable-diffusion-xl-base-1.0"
    assert c.model.vae == "madebyollin/sdxl-vae-fp16-fix"
    assert c.model.resolution is None  # the pipeline's native size: 1024 for SDXL
    assert c.sampling.decode_batch_size == 1  # 1024 px decodes one at a time (memory only)
    assert (c.pools.k, c.pools.threshold, c.pools.inner_steps) == (2, 0.4, 4)
    assert c.pools.divert_start_step == 4
    assert c.optimizer.lr == pytest.approx(1e-5)
    assert (c.lora.rank, c.lora.alpha) == (64, 64.0)
    assert (c.train.prompts_per_round, c.train.batch_size, c.train.gradient_accumulation_steps) == (2, 2, 2)
    assert (c.objective.beta, c.objective.eps) == (10.0, 0.1)
    assert (c.sampling.guidance_scale, c.sampling.eta) == (5.0, 1.0)
    assert c.preference.pretrained == "yuvalkirstain/PickScore_v1"
    assert c.preference.checkpoint == ("SPO-Diffusion-Models/Step-Aware_Preference_Models/"
                                       "sdxl_step-aware_preference_model.bin")
    assert c.optimizer.max_grad_norm is None and c.seed == 42
    assert c.train.rounds == 5000  # 10 epochs of 4k prompts at 2 prompts x 4 GPUs
    assert c.pools.fold_last_step and c.train.carry_accumulation


@pytest.mark.parametrize("name", ["sd15-d3po", "sd15-ddpo", "sd15-diffusion-dpo", "sdxl-d3po", "sdxl-ddpo",
                                  "sdxl-diffusion-dpo", "toy"])
def test_other_methods_keep_their_own_clipping_and_reward(name: str) -> None:
    """The SPO presets' release facts (no clipping, the released SPM, carried accumulation) do not
    leak into the baselines' presets that start from them, nor into the toy recipe."""
    c = load_config(name)
    assert c.optimizer.max_grad_norm == 1.0
    assert c.train.carry_accumulation is False
    assert c.preference.checkpoint is None


def test_presets_give_exact_python_types():
    for name in PRESETS:
        c = load_config(name)
        assert type(c.optimizer.lr) is float  # "6.0e-5" in YAML, not a str
        assert type(c.lora.alpha) is float  # int in YAML, coerced to the float annotation
        assert type(c.optimizer.betas) is tuple


def test_defaults_are_the_sd15_release_values():
    defaults = load_config()
    assert defaults == SPOConfig()
    sd15 = load_config("sd15")
    assert defaults.lora.alpha is None  # None means alpha = rank; the preset spells out 4
    sd15.lora.alpha = None
    assert defaults.preference.checkpoint is None  # the preset names the released SPM on the hub
    sd15.preference.checkpoint = None
    # the preset trains in fp16 as the release's accelerate config; the defaults run anywhere
    assert (sd15.model.dtype, sd15.train.mixed_precision) == ("float16", "fp16")
    assert (defaults.model.dtype, defaults.train.mixed_precision) == ("float32", "no")
    sd15.model.dtype, sd15.train.mixed_precision = "float32", "no"
    assert sd15 == defaults


def test_default_lists_are_not_shared_between_instances():
    a, b = LoRAConfig(), LoRAConfig()
    a.target_modules.append("proj")
    assert b.target_modules == ["to_q", "to_k", "to_v", "to_out.0"]


def test_unknown_preset_lists_available_ones():
    with pytest.raises(ConfigError) as info:
        load_config("sd21")
    message = str(info.value)
    assert "sd21" in message
    assert "sd15" in message and "sdxl" in message


def test_missing_file_is_reported_with_presets(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert "nope.yaml" in str(info.value)
    assert "sd15" in str(info.value)


# --------------------------------------------------------------------------- YAML files


def test_yaml_file_starting_from_preset(tmp_path):
    path = write_yaml(tmp_path / "run.yaml", """
preset: sdxl
seed: 7
pools:
  k: 3
train:
  rounds: 5
""")
    c = load_config(path)
    assert (c.seed, c.pools.k, c.train.rounds) == (7, 3, 5)
    # untouched keys of a changed section keep the preset's values
    assert (c.pools.threshold, c.pools.inner_steps) == (0.4, 4)
    # untouched sections too
    assert c.model.backbone == "sdxl" and c.lora.rank == 64
    # a str path works as well as a Path
    assert load_config(str(path)) == c


def test_yaml_file_without_preset_merges_over_defaults(tmp_path):
    path = write_yaml(tmp_path / "run.yaml", "optimizer:\n  lr: 3e-5\n")
    c = load_config(path)
    assert c.optimizer.lr == pytest.approx(3e-5)  # PyYAML leaves "3e-5" a str; it is coerced
    assert c.optimizer.betas == (0.9, 0.999)
    assert c.pools == PoolsConfig()


def test_yaml_preset_may_be_a_relative_file(tmp_path):
    write_yaml(tmp_path / "base.yaml", "preset: sdxl\npools:\n  k: 6\n")
    path = write_yaml(tmp_path / "child.yaml", "preset: base.yaml\ntrain:\n  rounds: 2\n")
    c = load_config(path)
    assert (c.model.backbone, c.pools.k, c.train.rounds) == ("sdxl", 6, 2)


def test_yaml_unknown_preset_key(tmp_path):
    path = write_yaml(tmp_path / "run.yaml", "preset: sd4\n")
    with pytest.raises(ConfigError, match="sd4") as info:
        load_config(path)
    assert "sd15, sd15-d3po" in str(info.value)


def test_circular_presets_are_rejected(tmp_path):
    write_yaml(tmp_path / "a.yaml", "preset: b.yaml\n")
    write_yaml(tmp_path / "b.yaml", "preset: a.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "a.yaml")


def test_empty_yaml_file_and_empty_section_are_defaults(tmp_path):
    assert load_config(write_yaml(tmp_path / "empty.yaml", "")) == SPOConfig()
    assert load_config(write_yaml(tmp_path / "s.yaml", "pools:\n")) == SPOConfig()


def test_yaml_mistyped_key_suggests_correction(tmp_path):
    path = write_yaml(tmp_path / "run.yaml", "pools:\n  treshold: 0.2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "'pools.treshold'" in message
    # the closest key first (pools.threshold_min / _max are close too since LPO's threshold schedule)
    assert re.search(r"did you mean (one of )?'pools\.threshold'", message), message
    assert "run.yaml" in message


def test_yaml_unknown_top_level_section(tmp_path):
    path = write_yaml(tmp_path / "run.yaml", "optimiser:\n  lr: 1.0e-4\n")
    with pytest.raises(ConfigError, match="did you mean 'optimizer'"):
        load_config(path)


def test_yaml_section_given_scalar_and_key_given_mapping(tmp_path):
    path = write_yaml(tmp_path / "run.yaml", "pools: 3\nlora:\n  rank: {a: 1}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert len(info.value.errors) == 2
    assert "section 'pools' must be a mapping" in str(info.value)
    assert "lora.rank must be int" in str(info.value)


def test_yaml_top_level_must_be_mapping(tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write_yaml(tmp_path / "run.yaml", "- a\n- b\n"))


def test_yaml_duplicate_keys_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match="duplicate key 'k'"):
        load_config(write_yaml(tmp_path / "run.yaml", "pools:\n  k: 2\n  k: 3\n"))


def test_yaml_syntax_error_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(write_yaml(tmp_path / "run.yaml", "pools: [k: 2\n"))


# --------------------------------------------------------------------------- overrides


def test_overrides_of_each_type():
    c = load_config("sd15", [
        "seed=3",
        "pools.threshold=0.25",
        "sampling.guidance_scale=7",      # int accepted for a float
        "optimizer.lr=1e-4",              # YAML 1.1 str, coerced to float
        "model.gradient_checkpointing=true",
        "model.backbone=sdxl",
        "model.vae=some/vae",
        "objective.eps=null",
        "optimizer.max_grad_norm=null",
        "pools.kappa=700",
        "lora.target_modules=[to_q,to_k]",
        "optimizer.betas=[0.9,0.99]",
    ])
    assert c.seed == 3
    assert c.pools.threshold == 0.25
    assert c.sampling.guidance_scale == 7.0 and type(c.sampling.guidance_scale) is float
    assert c.optimizer.lr == pytest.approx(1e-4) and type(c.optimizer.lr) is float
    assert c.model.gradient_checkpointing is True
    assert c.model.backbone == "sdxl"
    assert c.model.vae == "some/vae"
    assert c.objective.eps is None
    assert c.optimizer.max_grad_norm is None
    assert c.pools.kappa == 700
    assert c.lora.target_modules == ["to_q", "to_k"]
    assert c.optimizer.betas == (0.9, 0.99)


def test_override_string_fields_keep_the_typed_text():
    c = load_config(None, ["model.revision=0123", "sampling.negative_prompt=no"])
    assert c.model.revision == "0123"  # not the YAML 1.1 octal int 83
    assert c.sampling.negative_prompt == "no"  # not False
    c = load_config(None, ["data.prompts=my prompts: v2.txt", "model.pretrained=[x]"])
    assert c.data.prompts == "my prompts: v2.txt"  # not a mapping
    assert c.model.pretrained == "[x]"
    assert load_config(None, ["data.prompts=null"]).data.prompts is None


def test_override_whole_section_mapping():
    c = load_config("sd15", ["pools={k: 3, threshold: 0.1}"])
    assert (c.pools.k, c.pools.threshold, c.pools.inner_steps) == (3, 0.1, 1)


def test_overrides_apply_in_order_after_the_file(tmp_path):
    path = write_yaml(tmp_path / "run.yaml", "preset: sd15\npools:\n  k: 6\n")
    assert load_config(path, ["pools.k=3", "pools.k=5"]).pools.k == 5
    assert load_config(path, ["pools.k=5", "pools.k=3"]).pools.k == 3
    assert load_config(path).pools.k == 6


def test_override_reverted_value_does_not_trip_validation():
    # A value only has to be valid at the end of all the layers.
    c = load_config("sd15", ["sampling.num_inference_steps=50", "pools.divert_start_step=30"])
    assert c.pools.divert_start_step == 30


@pytest.mark.parametrize("preset", PRESETS)
def test_public_contract_keys_work_in_every_preset(preset, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n", encoding="utf-8")
    model_dir = tmp_path / "model"
    c = load_config(preset, [
        f"model.pretrained={model_dir}",
        f"data.prompts={prompts}",
        "train.rounds=2",
        "seed=11",
        "pools.k=3",
        "pools.threshold=0.15",
        "logging.checkpoint_every=1",
        f"preference.pretrained={tmp_path / 'pickscore'}",
    ])
    assert c.model.pretrained == str(model_dir)
    assert c.data.prompts == str(prompts)
    assert c.train.rounds == 2
    assert c.seed == 11
    assert c.pools.k == 3
    assert c.pools.threshold == 0.15
    assert c.logging.checkpoint_every == 1
    assert c.preference.pretrained == str(tmp_path / "pickscore")
    assert c.model.backbone == preset.split("-")[0]  # the rest of the preset is intact


def test_override_mistyped_key_suggests_correction():
    with pytest.raises(ConfigError) as info:
        load_config("sd15", ["pools.treshold=0.2"])
    assert re.search(r"unknown config key 'pools\.treshold'; did you mean (one of )?'pools\.threshold'[,?]",
                     str(info.value)), str(info.value)


def test_override_key_in_wrong_section_suggests_right_one():
    with pytest.raises(ConfigError, match="did you mean .*'optimizer.lr'"):
        load_config("sd15", ["pools.lr=1e-4"])
    with pytest.raises(ConfigError, match="did you mean 'pools.threshold'"):
        load_config("sd15", ["threshold=0.2"])


def test_override_unknown_section():
    with pytest.raises(ConfigError) as info:
        load_config("sd15", ["poolz.k=3"])
    assert "'poolz'" in str(info.value) and "did you mean 'pools'" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config("sd15", ["zzz.k=3"])
    assert "valid keys in the top level are: seed, model, data" in str(info.value)


def test_override_unknown_key_without_close_match_lists_section_keys():
    with pytest.raises(ConfigError) as info:
        load_config("sd15", ["pools.foo=1"])
    assert "valid keys in section 'pools' are: k, divert_start_step, kappa" in str(info.value)


def test_override_without_equals_shows_expected_form():
    with pytest.raises(ConfigError) as info:
        load_config("sd15", ["pools.k"])
    assert "'pools.k'" in str(info.value)
    assert "section.key=value" in str(info.value)


def test_override_through_a_value_and_empty_key_fail():
    with pytest.raises(ConfigError, match="'pools.k' is a value"):
        load_config(None, ["pools.k.x=1"])
    with pytest.raises(ConfigError, match="dotted name"):
        load_config(None, ["=1"])
    with pytest.raises(ConfigError, match="section 'pools' must be a mapping"):
        load_config(None, ["pools=3"])


def test_single_override_string_is_not_split_into_characters():
    assert load_config(None, "pools.k=3").pools.k == 3


# --------------------------------------------------------------------------- type errors


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("pools.k=four", ["pools.k must be int", "'four' (str)"]),
        ("pools.k=2.5", ["pools.k must be int", "2.5 (float)"]),
        ("pools.k=true", ["pools.k must be int", "True (bool)"]),
        ("pools.threshold=yes", ["pools.threshold must be float", "True (bool)"]),
        ("pools.threshold=high", ["pools.threshold must be float", "'high' (str)"]),
        ("model.gradient_checkpointing=1", ["model.gradient_checkpointing must be bool", "1 (int)"]),
        ("model.gradient_checkpointing=on_", ["must be bool", "'on_' (str)"]),
        ("model.backbone=sd21", ["model.backbone must be one of 'sd15', 'sd3', 'sdxl', 'toy'", "'sd21' (str)"]),
        ("pools.resampler=winner", ["'random', 'win', 'lose'", "'winner'"]),
        ("objective.eps=tiny", ["objective.eps must be float", "'tiny' (str)"]),
        ("lora.target_modules=to_q", ["lora.target_modules must be list[str]", "'to_q' (str)"]),
        ("lora.target_modules=[to_q,3]", ["lora.target_modules[1] must be str", "3 (int)"]),
        ("optimizer.betas=[0.9]", ["optimizer.betas must be tuple[float, float]", "[0.9] (list)"]),
        ("optimizer.betas=[0.9,x]", ["optimizer.betas[1] must be float", "'x' (str)"]),
        ("train.rounds=null", ["train.rounds must be int", "null"]),
        ("model.pretrained=null", ["model.pretrained must be str", "null"]),
        ("seed=[1]", ["seed must be int", "[1] (list)"]),
    ],
)
def test_wrong_types_name_key_and_received_value(override, fragments):
    with pytest.raises(ConfigError) as info:
        load_config("sd15", [override])
    for fragment in fragments:
        assert fragment in str(info.value)


def test_yaml_wrong_type_names_key_and_value(tmp_path):
    path = write_yaml(tmp_path / "run.yaml", "pools:\n  k: four\n")
    with pytest.raises(ConfigError, match=r"pools.k must be int, got 'four' \(str\)"):
        load_config(path)


# --------------------------------------------------------------------------- value validation


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["pools.k=1"], "pools.k must be >= 2"),
        (["pools.threshold=1.0"], "pools.threshold must satisfy 0 <= threshold < 1"),
        (["pools.threshold=-0.1"], "pools.threshold must satisfy 0 <= threshold < 1"),
        (["pools.kappa=1000"], "pools.kappa=1000 is beyond the schedule"),
        (["pools.kappa=-1"], "beyond the schedule"),
        (["sampling.num_train_timesteps=500", "pools.kappa=600"], "[0, 499]"),
        (["pools.inner_steps=0"], "pools.inner_steps must be >= 1"),
        (["pools.divert_start_step=20"], "pools.divert_start_step must satisfy"),
        (["pools.divert_start_step=-1"], "pools.divert_start_step must satisfy"),
        (["sampling.eta=-0.5"], "sampling.eta must be >= 0"),
        (["sampling.guidance_scale=0"], "sampling.guidance_scale must be > 0"),
        (["objective.beta=0"], "objective.beta must be > 0"),
        (["objective.eps=0"], "objective.eps must be null"),
        (["objective.eps=1"], "objective.eps must be null"),
        (["optimizer.lr=0"], "optimizer.lr must be > 0"),
        (["lora.rank=0"], "lora.rank must be >= 1"),
        (["lora.dropout=1.0"], "lora.dropout must satisfy 0 <= dropout < 1"),
        (["train.rounds=0"], "train.rounds must be >= 1"),
        (["train.batch_size=0"], "train.batch_size must be >= 1"),
        (["train.prompts_per_round=0"], "train.prompts_per_round must be >= 1"),
        (["train.gradient_accumulation_steps=0"], "train.gradient_accumulation_steps must be >= 1"),
        (["model.resolution=500"], "model.resolution must be null (the pipeline's native size) or a positive multiple of 8"),
        (["model.resolution=0"], "model.resolution must be null"),
        (["sampling.decode_batch_size=0"], "sampling.decode_batch_size must be null (all at once) or >= 1"),
        (["logging.checkpoint_every=0"], "logging.checkpoint_every must be >= 1"),
        (["logging.log_every=0"], "logging.log_every must be >= 1"),
        (["eval.seeds=0"], "eval.seeds must be >= 1"),
        (["lora.target_modules=[]"], "lora.target_modules must be a non-empty list"),
        (["optimizer.betas=[0.9,1.0]"], "optimizer.betas"),
    ],
)
def test_invalid_values_fail(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        load_config("sd15", overrides)
    assert fragment in str(info.value)
    assert len(info.value.errors) == 1


@pytest.mark.parametrize(
    "overrides",
    [
        ["pools.kappa=999"],
        ["pools.kappa=0"],
        ["pools.threshold=0"],
        ["sampling.guidance_scale=1.0"],
        ["sampling.eta=0"],
        ["pools.divert_start_step=0"],
        ["pools.divert_start_step=19"],
        ["objective.eps=null"],
        ["lora.dropout=0.5"],
        ["model.resolution=8"],
        ["model.resolution=null"],
        ["sampling.decode_batch_size=null"],
        ["sampling.decode_batch_size=1"],
    ],
)
def test_boundary_values_are_accepted(overrides):
    load_config("sd15", overrides)


def test_zero_inference_steps_reports_every_dependent_rule():
    with pytest.raises(ConfigError) as info:
        load_config("sd15", ["sampling.num_inference_steps=0"])
    message = str(info.value)
    assert "sampling.num_inference_steps must be >= 1" in message
    assert "pools.divert_start_step must satisfy" in message
    assert "pools.inner_steps (1) must not exceed" in message


def test_divert_step_is_checked_against_the_final_step_count():
    with pytest.raises(ConfigError, match=r"sampling.num_inference_steps \(4\)"):
        load_config("sd15", ["sampling.num_inference_steps=4"])


def test_multiple_errors_are_reported_together(tmp_path):
    path = write_yaml(tmp_path / "run.yaml", "pools:\n  treshold: 0.2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["pools.k=1", "lora.rank=0", "train.rounds=x", "pools.threshold=1.5"])
    errors = info.value.errors
    assert len(errors) == 5
    message = str(info.value)
    assert "5 problems" in message
    for fragment in ["pools.treshold", "pools.k must be >= 2", "lora.rank must be >= 1",
                     "train.rounds must be int", "pools.threshold must satisfy"]:
        assert fragment in message


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_validate_checks_configs_built_in_code():
    config = SPOConfig()
    validate(config)  # defaults are valid
    config.pools.k = 1
    config.optimizer.lr = "fast"  # type: ignore[assignment]
    config.lora = dataclasses.replace(config.lora, rank=0)
    with pytest.raises(ConfigError) as info:
        validate(config)
    # wrong types are reported first (ranges can't be checked on them)
    assert "optimizer.lr must be float, got 'fast' (str)" in str(info.value)
    config.optimizer.lr = 1e-4
    with pytest.raises(ConfigError) as info:
        validate(config)
    assert len(info.value.errors) == 2


# --------------------------------------------------------------------------- serialisation


@pytest.mark.parametrize("preset", PRESETS)
def test_save_load_round_trip(preset, tmp_path):
    # objective.eps is a setting of the methods with a ratio clamp (SPO, D3PO) only
    clamped = hasattr(load_config(preset).objective, "eps")
    original = load_config(preset, [
        *(["objective.eps=null"] if clamped else []),
        "pools.kappa=750",
        "sampling.negative_prompt=null",
        "model.revision='0123'",
        "lora.target_modules=[to_q, 'yes']",
        "optimizer.betas=[0.8,0.95]",
        "data.prompts=prompts: with colon.txt",
    ])
    path = save_config(original, tmp_path / "out" / "config.yaml")
    assert path.is_file()
    loaded = load_config(path)
    assert loaded == original
    assert loaded.lora.target_modules == ["to_q", "yes"]
    assert loaded.optimizer.betas == (0.8, 0.95)


def test_config_to_dict_is_plain_and_ordered():
    d = config_to_dict(load_config("sdxl"))
    assert list(d) == [f.name for f in dataclasses.fields(SPOConfig)]
    assert d["optimizer"]["betas"] == [0.9, 0.999]
    assert d["pools"]["k"] == 2
    assert all(isinstance(v, dict) for k, v in d.items() if k != "seed")


def test_config_to_yaml_keeps_declaration_order():
    text = config_to_yaml(load_config("sd15"))
    sections = [line.rstrip(":") for line in text.splitlines() if line and not line.startswith(" ")]
    assert sections[0] == "seed: 42"
    assert sections[1:] == ["model", "data", "sampling", "pools", "preference", "objective",
                            "optimizer", "lora", "train", "logging", "eval", "spm"]
    assert yaml.safe_load(text) == config_to_dict(load_config("sd15"))


def test_yaml_no_is_the_literal_no(tmp_path) -> None:
    """YAML 1.1 reads ``no`` as false; a Literal with a "no" option takes it as that word."""
    assert load_config("sd15", ["train.mixed_precision=no"]).train.mixed_precision == "no"
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  mixed_precision: no\n")
    assert load_config(path).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="mixed_precision"):
        load_config("sd15", ["train.mixed_precision=yes"])


def test_method_presets_hold_the_published_defaults():
    """Each baseline preset: its method and the defaults of its authors' code (baselines-facts.md)."""
    for backbone in ("sd15", "sdxl", "toy"):
        dpo = load_config(f"{backbone}-diffusion-dpo")
        assert dpo.objective.name == "diffusion_dpo" and dpo.objective.beta == 5000.0
        assert (dpo.data.keep_ties, dpo.data.empty_caption_probability) == (False, 0.2)
        d3po = load_config(f"{backbone}-d3po")
        assert d3po.objective.name == "d3po" and (d3po.objective.beta, d3po.objective.eps) == (0.1, 0.1)
        assert d3po.objective.samples_per_prompt == 2 and d3po.preference.variant == "clean"
        ddpo = load_config(f"{backbone}-ddpo")
        assert ddpo.objective.name == "ddpo" and (ddpo.objective.clip_range, ddpo.objective.adv_clip_max) == (1e-4, 5.0)
        assert ddpo.objective.per_prompt_stat_tracking and ddpo.preference.variant == "clean"
        assert (ddpo.objective.stat_buffer_size, ddpo.objective.stat_min_count) == (16, 16)
    assert load_config("sd15-ddpo").sampling.num_inference_steps == 50
    assert load_config("sd15-ddpo").optimizer.lr == 3e-4 and load_config("sd15-d3po").optimizer.lr == 3e-5
    # the toy world's rule: published learning rate x 5 (toy SPO 3e-4 / release SPO 6e-5)
    assert load_config("toy").optimizer.lr / load_config("sd15").optimizer.lr == pytest.approx(5.0)
    for method, published in (("d3po", 3e-5), ("ddpo", 3e-4), ("diffusion-dpo", 1e-5)):
        assert load_config(f"toy-{method}").optimizer.lr == pytest.approx(5 * published)
        assert load_config(f"toy-{method}").model.pretrained == "toy:base"


def test_lpo_presets_hold_the_release_numbers():
    """sd15-lpo, sdxl-lpo and toy-lpo: the LPO release's settings (its exp configs over
    basic_config.py: lpo_sd-v1-5_..._thresh035-05-sigma.py, lpo_sdxl_..._thresh45-6-sigma.py)."""
    from spo.objectives.lpo import LPOConfig

    for name, (low, high) in (("sd15-lpo", (0.35, 0.5)), ("sdxl-lpo", (0.45, 0.6)), ("toy-lpo", (0.35, 0.5))):
        c = load_config(name)
        assert type(c.objective) is LPOConfig and c.objective.name == "lpo", name
        assert (c.objective.beta, c.objective.eps, c.objective.cfg) == (500.0, 0.1, True), name
        assert (c.pools.k, c.pools.divert_start_step, c.pools.inner_steps) == (4, 0, 1), name
        assert (c.pools.threshold_schedule, c.pools.threshold_min, c.pools.threshold_max) == ("sigma", low, high), name
        p = c.preference
        assert (p.kind, p.guidance_scale, p.multi_scale, p.multi_scale_cfg) == ("latent", 7.5, True, False), name
        assert c.model.backbone == name.split("-")[0]
    sd15, sdxl = load_config("sd15-lpo"), load_config("sdxl-lpo")
    # sampling is SPO's (basic_config: 20 DDIM steps, eta 1, CFG 5); the 7.5 of "cfg75" is the LRM's
    for c in (sd15, sdxl):
        assert (c.sampling.num_inference_steps, c.sampling.eta, c.sampling.guidance_scale) == (20, 1.0, 5.0)
        assert c.optimizer.max_grad_norm is None  # the release clips an exhausted filter iterator
        assert c.preference.dtype == "float16"
    assert sd15.optimizer.lr == pytest.approx(6e-5) and (sd15.lora.rank, sd15.lora.alpha) == (4, 4.0)
    assert (sd15.train.prompts_per_round, sd15.train.batch_size, sd15.train.gradient_accumulation_steps) == (5, 10, 1)
    assert sd15.pools.fold_last_step is False
    assert sd15.preference.pretrained == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert sd15.preference.checkpoint == "casiatao/LRM/lrm_sd15"
    assert sd15.preference.text_projection == "openai/clip-vit-large-patch14"
    assert sdxl.optimizer.lr == pytest.approx(1e-5) and (sdxl.lora.rank, sdxl.lora.alpha) == (64, 64.0)
    assert (sdxl.train.prompts_per_round, sdxl.train.batch_size, sdxl.train.gradient_accumulation_steps) == (4, 4, 1)
    assert sdxl.pools.fold_last_step is False and sdxl.train.carry_accumulation is False
    assert sdxl.preference.pretrained == "stabilityai/stable-diffusion-xl-base-1.0"
    assert sdxl.preference.checkpoint == "casiatao/LRM/lrm_sdxl"
    toy = load_config("toy-lpo")
    assert toy.model.pretrained == "toy:base" and toy.preference.pretrained == "toy:lrm"
    # the LRM's checks: LPO needs a latent judge
    with pytest.raises(ConfigError, match="preference.kind"):
        load_config("sd15-lpo", ["preference.kind=clip"])


def test_method_settings_are_checked():
    with pytest.raises(ConfigError, match="objective.samples_per_prompt"):
        load_config("toy-d3po", ["objective.samples_per_prompt=1"])
    with pytest.raises(ConfigError, match="objective.name"):
        load_config("toy", ["objective.name=grpo"])
    with pytest.raises(ConfigError, match="data.empty_caption_probability"):
        load_config("toy-diffusion-dpo", ["data.empty_caption_probability=1.0"])
    with pytest.raises(ConfigError, match="objective.clip_range"):
        load_config("toy-ddpo", ["objective.clip_range=0"])
