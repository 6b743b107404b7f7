"""Native resolution (issue 17): dynamic image size against timm, packing, block-diagonal attention.

Tolerances: float32, atol 1e-5 (the issue's bar). Against timm, both sides run the same ops in
the same order except the attention kernel, so logits differ by float32 rounding (~1e-6). The
packed forward embeds patches with a matmul instead of the strided convolution and attends with a
block mask instead of one sequence per image: the same sums in another order, again ~1e-6; a
wrong position, a token attending across images or a wrong pooling moves logits by O(0.1).
"""
from __future__ import annotations

import pytest
import torch

from distvit import models
from distvit.attention import attention
from distvit.attention.packed import segment_pieces
from distvit.data.packing import pack, patchify
from model_helpers import randomize_

TOL = dict(atol=1e-5, rtol=1e-5)
SMALL = dict(embed_dim=64, depth=2, num_heads=4, num_classes=7)
# Non-square sizes (H, W), all multiples of 16; the model's own 32x32 among them.
SIZES = [(32, 48), (64, 16), (32, 32), (16, 80), (48, 48)]


def _images(sizes, seed=0, chans=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(chans, h, w, generator=g) for h, w in sizes]


# --- 1. dynamic image size, against timm ---------------------------------------------------------

TIMM_DYNAMIC = [
    ("vit_small_patch16_224", {}),
    ("vit_small_patch16_224", dict(global_pool="avg", class_token=False)),
    ("deit_small_patch16_224", {}),
    ("deit_small_distilled_patch16_224", {}),
    ("deit3_small_patch16_224", {}),
]


@pytest.mark.parametrize("name,extra", TIMM_DYNAMIC)
def test_dynamic_img_size_matches_timm_on_non_square_inputs(timm_module, name, extra):
    kw = dict(img_size=32, depth=2, num_classes=7, dynamic_img_size=True, **extra)
    theirs = randomize_(timm_module.create_model(name, pretrained=False, **kw)).eval()
    ours = models.create(name, **kw).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    for h, w in [(48, 80), (16, 32), (32, 32)]:
        x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(h * w))
        with torch.no_grad():
            torch.testing.assert_close(ours(x), theirs(x), **TOL)


@pytest.mark.parametrize("flag", ["strict_img_size", "dynamic_img_size"])
def test_swin_window_padded_sizes_match_timm(timm_module, flag):
    # Built for 64 px (16x16 grid, windows of 4). 48x80: grid 12x20, then 6x10 at stage 2 (padded to 8x12);
    # 40x24: grid 10x6 (padded to 12x8), then 5x3 (padded to 8x4). The shift masks are built per input.
    kw = dict(img_size=64, depths=(2, 2), num_heads=(2, 4), embed_dim=32, window_size=4, num_classes=5,
              **{flag: flag == "dynamic_img_size"})
    theirs = randomize_(timm_module.create_model("swin_tiny_patch4_window7_224", pretrained=False, **kw)).eval()
    ours = models.create("swin_tiny_patch4_window7_224", **kw).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    for h, w in [(48, 80), (40, 24), (64, 64)]:
        x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(h + w))
        with torch.no_grad():
            torch.testing.assert_close(ours(x), theirs(x), **TOL)
    strict = models.create("swin_tiny_patch4_window7_224", **{**kw, flag: flag != "dynamic_img_size"})
    with pytest.raises(ValueError, match="expected"):
        strict(torch.randn(1, 3, 48, 80))


def test_fixed_size_model_rejects_other_sizes_and_dynamic_rejects_non_multiples():
    fixed = models.create("vit_small_patch16_224", img_size=32, **SMALL)
    with pytest.raises(ValueError, match="dynamic_img_size=True"):
        fixed(torch.randn(1, 3, 32, 48))
    dynamic = models.create("vit_small_patch16_224", img_size=32, dynamic_img_size=True, **SMALL)
    with pytest.raises(ValueError, match=r"image size 32x40 is not a multiple of the patch size 16x16"):
        dynamic(torch.randn(1, 3, 32, 40))


# --- 2. packing ----------------------------------------------------------------------------------


def test_pack_layout_positions_ids_and_slots():
    imgs = _images([(32, 48), (16, 16), (48, 32), (16, 32)])
    packed = pack(imgs, 16, max_tokens=8)
    # 6, 1, 6, 2 patches; first fit in input order: [0, 1], [2, 3].
    assert packed.num_sequences == 2
    assert packed.seq_lens.tolist() == [7, 8]
    assert packed.image_slots.tolist() == [[0, 0], [0, 6], [1, 0], [1, 6]]
    assert packed.cu_seqlens.tolist() == [0, 6, 7, 13, 15]
    assert packed.grid_sizes.tolist() == [[2, 3], [1, 1], [3, 2], [1, 2]]
    assert packed.image_ids.tolist() == [[0] * 6 + [1, -1], [2] * 6 + [3] * 2]
    assert packed.positions[0, :6].tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    # Patch (1, 2) of image 0 is rows 16..31, cols 32..47, flattened as (C, ph, pw).
    torch.testing.assert_close(packed.patches[0, 5], imgs[0][:, 16:32, 32:48].reshape(-1), atol=0, rtol=0)
    assert packed.patches[0, 7].abs().sum() == 0  # padding
    assert packed.useful_fraction() == pytest.approx(15 / 16)
    torch.testing.assert_close(patchify(imgs[3], (16, 16)), packed.patches[1, 6:8], atol=0, rtol=0)


def test_pack_errors_name_the_image_and_the_fix():
    with pytest.raises(ValueError, match=r"images\[1\] is 16x20, not a multiple of patch size 16x16"):
        pack([torch.zeros(3, 16, 16), torch.zeros(3, 16, 20)], 16, max_tokens=8)
    with pytest.raises(ValueError, match=r"images\[0\] \(64x64\) has 16 patches, more than max_tokens=8; raise"):
        pack([torch.zeros(3, 64, 64)], 16, max_tokens=8)


PACKED_MODELS = [
    ("vit_small_patch16_224", {}),                                       # class token
    ("vit_small_patch16_224", dict(global_pool="avg", class_token=False)),  # no class token, mean pool
    ("vit_small_patch16_224", dict(global_pool="avg")),                  # class token present, mean pool
    ("deit_small_patch16_224", {}),
    ("deit_small_distilled_patch16_224", {}),                            # two prefix tokens, two heads
    ("deit3_small_patch16_224", {}),                                     # pos embed on the patches only
]


@pytest.mark.parametrize("name,extra", PACKED_MODELS)
@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_forward_packed_equals_one_image_at_a_time(name, extra, backend):
    torch.manual_seed(0)
    model = randomize_(models.create(name, img_size=32, dynamic_img_size=True, attn_backend=backend,
                                     **{**SMALL, **extra})).eval()
    imgs = _images(SIZES)
    packed = pack(imgs, 16, max_tokens=12)  # 6, 4, 4, 5, 9 patches -> three rows, padding in two
    assert packed.num_sequences == 3
    with torch.no_grad():
        out = model.forward_packed(packed)
        ref = torch.cat([model(img[None]) for img in imgs])
    assert out.shape == (len(imgs), 7)
    torch.testing.assert_close(out, ref, **TOL)


def test_forward_packed_gradients_equal_one_image_at_a_time():
    model = randomize_(models.create("vit_small_patch16_224", img_size=32, dynamic_img_size=True, **SMALL))
    imgs = _images(SIZES[:4])
    target = torch.randn(len(imgs), 7)
    (model.forward_packed(pack(imgs, 16, max_tokens=10)) * target).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    (torch.cat([model(img[None]) for img in imgs]) * target).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_forward_packed_checks_the_patch_size():
    model = models.create("vit_small_patch16_224", img_size=32, dynamic_img_size=True, **SMALL)
    with pytest.raises(ValueError, match=r"packed with patch_size=\(8, 8\).*takes \(16, 16\)"):
        model.forward_packed(pack(_images([(16, 16)]), 8, max_tokens=8))


# --- block-diagonal attention --------------------------------------------------------------------


def _blockwise_reference(q, k, v, ids):
    """Each segment on its own (plain attention per id); padding rows 0."""
    o = torch.zeros_like(q)
    for b in range(q.shape[0]):
        for i in ids[b].unique().tolist():
            if i < 0:
                continue
            sel = ids[b] == i
            o[b, :, sel] = attention(q[b:b + 1, :, sel], k[b:b + 1, :, sel], v[b:b + 1, :, sel], backend="math")[0]
    return o


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_seq_ids_attention_is_block_diagonal(backend):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 10, 8, generator=g, requires_grad=True) for _ in range(3))
    ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, -1], [3, 3, 3, 3, 3, 3, 4, 4, -1, -1]])
    out = attention(q, k, v, seq_ids=ids, backend=backend)
    ref = _blockwise_reference(q, k, v, ids)
    torch.testing.assert_close(out, ref, **TOL)
    assert out[0, :, 9].abs().sum() == 0 and out[1, :, 8:].abs().sum() == 0
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, **TOL)


def test_seq_ids_with_lse_and_separate_key_ids():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 6, 4, generator=g, dtype=torch.float64) for _ in range(3))
    q_ids, k_ids = torch.tensor([0, 0, 1, 1, 1, 5]), torch.tensor([1, 1, 0, 0, 0, 1])
    o, lse = attention(q, k, v, seq_ids=q_ids, kv_seq_ids=k_ids, backend="sdpa", return_lse=True)
    o_m, lse_m = attention(q, k, v, seq_ids=q_ids, kv_seq_ids=k_ids, backend="math", return_lse=True)
    torch.testing.assert_close(o, o_m)
    torch.testing.assert_close(lse, lse_m)
    assert torch.isneginf(lse[..., 5]).all() and o[..., 5, :].abs().sum() == 0  # id 5 has no key here
    # Query 0 (id 0) against keys 2..4 only.
    s = (q[:, :, 0:1] @ k[:, :, 2:5].transpose(-1, -2)) / 2.0
    torch.testing.assert_close(lse[:, :, 0], torch.logsumexp(s, -1)[..., 0])


def test_seq_ids_errors():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match=r"seq_ids has shape \(3,\); it must be \(4,\) or \(1, 4\)"):
        attention(q, q, q, seq_ids=torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="integer tensor of segment ids"):
        attention(q, q, q, seq_ids=torch.zeros(4))


def test_segment_pieces_are_the_shared_runs_only():
    q_ids = torch.tensor([0, 0, 1, 1, 1, -1])
    k_ids = torch.tensor([1, 1, 2, 2, -1, -1])
    assert segment_pieces(q_ids, k_ids) == [(2, 5, 0, 2)]
    assert segment_pieces(torch.tensor([3, 3]), torch.tensor([4, 4])) == []  # the block is skipped


def test_max_images_per_seq_one_is_the_padded_layout():
    imgs = _images([(32, 48), (16, 16), (48, 32)])
    padded = pack(imgs, 16, max_tokens=8, max_images_per_seq=1)
    assert padded.num_sequences == 3 and padded.seq_lens.tolist() == [6, 1, 6]
    assert padded.useful_fraction() == pytest.approx(13 / 18)
    assert pack(imgs, 16, max_tokens=8, max_images_per_seq=2).seq_lens.tolist() == [7, 6]


def test_target_size_native_and_random_res():
    from distvit.data.packing import resize_for_packing, target_size

    assert target_size(480, 640, 16, 64, 256) == (192, 256)          # longer side down to 256, aspect kept
    assert target_size(30, 40, 16, 64, 256) == (64, 80)              # shorter side up to 64
    assert target_size(20, 800, 16, 64, 256) == (16, 256)            # both cannot hold: the max side wins
    draws = [target_size(480, 640, 16, 64, 256, "random_res", torch.Generator().manual_seed(s)) for s in range(20)]
    assert all(h % 16 == 0 and w % 16 == 0 and 64 <= w <= 256 for h, w in draws)
    assert len(set(draws)) > 3
    again = [target_size(480, 640, 16, 64, 256, "random_res", torch.Generator().manual_seed(s)) for s in range(20)]
    assert draws == again  # seeded per sample: a resumed stream draws the same sizes
    assert resize_for_packing(torch.rand(3, 480, 640), 16, 64, 256).shape == (3, 192, 256)
    with pytest.raises(ValueError, match=r"data.packing.resize='crop'; choose one of native, random_res"):
        target_size(10, 10, 16, 64, 256, "crop")


def test_collate_packed_keeps_labels_in_input_order():
    from distvit.data.packing import collate_packed

    imgs = _images([(32, 32), (16, 48), (16, 16)])
    packed, labels = collate_packed(list(zip(imgs, [4, 1, 9])), 16, max_tokens=5)
    assert labels.tolist() == [4, 1, 9] and packed.num_images == 3
    assert packed.image_slots.tolist() == [[0, 0], [1, 0], [0, 4]]


@pytest.mark.parametrize("name", ["vit_small_patch16_224", "deit_small_distilled_patch16_224"])
def test_packed_flops_count_real_tokens_only(name):
    from distvit.models.packed import packed_flops

    model = models.create(name, img_size=32, dynamic_img_size=True, **SMALL)
    native = _images([(32, 32)] * 3)
    assert packed_flops(model, pack(native, 16, max_tokens=8)) == 3 * model.flops_per_image()
    # Padding and the other images' tokens add nothing: one 16x16 image alone in a 4-slot row.
    one = packed_flops(model, pack(_images([(16, 16)]), 16, max_tokens=4))
    both = packed_flops(model, pack(_images([(16, 16), (32, 32)]), 16, max_tokens=8))
    assert both == one + model.flops_per_image()


def test_drop_path_on_packed_rows_draws_one_mask_per_image():
    from distvit.models.layers import DropPath

    drop = DropPath(0.5).train()
    ids = torch.tensor([[0, 0, 0, 1, 1, -1], [2, 2, 3, 3, 3, 3]])
    torch.manual_seed(0)
    seen = set()
    for _ in range(40):
        out = drop(torch.ones(2, 6, 3), ids)
        for b, row in enumerate(ids.tolist()):
            for i in set(row):
                vals = out[b, torch.tensor(row) == i].unique().tolist()
                assert vals in ([0.0], [2.0]) if i >= 0 else vals == [2.0]  # whole image dropped or kept; pads kept
        seen.add((out[0, 0, 0].item(), out[0, 3, 0].item()))
    assert len(seen) == 4  # images of one row are dropped independently


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["sdpa", "flash"])
def test_cuda_block_diagonal_backends_match_math(backend):
    from distvit.attention.backends import flash_installed

    if backend == "flash" and not flash_installed():
        pytest.skip("flash-attn is not installed")
    g = torch.Generator().manual_seed(3)
    ids = torch.tensor([[0] * 37 + [1] * 64 + [2] * 20 + [-1] * 7]).cuda()
    q, k, v, do = (torch.randn(1, 4, 128, 64, generator=g, dtype=torch.float64).cuda() for _ in range(4))
    ref = _blockwise_reference(q, k, v, ids)
    q16, k16, v16 = (t.to(torch.bfloat16).requires_grad_() for t in (q, k, v))
    out = attention(q16, k16, v16, seq_ids=ids, backend=backend)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=0)  # bf16 rounding of O(1) values
    assert out[0, :, 121:].abs().sum() == 0
    (out.float() * do.float()).sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q16, k16, v16))
