"""Transformer building blocks shared by the ViT family (and the models added beside it).

Parameter names follow timm (norm1, attn.qkv, attn.proj, ls1, norm2, mlp.fc1, mlp.fc2, ls2,
patch_embed.proj) so timm state dicts load unchanged. Attention goes through
distvit.attention.attention, so every model picks its backend the same way.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn

from distvit.attention import attention

LayerNorm = partial(nn.LayerNorm, eps=1e-6)  # timm's ViT norm


def to_2tuple(x) -> tuple[int, int]:
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ValueError(f"expected an int or a pair (height, width), got {x!r}")
        return int(x[0]), int(x[1])
    return int(x), int(x)


class PatchEmbed(nn.Module):
    """Image (B, C, H, W) -> patch tokens (B, N, D) by one strided convolution."""

    def __init__(self, img_size=224, patch_size=16, in_chans: int = 3, embed_dim: int = 768, bias: bool = True,
                 strict_img_size: bool = True):
        """strict_img_size=False: take any H x W divisible by the patch size (timm's dynamic_img_size)."""
        super().__init__()
        self.strict_img_size = strict_img_size
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        for side, (size, patch) in zip(("height", "width"), zip(self.img_size, self.patch_size)):
            if size % patch:
                raise ValueError(f"PatchEmbed: image {side} {size} is not a multiple of patch size {patch}; "
                                 "choose img_size as a multiple of the patch size")
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=bias)

    def set_img_size(self, img_size) -> None:
        """Take images of another size (the caller resizes the position embedding to match)."""
        img_size = to_2tuple(img_size)
        if img_size[0] % self.patch_size[0] or img_size[1] % self.patch_size[1]:
            raise ValueError(f"PatchEmbed: img_size {img_size} is not a multiple of patch size {self.patch_size}")
        self.img_size = img_size
        self.grid_size = (img_size[0] // self.patch_size[0], img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.proj(x).flatten(2).transpose(1, 2)

    def check_input(self, x: torch.Tensor) -> tuple[int, int]:
        """Validate images (B, C, H, W); returns their patch grid (rows, cols)."""
        if not self.strict_img_size and x.dim() == 4 and x.shape[1] == self.in_chans:
            h, w = x.shape[2], x.shape[3]
            if h % self.patch_size[0] or w % self.patch_size[1]:
                raise ValueError(f"PatchEmbed: image size {h}x{w} is not a multiple of the patch size "
                                 f"{self.patch_size[0]}x{self.patch_size[1]}; resize or crop the input to a multiple")
            return h // self.patch_size[0], w // self.patch_size[1]
        if x.dim() != 4 or x.shape[1] != self.in_chans or tuple(x.shape[2:]) != self.img_size:
            raise ValueError(f"PatchEmbed: input has shape {tuple(x.shape)}, expected (batch, {self.in_chans}, "
                             f"{self.img_size[0]}, {self.img_size[1]}); build the model with img_size=/in_chans= "
                             "for other inputs (the position embedding is resized when weights load), or with "
                             "dynamic_img_size=True for any size divisible by the patch size")
        return self.grid_size


class Attention(nn.Module):
    """Multi-head self-attention: x (B, N, D) -> (B, N, D).

    causal: each token attends only to itself and earlier tokens.
    attn_backend: a distvit.attention backend name ("auto", "sdpa", "flash", "math").
    `attend` is the one seam between projections and the attention kernel: sequence-parallel
    wrappers replace it on the instance and keep the projections and weights as they are.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, proj_bias: bool = True,
                 proj_drop: float = 0.0, causal: bool = False, attn_backend: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.causal = causal
        self.attn_backend = attn_backend
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None,
               seq_ids: torch.Tensor | None = None) -> torch.Tensor:
        return attention(q, k, v, causal=self.causal, bias=bias, scale=self.scale, backend=self.attn_backend,
                         seq_ids=seq_ids)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None,
                seq_ids: torch.Tensor | None = None) -> torch.Tensor:
        """seq_ids (B, N) or (N,): packed sequences; a token attends only to tokens of its own id (-1: padding)."""
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        o = self.attend(q, k, v, attn_bias) if seq_ids is None else self.attend(q, k, v, attn_bias, seq_ids=seq_ids)
        x = o.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, act_layer=nn.GELU, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class LayerScale(nn.Module):
    """Per-channel learned residual scale (CaiT / DeiT-III), parameter `gamma` as timm names it."""

    def __init__(self, dim: int, init_values: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a sample's residual branch with probability p, scale the rest by 1/(1-p)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"DropPath: drop_prob={drop_prob} must be in [0, 1)")
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor, seq_ids: torch.Tensor | None = None) -> torch.Tensor:
        """seq_ids (B, T) or (T,): packed sequences; the mask is then drawn per image, not per row."""
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        if seq_ids is not None:
            per_image = x.new_empty(max(1, int(seq_ids.max()) + 1)).bernoulli_(keep)
            return x * image_mask_to_tokens(per_image, seq_ids, x) / keep
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def image_mask_to_tokens(per_image: torch.Tensor, seq_ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-image mask (N,) as a per-token mask broadcastable to x (B, T, D); padding (id -1) keeps 1."""
    ids = seq_ids if seq_ids.dim() == 2 else seq_ids[None]
    mask = torch.where(ids >= 0, per_image[ids.clamp(min=0)], torch.ones((), dtype=x.dtype, device=x.device))
    return mask.unsqueeze(-1)


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_drop: float = 0.0, drop_path: float = 0.0, init_values: float | None = None,
                 norm_layer=LayerNorm, act_layer=nn.GELU, causal: bool = False, attn_backend: str = "auto"):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_drop=proj_drop, causal=causal,
                              attn_backend=attn_backend)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None,
                seq_ids: torch.Tensor | None = None) -> torch.Tensor:
        ids = () if seq_ids is None or isinstance(self.drop_path1, nn.Identity) else (seq_ids,)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_bias, seq_ids)), *ids)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))), *ids)
