"""Causal sequence parallelism (issue 19, item 2): the causal ViT sharded over sp ranks equals one process.

Each case runs parallelize_causal at sp = 2 or 4 on gloo and compares with the same model in one
process: the gathered predictions, the loss, and the gradient of every parameter, float32,
1e-5 (the same sums in another order: ring partials merged through (o, lse), exact all-to-alls,
per-rank squared-error sums added over the group). 10 x 10 images in 2 x 2 patches give 25
tokens, which no layout divides: the end padding is exercised too. At sp = 4 also a dp x sp = 2 x 2
mesh (the sp group a subgroup of the job).
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distvit.models.causal_vit import vit_causal_digits
from distvit.parallel.parallelize_causal import parallelize_causal
from test_sequence_parallel import _free_port, _mesh_groups

TOL = dict(rtol=1e-5, atol=1e-5)
# (impl, grad_sync)
CASES = [("ring", "allreduce"), ("ulysses", "allreduce"), ("ring", "partial")]


def _model():
    torch.manual_seed(0)
    return vit_causal_digits(img_size=10, depth=2)


def _images():
    return torch.randn(3, 1, 10, 10, generator=torch.Generator().manual_seed(1))


def _worker(rank, world, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        group, _, _ = _mesh_groups(world, world)
        results = {}
        for impl, grad_sync in CASES:
            # Other ranks start from other weights: parallelize_causal broadcasts rank 0's.
            model = _model() if rank == 0 else vit_causal_digits(img_size=10, depth=2)
            parallelize_causal(model, group, impl, grad_sync=grad_sync)
            loss = model.loss(_images())
            loss.backward()
            with torch.no_grad():
                pred = model(_images())
            results[(impl, grad_sync)] = {"loss": loss.detach(), "pred": pred, "layout": model.sequence_parallel.layout,
                                          "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}
        if world == 4:  # dp x sp = 2 x 2: the sp group is a subgroup (global ranks 0, 1 and 2, 3)
            sub, _, _ = _mesh_groups(4, 2)
            for impl in ("ring", "ulysses"):
                model = parallelize_causal(_model(), sub, impl)
                loss = model.loss(_images())
                loss.backward()
                results[("mesh", impl)] = {"loss": loss.detach(),
                                           "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}
        # The gathered forward is differentiable too: its gradient equals the loss's.
        model = vit_causal_digits(img_size=10, depth=2)
        parallelize_causal(model, group, "ring")
        images = _images()
        torch.nn.functional.mse_loss(model(images), model.patchify(images)).backward()
        results["gathered_grads"] = {n: p.grad.clone() for n, p in model.named_parameters()}
        results["gathered_params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        try:
            model.generate(batch=1)
        except NotImplementedError as e:
            results["decode_error"] = str(e)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
        # Both ranks are done with the group before either closes it: a peer that closes its
        # connections while the other still holds the group can abort the other (gloo, seen once in CI).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _check(tmp_path, world):
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    ref = _model()
    images = _images()
    loss = ref.loss(images)
    loss.backward()
    pred = ref(images).detach()
    grads = {n: p.grad for n, p in ref.named_parameters()}
    for impl, grad_sync in CASES:
        case = (impl, grad_sync)
        assert ranks[0][case]["layout"] == ("zigzag" if impl == "ring" else "contiguous")
        for r in ranks:
            torch.testing.assert_close(r[case]["loss"], loss.detach(), **TOL)
            torch.testing.assert_close(r[case]["pred"], pred, **TOL)
        if grad_sync == "partial":  # each rank holds only its tokens' part
            assert not torch.allclose(ranks[0][case]["grads"]["head.weight"], grads["head.weight"], **TOL)
        for name, expect in grads.items():
            if grad_sync == "allreduce":  # every rank holds the full gradient
                for i, r in enumerate(ranks):
                    torch.testing.assert_close(r[case]["grads"][name], expect, **TOL,
                                               msg=lambda m: f"{case} rank {i} {name}: {m}")
            else:  # the sum over the group is the full gradient
                got = sum(r[case]["grads"][name] for r in ranks)
                torch.testing.assert_close(got, expect, **TOL, msg=lambda m: f"{case} {name}: {m}")
    for impl in ("ring", "ulysses") if world == 4 else ():
        for i, r in enumerate(ranks):
            torch.testing.assert_close(r[("mesh", impl)]["loss"], loss.detach(), **TOL)
            for name, expect in grads.items():
                torch.testing.assert_close(r[("mesh", impl)]["grads"][name], expect, **TOL,
                                           msg=lambda m: f"2 x 2 mesh {impl} rank {i} {name}: {m}")
    # gathered forward + mse on every rank: same gradient as the one-process model with those weights
    gref = vit_causal_digits(img_size=10, depth=2)
    gref.load_state_dict(ranks[0]["gathered_params"])
    gref.loss(images).backward()
    for name, p in gref.named_parameters():
        for r in ranks:
            torch.testing.assert_close(r["gathered_grads"][name], p.grad, **TOL, msg=lambda m: f"gathered {name}: {m}")
    assert "decode with an unsharded CausalViT" in ranks[0]["decode_error"]


@pytest.mark.multirank
def test_causal_vit_sp2_equals_single_process(tmp_path):
    _check(tmp_path, 2)


@pytest.mark.slow
@pytest.mark.multirank
def test_causal_vit_sp4_equals_single_process(tmp_path):
    _check(tmp_path, 4)


def test_parallelize_causal_errors_name_the_value():
    model = vit_causal_digits()
    with pytest.raises(ValueError, match=r"impl='hybrid' \(parallel.sp_impl\); choose one of ring, ulysses"):
        parallelize_causal(model, impl="hybrid")
    with pytest.raises(ValueError, match=r"grad_sync='mean'"):
        parallelize_causal(model, grad_sync="mean")
    with pytest.raises(TypeError, match="got a Linear"):
        parallelize_causal(torch.nn.Linear(2, 2))
    assert parallelize_causal(model) is model and getattr(model, "sequence_parallel", None) is None  # sp = 1


def _causal_pairs_per_rank(layout: str, seq_len: int, world: int) -> list[int]:
    """(query, key) products each rank's ring attention computes under the causal mask."""
    from distvit.parallel.sequence_parallel import _ring_tasks, padded_length

    local = padded_length(seq_len, world, layout) // world
    pairs = []
    for rank in range(world):
        n = 0
        for src in range(world):
            for q_lo, q_hi, k_lo, k_hi, causal in _ring_tasks(layout, True, rank, src, world, local, seq_len):
                rows, cols = q_hi - q_lo, k_hi - k_lo
                n += rows * (rows + 1) // 2 if causal else rows * cols
        pairs.append(n)
    return pairs


def test_zigzag_balances_the_causal_work_of_the_base_geometry():
    # vit_causal_base_patch16_224: 196 tokens over sp = 4 ranks (padded to 200 for zigzag).
    zigzag = _causal_pairs_per_rank("zigzag", 196, 4)
    contiguous = _causal_pairs_per_rank("contiguous", 196, 4)
    assert len(set(zigzag)) == 1 and zigzag[0] == 50 * 51 // 2 + 3 * 50 * 25
    assert contiguous == [49 * 50 // 2 + r * 49 * 49 for r in range(4)]  # the last rank: 6x the first's
    assert sum(zigzag) == 200 * 201 // 2  # zigzag computes the causal triangle once, no more


def _drop_path_worker(rank, world, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = parallelize_causal(vit_causal_digits(img_size=10, depth=2, drop_path_rate=0.5).train(), None, "ring")
        torch.manual_seed(5 if rank == 0 else 100 + rank)  # rank 0 draws the masks as one process would;
        # the others' own draws would differ: they must receive rank 0's
        loss = model.loss(_images())
        loss.backward()
        torch.save({"loss": loss.detach(), "grads": {n: p.grad for n, p in model.named_parameters()}},
                   f"{out_dir}/drop{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_drop_path_mask_is_shared_over_the_sp_group(tmp_path):
    # Stochastic depth drops whole images: every sp rank must drop the same ones, as one process does.
    mp.spawn(_drop_path_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    ref = vit_causal_digits(img_size=10, depth=2, drop_path_rate=0.5).train()
    torch.manual_seed(5)
    loss = ref.loss(_images())
    loss.backward()
    for r in range(2):
        got = torch.load(tmp_path / f"drop{r}.pt")
        torch.testing.assert_close(got["loss"], loss.detach(), **TOL)
        for n, g in got["grads"].items():  # grad_sync="allreduce": every rank holds the full gradient
            torch.testing.assert_close(g, ref.get_parameter(n).grad, **TOL, msg=lambda m: f"rank {r} {n}: {m}")
