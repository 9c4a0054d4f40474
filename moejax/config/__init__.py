"""Typed experiment configuration: frozen dataclasses, CLI overrides, and validation.

A config is six groups (`model`, `attention`, `data`, `mesh`, `train`, `pruning`). Config files in
`configs/` define `get_config() -> Config`; the command line overrides single fields with
`--config.model.num_experts=8`. `validate` checks every field before anything is compiled and
raises `ConfigError` naming the field, the value and what is allowed.
"""

from moejax.config.groups import (
    DTYPES,
    Config,
    ConfigError,
    DataConfig,
    MeshConfig,
    ModelConfig,
    TrainConfig,
    describe,
)
from moejax.config.loading import (
    apply_overrides,
    config_of,
    from_dict,
    load_config_file,
    load_config_module,
    load_json,
    save_json,
    to_dict,
    to_json,
)
from moejax.config.validation import (
    validate,
    validate_attention,
    validate_mesh,
    validate_model,
)
from moejax.pruning.config import PRUNING_MODES, LMPruningConfig

__all__ = [
    "DTYPES",
    "PRUNING_MODES",
    "Config",
    "ConfigError",
    "DataConfig",
    "LMPruningConfig",
    "MeshConfig",
    "ModelConfig",
    "TrainConfig",
    "apply_overrides",
    "config_of",
    "describe",
    "from_dict",
    "load_config_file",
    "load_config_module",
    "load_json",
    "save_json",
    "to_dict",
    "to_json",
    "validate",
    "validate_attention",
    "validate_mesh",
    "validate_model",
]
