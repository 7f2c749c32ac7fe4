"""The typed configuration (schema.py), its one validation pass (validate.py) and its reading and writing
(load.py). Builders are its only readers; modules take keyword-only arguments."""

from tmtseg.config.load import config_from_dict, diff, load_config, load_config_over, to_dict, to_yaml
from tmtseg.config.schema import (
    RUN_NEUTRAL,
    AdaptConfig,
    BackboneConfig,
    Config,
    DataConfig,
    InferConfig,
    LossConfig,
    ModelConfig,
    SplitConfig,
    TrainConfig,
)
from tmtseg.config.validate import validate

__all__ = [
    "RUN_NEUTRAL",
    "AdaptConfig",
    "BackboneConfig",
    "Config",
    "DataConfig",
    "InferConfig",
    "LossConfig",
    "ModelConfig",
    "SplitConfig",
    "TrainConfig",
    "config_from_dict",
    "diff",
    "load_config",
    "load_config_over",
    "to_dict",
    "to_yaml",
    "validate",
]
