"""Sequence parallelism on packed sequences, and hybrid Ulysses + ring (issue 17, item 4).

Every multi-rank case is compared against one process on the same inputs: the output and the
gradient of every input (attention) or parameter (ViT), float32, 1e-5 as in
test_sequence_parallel.py (same sums in another order: per-block partials merged through
(o, lse), exact all-to-alls, per-image pooled sums added over ranks). The packed sequences put
image boundaries inside the shards, pad each row differently, and hold several rows.
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distvit.attention.backends import attention
from distvit.parallel.hybrid import hybrid_attention, hybrid_groups
from distvit.attention.packed import ring_pieces
from distvit.parallel.sequence_parallel import ring_attention, shard_tokens, ulysses_attention, unshard_tokens
from distvit.data.packing import pack
from test_sequence_parallel import _free_port, _mesh_groups

TOL = dict(rtol=1e-5, atol=1e-5)
D = 8
# Two rows of 21 tokens: images of 5, 7, 3, 6 tokens and 9, 12 tokens (row 1 padded with -1 at the end).
IDS = torch.tensor([[0] * 5 + [1] * 7 + [2] * 3 + [3] * 6, [4] * 9 + [5] * 10 + [-1] * 2])
# (impl, layout, ulysses_size, heads, packed): hybrid u x (sp/u); "4 with 2 heads" runs hybrid 2 x 2.
ATTN_CASES = {
    2: [("ulysses", "contiguous", None, 4, True), ("ring", "contiguous", None, 4, True),
        ("ring", "zigzag", None, 4, True), ("hybrid", "contiguous", 1, 4, True), ("hybrid", "contiguous", 2, 2, True),
        ("hybrid", "contiguous", 1, 4, False)],
    4: [("ulysses", "contiguous", None, 4, True), ("ring", "contiguous", None, 4, True),
        ("ring", "zigzag", None, 4, True), ("hybrid", "contiguous", 2, 4, True), ("hybrid", "contiguous", 2, 2, True),
        ("hybrid", "contiguous", 2, 2, False)],
}


def _inputs(heads: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, heads, IDS.shape[1], D, generator=g) for _ in range(4)]  # q, k, v, upstream gradient


def _run(case, q, k, v, ids, group, groups):
    impl, layout, _, _, packed = case
    kw = dict(seq_ids=ids) if packed else dict(seq_len=IDS.shape[1])
    if impl == "ulysses":
        return ulysses_attention(q, k, v, group, **kw)
    if impl == "ring":
        return ring_attention(q, k, v, group, layout=layout, **kw)
    return hybrid_attention(q, k, v, *groups, **kw)


def _attention_worker(rank, world, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        group, sp_rank, _ = _mesh_groups(world, world)
        results = {}
        for case in ATTN_CASES[world]:
            impl, layout, u, heads, packed = case
            groups = hybrid_groups(group, u) if impl == "hybrid" else None
            q, k, v, do = (shard_tokens(t, 2, sp_rank, world, layout=layout) for t in _inputs(heads))
            ids = shard_tokens(IDS + 1, 1, sp_rank, world, layout=layout) - 1  # padding shards as -1
            q, k, v = (t.requires_grad_() for t in (q, k, v))
            o = _run(case, q, k, v, ids, group, groups)
            (o * do).sum().backward()
            results[case] = {"o": o.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}
        try:
            hybrid_groups(group, 3)
        except ValueError as e:
            results["bad_u"] = str(e)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
        # Both ranks are done with the group before either closes it: a peer that closes its
        # connections while the other still holds the group can abort the other (gloo, seen once in CI).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _check_attention(tmp_path, world):
    mp.spawn(_attention_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for case in ATTN_CASES[world]:
        _, layout, _, heads, packed = case
        q, k, v, do = _inputs(heads)
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        if packed:
            ref = attention(q, k, v, seq_ids=IDS, backend="math")
        else:
            ref = attention(q, k, v, backend="math")
        (ref * do).sum().backward()
        for name, expect in (("o", ref), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
            got = unshard_tokens([r[case][name] for r in ranks], 2, IDS.shape[1], layout=layout)
            torch.testing.assert_close(got, expect, **TOL, msg=lambda m: f"{case} {name}: {m}")
    assert ranks[0]["bad_u"].startswith(f"parallel.ulysses_size=3 does not divide parallel.sp_size={world}")


@pytest.mark.multirank
def test_packed_and_hybrid_attention_sp2_equal_single_process(tmp_path):
    _check_attention(tmp_path, 2)


@pytest.mark.slow
@pytest.mark.multirank
def test_packed_and_hybrid_attention_sp4_equal_single_process(tmp_path):
    _check_attention(tmp_path, 4)


def test_ring_skips_blocks_that_share_no_image():
    # Rank 0 holds images 0 and 1, rank 1 image 1's tail and image 2, rank 2 image 3 only.
    all_ids = torch.tensor([[[0, 0, 1, 1]], [[1, 2, 2, 2]], [[3, 3, 3, -1]]])
    tasks = ring_pieces(all_ids, rank=0)
    assert [[t[1:5] for t in per_src] for per_src in tasks] == [[(0, 2, 0, 2), (2, 4, 2, 4)], [(2, 4, 0, 1)], []]
    assert ring_pieces(all_ids, rank=2)[0] == [] and ring_pieces(all_ids, rank=2)[1] == []


# --- the ViT on packed sequences --------------------------------------------------------------------

# (impl, layout, ulysses_size, heads, global_pool, class_token, grad_sync)
VIT_CASES = {
    2: [("ulysses", "contiguous", None, 4, "token", True, "allreduce"),
        ("ring", "zigzag", None, 4, "avg", False, "allreduce"),
        ("hybrid", "contiguous", 1, 2, "token", True, "partial")],
    4: [("ulysses", "contiguous", None, 4, "token", True, "allreduce"),
        ("ring", "contiguous", None, 2, "avg", True, "allreduce"),
        ("hybrid", "contiguous", 2, 4, "token", True, "allreduce"),
        ("hybrid", "contiguous", 2, 2, "avg", False, "partial")],
}


def _vit(heads, pool, class_token, **kw):
    from distvit.models.vit import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=8, patch_size=2, in_chans=1, num_classes=5, embed_dim=32, depth=2,
                             num_heads=heads, mlp_ratio=2.0, global_pool=pool, class_token=class_token,
                             dynamic_img_size=True, **kw)


def _packed():
    g = torch.Generator().manual_seed(7)
    sizes = [(8, 6), (4, 10), (6, 6), (2, 8), (8, 8)]  # 12, 10, 9, 4, 16 patches -> rows [0, 1], [2, 3], [4]
    images = [torch.randn(1, h, w, generator=g) for h, w in sizes]
    return pack(images, 2, max_tokens=24), torch.tensor([0, 3, 1, 4, 2])


def _vit_worker(rank, world, port, out_dir):
    from distvit.parallel.parallelize import parallelize_sequence

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        group, _, _ = _mesh_groups(world, world)
        results = {}
        for case in VIT_CASES[world]:
            impl, layout, u, heads, pool, class_token, grad_sync = case
            model = _vit(heads, pool, class_token)
            parallelize_sequence(model, group, impl, layout=layout, grad_sync=grad_sync, ulysses_size=u)
            packed, labels = _packed()
            logits = model.forward_packed(packed)
            torch.nn.functional.cross_entropy(logits, labels).backward()
            results[case] = {"logits": logits.detach(), "grads": {n: p.grad for n, p in model.named_parameters()}}
        # Stochastic depth on packed rows: one mask per image, shared by the group, so the logits agree.
        model = parallelize_sequence(_vit(4, "token", True, drop_path_rate=0.5), group, "ring")
        with torch.no_grad():
            results["dropped"] = model.train().forward_packed(_packed()[0])
            results["eval"] = model.eval().forward_packed(_packed()[0])
        torch.save(results, f"{out_dir}/rank{rank}.pt")
        # Both ranks are done with the group before either closes it: a peer that closes its
        # connections while the other still holds the group can abort the other (gloo, seen once in CI).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _check_vit(tmp_path, world):
    mp.spawn(_vit_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for case in VIT_CASES[world]:
        _, _, _, heads, pool, class_token, grad_sync = case
        model = _vit(heads, pool, class_token)
        packed, labels = _packed()
        logits = model.forward_packed(packed)
        torch.nn.functional.cross_entropy(logits, labels).backward()
        for r in ranks:
            torch.testing.assert_close(r[case]["logits"], logits, **TOL, msg=lambda m: f"{case} logits: {m}")
        for name, p in model.named_parameters():
            grads = [r[case]["grads"][name] for r in ranks]
            if grad_sync == "allreduce":
                for g in grads:
                    torch.testing.assert_close(g, p.grad, **TOL, msg=lambda m: f"{case} {name}: {m}")
            else:
                torch.testing.assert_close(sum(grads), p.grad, **TOL, msg=lambda m: f"{case} {name}: {m}")
    for r in ranks[1:]:
        assert torch.equal(r["dropped"], ranks[0]["dropped"])
    assert not torch.allclose(ranks[0]["dropped"], ranks[0]["eval"])  # something was dropped


@pytest.mark.multirank
def test_packed_vit_sp2_equals_single_process(tmp_path):
    _check_vit(tmp_path, 2)


@pytest.mark.slow
@pytest.mark.multirank
def test_packed_vit_sp4_equals_single_process(tmp_path):
    _check_vit(tmp_path, 4)


def test_packed_single_process_is_the_reference_for_the_cases_above():
    """The reference itself: forward_packed equals each image alone (so the sp tests compare to the truth)."""
    model = _vit(4, "token", True).eval()
    packed, _ = _packed()
    g = torch.Generator().manual_seed(7)
    imgs = [torch.randn(1, h, w, generator=g) for h, w in [(8, 6), (4, 10), (6, 6), (2, 8), (8, 8)]]
    with torch.no_grad():
        torch.testing.assert_close(model.forward_packed(packed), torch.cat([model(i[None]) for i in imgs]), **TOL)
    assert list(itertools.accumulate(packed.seq_lens.tolist())) == [22, 35, 51]


def test_config_takes_hybrid_and_checks_ulysses_size():
    from distvit.config import ConfigError, load_config

    cfg = load_config(None, ["parallel.sp_size=4", "parallel.sp_impl=hybrid", "parallel.ulysses_size=2"])
    assert (cfg.parallel.sp_impl, cfg.parallel.ulysses_size) == ("hybrid", 2)
    with pytest.raises(ConfigError, match=r"parallel.ulysses_size=3 does not divide parallel.sp_size=4; choose one "
                                          r"of \[1, 2, 4\]"):
        load_config(None, ["parallel.sp_size=4", "parallel.sp_impl=hybrid", "parallel.ulysses_size=3"])
    with pytest.raises(ConfigError, match=r"parallel.ulysses_size=None with parallel.sp_impl=hybrid"):
        load_config(None, ["parallel.sp_size=4", "parallel.sp_impl=hybrid"])
