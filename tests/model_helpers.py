"""Shared pieces of the model tests: timm's twin of a registered model, random weights, the logit tolerance.

Logit comparisons with timm run in float32 at atol 1e-5, rtol 1e-4: both sides compute the same maths
except the attention kernel (timm's fused SDPA call vs ours) and, for Swin, the order (windows in the heads
dim vs the batch dim, a -inf vs timm's -100 shift mask, whose exp(-100) ~ 4e-44 vanishes in float32), so
they differ by float32 rounding (~2e-6 here); a wrong layout, norm placement, window order or mask moves
logits by O(1).
"""
from __future__ import annotations

import torch

LOGIT_TOL = dict(atol=1e-5, rtol=1e-4)

# The digits models have no timm name: their twins are built from timm's classes with these arguments.
TIMM_DIGITS = {
    "vit_digits": ("timm.models.vision_transformer", "VisionTransformer",
                   dict(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=64, depth=4, num_heads=4,
                        mlp_ratio=2.0, global_pool="avg", class_token=False)),
    "deit_digits_distilled": ("timm.models.deit", "VisionTransformerDistilled",
                              dict(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=64, depth=4,
                                   num_heads=4, mlp_ratio=2.0)),
    "swin_digits": ("timm.models.swin_transformer", "SwinTransformer",
                    dict(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=64, depths=(2, 2),
                         num_heads=(4, 8), window_size=2, mlp_ratio=2.0)),
}


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def timm_twin(timm, name, **kwargs):
    """timm's own model for one of ours: same name and overrides (the digits models via timm's classes)."""
    if name in TIMM_DIGITS:
        import importlib

        module, cls, args = TIMM_DIGITS[name]
        return getattr(importlib.import_module(module), cls)(**{**args, **kwargs})
    return timm.create_model(name, pretrained=False, **kwargs)


def randomize_(model, seed=0):
    """Random values in every parameter (LayerNorm weights near 1): default inits hide layout errors."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=g) * 0.05
                is_norm_scale = isinstance(module, torch.nn.LayerNorm) and name == "weight"
                p.copy_(1.0 + noise if is_norm_scale else noise)
    return model
