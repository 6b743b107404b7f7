"""Swin Transformer beyond the model contract (tests/test_model_contract.py: sizes, timm layout and logits,
weight round trips, checkpointing, FLOPs, backends): shifted-window attention against a naive float64
reference, the bias through SDPA vs math, the original Microsoft weights and window resizing, hooks, drop
path per block, and a 2-rank ZeRO-2 run of the digits config against the single-process reference loop.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distvit import models
from distvit.attention.backends import resolve_backend
from distvit.models import load_checkpoint
from distvit.models.swin import (SwinBlock, WindowAttention, resize_relative_position_bias_table,
                                 shifted_window_mask, window_partition, window_reverse)
from model_helpers import randomize_


# --- shifted windows against the definition ---------------------------------------------------------


def naive_window_attention(x, attn: WindowAttention, window: int, shift: int) -> torch.Tensor:
    """The paper's definition, written without rolls, partitions or masks of windows: token (i, j) attends to
    every token of its window, the windows of the grid displaced by `shift` (windows at the image border
    are cut short, nothing wraps around), with the bias looked up at the true offset. x (B, H, W, C)."""
    B, H, W, C = x.shape
    nh, hd = attn.num_heads, attn.head_dim
    q, k, v = F.linear(x.reshape(B, H * W, C), attn.qkv.weight, attn.qkv.bias).view(B, H * W, 3, nh, hd).unbind(2)
    rows = torch.arange(H).repeat_interleave(W)
    cols = torch.arange(W).repeat(H)
    # Window boundaries at shift + k*window (the first, [0, shift), and the last are cut by the border):
    # the token at row r is in window floor((r - shift) / window).
    win_r = torch.div(rows - shift, window, rounding_mode="floor")
    win_c = torch.div(cols - shift, window, rounding_mode="floor")
    same = (win_r[:, None] == win_r[None, :]) & (win_c[:, None] == win_c[None, :])
    dr = rows[:, None] - rows[None, :]
    dc = cols[:, None] - cols[None, :]
    index = ((dr + window - 1) * (2 * window - 1) + dc + window - 1).clamp(0, (2 * window - 1) ** 2 - 1)
    bias = attn.relative_position_bias_table[index].permute(2, 0, 1)  # (heads, HW, HW), used only where same
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * attn.scale + bias
    s = s.masked_fill(~same, float("-inf"))
    o = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v).reshape(B, H * W, C)
    return attn.proj(o).view(B, H, W, C)


@pytest.mark.parametrize("backend", ["math", "sdpa"])
@pytest.mark.parametrize("grid,window,shift", [((8, 8), 4, False), ((8, 8), 4, True), ((8, 12), 4, True),
                                               ((6, 6), 2, True), ((6, 9), 3, True)])
def test_shifted_window_attention_equals_naive_reference_float64(grid, window, shift, backend):
    torch.manual_seed(0)
    blk = SwinBlock(24, grid, num_heads=3, window_size=(window, window), shift=shift, attn_backend=backend).double()
    with torch.no_grad():
        blk.attn.relative_position_bias_table.normal_(0, 1.0)  # large enough that a wrong offset shows
    x = torch.randn(2, *grid, 24, dtype=torch.float64, requires_grad=True)
    s = window // 2 if shift else 0
    assert blk.shift_size == (s, s)
    got = blk._window_attention(x)
    ref = naive_window_attention(x, blk.attn, window, s)
    # float64 on both sides: only summation order differs.
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-10)
    g_got = torch.autograd.grad(got.square().sum(), [x, blk.attn.relative_position_bias_table])
    g_ref = torch.autograd.grad(ref.square().sum(), [x, blk.attn.relative_position_bias_table])
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


def test_shift_mask_keeps_the_image_border_apart():
    """In the rolled grid the bottom-right window holds the image's corners; none of them may see another."""
    torch.manual_seed(0)
    blk = SwinBlock(8, (8, 8), num_heads=2, window_size=(4, 4), shift=True).double().eval()
    x = torch.randn(1, 8, 8, 8, dtype=torch.float64)
    base = blk._window_attention(x)
    for far in [(7, 7), (7, 0), (0, 7)]:
        moved = x.clone()
        moved[0, far[0], far[1]] += 10.0
        out = blk._window_attention(moved)
        assert torch.equal(out[0, 0, 0], base[0, 0, 0]), f"token {far} leaked into (0, 0) across the border"
    near = x.clone()
    near[0, 1, 1] += 10.0  # same displaced window as (0, 0): must be seen
    assert not torch.allclose(blk._window_attention(near)[0, 0, 0], base[0, 0, 0])

    mask = shifted_window_mask(8, 8, (4, 4), (2, 2))
    assert mask.shape == (4, 16, 16)
    assert (mask[0] == 0).all()  # the interior window is one region
    # Window 3 (bottom-right) holds 4 regions of 2x2 tokens: each token sees 4 of 16.
    assert ((mask[3] == 0).sum(-1) == 4).all()


def test_window_partition_round_trip():
    x = torch.arange(2 * 6 * 8 * 3, dtype=torch.float32).view(2, 6, 8, 3)
    w = window_partition(x, (3, 4))
    assert w.shape == (2, 4, 12, 3)
    assert torch.equal(w[0, 1, 0], x[0, 0, 4])  # second window starts at column 4
    assert torch.equal(window_reverse(w, (3, 4), 6, 8), x)


def test_window_bias_through_sdpa_equals_math_float64():
    """The relative position bias plus the shift mask as attention(bias=): same output and bias-table grad."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 16, 24, dtype=torch.float64)
    mask = shifted_window_mask(8, 8, (4, 4), (2, 2), dtype=torch.float64)
    results = {}
    for backend in ("sdpa", "math"):
        torch.manual_seed(1)
        attn = WindowAttention(24, 3, (4, 4), attn_backend=backend).double()
        out = attn(x, mask)
        grad = torch.autograd.grad(out.square().sum(), attn.relative_position_bias_table)[0]
        results[backend] = (out, grad)
    torch.testing.assert_close(results["sdpa"][0], results["math"][0], atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(results["sdpa"][1], results["math"][1], atol=1e-10, rtol=1e-9)


def test_auto_backend_picks_sdpa_for_a_bias_even_with_flash_installed(monkeypatch):
    import distvit.attention.backends as backends

    monkeypatch.setattr(backends, "flash_installed", lambda: True)
    q = torch.randn(1, 2, 4, 8, dtype=torch.float16)
    assert resolve_backend("auto", q, q, q, torch.zeros(2, 4, 4, dtype=torch.float16)) == "sdpa"
    with pytest.raises(ValueError, match="flash-attn takes no additive bias; use backend='sdpa' or 'math'"):
        resolve_backend("flash", q, q, q, torch.zeros(2, 4, 4, dtype=torch.float16))


# --- weights ----------------------------------------------------------------------------------------


def _logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


def test_original_microsoft_layout_loads(tmp_path):
    """The released Swin checkpoints merge patches at the end of a stage, name the head `head` and save the
    index and mask buffers; checkpoint_filter_fn maps them onto timm's layout."""
    src = randomize_(models.create("swin_tiny_patch4_window7_224", img_size=64, num_classes=4))
    original = {}
    for k, v in src.state_dict().items():
        if ".downsample." in k:
            stage = int(k.split(".")[1])
            k = k.replace(f"layers.{stage}.downsample", f"layers.{stage - 1}.downsample")
        original[k.replace("head.fc.", "head.")] = v
    for name, module in src.named_modules():
        if isinstance(module, WindowAttention):
            original[f"{name}.relative_position_index"] = module.relative_position_index
        if isinstance(module, SwinBlock) and module.attn_mask is not None:
            original[f"{name}.attn_mask"] = module.attn_mask
    path = tmp_path / "original.pth"
    torch.save({"model": original}, path)
    ours = models.create("swin_tiny_patch4_window7_224", img_size=64, num_classes=4)
    report = load_checkpoint(ours, path)
    assert report.ok
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(_logits(ours, x), _logits(src, x), atol=0, rtol=0)


def test_checkpoint_at_another_window_size_resizes_the_bias_tables(tmp_path):
    from safetensors.torch import save_file

    src = models.create("swin_tiny_patch4_window7_224", img_size=64, num_classes=4)
    with torch.no_grad():
        for name, p in src.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.fill_(0.25)  # a constant table must stay constant under any resize
    path = tmp_path / "w7.safetensors"
    save_file(src.state_dict(), str(path))
    ours = models.create("swin_tiny_patch4_window7_224", img_size=64, num_classes=4, window_size=4,
                         checkpoint=str(path))
    table = ours.layers[0].blocks[0].attn.relative_position_bias_table
    assert table.shape == (7 * 7, 3)
    torch.testing.assert_close(table, torch.full_like(table, 0.25))
    with pytest.raises(ValueError, match="table with 12 rows is not a \\(2w-1\\)\\^2 grid of a square window"):
        resize_relative_position_bias_table(torch.zeros(12, 2), (4, 4))


def test_resize_bias_table_is_bicubic_over_the_offset_grid():
    """Swin's own fine-tuning recipe: per head, the (2w-1)x(2w-1) offset grid resized bicubically."""
    table = torch.randn(13 * 13, 3, generator=torch.Generator().manual_seed(0))
    assert resize_relative_position_bias_table(table, (7, 7)) is table
    out = resize_relative_position_bias_table(table, (12, 12))
    assert out.shape == (23 * 23, 3)
    grid = table.t().reshape(3, 13, 13)
    expected = F.interpolate(grid[None], size=(23, 23), mode="bicubic", align_corners=False)[0]
    torch.testing.assert_close(out.t().reshape(3, 23, 23), expected)


# --- hooks and accounting ----------------------------------------------------------------------------


def test_hooks_and_attributes():
    from distvit.engine.optim import param_groups

    m = models.create("swin_tiny_patch4_window7_224", img_size=64, num_classes=3)
    tables = {n for n, _ in m.named_parameters() if "relative_position_bias_table" in n}
    assert len(tables) == 12 and m.no_weight_decay() == tables
    groups = param_groups(m, 0.05)
    no_decay = {id(p) for p in groups[1]["params"]}
    assert all(id(p) in no_decay for n, p in m.named_parameters() if n in tables)
    assert [blk.window_size for blk in m.blocks()][-4:] == [(4, 4), (4, 4), (2, 2), (2, 2)]  # 64 px: 16, 8, 4, 2
    assert [blk.shift_size for blk in m.blocks()][:2] == [(0, 0), (3, 3)]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = m.forward_features(x)
        assert feats.shape == (2, 2, 2, 768)
        assert m.forward_head(feats, pre_logits=True).shape == (2, 768)
        assert m(x).shape == (2, 3)
    m.reset_classifier(0)
    assert m(x).shape == (2, 768)
    with pytest.raises(ValueError, match=r"input has shape \(2, 3, 32, 32\), expected \(batch, 3, 64, 64\)"):
        m(torch.randn(2, 3, 32, 32))
    with pytest.raises(TypeError, match="swin_digits: unknown option 'window'; did you mean window_size"):
        models.create("swin_digits", window=4)


def test_drop_path_rises_linearly_over_all_blocks():
    m = models.create("swin_tiny_patch4_window7_224", img_size=64, drop_path_rate=0.11)
    rates = [getattr(blk.drop_path1, "drop_prob", 0.0) for blk in m.blocks()]
    assert rates == pytest.approx([0.11 * i / 11 for i in range(12)])


# --- training through the Trainer -------------------------------------------------------------------


@pytest.mark.multirank
def test_zero2_two_ranks_equal_single_process(tmp_path):
    """configs/swin_digits.yaml on 2 ranks with ZeRO-2 for 5 steps equals the plain torch loop on one process."""
    from distvit.config import load_config
    from distvit.data.write import write_digits
    from test_trainer import STEPS
    from trainer_helpers import launch, load_weights, losses, reference_run, summary

    digits = tmp_path / "digits"
    write_digits(digits)
    sets = [f"run.output_dir={tmp_path}", "run.name=swin", f"run.max_steps={STEPS}", "run.eval_every=1000",
            f"data.train={digits}/train-*.tar", f"data.val={digits}/val-*.tar", "data.batch_size=16",
            "log.every_steps=1", "log.tensorboard=false", "log.progress=false", "schedule.warmup_steps=2",
            "optim.lr=3e-3", "parallel.zero_stage=2", "model.drop_path_rate=0.0"]
    launch(["--config", "swin_digits"] + [a for s in sets for a in ("--set", s)])
    cfg = load_config("swin_digits", sets)
    ref_state, ref_losses = reference_run(cfg, STEPS)
    got = load_weights(tmp_path / "swin" / "model.safetensors")
    assert set(got) == set(ref_state)
    # fp32; tolerances as in test_trainer: all-reduced half-batch grads vs one mean differ at float32
    # rounding, which Adam keeps at ~1e-7 relative over 5 steps.
    for k, ref in ref_state.items():
        torch.testing.assert_close(got[k], ref.float(), rtol=1e-4, atol=2e-5, msg=lambda m: f"{k}: {m}")
    logged = [float(loss) for _, loss in losses(tmp_path / "swin")]
    torch.testing.assert_close(torch.tensor(logged), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
    assert summary(tmp_path / "swin")["status"] == "finished"
