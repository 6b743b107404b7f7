"""DeiT (Touvron et al. 2021, "Training data-efficient image transformers & distillation through attention")
and DeiT III ("Revenge of the ViT", 2022), timm-compatible: timm's names and state-dict layouts.

    model = distvit.models.create("deit_small_distilled_patch16_224", num_classes=100)

- deit_*: the ViT itself (VisionTransformer from vit.py), with ImageNet normalisation.
- deit_*_distilled_*: DistilledVisionTransformer, a ViT with a second prefix token (`dist_token`) and a
  second head (`head_dist`) read from it. In training with distillation (`set_distilled_training()`),
  forward returns (class-token logits, distillation-token logits); otherwise their average, as timm does.
- deit3_*: PatchPosEmbedViT, a ViT whose position embedding covers only the patches (the class token is
  added after it), with layer scale (init 1e-6).

Pure PyTorch: the teacher and the distillation losses live in distvit.engine.distill.
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn

from distvit.models.registry import build_variant, register_model
from distvit.models.vit import DIGITS_CFG, VisionTransformer
from distvit.models.vit import checkpoint_filter_fn as vit_checkpoint_filter_fn
from distvit.models.weights import resample_abs_pos_embed

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _cfg(**kwargs) -> dict:
    cfg = dict(num_classes=1000, input_size=(3, 224, 224), crop_pct=0.9, interpolation="bicubic",
               mean=IMAGENET_MEAN, std=IMAGENET_STD, first_conv="patch_embed.proj", classifier="head")
    cfg.update(kwargs)
    return cfg


class DistilledVisionTransformer(VisionTransformer):
    """ViT with a distillation token after the class token and a head on each; timm's
    VisionTransformerDistilled layout (cls_token, pos_embed, dist_token, ..., head, head_dist)."""

    def __init__(self, **kwargs):
        pool, cls_token = kwargs.get("global_pool", "token"), kwargs.get("class_token", True)
        if pool != "token" or cls_token is not True:
            raise ValueError(f"DistilledVisionTransformer: global_pool={pool!r}, class_token={cls_token!r}; the two heads "
                             "read the class and distillation tokens, so these stay 'token' and True (use a deit_* "
                             "model without 'distilled' for average pooling)")
        super().__init__(**kwargs)
        self.num_prefix_tokens = 2
        self.dist_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 2, self.embed_dim))
        self.head_dist = nn.Linear(self.embed_dim, self.num_classes) if self.num_classes > 0 else nn.Identity()
        self.distilled_training = False  # timm's switch: return both heads' logits while training
        self.separate_heads = False  # ours: return both heads' logits in any mode (evaluation of each head)
        nn.init.trunc_normal_(self.dist_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if isinstance(self.head_dist, nn.Linear):
            nn.init.trunc_normal_(self.head_dist.weight, std=0.02)
            nn.init.zeros_(self.head_dist.bias)

    def set_distilled_training(self, enable: bool = True) -> None:
        self.distilled_training = enable

    def set_separate_heads(self, enable: bool = True) -> None:
        self.separate_heads = enable

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "dist_token"}

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool not in (None, "token"):
            raise ValueError(f"reset_classifier: global_pool={global_pool!r}; the distilled heads read the tokens")
        super().reset_classifier(num_classes)
        self.head_dist = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def _pos_embed(self, x: torch.Tensor, grid=None) -> torch.Tensor:
        B = x.shape[0]
        pos = self.pos_embed if grid is None else self.pos_embed_for(grid)
        x = torch.cat([self.cls_token.expand(B, -1, -1), self.dist_token.expand(B, -1, -1), x], dim=1)
        return self.pos_drop(x + pos)

    def forward_pooled(self, prefix: torch.Tensor, patch_mean: torch.Tensor | None, pre_logits: bool = False):
        x_cls, x_dist = self.head_drop(prefix[:, 0]), self.head_drop(prefix[:, 1])
        if pre_logits:
            return (x_cls + x_dist) / 2
        x_cls, x_dist = self.head(x_cls), self.head_dist(x_dist)
        if self.separate_heads or (self.distilled_training and self.training):
            return x_cls, x_dist
        return (x_cls + x_dist) / 2

    def flops_per_image(self) -> int:
        flops = super().flops_per_image()  # counts both prefix tokens and the class head
        if isinstance(self.head_dist, nn.Linear):
            flops += 2 * self.embed_dim * self.head_dist.out_features
        return flops


def deit3_checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: PatchPosEmbedViT) -> dict[str, torch.Tensor]:
    """timm or original DeiT III weights into `model`: the original `blocks.N.gamma_1/2` become
    `blocks.N.ls1/ls2.gamma`; a patch-only position embedding of another grid is resized."""
    out = {}
    for k, v in state_dict.items():
        k = re.sub(r"\.gamma_([12])$", r".ls\1.gamma", k)
        if k == "pos_embed" and v.shape != model.pos_embed.shape:
            v = resample_abs_pos_embed(v, model.patch_embed.grid_size, num_prefix_tokens=0)
        out[k] = v
    return vit_checkpoint_filter_fn(out, model)  # pos_embed already fits; the rest as for any ViT


class PatchPosEmbedViT(VisionTransformer):
    """ViT whose position embedding covers the patches only; the class token is concatenated after it is
    added (DeiT III, big_vision; timm's no_embed_class=True)."""

    checkpoint_filter_fn = staticmethod(deit3_checkpoint_filter_fn)
    no_embed_class = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, self.embed_dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def _pos_embed(self, x: torch.Tensor, grid=None) -> torch.Tensor:
        x = x + (self.pos_embed if grid is None else self.pos_embed_for(grid))
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x)

    def set_img_size(self, img_size) -> None:
        old_grid = self.patch_embed.grid_size
        self.patch_embed.set_img_size(img_size)
        new = resample_abs_pos_embed(self.pos_embed.detach(), self.patch_embed.grid_size, old_grid=old_grid,
                                     num_prefix_tokens=0)
        self.pos_embed = nn.Parameter(new)
        self.default_cfg["input_size"] = (self.patch_embed.in_chans, *self.patch_embed.img_size)

    def flops_per_image(self) -> int:
        """As VisionTransformer.flops_per_image, over the patches plus the class token."""
        n = self.patch_embed.num_patches + self.num_prefix_tokens
        d = self.embed_dim
        ph, pw = self.patch_embed.patch_size
        flops = 2 * self.patch_embed.num_patches * self.patch_embed.in_chans * ph * pw * d
        for blk in self.blocks:
            hidden = blk.mlp.fc1.out_features
            flops += 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * hidden
        if isinstance(self.head, nn.Linear):
            flops += 2 * d * self.head.out_features
        return flops


def _create(cls, name: str, variant: dict, overrides: dict, cfg: dict) -> VisionTransformer:
    return build_variant(cls, name, variant, overrides, cfg, options_of=VisionTransformer)


def _deit(name, overrides, cls=VisionTransformer, img_size=224, **variant):
    cfg = _cfg(input_size=(3, img_size, img_size), crop_pct=1.0 if img_size >= 384 else 0.9)
    if cls is DistilledVisionTransformer:
        cfg["classifier"] = ("head", "head_dist")
    return _create(cls, name, variant, overrides, cfg)


# --- the variants (timm's names and sizes) ------------------------------------------------
TINY = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
SMALL = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
MEDIUM = dict(patch_size=16, embed_dim=512, depth=12, num_heads=8)
BASE = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
LARGE = dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16)
HUGE14 = dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16)
DEIT3 = dict(cls=PatchPosEmbedViT, init_values=1e-6)


@register_model
def deit_tiny_patch16_224(**kw):
    return _deit("deit_tiny_patch16_224", kw, **TINY)


@register_model
def deit_small_patch16_224(**kw):
    return _deit("deit_small_patch16_224", kw, **SMALL)


@register_model
def deit_base_patch16_224(**kw):
    return _deit("deit_base_patch16_224", kw, **BASE)


@register_model
def deit_base_patch16_384(**kw):
    return _deit("deit_base_patch16_384", kw, img_size=384, **BASE)


@register_model
def deit_tiny_distilled_patch16_224(**kw):
    return _deit("deit_tiny_distilled_patch16_224", kw, cls=DistilledVisionTransformer, **TINY)


@register_model
def deit_small_distilled_patch16_224(**kw):
    return _deit("deit_small_distilled_patch16_224", kw, cls=DistilledVisionTransformer, **SMALL)


@register_model
def deit_base_distilled_patch16_224(**kw):
    return _deit("deit_base_distilled_patch16_224", kw, cls=DistilledVisionTransformer, **BASE)


@register_model
def deit_base_distilled_patch16_384(**kw):
    return _deit("deit_base_distilled_patch16_384", kw, cls=DistilledVisionTransformer, img_size=384, **BASE)


@register_model
def deit3_small_patch16_224(**kw):
    return _deit("deit3_small_patch16_224", kw, **DEIT3, **SMALL)


@register_model
def deit3_medium_patch16_224(**kw):
    return _deit("deit3_medium_patch16_224", kw, **DEIT3, **MEDIUM)


@register_model
def deit3_base_patch16_224(**kw):
    return _deit("deit3_base_patch16_224", kw, **DEIT3, **BASE)


@register_model
def deit3_base_patch16_384(**kw):
    return _deit("deit3_base_patch16_384", kw, img_size=384, **DEIT3, **BASE)


@register_model
def deit3_large_patch16_224(**kw):
    return _deit("deit3_large_patch16_224", kw, **DEIT3, **LARGE)


@register_model
def deit3_huge_patch14_224(**kw):
    return _deit("deit3_huge_patch14_224", kw, **DEIT3, **HUGE14)


@register_model
def deit_digits_distilled(**kw):
    """vit_digits' trunk (64 wide, 4 blocks, 2x2 patches of 8x8 digits) with class and distillation tokens."""
    variant = dict(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=64, depth=4, num_heads=4,
                   mlp_ratio=2.0, drop_path_rate=0.1)
    return _create(DistilledVisionTransformer, "deit_digits_distilled", variant, kw, DIGITS_CFG)
