"""Vision Transformer (ViT), timm-compatible: the same model names and the same state-dict layout,
so a timm ViT state dict loads with strict=True and gives the same logits.

    model = distvit.models.create("vit_base_patch16_224", num_classes=10, img_size=384)

Layout: cls_token, pos_embed, patch_embed.proj, blocks.N.{norm1, attn.qkv, attn.proj, ls1,
norm2, mlp.fc1, mlp.fc2, ls2}, norm, fc_norm, head. With global_pool="avg" the final norm is
applied after pooling (fc_norm) and `norm` is an identity, as in timm.

Pure PyTorch: no torch.distributed or DeepSpeed here; parallel wrappers act on the module from
outside (Attention.attend is their seam).
"""
from __future__ import annotations


import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from distvit.models.layers import Block, LayerNorm, PatchEmbed
from distvit.models.registry import build_variant, register_model
from distvit.models.weights import resample_abs_pos_embed

GLOBAL_POOLS = ("token", "avg")
INCEPTION_MEAN = (0.5, 0.5, 0.5)  # timm's augreg ViT weights normalise to [-1, 1]
INCEPTION_STD = (0.5, 0.5, 0.5)


def _cfg(**kwargs) -> dict:
    cfg = dict(num_classes=1000, input_size=(3, 224, 224), crop_pct=0.9, interpolation="bicubic",
               mean=INCEPTION_MEAN, std=INCEPTION_STD, first_conv="patch_embed.proj", classifier="head")
    cfg.update(kwargs)
    return cfg


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: VisionTransformer) -> dict[str, torch.Tensor]:
    """Adapt a timm (or older timm / our own) ViT state dict to `model`.

    Drops the unused `pre_logits` layer of old timm weights, reshapes a linear patch
    projection to the conv layout, and resizes `pos_embed` (bicubic, antialiased, as timm) when
    the checkpoint was trained at another image size.
    """
    out = {}
    for k, v in state_dict.items():
        if "pre_logits" in k:
            continue
        if k == "patch_embed.proj.weight" and v.dim() < 4:
            o, _, h, w = model.patch_embed.proj.weight.shape
            v = v.reshape(o, -1, h, w)
        elif k == "pos_embed" and v.shape != model.pos_embed.shape:
            grid = v.shape[1] - model.num_prefix_tokens
            side = int(round(grid ** 0.5)) if grid > 0 else 0
            if side * side != grid:
                raise ValueError(
                    f"checkpoint pos_embed has {v.shape[1]} tokens, which is not this model's "
                    f"{model.num_prefix_tokens} prefix token(s) plus a square patch grid; was it saved with "
                    f"class_token={'False' if model.num_prefix_tokens else 'True'}? Build the model to match")
            v = resample_abs_pos_embed(v, model.patch_embed.grid_size, old_grid=(side, side),
                                       num_prefix_tokens=model.num_prefix_tokens)
        out[k] = v
    return out


class VisionTransformer(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans: int = 3, num_classes: int = 1000,
                 global_pool: str = "token", embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, init_values: float | None = None,
                 class_token: bool = True, fc_norm: bool | None = None, drop_rate: float = 0.0,
                 pos_drop_rate: float = 0.0, proj_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 attn_backend: str = "auto", dynamic_img_size: bool = False, default_cfg: dict | None = None):
        """
        global_pool: "token" (the class token's output) or "avg" (mean of the patch tokens).
        fc_norm: norm after pooling instead of before; None: on for "avg", as timm does.
        drop_rate: dropout before the head; pos_drop_rate: after adding position embeddings;
        proj_drop_rate: after attention/MLP projections; drop_path_rate: stochastic depth,
        rising linearly over the blocks to this value.
        init_values: layer-scale initial value (None: no layer scale).
        dynamic_img_size: take any H x W divisible by the patch size; the position-embedding grid is
        resampled per input (bicubic, antialiased), as timm's dynamic_img_size=True.
        """
        super().__init__()
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(f"VisionTransformer: global_pool={global_pool!r}; choose one of {', '.join(GLOBAL_POOLS)}")
        if global_pool == "token" and not class_token:
            raise ValueError("VisionTransformer: global_pool='token' needs class_token=True; "
                             "use global_pool='avg' without a class token")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"VisionTransformer: drop_path_rate={drop_path_rate} must be in [0, 1)")
        use_fc_norm = global_pool == "avg" if fc_norm is None else fc_norm
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.embed_dim = self.num_features = embed_dim
        self.num_heads = num_heads
        self.depth = depth
        self.num_prefix_tokens = 1 if class_token else 0
        self.grad_checkpointing = False
        self.dynamic_img_size = dynamic_img_size

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, strict_img_size=not dynamic_img_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + self.patch_embed.num_patches, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        # Plain floats (not torch.linspace) so the model also builds under torch.device("meta").
        rates = [drop_path_rate * i / (depth - 1) for i in range(depth)] if depth > 1 else [drop_path_rate] * depth
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate,
                  drop_path=rates[i], init_values=init_values, attn_backend=attn_backend)
            for i in range(depth)
        ])
        self.norm = nn.Identity() if use_fc_norm else LayerNorm(embed_dim)
        self.fc_norm = LayerNorm(embed_dim) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        self.default_cfg = dict(default_cfg or _cfg())
        self.default_cfg.update(num_classes=num_classes, input_size=(in_chans, *self.patch_embed.img_size))
        self.init_weights()

    # --- construction helpers -----------------------------------------------------------

    def init_weights(self) -> None:
        """timm's default ViT init: truncated normal (std .02) for linears and pos_embed, tiny cls_token."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    checkpoint_filter_fn = staticmethod(checkpoint_filter_fn)  # weights.load_checkpoint applies it

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward (torch.utils.checkpoint, non-reentrant)."""
        self.grad_checkpointing = enable

    def set_attn_backend(self, backend: str) -> None:
        for blk in self.blocks:
            blk.attn.attn_backend = backend

    def set_img_size(self, img_size) -> None:
        """Take another input size: the learned position embedding is resized (bicubic) in place."""
        old_grid = self.patch_embed.grid_size
        self.patch_embed.set_img_size(img_size)
        new = resample_abs_pos_embed(self.pos_embed.detach(), self.patch_embed.grid_size, old_grid=old_grid,
                                     num_prefix_tokens=self.num_prefix_tokens)
        self.pos_embed = nn.Parameter(new)
        self.default_cfg["input_size"] = (self.patch_embed.in_chans, *self.patch_embed.img_size)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            if global_pool not in GLOBAL_POOLS or (global_pool == "token" and self.cls_token is None):
                raise ValueError(f"reset_classifier: global_pool={global_pool!r} is not valid for this model")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.default_cfg["num_classes"] = num_classes

    # --- forward --------------------------------------------------------------------------

    no_embed_class = False  # the position embedding covers the prefix tokens too (DeiT III: False)

    def pos_embed_for(self, grid) -> torch.Tensor:
        """The position embedding for a patch grid (rows, cols): resampled as timm's dynamic_img_size."""
        prefix = 0 if self.no_embed_class else self.num_prefix_tokens
        return resample_abs_pos_embed(self.pos_embed, grid, old_grid=self.patch_embed.grid_size,
                                      num_prefix_tokens=prefix)

    def _pos_embed(self, x: torch.Tensor, grid=None) -> torch.Tensor:
        pos = self.pos_embed if grid is None else self.pos_embed_for(grid)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + pos)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> normalised tokens (B, prefix + patches, D)."""
        grid = self.patch_embed.check_input(x) if self.dynamic_img_size else None
        return self.forward_blocks(self._pos_embed(self.patch_embed(x), grid))

    def forward_blocks(self, x: torch.Tensor, seq_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Embedded tokens -> the blocks (checkpointed when enabled) -> the final norm.

        seq_ids (B, T): packed sequences, attention block-diagonal per id (see models/packed.py).
        """
        extra = () if seq_ids is None else (None, seq_ids)
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, *extra, use_reentrant=False)
            else:
                x = blk(x, *extra)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        prefix = x[:, :self.num_prefix_tokens]
        mean = x[:, self.num_prefix_tokens:].mean(dim=1) if self.global_pool == "avg" else None
        return self.forward_pooled(prefix, mean, pre_logits)

    def forward_pooled(self, prefix: torch.Tensor, patch_mean: torch.Tensor | None,
                       pre_logits: bool = False) -> torch.Tensor:
        """The head from pooled pieces: prefix-token outputs (B, P, D) and the patch-token mean (B, D)."""
        x = patch_mean if self.global_pool == "avg" else prefix[:, 0]
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def forward_packed(self, packed) -> torch.Tensor:
        """Logits (N, classes) of the N images of a distvit.data.packing.PackedBatch, in input order."""
        from distvit.models.packed import forward_packed

        return forward_packed(self, packed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(x) and hasattr(x, "image_slots"):
            # A PackedBatch: through forward so that wrappers (DeepSpeed, ZeRO-3's gather hooks) see the call.
            return self.forward_packed(x)
        return self.forward_head(self.forward_features(x))

    # --- accounting -----------------------------------------------------------------------

    def flops_per_image(self) -> int:
        """Forward FLOPs for one image: 2 x the multiply-adds of every matmul and of the patch conv.

        Attention is counted dense (scores and weighted sum over all token pairs); norms,
        softmax, GELU and adds are left out, as MFU conventions do.
        """
        n = self.pos_embed.shape[1]
        d = self.embed_dim
        ph, pw = self.patch_embed.patch_size
        flops = 2 * self.patch_embed.num_patches * self.patch_embed.in_chans * ph * pw * d
        for blk in self.blocks:
            hidden = blk.mlp.fc1.out_features
            flops += 2 * n * d * 3 * d      # qkv
            flops += 2 * 2 * n * n * d      # q k^T and attn @ v, over all heads
            flops += 2 * n * d * d          # proj
            flops += 2 * 2 * n * d * hidden  # fc1 and fc2
        if isinstance(self.head, nn.Linear):
            flops += 2 * d * self.head.out_features
        return flops


def _create(name: str, variant: dict, overrides: dict, cfg: dict) -> VisionTransformer:
    return build_variant(VisionTransformer, name, variant, overrides, cfg)


def _vit(name, overrides, img_size=224, cfg=None, **variant):
    """cfg: what differs from the usual default cfg, e.g. num_classes=0 where timm's default weights are a
    headless ImageNet-21k trunk (so create(name) builds what timm.create_model(name) builds)."""
    cfg = _cfg(input_size=(3, img_size, img_size), crop_pct=1.0 if img_size >= 384 else 0.9, **(cfg or {}))
    return _create(name, variant, overrides, cfg)


# --- the variants (timm's names and sizes) ------------------------------------------------
# Ti = 192 x 12 (3 heads), S = 384 x 12 (6), B = 768 x 12 (12), L = 1024 x 24 (16),
# H = 1280 x 32 (16), g = 1408 x 40 (16, mlp 48/11): Dosovitskiy et al. 2020, Zhai et al. 2021.
TINY = dict(embed_dim=192, depth=12, num_heads=3)
SMALL = dict(embed_dim=384, depth=12, num_heads=6)
BASE = dict(embed_dim=768, depth=12, num_heads=12)
LARGE = dict(embed_dim=1024, depth=24, num_heads=16)
HUGE = dict(embed_dim=1280, depth=32, num_heads=16)
GIANT = dict(embed_dim=1408, depth=40, num_heads=16, mlp_ratio=48 / 11)
HEADLESS = dict(num_classes=0)  # timm's default weights: the ImageNet-21k trunk without its head
DINO = dict(num_classes=0, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))  # self-supervised DINO trunk


@register_model
def vit_tiny_patch16_224(**kw):
    return _vit("vit_tiny_patch16_224", kw, patch_size=16, **TINY)


@register_model
def vit_tiny_patch16_384(**kw):
    return _vit("vit_tiny_patch16_384", kw, img_size=384, patch_size=16, **TINY)


@register_model
def vit_small_patch32_224(**kw):
    return _vit("vit_small_patch32_224", kw, patch_size=32, **SMALL)


@register_model
def vit_small_patch32_384(**kw):
    return _vit("vit_small_patch32_384", kw, img_size=384, patch_size=32, **SMALL)


@register_model
def vit_small_patch16_224(**kw):
    return _vit("vit_small_patch16_224", kw, patch_size=16, **SMALL)


@register_model
def vit_small_patch16_384(**kw):
    return _vit("vit_small_patch16_384", kw, img_size=384, patch_size=16, **SMALL)


@register_model
def vit_small_patch8_224(**kw):
    return _vit("vit_small_patch8_224", kw, patch_size=8, cfg=DINO, **SMALL)


@register_model
def vit_base_patch32_224(**kw):
    return _vit("vit_base_patch32_224", kw, patch_size=32, **BASE)


@register_model
def vit_base_patch32_384(**kw):
    return _vit("vit_base_patch32_384", kw, img_size=384, patch_size=32, **BASE)


@register_model
def vit_base_patch16_224(**kw):
    return _vit("vit_base_patch16_224", kw, patch_size=16, **BASE)


@register_model
def vit_base_patch16_384(**kw):
    return _vit("vit_base_patch16_384", kw, img_size=384, patch_size=16, **BASE)


@register_model
def vit_base_patch8_224(**kw):
    return _vit("vit_base_patch8_224", kw, patch_size=8, **BASE)


@register_model
def vit_large_patch32_224(**kw):
    return _vit("vit_large_patch32_224", kw, patch_size=32, cfg=HEADLESS, **LARGE)


@register_model
def vit_large_patch32_384(**kw):
    return _vit("vit_large_patch32_384", kw, img_size=384, patch_size=32, **LARGE)


@register_model
def vit_large_patch16_224(**kw):
    return _vit("vit_large_patch16_224", kw, patch_size=16, **LARGE)


@register_model
def vit_large_patch16_384(**kw):
    return _vit("vit_large_patch16_384", kw, img_size=384, patch_size=16, **LARGE)


@register_model
def vit_large_patch14_224(**kw):
    return _vit("vit_large_patch14_224", kw, patch_size=14, **LARGE)


@register_model
def vit_huge_patch14_224(**kw):
    return _vit("vit_huge_patch14_224", kw, patch_size=14, cfg=HEADLESS, **HUGE)


@register_model
def vit_giant_patch14_224(**kw):
    return _vit("vit_giant_patch14_224", kw, patch_size=14, **GIANT)


# sklearn's digits, scaled to [0, 1]: mean 0.305, std 0.376 over all pixels.
DIGITS_CFG = _cfg(num_classes=10, input_size=(1, 8, 8), crop_pct=1.0, interpolation="nearest",
                  mean=(0.305,), std=(0.376,))


@register_model
def vit_digits(**kw):
    """A 136k-parameter ViT for 8x8 grayscale digits: 2x2 patches (16 tokens), average pooling.

    Mean pooling without a class token learns this small set faster than the token pool
    (98.6% vs 94.4% val top-1 after 30 epochs, AdamW 2e-3 one-cycle, batch 64, 80/20 split).
    """
    variant = dict(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=64, depth=4, num_heads=4,
                   mlp_ratio=2.0, global_pool="avg", class_token=False, drop_path_rate=0.1)
    return _create("vit_digits", variant, kw, DIGITS_CFG)
