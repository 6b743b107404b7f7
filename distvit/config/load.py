"""The run's configuration: one typed tree, loaded from YAML, overridden from the command line.

    cfg = load_config("configs/demo_digits.yaml", overrides=["optim.lr=3e-3", "run.name=try2"])

A YAML file may inherit from other files with a top-level `base:` (a path relative to the file,
or the name of a shipped config such as `demo_digits`, or a list of them, merged in order, the
file itself last). `--set section.key=value` values are
parsed as YAML scalars (`1e-3`, `true`, `[1, 2]`, `null`) and then validated against the field's
type by pydantic. Every error is one line naming the bad key, where it came from (file or flag)
and the fix; unknown keys get a difflib suggestion.

Each section is a pydantic model with `extra="forbid"`; the data section belongs to the data
package (`distvit.data.config.DataConfig`). Runtime objects (process groups, engines) are never
stored here: the tree flows one way, into the trainer.
"""
from __future__ import annotations

import difflib
import re
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from distvit.config.schema import Config, ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def shipped_configs() -> list[str]:
    return sorted(p.name for p in CONFIG_DIR.glob("*.yaml")) if CONFIG_DIR.is_dir() else []


def resolve_config_path(path: str | Path) -> Path:
    """A path as given, else a name under configs/ (with or without .yaml)."""
    p = Path(path)
    candidates = [p, CONFIG_DIR / p, CONFIG_DIR / f"{p}.yaml"] if not p.is_absolute() else [p]
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(
        f"config file '{path}' not found; configs that ship (in {CONFIG_DIR}): "
        + (", ".join(shipped_configs()) or "none")
    )


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]}); fix the file's syntax") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (run:, model:, ...), got {type(data).__name__}")
    return data


def _merge(dst: dict, src: dict, origins: dict[str, str], origin: str, prefix: str = "") -> None:
    """Deep-merge src into dst, recording for every leaf key where its value came from."""
    for key, value in src.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge(dst[key], value, origins, origin, dotted + ".")
        else:
            dst[key] = value
            _record(origins, dotted, value, origin)


def _record(origins: dict[str, str], dotted: str, value: Any, origin: str) -> None:
    origins[dotted] = origin
    if isinstance(value, dict):
        for k, v in value.items():
            _record(origins, f"{dotted}.{k}", v, origin)


def _load_file(path: Path, origins: dict[str, str], stack: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in stack:
        chain = " -> ".join(str(p) for p in (*stack, path))
        raise ConfigError(f"config inheritance loops: {chain}; remove one of the `base:` entries")
    data = _read_yaml(path)
    bases = data.pop("base", None)
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else (bases or []):
        base_path = (path.parent / base) if not Path(base).is_absolute() else Path(base)
        if not base_path.is_file() and not Path(base).is_absolute():  # a shipped config by name, as --config finds it
            base_path = next((c for c in (CONFIG_DIR / base, CONFIG_DIR / f"{base}.yaml") if c.is_file()), base_path)
        if not base_path.is_file():
            raise ConfigError(f"{path}: base '{base}' not found (looked at {base_path} and in {CONFIG_DIR}); fix the "
                              f"`base:` path, or name a shipped config: {', '.join(shipped_configs()) or 'none'}")
        _merge(merged, _load_file(base_path, origins, (*stack, path)), origins, str(base_path))
    _merge(merged, data, origins, str(path))
    return merged


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected section.key=value, e.g. --set optim.lr=3e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or "." not in key:
        raise ConfigError(f"--set {text}: the key must name a section and a field, e.g. optim.lr")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def _apply_override(tree: dict, key: str, value: Any, origins: dict[str, str], origin: str) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{origin}: '{key}' goes through a value that is not a section")
    node[parts[-1]] = value
    _record(origins, key, value, origin)


def origin_of(origins: dict[str, str], dotted: str) -> str:
    """Where a key's value came from: the key itself, else the fields under it (a section), else the
    list field holding it; 'defaults' if nothing set it (a file that sets other keys of its section
    did not set this one)."""
    if dotted in origins:
        return origins[dotted]
    under = [o for k, o in origins.items() if k.startswith(dotted + ".")]
    if under:
        return ", ".join(dict.fromkeys(under))
    parts = dotted.split(".")
    for i in range(len(parts) - 1, 0, -1):
        parent = ".".join(parts[:i])
        if parent in origins and parent not in Config.model_fields:  # an item of a list field, not a section
            return origins[parent]
    return "defaults"


def _all_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            keys.extend(_all_keys(sub, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _check_unknown(tree: dict, model: type[BaseModel], origins: dict[str, str], prefix: str = "") -> None:
    """Unknown keys, found before pydantic so the message can say where the key came from."""
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        field = model.model_fields.get(key)
        if field is None:
            valid = list(model.model_fields)
            # The same name in another section first (a key in the wrong section), then a typo here,
            # then a typo anywhere in the tree.
            close = [k for k in _all_keys(Config) if k.rsplit(".", 1)[-1] == key][:1]
            close = close or difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
            close = close or difflib.get_close_matches(dotted, _all_keys(Config), n=1, cutoff=0.6)
            hint = f"did you mean '{close[0] if '.' in close[0] else prefix + close[0]}'?" if close else (
                f"valid keys here: {', '.join(prefix + v for v in valid)}"
            )
            raise ConfigError(f"unknown config key '{dotted}' (from {origin_of(origins, dotted)}); {hint}")
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            if not isinstance(value, dict):
                raise ConfigError(
                    f"config key '{dotted}' (from {origin_of(origins, dotted)}) is a section; "
                    f"give its fields, e.g. {dotted}.{next(iter(sub.model_fields))}=..."
                )
            _check_unknown(value, sub, origins, dotted + ".")


def _section_type(annotation: Any) -> Any:
    """The BaseModel inside `X | None` (an optional section such as data.packing), else the annotation."""
    for arg in typing.get_args(annotation):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return annotation


def _type_error(exc: ValidationError, tree: dict, origins: dict[str, str]) -> ConfigError:
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"] if not str(p).startswith(("function-", "literal["))]
    # Drop pydantic's union-member labels ("int", "float", ...) from the location.
    fields = []
    model: Any = Config
    for part in loc:
        if isinstance(model, type) and issubclass(model, BaseModel) and part in model.model_fields:
            fields.append(part)
            model = _section_type(model.model_fields[part].annotation)
        elif part.isdigit():
            fields.append(part)
    dotted = ".".join(fields)
    value: Any = tree
    for part in fields:
        value = value.get(part) if isinstance(value, dict) else (value[int(part)] if isinstance(value, list) and part.isdigit() and int(part) < len(value) else None)
    where = origin_of(origins, dotted)
    expected = err["msg"]
    if err["type"] == "value_error":
        text = expected.removeprefix("Value error, ")
        # A rule over several keys (offload x zero_stage): say where each key it names came from.
        named = [k for k in _all_keys(Config) if k.startswith(dotted + ".") and re.search(rf"\b{re.escape(k)}\b", text)]
        if named:
            where = ", ".join(f"{k} from {origin_of(origins, k)}" for k in named)
            return ConfigError(f"bad config ({where}): {text}")
        return ConfigError(f"bad value for config key '{dotted}' (from {where}): {text}")
    return ConfigError(f"bad value for config key '{dotted}' (from {where}): got {value!r}; expected {expected.lower()}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build the Config tree: defaults <- YAML file (and its bases) <- `--set` overrides."""
    origins: dict[str, str] = {}
    tree: dict = _load_file(resolve_config_path(path), origins) if path else {}
    for text in overrides or []:
        key, value = parse_override(text)
        _apply_override(tree, key, value, origins, f"--set {text}")
    _check_unknown(tree, Config, origins)
    try:
        cfg = Config.model_validate(tree)
    except ValidationError as exc:
        raise _type_error(exc, tree, origins) from None
    from distvit.config.checks import check_across_sections

    check_across_sections(cfg, origins)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config (atomically: a reader never sees half a file)."""
    from distvit.checkpoint.io import atomic_write_text

    atomic_write_text(Path(path), cfg.to_yaml())
