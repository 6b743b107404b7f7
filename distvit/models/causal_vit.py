"""Autoregressive (causal) ViT: predicts each image patch from the patches before it.

The image is cut into N patches in raster order. Token 0 is a learned start token, token i
(i >= 1) the embedding of patch i - 1; every token gets its position embedding, the blocks
attend causally, and the head at token i regresses the pixels of patch i (as iGPT/AIM do,
with pixels instead of a codebook). So a full forward yields a prediction for every patch
given the patches before it, and generation produces one patch per step.

Incremental decoding keeps a preallocated KV cache (KVCache) and attends the new tokens to
it with distvit.attention.decode.decode_attention; feeding the patches of an image one at a
time gives the same predictions as the full causal forward (tests/test_causal_vit.py).

Prefix attention (AIM): with prefix_patches = K > 0 the first K + 1 tokens (the start token and
patches 0 .. K-1) see each other both ways; every later token stays causal. The prediction at
token i >= K (patch i) still sees only patches before it, so the loss is taken on patches K .. N-1
(distvit/engine/tasks.py); the bidirectional prefix is the prompt at generation.

Pure PyTorch: no torch.distributed here (sequence parallelism: parallel/parallelize_causal.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from torch.utils.checkpoint import checkpoint

from distvit.attention import attention
from distvit.attention.decode import MAX_QUERY_TOKENS, decode_attention
from distvit.models.layers import Attention, Block, LayerNorm
from distvit.models.registry import register_model


class KVCache:
    """Keys and values of every layer, preallocated: (layers, B, heads, capacity, head_dim).

    seqlens (B,) counts the tokens each sequence holds. A forward with the cache writes the new
    tokens' keys at positions seqlens .. seqlens + n - 1 of every layer; advance(n) then moves
    seqlens on (the model calls it once all layers have written).
    """

    def __init__(self, num_layers: int, batch: int, heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 backend: str = "auto"):
        self.backend = backend  # decode_attention's: auto = streamk on CUDA, torch elsewhere
        shape = (num_layers, batch, heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=device)

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def write(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """Store (B, heads, n, head_dim) keys/values after each sequence's current tokens."""
        n = k_new.shape[2]
        pos = self.seqlens.long()[:, None] + torch.arange(n, device=self.seqlens.device)[None, :]  # (B, n)
        batch = torch.arange(k_new.shape[0], device=pos.device)[:, None].expand_as(pos)
        # Advanced indices around a slice put their dims first: the target is (B, n, heads, D).
        self.k[layer][batch, :, pos] = k_new.transpose(1, 2).to(self.k.dtype)
        self.v[layer][batch, :, pos] = v_new.transpose(1, 2).to(self.v.dtype)

    holds_whole_sequences = True  # a sharded cache (parallel/decode_sp.py) holds a slice of positions

    def attend(self, layer: int, q: torch.Tensor, scale: float) -> torch.Tensor:
        """Decode attention of n <= 16 new queries (already written) over each sequence's tokens."""
        return decode_attention(q, self.k[layer], self.v[layer], self.seqlens + q.shape[2], scale=scale,
                                backend=self.backend)

    def advance(self, n: int) -> None:
        self.seqlens += n

    def reset(self) -> None:
        self.seqlens.zero_()


class CachedAttention(Attention):
    """layers.Attention with causal=True that can also run against a KVCache (same weights)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_backend: str = "auto"):
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, causal=True, attn_backend=attn_backend)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        """bias: an additive prefix-causal mask (prefix_bias) replacing the causal one, or None."""
        if cache is None and bias is None:
            return super().forward(x)
        B, n, C = x.shape
        q, k, v = self.qkv(x).reshape(B, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if cache is None:
            o = attention(q, k, v, causal=False, bias=bias, scale=self.scale, backend=self.attn_backend)
            return self.proj_drop(self.proj(o.transpose(1, 2).reshape(B, n, C)))
        cache.write(layer, k, v)
        if bias is not None:
            o = self._prefill(q, cache, layer, bias)
        elif n <= MAX_QUERY_TOKENS:
            o = cache.attend(layer, q, self.scale)  # a sharded cache (parallel/decode_sp.py) merges over ranks
        else:
            o = self._prefill(q, cache, layer)
        return self.proj_drop(self.proj(o.transpose(1, 2).reshape(B, n, C)))

    def _prefill(self, q, cache, layer, bias=None):
        """More new tokens than decode takes: ordinary causal attention over the cached prefix.

        Needs every sequence at the same length (one slice of the cache serves the batch).
        """
        if not cache.holds_whole_sequences:
            raise ValueError(f"CachedAttention: a chunk of {q.shape[2]} tokens (or a prefix mask) needs the whole "
                             "cache on this rank; prefill into a KVCache, then split it (ShardedKVCache.from_full)")
        lengths = cache.seqlens.unique()
        if lengths.numel() != 1:
            raise ValueError(f"CachedAttention: a chunk of {q.shape[2]} tokens needs every sequence of the cache "
                             f"at the same length, got lengths {cache.seqlens.tolist()}; feed at most "
                             f"{MAX_QUERY_TOKENS} tokens at a time for ragged batches")
        end = int(lengths) + q.shape[2]
        k = cache.k[layer][:, :, :end].to(q.dtype)
        v = cache.v[layer][:, :, :end].to(q.dtype)
        if bias is not None:  # prefix-causal over the whole cached span (bias is (B|1, 1, n, end))
            return attention(q, k, v, causal=False, bias=bias, scale=self.scale, backend=self.attn_backend)
        return self.attend(q, k, v)  # causal, bottom-right: the new tokens are the last ones


class CausalBlock(Block):
    """layers.Block, causal, whose attention can use a KVCache. Parameter names as timm's."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 attn_backend: str = "auto", drop_path: float = 0.0):
        super().__init__(dim, num_heads, mlp_ratio, qkv_bias, drop_path=drop_path, causal=True,
                         attn_backend=attn_backend)
        self.attn = CachedAttention(dim, num_heads, qkv_bias, attn_backend)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), cache, layer, bias)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


@dataclass(frozen=True)
class CausalViTConfig:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    attn_backend: str = "auto"  # full forward and prefill; decoding always uses decode_attention
    drop_path_rate: float = 0.0  # stochastic depth, linearly up to this rate at the last block (timm)
    prefix_patches: int = 0  # AIM prefix attention: the first K patches see each other both ways


class CausalViT(nn.Module):
    """Next-patch prediction over raster-ordered patches; see the module docstring."""

    def __init__(self, cfg: CausalViTConfig = CausalViTConfig()):
        super().__init__()
        if cfg.img_size % cfg.patch_size:
            raise ValueError(f"CausalViT: img_size {cfg.img_size} is not a multiple of patch_size {cfg.patch_size}")
        self.cfg = cfg
        self.grid = cfg.img_size // cfg.patch_size
        self.num_patches = self.grid * self.grid
        if not 0 <= cfg.prefix_patches < self.num_patches:
            raise ValueError(f"CausalViT: prefix_patches={cfg.prefix_patches} (task.prefix_patches) must be in "
                             f"[0, {self.num_patches - 1}]: the image has {self.num_patches} patches and at least one "
                             "must be predicted")
        self.prefix_patches = cfg.prefix_patches
        self.grad_checkpointing = False
        self.patch_dim = cfg.in_chans * cfg.patch_size * cfg.patch_size
        # A linear map of the flattened patch: the same as timm's strided conv, and it embeds a
        # single generated patch without an image around it.
        self.patch_embed = nn.Linear(self.patch_dim, cfg.embed_dim)
        self.start_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, cfg.embed_dim))
        rates = torch.linspace(0, cfg.drop_path_rate, cfg.depth, device="cpu").tolist()  # plain floats, also under a meta-device build
        self.blocks = nn.ModuleList(CausalBlock(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias,
                                                cfg.attn_backend, rates[i]) for i in range(cfg.depth))
        self.norm = LayerNorm(cfg.embed_dim)
        self.head = nn.Linear(cfg.embed_dim, self.patch_dim)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.start_token, std=0.02)
        self.apply(_init_weights)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward (torch.utils.checkpoint, non-reentrant)."""
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "start_token"}

    def flops_per_image(self) -> float:
        """Forward multiply-adds x 2 of the linear layers and attention (causal: half the scores)."""
        cfg, n = self.cfg, self.num_patches
        d = cfg.embed_dim
        per_block = 2 * n * (4 * d * d + 2 * d * int(d * cfg.mlp_ratio)) + 2 * n * n * d  # qkv+proj, mlp, qk+pv / 2
        embed_and_head = 2 * (n - 1) * self.patch_dim * d + 2 * n * d * self.patch_dim  # the start token is learned
        return float(cfg.depth * per_block + embed_and_head)

    # -------------------------------------------------------------- pixels <-> patches

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, C * p * p), raster order, each patch flattened (c, row, col)."""
        B, C, H, W = images.shape
        p, cfg = self.cfg.patch_size, self.cfg
        if (C, H, W) != (cfg.in_chans, cfg.img_size, cfg.img_size):
            raise ValueError(f"CausalViT: images have shape {tuple(images.shape)}; expected (batch, {cfg.in_chans}, "
                             f"{cfg.img_size}, {cfg.img_size})")
        x = images.reshape(B, C, self.grid, p, self.grid, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(B, self.num_patches, self.patch_dim)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        B, p, C = patches.shape[0], self.cfg.patch_size, self.cfg.in_chans
        x = patches.reshape(B, self.grid, self.grid, C, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(B, C, self.cfg.img_size, self.cfg.img_size)

    # -------------------------------------------------------------- full causal forward

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Predicted pixels of every patch given the patches before it: (B, N, patch_dim).

        With prefix_patches = K, predictions 0 .. K-1 see the prefix both ways (not a prediction:
        the loss skips them); predictions K .. N-1 see only earlier patches.
        """
        patches = self.patchify(images)
        B = patches.shape[0]
        tokens = torch.cat([self.start_token.expand(B, -1, -1), self.patch_embed(patches[:, :-1])], dim=1)
        bias = None
        if self.prefix_patches:
            bias = prefix_bias(torch.full((1,), self.prefix_patches + 1, device=tokens.device), self.num_patches,
                               self.num_patches, tokens.dtype)
        return self.forward_tokens(tokens + self.pos_embed, bias=bias)

    def forward_tokens(self, x: torch.Tensor, cache: KVCache | None = None,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
        """Run the blocks and head on position-embedded tokens; with a cache, after its tokens.

        bias: the prefix-causal mask (prefix_bias) instead of the causal one; with a cache, the
        cache must be empty (a prefill from token 0).
        """
        remat = self.grad_checkpointing and cache is None and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if remat:
                x = checkpoint(block, x, None, i, bias, use_reentrant=False)
            else:
                x = block(x, cache, i, bias)
        if cache is not None:
            cache.advance(x.shape[1])
        return self.head(self.norm(x))

    def loss(self, images: torch.Tensor, norm_pix: bool = False) -> torch.Tensor:
        """The training objective on `images`: the mean over images of next_patch_errors (the mean squared
        error over patches prefix_patches .. N-1; the prefix sees its own targets, so it carries no loss),
        against per-patch normalised targets when norm_pix. distvit/engine/tasks.py (task.kind=autoregressive)
        computes the same with the same two functions, on the engine's forward."""
        target = self.patchify(images)
        if norm_pix:
            target = normalise_patches(target)
        return next_patch_errors(self.forward(images), target, self.prefix_patches).mean()

    # -------------------------------------------------------------- incremental decoding

    def new_cache(self, batch: int, dtype: torch.dtype | None = None, device=None, backend: str = "auto") -> KVCache:
        """A cache with room for a whole image (num_patches tokens)."""
        ref = self.pos_embed
        cfg = self.cfg
        return KVCache(cfg.depth, batch, cfg.num_heads, self.num_patches, cfg.embed_dim // cfg.num_heads,
                       dtype or ref.dtype, device or ref.device, backend)

    def step(self, patches: torch.Tensor | None, cache: KVCache) -> torch.Tensor:
        """Feed the next tokens and return their predictions (B, n, patch_dim).

        patches=None feeds the start token (the cache must be empty); otherwise patches
        (B, n, patch_dim) are the next n patches; patch i is token i + 1, since token 0 is the
        start token. The tokens take the cache positions seqlens .. seqlens + n - 1, and every
        sequence of the batch must be at the same position (lockstep decoding).
        """
        start = int(cache.seqlens[0])
        if patches is None:
            if start != 0:
                raise ValueError(f"CausalViT.step: the start token goes first, but the cache already holds {start} "
                                 "tokens; call cache.reset() to begin a new image")
            tokens = self.start_token.expand(cache.seqlens.shape[0], -1, -1)
        else:
            if start == 0:
                raise ValueError("CausalViT.step: the cache is empty, so the start token comes first: call "
                                 "step(None, cache) before feeding patches")
            tokens = self.patch_embed(patches)
        n = tokens.shape[1]
        if start + n > self.num_patches:
            raise ValueError(f"CausalViT.step: the cache holds {start} tokens and {n} more do not fit in "
                             f"{self.num_patches} positions (one per patch)")
        return self.forward_tokens(tokens + self.pos_embed[:, start:start + n], cache)

    @torch.no_grad()
    def generate(self, batch: int, prompt: torch.Tensor | None = None) -> torch.Tensor:
        """Complete images patch by patch, greedily (the regressed pixels are the patch): (B, C, H, W).

        prompt: (B, k, patch_dim), known first patches (e.g. the top rows), fed in one step.
        """
        cache = self.new_cache(batch)
        pred = self.step(None, cache)[:, -1]  # patch 0 from the start token alone
        out = []
        if prompt is not None and prompt.shape[1] > 0:
            if prompt.shape[1] > self.num_patches:
                raise ValueError(f"CausalViT.generate: prompt has {prompt.shape[1]} patches; an image has "
                                 f"{self.num_patches}")
            out = list(prompt.unbind(1))
            if len(out) < self.num_patches:
                pred = self.step(prompt, cache)[:, -1]
        while len(out) < self.num_patches:
            out.append(pred)
            if len(out) < self.num_patches:
                pred = self.step(pred[:, None], cache)[:, -1]
        return self.unpatchify(torch.stack(out, dim=1))


NORM_EPS = 1e-6  # MAE's norm_pix_loss epsilon


def normalise_patches(patches: torch.Tensor) -> torch.Tensor:
    """Each patch (last dim) to zero mean and unit variance, (x - mean) / sqrt(var + NORM_EPS) with the
    unbiased variance (MAE's norm_pix_loss): the AIM / MAE target. A one-pixel patch has variance 0."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True, unbiased=True) if patches.shape[-1] > 1 else torch.zeros_like(mean)
    return (patches - mean) / (var + NORM_EPS).sqrt()


def next_patch_errors(pred: torch.Tensor, target: torch.Tensor, prefix_patches: int = 0) -> torch.Tensor:
    """Per-image mean squared error (B,), float32, over the predicted patches prefix_patches .. N-1 of
    pred and target (B, N, patch_dim). Predictions 0 .. K-1 of a prefix-attention model see patch i
    when predicting it, so they are not predictions and carry no loss."""
    k = prefix_patches
    diff = pred[:, k:].float() - target[:, k:].float()
    return diff.pow(2).mean(dim=(1, 2))


def prefix_bias(prefix_tokens: torch.Tensor, queries: int, keys: int, dtype=torch.float32) -> torch.Tensor:
    """Additive mask (B, 1, queries, keys), queries at positions 0 .. queries-1: query i sees key j
    when j <= i (causal) or j < prefix_tokens[b] (the bidirectional prefix); -inf elsewhere."""
    dev = prefix_tokens.device
    i = torch.arange(queries, device=dev)[:, None]
    j = torch.arange(keys, device=dev)[None, :]
    visible = (j <= i)[None] | (j[None] < prefix_tokens.reshape(-1, 1, 1))
    return torch.zeros(visible.shape, dtype=dtype, device=dev).masked_fill(~visible, float("-inf"))[:, None]


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _build(name: str, defaults: dict, overrides: dict) -> CausalViT:
    known = set(CausalViTConfig.__dataclass_fields__)
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"{name}: unknown override(s) {', '.join(unknown)}; a causal ViT takes "
                         f"{', '.join(sorted(known))} (it has no classifier, so no num_classes)")
    return CausalViT(CausalViTConfig(**{**defaults, **overrides}))


AUTOREGRESSIVE_MODELS: set[str] = set()  # names trained with task.kind=autoregressive (config_checks.py)


def _register_causal(fn):
    AUTOREGRESSIVE_MODELS.add(fn.__name__)
    return register_model(fn)


@_register_causal
def vit_causal_digits(**overrides) -> CausalViT:
    """Tiny: 8x8 one-channel digits, 2x2 patches (16 tokens), 4 blocks of width 64."""
    return _build("vit_causal_digits", dict(img_size=8, patch_size=2, in_chans=1, embed_dim=64, depth=4,
                                            num_heads=4), overrides)


@_register_causal
def vit_causal_base_patch16_224(**overrides) -> CausalViT:
    """ViT-Base geometry (12 x 768, 12 heads), 224 px, 196 patch tokens."""
    return _build("vit_causal_base_patch16_224", {}, overrides)
