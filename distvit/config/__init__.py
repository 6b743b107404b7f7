"""The run's configuration: one typed tree, loaded from YAML, overridden from the command line.

    cfg = load_config("configs/demo_digits.yaml", overrides=["optim.lr=3e-3", "run.name=try2"])

schema.py: the sections (pydantic, `extra="forbid"`); load.py: YAML with `base:` inheritance,
`--set` overrides, unknown-key suggestions and the one-line error texts; checks.py: the rules
that span sections. Runtime objects (process groups, engines) are never stored here: the tree
flows one way, into the trainer.
"""
from distvit.config.load import CONFIG_DIR, load_config, parse_override, save_config, shipped_configs
from distvit.config.schema import (
    CheckpointConfig, Config, ConfigError, DistillConfig, LogConfig, ModelConfig, OptimConfig, ParallelConfig,
    RunConfig, ScheduleConfig, Section, TaskConfig,
)

__all__ = [
    "CONFIG_DIR", "load_config", "parse_override", "save_config", "shipped_configs", "CheckpointConfig", "Config",
    "ConfigError", "DistillConfig", "LogConfig", "ModelConfig", "OptimConfig", "ParallelConfig", "RunConfig",
    "ScheduleConfig", "Section", "TaskConfig",
]
