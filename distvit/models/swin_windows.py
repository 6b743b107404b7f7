"""Swin's windows: partition a (B, H, W, C) token grid into w x w windows and back, the relative
position index and bias-table resize (timm's, for other window sizes), and the mask that keeps a
shifted window's tokens from attending across the cyclically wrapped image border."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def window_partition(x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """(B, H, W, C) -> (B, num_windows, wh*ww, C); windows in row-major order, tokens row-major inside."""
    B, H, W, C = x.shape
    wh, ww = window
    x = x.view(B, H // wh, wh, W // ww, ww, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, (H // wh) * (W // ww), wh * ww, C)


def window_reverse(windows: torch.Tensor, window: tuple[int, int], H: int, W: int) -> torch.Tensor:
    """(B, num_windows, wh*ww, C) -> (B, H, W, C), the inverse of window_partition."""
    B, _, _, C = windows.shape
    wh, ww = window
    x = windows.view(B, H // wh, W // ww, wh, ww, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, H, W, C)


def relative_position_index(wh: int, ww: int, device=None) -> torch.Tensor:
    """(N, N) long, N = wh*ww: the row of the (2wh-1)(2ww-1) bias table for the offset from token i to token j."""
    rows, cols = torch.meshgrid(torch.arange(wh, device=device), torch.arange(ww, device=device), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    dr = rows[:, None] - rows[None, :] + (wh - 1)  # 0 .. 2wh-2
    dc = cols[:, None] - cols[None, :] + (ww - 1)
    return dr * (2 * ww - 1) + dc


def shifted_window_mask(H: int, W: int, window: tuple[int, int], shift: tuple[int, int],
                        device=None, dtype=torch.float32) -> torch.Tensor:
    """(num_windows, N, N) additive mask for the rolled (H, W) grid: 0 where two tokens of a window were
    neighbours before the roll, -inf where one of them wrapped around the image border.

    After rolling by -shift, the last `shift` rows (columns) hold the image's first rows (columns). Each
    axis splits into three bands, [0, H-w), [H-w, H-s), [H-s, H); tokens attend only inside their own
    band pair (at most the last window row/column mixes bands).
    """
    def bands(size: int, w: int, s: int) -> torch.Tensor:
        ids = torch.zeros(size, dtype=torch.long, device=device)
        ids[size - w:] = 1
        if s:
            ids[size - s:] = 2
        return ids

    region = bands(H, window[0], shift[0])[:, None] * 3 + bands(W, window[1], shift[1])[None, :]  # (H, W)
    region = window_partition(region[None, :, :, None], window)[0, :, :, 0]  # (num_windows, N)
    same = region[:, :, None] == region[:, None, :]
    return torch.zeros(same.shape, dtype=dtype, device=device).masked_fill(~same, float("-inf"))


def resize_relative_position_bias_table(table: torch.Tensor, new_window: tuple[int, int],
                                        old_window: tuple[int, int] | None = None) -> torch.Tensor:
    """Resize a ((2wh-1)(2ww-1), heads) bias table to another window, bicubic over the offset grid.

    This is how the Swin authors fine-tune at another window size (their `load_pretrained`); timm
    interpolates on a geometric grid instead, so tables resized here differ slightly from timm's.
    old_window defaults to a square window.
    """
    rows, heads = table.shape
    if old_window is None:
        side = math.isqrt(rows)
        if side * side != rows or side % 2 == 0:
            raise ValueError(f"relative position bias table with {rows} rows is not a (2w-1)^2 grid of a square "
                             "window; pass old_window=(h, w)")
        old_window = ((side + 1) // 2,) * 2
    old = (2 * old_window[0] - 1, 2 * old_window[1] - 1)
    new = (2 * new_window[0] - 1, 2 * new_window[1] - 1)
    if old[0] * old[1] != rows:
        raise ValueError(f"relative position bias table has {rows} rows, not {old[0] * old[1]} for window {old_window}")
    if old == new:
        return table
    grid = table.float().t().reshape(1, heads, old[0], old[1])
    grid = F.interpolate(grid, size=new, mode="bicubic", align_corners=False)
    return grid.reshape(heads, new[0] * new[1]).t().contiguous().to(table.dtype)


# --- modules -----------------------------------------------------------------------------------
