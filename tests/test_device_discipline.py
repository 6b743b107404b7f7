"""Every collective distvit issues runs on its group's communication device (distvit/parallel/comm.py), and
the per-step host sync is gone (distvit/engine/step_sync.py).

The multi-rank test runs the trainer's collective paths against a group whose only backend is bound
to CUDA, as NCCL's is: `init_process_group("cuda:gloo")`. Such a group refuses CPU tensors with
"No backend type associated with device type cpu", which is what the old trainer sent it (the
eval totals, the loss, the preemption flag, the bad-sample count, sp's start-up broadcast).
A CPU machine has no CUDA memory to move tensors to, so the test lends the seam two stand-ins:
the CUDA device is host memory (`comm._device_of_type`) and the c10d call goes to the backend the
group has for CUDA (`comm._issue`). What it checks is real: each path goes through the seam (a
direct `dist.*` call on this group still fails), the seam asks for the group's device (CUDA, not
the tensor's CPU), and the reduced values are right. The `cuda` variant (`pytest -m gpu`) runs the
same paths with no stand-ins: two ranks on one GPU (cuda:gloo allows that, NCCL would not), CPU
tensors really moved up and back.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distvit.parallel import comm
from trainer_helpers import free_port

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ the rule, one process


def test_rule_keeps_a_tensor_where_the_group_serves_its_device():
    gloo_like = SimpleNamespace(_device_types=[torch.device("cuda"), torch.device("cpu")])
    assert comm.comm_device(gloo_like, prefer=torch.device("cpu")) == torch.device("cpu")
    assert comm.comm_device(gloo_like, prefer=torch.device("cuda", 0)) == torch.device("cuda", 0)  # no move


def test_rule_sends_cpu_tensors_to_cuda_under_a_cuda_only_group(monkeypatch):
    asked = []
    monkeypatch.setattr(comm, "_device_of_type", lambda t: asked.append(t) or torch.device(t, 0))
    nccl_like = SimpleNamespace(_device_types=[torch.device("cuda")])
    assert comm.comm_device(nccl_like, prefer=torch.device("cpu")) == torch.device("cuda", 0)
    assert asked == ["cuda"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_rule_refuses_a_group_for_devices_this_process_lacks_in_one_line():
    with pytest.raises(RuntimeError) as err:
        comm.comm_device(SimpleNamespace(_device_types=[torch.device("cuda")]), prefer=torch.device("cpu"))
    msg = str(err.value)
    assert "\n" not in msg and "['cuda']" in msg and "backend_for" in msg


def test_no_direct_collectives_outside_the_seam_in_the_trainer_paths():
    """The trainer and the start-up broadcast issue collectives only through distvit.parallel.comm."""
    direct = re.compile(r"\bdist\.(all_reduce|broadcast|all_gather|reduce_scatter|reduce)\(")
    trainer = (ROOT / "distvit/engine/trainer.py").read_text()
    assert not direct.findall(trainer)
    for path in ("distvit/engine/step_sync.py", "distvit/engine/step_tuning.py"):
        assert not direct.findall((ROOT / path).read_text()), path
    par = (ROOT / "distvit/parallel/parallelize.py").read_text()
    body = par[par.index("def broadcast_parameters"):par.index("def _global_rank")]
    assert not direct.findall(body) and "comm.broadcast_many" in body


# ------------------------------------------------------------------ 2 ranks, a group that refuses CPU tensors


def _cuda_bound_stand_ins(monkeypatch, asked: list):
    def device_of_type(device_type):
        asked.append(device_type)
        return torch.device("cpu")  # no CUDA here: host memory stands in for the device

    def issue(name, tensor, group, **kw):
        g = dist.group.WORLD if group is None else group
        (device,) = g._device_types  # this group has one backend, bound to CUDA
        backend = g._get_backend(device)
        if name == "all_reduce":
            opts = dist.AllreduceOptions()
            opts.reduceOp = kw["op"]
            backend.allreduce([tensor], opts).wait()
        elif name == "broadcast":
            opts = dist.BroadcastOptions()
            opts.rootRank = dist.get_group_rank(g, kw["src"])
            backend.broadcast([tensor], opts).wait()
        else:
            raise AssertionError(name)

    monkeypatch.setattr(comm, "_device_of_type", device_of_type)
    monkeypatch.setattr(comm, "_issue", issue)


def _worker(rank: int, world: int, port: int, out: str, on_gpu: bool = False) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cuda" if on_gpu else "cpu")
    torch.set_num_threads(1)
    if on_gpu:
        torch.cuda.set_device(0)  # both ranks on one GPU: cuda:gloo allows it, NCCL would not
    dist.init_process_group("cuda:gloo", rank=rank, world_size=world)
    results = {}
    try:
        # The group is what NCCL would be for CPU tensors: it refuses them.
        try:
            dist.all_reduce(torch.ones(1))
            results["direct_refused"] = ""
        except RuntimeError as exc:
            results["direct_refused"] = str(exc)

        mp_ = pytest.MonkeyPatch()
        asked: list[str] = []
        if not on_gpu:
            _cuda_bound_stand_ins(mp_, asked)
        try:
            results.update(_trainer_paths(rank, world, torch.device("cuda", 0) if on_gpu else torch.device("cpu")))
        finally:
            mp_.undo()
        results["asked"] = ["cuda"] if on_gpu else sorted(set(asked))
    finally:
        dist.destroy_process_group()
    torch.save(results, Path(out) / f"rank{rank}.pt")


def _trainer_paths(rank: int, world: int, device: torch.device) -> dict:
    from distvit.engine.step_sync import StepSync
    from distvit.engine.trainer import Trainer
    from distvit.parallel.parallelize import broadcast_parameters

    out = {}
    # 1. the eval totals (Trainer.evaluate, unchanged code path, on a stand-in trainer)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)).to(device)
    x = torch.randn(4, 2, 2)
    y = torch.tensor([0, 1, 2, 0])
    valid = torch.tensor([True, True, True, rank == 0])  # rank 1's last sample is padding
    engine = torch.nn.Module()
    engine.module = net
    engine.forward = net.forward  # what DeepSpeed's engine does: call the module
    stand_in = SimpleNamespace(val_loader=[(x, y, valid)], engine=engine, input_dtype=torch.float32,
                               device=device, mesh=SimpleNamespace(dp_group=None), task=None)  # classification
    out["eval"] = Trainer.evaluate(stand_in)

    # 2. the fused step read: loss, NaN check, preemption flag, bad samples
    sync = StepSync(device, dp_size=world)
    t = lambda v: torch.tensor(v, device=device)  # noqa: E731
    sync.add(1, [t(1.0 + 2 * rank)])
    sync.add(2, [t(2.0 + 2 * rank), t(4.0 + 2 * rank)])  # grad_accum = 2
    out["read"] = sync.read(stop_requested=rank == 1, bad_samples=3 + rank)
    sync.add(3, [t(float("nan") if rank == 1 else 1.0)])
    sync.add(4, [t(float("inf") if rank == 0 else 1.0)])
    out["read_bad"] = sync.read(stop_requested=False)

    # 3. sp's start-up broadcast of CPU parameters (before the engine exists; on the GPU they go up and back)
    torch.manual_seed(100 + rank)  # each rank initialises differently
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7))
    broadcast_parameters(model, SimpleNamespace(group=None))
    out["weights"] = {k: v.clone() for k, v in model.state_dict().items()}
    return out


@pytest.mark.multirank
@pytest.mark.parametrize("on_gpu", [False, pytest.param(True, marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])], ids=["cpu-stand-ins", "cuda"])
def test_trainer_collectives_run_on_a_group_that_refuses_cpu_tensors(tmp_path, on_gpu):
    world = 2
    mp.spawn(_worker, args=(world, free_port(), str(tmp_path), on_gpu), nprocs=world, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world))
    for r in (r0, r1):
        assert "No backend type associated with device type cpu" in r["direct_refused"]
        assert r["asked"] == ["cuda"]  # the seam went to the group's device, never the tensor's CPU
    # eval: 4 + 3 valid samples, the same totals on both ranks
    assert r0["eval"]["val_count"] == 7 and r0["eval"] == r1["eval"]
    # step read: the last step's loss (mean over micro-batches, then over dp), not the window's mean
    for r in (r0, r1):
        read = r["read"]
        assert read.loss == pytest.approx(((2 + 4) / 2 + (4 + 6) / 2) / 2)
        assert read.stop is True  # rank 1 was signalled: both stop at the same step
        assert read.bad_samples == 7 and read.first_bad is None and read.steps == 2
        assert r["read_bad"].first_bad == (3, "nan")  # rank 1's NaN at step 3 comes before rank 0's inf at 4
    # broadcast: rank 1 now holds rank 0's weights and buffers
    assert set(r0["weights"]) == set(r1["weights"])
    for k, v in r0["weights"].items():
        assert torch.equal(v, r1["weights"][k]), k
