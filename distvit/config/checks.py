"""Config rules that span sections, and names that must exist; run by `load_config` after pydantic.

Each error names the key, where its value came from (file or `--set` flag) and the fix.
"""
from __future__ import annotations

import difflib

from distvit.config.load import origin_of
from distvit.config.schema import Config, ConfigError


def check_across_sections(cfg: Config, origins: dict[str, str]) -> None:
    """Rules that span sections, and names that must exist: a value accepted here must not break later."""
    def bad(key: str, text: str) -> ConfigError:
        return ConfigError(f"bad value for config key '{key}' (from {origin_of(origins, key)}): {text}")

    if cfg.schedule.min_lr > cfg.optim.lr:
        raise bad("schedule.min_lr", f"{cfg.schedule.min_lr} is above the peak optim.lr={cfg.optim.lr} "
                  f"(from {origin_of(origins, 'optim.lr')}); set schedule.min_lr <= optim.lr, e.g. 0")
    for key, given, data_key in (("model.img_size", cfg.model.img_size, "data.img_size"),
                                 ("model.in_chans", cfg.model.in_chans, "data.in_chans")):
        have = getattr(cfg.data, data_key.split(".")[1], None)
        if given is not None and have is not None and given != have:
            raise bad(key, f"{given}, but the data loader yields {data_key}={have} (from {origin_of(origins, data_key)}); "
                      f"set both to the same value, or leave {key} unset (it follows {data_key})")
    from distvit import models

    for key, name in (("model.name", cfg.model.name), ("distill.teacher", cfg.distill.teacher)):
        if name is not None and name not in models.list_models():
            close = difflib.get_close_matches(name, models.list_models(), n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}?" if close else f"registered models: {', '.join(models.list_models())}"
            raise bad(key, f"no model named '{name}'; {hint}")
