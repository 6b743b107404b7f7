"""CUDA paths of attention, sequence parallelism, activation checkpointing and EMA (`pytest -m gpu`).

One body per check, run on `cpu` (CI) and `cuda` (the GPU machine), each against a reference:
- `sdpa` and `flash` (when flash-attn is installed) against `math` in float64, forward and backward;
- ring and Ulysses attention on 2 ranks, forward and backward, against single-process float64
  attention. On one GPU, Ulysses runs 2 ranks on that GPU over a `cuda:gloo` group, a group that
  refuses CPU tensors as an NCCL-only group does (checked); ring needs send/recv of CUDA tensors,
  which gloo lacks and NCCL gives only one rank per GPU: it needs 2 GPUs and says so when skipped;
- activation checkpointing against no checkpointing (drop path on: the RNG is replayed);
- the trainer's EMA update (bf16 weights into an fp32 EMA) against float64 arithmetic.
"""
from __future__ import annotations

import os
import types

import pytest
import torch
import torch.distributed as dist

from gpu_helpers import DEVICES, rank_env, spawn

from distvit import models
from distvit.attention import attention
from distvit.attention import backends as ab
from distvit.parallel.sequence_parallel import ring_attention, shard_tokens, ulysses_attention, unshard_tokens

LOW = {"cpu": torch.float32, "cuda": torch.bfloat16}  # the dtype each device trains in
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}  # relative to the largest reference value


def _close(got: torch.Tensor, ref: torch.Tensor, dtype, what: str) -> None:
    err = (got.double().cpu() - ref.double().cpu()).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= TOL[dtype] * max(scale, 1.0), f"{what}: max error {err:.3g} against max |ref| {scale:.3g}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["sdpa", "flash"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("tq,tk", [(128, 128), (100, 300), (300, 100)])
def test_backend_matches_math_forward_and_backward(device, backend, causal, tq, tk):
    if backend == "flash" and (device == "cpu" or not ab.flash_installed()):
        pytest.skip("flash-attn is CUDA-only and installed as the optional extra distvit[flash]; not present here")
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(2, 4, t, 64, generator=g, dtype=torch.float64) for t in (tq, tk, tk, tq))
    ref_in = [t.clone().to(device).requires_grad_() for t in (q, k, v)]
    ref = attention(*ref_in, causal=causal, backend="math")
    ref.backward(do.to(device))
    dtype = LOW[device]
    got_in = [t.detach().to(device, dtype).requires_grad_() for t in (q, k, v)]
    o = attention(*got_in, causal=causal, backend=backend)
    o.backward(do.to(device, dtype))
    assert o.dtype == dtype and o.device.type == device
    _close(o, ref, dtype, "o")
    for name, a, b in zip("qkv", got_in, ref_in):
        _close(a.grad, b.grad, dtype, f"d{name}")


# ------------------------------------------------------------------ ring and Ulysses on 2 ranks
SP_B, SP_H, SP_D = 2, 4, 48


def _sp_inputs(seq_len: int):
    g = torch.Generator().manual_seed(seq_len)
    return [torch.randn(SP_B, SP_H, seq_len, SP_D, generator=g, dtype=torch.float64) for _ in range(4)]


def _sp_worker(rank: int, world: int, port: int, device: str, impl: str, out: str) -> None:
    rank_env(rank, world, port, device)
    if device == "cpu":
        backend, dev = "gloo", torch.device("cpu")
    elif impl == "ulysses" and torch.cuda.device_count() < world:
        backend, dev = "cuda:gloo", torch.device("cuda", 0)  # 2 ranks on one GPU; CPU tensors refused
    else:
        backend, dev = "nccl", torch.device("cuda", rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results = {"backend": backend}
    try:
        if backend == "cuda:gloo":
            try:
                dist.all_reduce(torch.zeros(1))
                results["cpu_tensor"] = "accepted"
            except (RuntimeError, ValueError) as err:
                results["cpu_tensor"] = str(err).splitlines()[0]
        fn = ulysses_attention if impl == "ulysses" else ring_attention
        for causal in (False, True):
            for seq_len in (64, 37):  # 37: padded to an even split, the padding dropped
                q, k, v, do = (shard_tokens(t, 2, rank, world).to(dev, torch.float32) for t in _sp_inputs(seq_len))
                q, k, v = (t.requires_grad_() for t in (q, k, v))
                o = fn(q, k, v, None, causal=causal, seq_len=seq_len)
                (o * do).sum().backward()
                assert o.device.type == dev.type
                results[(causal, seq_len)] = {n: t.detach().cpu() for n, t in
                                              (("o", o), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad))}
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.multirank
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["ulysses", "ring"])
def test_sequence_parallel_forward_backward_on_device(device, impl, tmp_path):
    if device == "cuda" and impl == "ring" and torch.cuda.device_count() < 2:
        pytest.skip("ring attention on CUDA needs 2 GPUs: it passes K/V with isend/irecv, which gloo does not do "
                    "for CUDA tensors and NCCL does only with one rank per GPU")
    spawn(_sp_worker, 2, device, impl, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    if ranks[0]["backend"] == "cuda:gloo":
        assert ranks[0]["cpu_tensor"] != "accepted", "a cuda:gloo group took a CPU tensor: the check proves nothing"
    for causal in (False, True):
        for seq_len in (64, 37):
            q, k, v, do = _sp_inputs(seq_len)
            q, k, v = (t.requires_grad_() for t in (q, k, v))
            ref = attention(q, k, v, causal=causal, backend="math")
            (ref * do).sum().backward()
            for name, expect in (("o", ref), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
                got = unshard_tokens([r[(causal, seq_len)][name] for r in ranks], 2, seq_len)
                # float32 inputs (CUDA: TF32 off for SDPA) against float64
                torch.testing.assert_close(got.double(), expect.detach(), rtol=1e-4, atol=1e-4,
                                           msg=lambda m: f"{impl} causal={causal} T={seq_len} {name}: {m}")


# ------------------------------------------------------------------ activation checkpointing, EMA
@pytest.mark.parametrize("device", DEVICES)
def test_grad_checkpointing_equals_no_checkpointing(device):
    """Same seed, drop path on: checkpointing replays the RNG (CPU and CUDA), so loss and grads match."""
    name, shape = ("vit_digits", (8, 1, 8, 8)) if device == "cpu" else ("vit_small_patch16_224", (8, 3, 224, 224))
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(device)
    y = torch.arange(8).to(device)
    results = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        m = models.create(name, drop_path_rate=0.2).to(device).train()
        m.set_grad_checkpointing(ckpt)
        torch.manual_seed(1)
        with torch.autocast(device, dtype=LOW[device], enabled=device == "cuda"):
            loss = torch.nn.functional.cross_entropy(m(x), y)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    (l0, g0), (l1, g1) = results
    assert torch.equal(l0, l1), (l0, l1)  # the forward is recomputed with the same kernels: same bits
    assert g0.keys() == g1.keys()
    for n in g0:
        if device == "cpu":
            torch.testing.assert_close(g1[n], g0[n], atol=0, rtol=0, msg=lambda m: f"grad of {n}: {m}")
            continue
        # CUDA: the recomputed forward is bitwise too, but the fused attention backward adds dq
        # with atomics in bf16 (order varies between launches): a bf16-rounding bound on each
        # parameter's gradient as a whole. A wrong RNG replay or a lost gradient is O(1) here.
        rel = ((g1[n] - g0[n]).norm() / g0[n].norm().clamp_min(1e-12)).item()
        assert rel <= 2e-2, f"grad of {n}: relative difference {rel:.3g} with checkpointing"


@pytest.mark.parametrize("device", DEVICES)
def test_ema_update_matches_float64(device):
    from distvit.engine.trainer import Trainer

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 10))
    live = net.to(device, LOW[device])  # the engine's module: bf16 on CUDA
    ema = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 10)).to(device)
    ema.load_state_dict({k: v.float() for k, v in live.state_dict().items()})
    decay = 0.9
    stub = types.SimpleNamespace(cfg=types.SimpleNamespace(optim=types.SimpleNamespace(ema_decay=decay)),
                                 engine=types.SimpleNamespace(module=live), ema=ema)
    ref = [p.detach().double().cpu() for p in ema.parameters()]
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        with torch.no_grad():
            for p in live.parameters():
                p.add_(torch.randn(p.shape, generator=g).to(device, p.dtype) * 0.1)
        Trainer._update_ema(stub)
        ref = [e + (1 - decay) * (p.detach().double().cpu() - e) for e, p in zip(ref, live.parameters())]
    for i, (got, want) in enumerate(zip(ema.parameters(), ref)):
        assert got.dtype == torch.float32 and got.device.type == device
        # float32 accumulation of 20 lerps: a few float32 ulps of values of size ~1
        torch.testing.assert_close(got.detach().double().cpu(), want, rtol=0, atol=1e-5, msg=lambda m: f"param {i}: {m}")
