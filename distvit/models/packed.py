"""The packed forward of the ViT family: `model.forward_packed(pack(images, ...))` -> one logit row per image.

Token layout of a sequence row: for each image in slot order, the model's prefix tokens (class
token, distillation token) then the image's patches; rows are padded at the end (id -1). Every
token carries its image id, so attention is block-diagonal per image (distvit.attention's
seq_ids). Position embeddings come per image from its own grid: the learned grid resampled to
the image's patch grid exactly as timm's dynamic_img_size does (bicubic, antialiased), then
looked up at each patch's (row, col). Pooling per image: the class token's output, or the mean
of its patch tokens, by the model's global_pool.

So `forward_packed(pack(imgs))[i]` equals `model(imgs[i][None])[0]` (a model built with
dynamic_img_size=True for sizes other than its own) up to float rounding. Sequence-parallel
models (distvit.parallel.parallelize) reuse `token_layout`, `embed` and `pool` on their share of
the tokens. Pure PyTorch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distvit.models.weights import resample_abs_pos_embed


@dataclass
class TokenLayout:
    """Per token of the (S, T) packed sequence: its image id (-1 pad), patch slot (-1 if none), prefix index (-1)."""

    seq_ids: torch.Tensor
    patch_src: torch.Tensor
    prefix_k: torch.Tensor
    num_images: int
    num_prefix: int

    @property
    def length(self) -> int:
        return self.seq_ids.shape[1]

    def padded(self, length: int) -> "TokenLayout":
        """The layout padded at the end of every row to `length` tokens."""
        extra = length - self.length
        if extra <= 0:
            return self
        pad = lambda t: F.pad(t, (0, extra), value=-1)  # noqa: E731
        return TokenLayout(pad(self.seq_ids), pad(self.patch_src), pad(self.prefix_k), self.num_images,
                           self.num_prefix)

    def select(self, positions: torch.Tensor) -> "TokenLayout":
        """The tokens at `positions` (1-D, of every row)."""
        return TokenLayout(self.seq_ids[:, positions], self.patch_src[:, positions], self.prefix_k[:, positions],
                           self.num_images, self.num_prefix)


def token_layout(packed, num_prefix: int) -> TokenLayout:
    """Where every image's prefix tokens and patches sit once the model's prefix tokens are inserted."""
    S = packed.num_sequences
    rows = [[] for _ in range(S)]
    for i, (r, at) in enumerate(packed.image_slots.tolist()):
        rows[r].append((at, i))
    seq_ids, patch_src, prefix_k = [], [], []
    grid = packed.grid_sizes.tolist()
    for members in rows:
        ids, src, pre = [], [], []
        for at, i in sorted(members):
            n = grid[i][0] * grid[i][1]
            ids += [i] * (num_prefix + n)
            src += [-1] * num_prefix + list(range(at, at + n))
            pre += list(range(num_prefix)) + [-1] * n
        seq_ids.append(ids)
        patch_src.append(src)
        prefix_k.append(pre)
    T = max(len(r) for r in seq_ids)
    device = packed.image_ids.device

    def table(lists):
        return torch.tensor([r + [-1] * (T - len(r)) for r in lists], dtype=torch.long, device=device)

    return TokenLayout(table(seq_ids), table(patch_src), table(prefix_k), packed.num_images, num_prefix)


def _pos_table(model, packed) -> tuple[torch.Tensor, torch.Tensor]:
    """(every image's resampled patch position embeddings concatenated (sum n_i, D), offsets (N,))."""
    prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    grid_pe = model.pos_embed[:, prefix:]
    old = model.patch_embed.grid_size
    cache, parts = {}, []
    for gh, gw in packed.grid_sizes.tolist():
        if (gh, gw) not in cache:
            cache[(gh, gw)] = resample_abs_pos_embed(grid_pe, (gh, gw), old_grid=old, num_prefix_tokens=0)[0]
        parts.append(cache[(gh, gw)])
    sizes = (packed.grid_sizes[:, 0] * packed.grid_sizes[:, 1]).to(packed.image_ids.device)
    offsets = torch.cumsum(sizes, 0) - sizes
    return torch.cat(parts, dim=0), offsets


def _prefix_table(model) -> torch.Tensor:
    """(P, D): each prefix token plus its position embedding (none for no_embed_class models)."""
    tokens = [model.cls_token[0, 0]] if model.cls_token is not None else []
    if getattr(model, "dist_token", None) is not None:
        tokens.append(model.dist_token[0, 0])
    if not tokens:
        return model.pos_embed.new_zeros(0, model.embed_dim)
    table = torch.stack(tokens)
    if not getattr(model, "no_embed_class", False):
        table = table + model.pos_embed[0, :len(tokens)]
    return table


def embed(model, packed, layout: TokenLayout) -> torch.Tensor:
    """Position-embedded tokens (S, T, D) of `layout` (zeros at padding), pos_drop applied."""
    pe = model.patch_embed
    if tuple(packed.patch_size) != tuple(pe.patch_size) or packed.in_chans != pe.in_chans:
        raise ValueError(f"forward_packed: the batch was packed with patch_size={tuple(packed.patch_size)} and "
                         f"{packed.in_chans} channels, but the model takes {tuple(pe.patch_size)} and {pe.in_chans}; "
                         "pack with the model's patch size (data.packing uses model.patch_embed.patch_size)")
    S, T = layout.seq_ids.shape
    pos, offsets = _pos_table(model, packed)
    x = pos.new_zeros(S, T, model.embed_dim)
    # No `if any tokens` shortcuts: every parameter stays in the graph even when this rank (sequence
    # parallel) holds no patch or no prefix token, so its gradient hook runs on every rank alike.
    s_idx, t_idx = torch.nonzero(layout.patch_src >= 0, as_tuple=True)
    slot = layout.patch_src[s_idx, t_idx]
    img = layout.seq_ids[s_idx, t_idx]
    rc = packed.positions[s_idx, slot]
    flat = offsets[img] + rc[:, 0] * packed.grid_sizes.to(rc.device)[img, 1] + rc[:, 1]
    # The patch conv called as a module (each patch a 1-patch image): ZeRO-3 gathers its weight in its hook.
    ph, pw = pe.patch_size
    pixels = packed.patches[s_idx, slot].to(pos.dtype).reshape(-1, pe.in_chans, ph, pw)
    values = pe.proj(pixels).flatten(1) + pos[flat]
    x = x.index_put((s_idx, t_idx), values)
    s_idx, t_idx = torch.nonzero(layout.prefix_k >= 0, as_tuple=True)
    x = x.index_put((s_idx, t_idx), _prefix_table(model)[layout.prefix_k[s_idx, t_idx]])
    return model.pos_drop(x)


def pool(model, x: torch.Tensor, layout: TokenLayout):
    """(prefix outputs (N, P, D), per-image SUM of patch outputs (N, D)) of the tokens x (S, T, D) of `layout`.

    Sums, not means, so sequence-parallel ranks can add their parts before dividing by the patch counts.
    """
    N, P, D = layout.num_images, layout.num_prefix, x.shape[-1]
    prefix = x.new_zeros(N, P, D)
    s_idx, t_idx = torch.nonzero(layout.prefix_k >= 0, as_tuple=True)
    prefix = prefix.index_put((layout.seq_ids[s_idx, t_idx], layout.prefix_k[s_idx, t_idx]), x[s_idx, t_idx])
    s_idx, t_idx = torch.nonzero(layout.patch_src >= 0, as_tuple=True)
    sums = x.new_zeros(N, D).index_add(0, layout.seq_ids[s_idx, t_idx], x[s_idx, t_idx])
    return prefix, sums


def patch_counts(packed, like: torch.Tensor) -> torch.Tensor:
    return (packed.grid_sizes[:, 0] * packed.grid_sizes[:, 1]).to(device=like.device, dtype=like.dtype)[:, None]


def forward_packed(model, packed) -> torch.Tensor:
    """Logits (N, classes) for the N packed images, in input order."""
    layout = token_layout(packed, model.num_prefix_tokens)
    x = model.forward_blocks(embed(model, packed, layout), seq_ids=layout.seq_ids)
    prefix, sums = pool(model, x, layout)
    return model.forward_pooled(prefix, sums / patch_counts(packed, sums))


def packed_flops(model, packed) -> int:
    """Forward FLOPs of forward_packed on real tokens only (padding slots and cross-image pairs excluded).

    As VisionTransformer.flops_per_image, per image i with n_i = prefix + patches tokens: the
    per-token matmuls over n_i tokens, attention over its own n_i^2 pairs (what a varlen kernel
    computes), the patch projection, the head(s). For an image at the model's own size it equals
    flops_per_image(), so MFU from it counts the useful work of a packed step.
    """
    return grid_flops(model, packed.grid_sizes)


def grid_flops(model, grid_sizes) -> int:
    """packed_flops of images with these (rows, cols) patch grids ((N, 2) tensor or list of pairs)."""
    d = model.embed_dim
    pe = model.patch_embed
    patch_flops = 2 * pe.in_chans * pe.patch_size[0] * pe.patch_size[1] * d
    heads = [h for h in (model.head, getattr(model, "head_dist", None)) if isinstance(h, torch.nn.Linear)]
    total = 0
    grids = grid_sizes.tolist() if torch.is_tensor(grid_sizes) else grid_sizes
    for gh, gw in grids:
        n = model.num_prefix_tokens + gh * gw
        total += gh * gw * patch_flops + sum(2 * d * h.out_features for h in heads)
        for blk in model.blocks:
            hidden = blk.mlp.fc1.out_features
            total += 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * hidden
    return total
