"""Model registry: names users know from timm, built by `create(name, **overrides)`.

A model file registers each variant with `@register_model` on a function `name(**overrides)`
that returns the nn.Module; the function's name is the model name.
"""
from __future__ import annotations

import difflib
import fnmatch
import inspect
from typing import Callable

import torch.nn as nn

_ENTRYPOINTS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    name = fn.__name__
    if name in _ENTRYPOINTS and _ENTRYPOINTS[name] is not fn:
        raise ValueError(f"register_model: a model named {name!r} is already registered "
                         f"(by {_ENTRYPOINTS[name].__module__}); pick another name")
    _ENTRYPOINTS[name] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching a shell-style pattern (e.g. "vit_base_*"), sorted."""
    return sorted(n for n in _ENTRYPOINTS if fnmatch.fnmatchcase(n, pattern))


def is_model(name: str) -> bool:
    return name in _ENTRYPOINTS


def model_entrypoint(name: str) -> Callable[..., nn.Module]:
    if name not in _ENTRYPOINTS:
        close = difflib.get_close_matches(name, list(_ENTRYPOINTS), n=5, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else f"registered models: {', '.join(list_models())}"
        raise ValueError(f"unknown model {name!r}; {hint}")
    return _ENTRYPOINTS[name]


def create(name: str, *, checkpoint: str | None = None, strict: bool = True, reset_head: bool | None = None,
           **overrides) -> nn.Module:
    """Build a registered model; overrides (num_classes=, img_size=, in_chans=, drop_path_rate=,
    attn_backend=, global_pool=, class_token=, ...) replace the variant's defaults.

    An override given as None keeps the default (configs use None for "not set").
    checkpoint: a .safetensors / .pt / .pth file to load (ours or timm's; the position
    embedding is resized to img_size). strict=True raises on any missing, unexpected or
    mis-shaped key, with the full list; strict=False loads what matches and keeps the rest
    as initialised. reset_head: None re-initialises the classifier when the file's has another
    number of classes (and says so); True always; False never (see weights.load_checkpoint).
    """
    fn = model_entrypoint(name)
    model = fn(**{k: v for k, v in overrides.items() if v is not None})
    if checkpoint is not None:
        from distvit.models.weights import load_checkpoint

        load_checkpoint(model, checkpoint, strict=strict, reset_head=reset_head)
    return model


def build_variant(cls: type[nn.Module], name: str, variant: dict, overrides: dict, cfg: dict,
                  options_of: type[nn.Module] | None = None) -> nn.Module:
    """Build a registered variant: its architecture (`variant`) + the user's `overrides`.

    An override the constructor does not take is a TypeError naming it, close names and every
    valid option. `options_of` names the class whose constructor defines the options when `cls`
    only adds to it (e.g. a distilled ViT). `cfg` is the pretrained/default cfg (input size,
    classes, mean/std) the model keeps as `default_cfg`.
    """
    valid = set(inspect.signature((options_of or cls).__init__).parameters) - {"self", "default_cfg"}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(valid), n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise TypeError(f"{name}: unknown option {unknown[0]!r}; {hint}valid options: {', '.join(sorted(valid))}")
    args = {"img_size": cfg["input_size"][-1], "num_classes": cfg["num_classes"], **variant, **overrides}
    return cls(**args, default_cfg=cfg)
