"""Interleaved offload on the device backend vs stock DeepSpeed ZeRO-3 CPU offload (one rank).

Runs the same body on `cpu` (the CPU stand-in, in CI) and on `cuda` (`pytest -m gpu`): the CUDA
backend with its three streams, pinned host buffers and events, the torch device Adam, and the
calibration that measures them. What is compared, against stock DeepSpeed CPU offload:
- fraction 0 (every sub-group on the CPU, through the hooks): bitwise, on both devices;
- fraction 1 (every sub-group on the device): bitwise on `cpu` (the stand-in runs DeepSpeed's own
  cpu_adam); within the ulp bound of test_offload's torch-kernel test on `cuda` (device Adam is
  torch arithmetic, not cpu_adam's AVX code, so bitwise is not possible there);
- on `cuda`, the recorded CUDA events of one step: H2D of one sub-group runs while another is
  updated on the device, and D2H of one while another is loaded (the pipeline overlaps).
And `zero_optimization.offload_param.device=cpu` is refused in one line (it used to pick the CPU
stand-in silently on a GPU machine, because the partitions live in host memory there).
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from gpu_helpers import DEVICES, rank_env, spawn

from distvit.offload import Settings

STEPS, LR = 6, 1e-2
# cpu: small and fast for CI; cuda: sub-groups of 1M elements so transfers take measurable time.
SIZES = {"cpu": ([32, 64, 64, 64, 10], 1500), "cuda": ([1024, 2048, 2048, 2048, 1024, 10], 1_000_000)}


def _build(device: str, mode: str, fraction=None, *, param_offload: bool = False):
    import deepspeed
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    from distvit import offload

    dims, sub_group = SIZES[device]
    torch.manual_seed(0)
    layers = []
    for a, b in zip(dims, dims[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.GELU()]
    model = torch.nn.Sequential(*layers[:-1])
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = DeepSpeedCPUAdam([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}], lr=LR)
    zero = {"stage": 3, **Settings("cpu" if mode == "cpu" else "interleaved", "auto").ds_fragment(sub_group)}
    if param_offload:
        zero["offload_param"] = {"device": "cpu"}
    config = {"train_micro_batch_size_per_gpu": 8, "gradient_clipping": 0.5, "zero_optimization": zero,
              "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    if mode == "cpu":
        return engine, None
    return engine, offload.enable(engine, Settings("interleaved", fraction, log_every=0), logger=lambda msg: None)


def _train(engine, device: str, steps: int) -> list[float]:
    dims = SIZES[device][0]
    losses = []
    for step in range(steps):
        gen = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, dims[0], generator=gen), torch.randint(0, dims[-1], (8,), generator=gen)
        loss = torch.nn.functional.cross_entropy(engine(x.to(engine.device)), y.to(engine.device))
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def _snapshot(engine, losses) -> dict:
    zero = engine.optimizer
    flats = zero.fp32_partitioned_groups_flat
    return {
        "losses": losses,
        "fp32": [t.detach().cpu().clone() for t in flats],
        "exp_avg": [zero.optimizer.state[t]["exp_avg"].cpu().clone() for t in flats],
        "exp_avg_sq": [zero.optimizer.state[t]["exp_avg_sq"].cpu().clone() for t in flats],
        "model": [t.detach().float().cpu().clone() for t in zero.fp16_partitioned_groups_flat],
    }


def _record_spans(handle, spans: list) -> None:
    """Keep each step's (kind, start s, end s) per recorded event, relative to the step's first event."""
    pipe = handle.pipeline
    finish = pipe.finish

    def finish_and_keep():
        events = list(pipe.record.events)
        rec = finish()
        if events:
            t0 = events[0][1]
            spans.append([(kind, pipe.backend.elapsed_s(t0, s), pipe.backend.elapsed_s(t0, e)) for kind, s, e, _ in events])
        return rec

    pipe.finish = finish_and_keep


def _worker(rank: int, world: int, port: int, device: str, out: str) -> None:
    rank_env(rank, world, port, device)
    results = {}
    engine, _ = _build(device, "cpu")
    results["stock"] = _snapshot(engine, _train(engine, device, STEPS))
    for fraction in (0.0, 1.0):
        engine, handle = _build(device, "interleaved", fraction)
        spans: list = []
        _record_spans(handle, spans)
        snap = _snapshot(engine, _train(engine, device, STEPS))
        snap.update(stats=handle.stats(), spans=spans, backend=handle.backend.name)
        results[f"interleaved {fraction}"] = snap
    try:
        engine, handle = _build(device, "interleaved", 0.5, param_offload=True)
        if device == "cpu":
            # On the CPU accelerator, host partitions are where they belong: the stand-in is right.
            # Pretend the accelerator is a GPU: what a GPU machine sees with offload_param=cpu.
            engine.device = torch.device("cuda", 0)
            from distvit import offload

            handle.disable()
            offload.enable(engine, Settings("interleaved", 0.5, log_every=0), logger=lambda msg: None)
        results["param offload"] = f"accepted with backend {handle.backend.name}"
    except ValueError as err:
        results["param offload"] = str(err)
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))


def _overlaps(spans, a: str, b: str) -> bool:
    """Some event of kind a runs (strictly) while some event of kind b runs, in the same step."""
    for step in spans:
        for ka, sa, ea in step:
            for kb, sb, eb in step:
                if ka == a and kb == b and sa < eb and sb < ea:
                    return True
    return False


@pytest.fixture(scope="module", params=DEVICES)
def offload_runs(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"gpu_offload_{request.param}")
    spawn(_worker, 1, request.param, str(out))
    return request.param, torch.load(out / "rank0.pt", weights_only=False)


def _equal(a: dict, b: dict, what: str) -> None:
    for key in ("fp32", "exp_avg", "exp_avg_sq", "model"):
        for i, (x, y) in enumerate(zip(a[key], b[key])):
            assert torch.equal(x, y), f"{what}: {key} of sub-group {i} differs by {(x - y).abs().max().item():.3g}"
    assert a["losses"] == b["losses"], what


@pytest.mark.multirank
@pytest.mark.slow  # cpu: 4 DeepSpeed engines in one spawned rank, ~200 s on 2 busy shared cores
def test_interleaved_on_the_device_backend_equals_stock_cpu_offload(offload_runs):
    device, res = offload_runs
    ref = res["stock"]
    cpu_side, dev_side = res["interleaved 0.0"], res["interleaved 1.0"]
    assert dev_side["backend"] == ("cuda" if device == "cuda" else "cpu-stand-in")
    assert dev_side["stats"]["device_subgroups"] == dev_side["stats"]["subgroups"] >= 4
    _equal(ref, cpu_side, f"{device}, fraction 0")
    if device == "cpu":
        _equal(ref, dev_side, "cpu stand-in, fraction 1")
        return
    # torch device Adam vs cpu_adam: a few ulps per step (test_offload.test_torch_kernel_matches_deepspeed_cpu_adam),
    # carried through the next forward/backward; a wrong copy or a race shows up at the size of lr.
    for x, y in zip(ref["fp32"], dev_side["fp32"]):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=LR * 1e-4)
    torch.testing.assert_close(torch.tensor(dev_side["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=0)


@pytest.mark.multirank
@pytest.mark.slow  # cpu: 4 DeepSpeed engines in one spawned rank, ~200 s on 2 busy shared cores
def test_recorded_events_show_the_pipeline_overlapping(offload_runs):
    device, res = offload_runs
    spans = res["interleaved 1.0"]["spans"]
    assert len(spans) == STEPS
    kinds = {kind for step in spans for kind, _, _ in step}
    assert kinds == {"h2d", "device_adam", "d2h"}, kinds
    for step in spans:
        assert all(end >= start for _, start, end in step), step
    if device == "cpu":
        return  # the stand-in is synchronous: nothing can overlap, by construction
    assert _overlaps(spans, "h2d", "device_adam"), f"no H2D ran during a device Adam: {spans[-1]}"
    assert _overlaps(spans, "d2h", "h2d") or _overlaps(spans, "d2h", "device_adam"), f"no D2H overlapped: {spans[-1]}"


@pytest.mark.multirank
@pytest.mark.slow  # cpu: 4 DeepSpeed engines in one spawned rank, ~200 s on 2 busy shared cores
def test_param_offload_to_cpu_is_refused_in_one_line(offload_runs):
    device, res = offload_runs
    msg = res["param offload"]
    assert msg.startswith("interleaved offload updates the ZeRO-3 parameter partitions on the cuda device, but "
                          "zero_optimization.offload_param.device is 'cpu'"), msg
    assert "remove offload_param" in msg and "parallel.offload=cpu" in msg and "\n" not in msg


def test_param_offload_to_cpu_is_refused_at_config_time(tmp_path):
    from distvit.config import ConfigError, load_config
    from distvit.parallel.deepspeed_config import build_ds_config

    extra = tmp_path / "ds.json"
    extra.write_text(json.dumps({"zero_optimization": {"offload_param": {"device": "cpu"}}}))
    cfg = load_config(None, ["parallel.zero_stage=3", "parallel.offload=interleaved", "parallel.precision=fp32",
                             "parallel.sub_group_size=1000", f"parallel.deepspeed_extra={extra}"])
    with pytest.raises(ConfigError) as err:
        build_ds_config(cfg, torch.device("cuda", 0))
    assert str(err.value) == (
        "interleaved offload updates the ZeRO-3 parameter partitions on the cuda device, but "
        f"zero_optimization.offload_param.device is 'cpu' (from parallel.deepspeed_extra '{extra}'), which keeps them "
        "in host memory; remove offload_param from the DeepSpeed config, or use parallel.offload=cpu (DeepSpeed's own "
        "offload, which supports offload_param)")
    # On the CPU the partitions belong in host memory: nothing to refuse. Stock offload takes it anywhere.
    assert build_ds_config(cfg, torch.device("cpu"))["zero_optimization"]["offload_param"] == {"device": "cpu"}
    stock = cfg.model_copy(update={"parallel": cfg.parallel.model_copy(update={"offload": "cpu"})})
    assert build_ds_config(stock, torch.device("cuda", 0))["zero_optimization"]["offload_param"] == {"device": "cpu"}
