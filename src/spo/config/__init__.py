"""Typed configuration of SPO runs: schema, presets, loading and validation.

Typical use::

    from spo.config import load_config

    cfg = load_config("sdxl", overrides=["pools.k=4", "train.rounds=10"])
    cfg.pools.threshold  # 0.4
"""

from .loading import (
    ConfigError,
    available_presets,
    config_to_dict,
    config_to_yaml,
    load_config,
    save_config,
    validate,
)
from .schema import (
    DataConfig,
    EvalConfig,
    LoggingConfig,
    LoRAConfig,
    ModelConfig,
    ObjectiveConfig,
    OptimizerConfig,
    PoolsConfig,
    PreferenceConfig,
    SamplingConfig,
    SPOConfig,
    TrainConfig,
)

__all__ = [
    "SPOConfig",
    "ModelConfig",
    "DataConfig",
    "SamplingConfig",
    "PoolsConfig",
    "PreferenceConfig",
    "ObjectiveConfig",
    "OptimizerConfig",
    "LoRAConfig",
    "TrainConfig",
    "LoggingConfig",
    "EvalConfig",
    "ConfigError",
    "available_presets",
    "load_config",
    "validate",
    "config_to_dict",
    "config_to_yaml",
    "save_config",
]
