"""Every collective distvit issues runs on its group's communication device (distvit/parallel/comm.py), and
the per-step host sync is gone (distvit/engine/step_sync.py).

The multi-rank test runs the trainer's collective paths against a group whose only backend is bound
to CUDA, as NCCL's is: `init_process_group("cuda:gloo")`. Such a group refuses CPU tensors with
"No backend type associated with device type cpu", which is what the old code sent it (the
eval totals, the loss, the preemption flag, the bad-sample count, sp's start-up broadcast, and
the resume's agreement flags, checkpoint/resume.py `_all_ok`, also used by checkpoint/elastic.py).
A CPU machine has no CUDA memory to move tensors to, so the test lends the seam two stand-ins:
the CUDA device is host memory (`comm._device_of_type`) and the c10d call goes to the backend the
group has for CUDA (`comm._issue`). What it checks is real: each path goes through the seam (a
direct `dist.*` call on this group still fails), the seam asks for the group's device (CUDA, not
the tensor's CPU), and the reduced values are right. The `cuda` variant (`pytest -m gpu`) runs the
same paths with no stand-ins: two ranks on one GPU (cuda:gloo allows that, NCCL would not), CPU
tensors really moved up and back.

A static scan holds every module of distvit/ to the rule: no direct torch.distributed collective
outside comm.py except the few on activations, listed with their reasons (ALLOWED_DIRECT). sp's
packed drop path is run on meta tensors (any host read raises) and, on CUDA, under sync debug mode.
"""
from __future__ import annotations

import os
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


# Collectives distvit may issue directly: each runs on tensors that already live on the device the
# group serves (activations, their gradients, ids moved to the activations' device), so the seam
# would only add a device check. Everything else goes through distvit.parallel.comm.
# (file, enclosing function): (the torch.distributed names it uses, why it may)
ALLOWED_DIRECT = {
    ("distvit/parallel/sequence_parallel.py", "_GatherTokens.forward"): (
        {"all_gather"}, "token shards: activations, on their own device"),
    ("distvit/parallel/sequence_parallel.py", "gather_ids"): (
        {"all_gather"}, "segment ids, moved to q's device by attention.packed.check_ids first"),
    ("distvit/parallel/sequence_parallel.py", "_Ring.shift"): (
        {"P2POp", "isend", "irecv", "batch_isend_irecv"}, "ring attention's K/V blocks: activations"),
    ("distvit/parallel/decode_sp.py", "decode_attention_sp"): (
        {"all_gather"}, "decode merge: (o, lse) partials and key counts on q's device (decode_attention refuses others)"),
    ("distvit/parallel/parallelize.py", "_register_grad_sync.sum_over_sp"): (
        {"all_reduce"}, "sp's gradient sum: a gradient lives on its parameter's device"),
    ("distvit/parallel/parallelize.py", "SumReplicated.forward"): (
        {"all_reduce"}, "pooled activations"),
    ("distvit/parallel/parallelize.py", "_shared_mask"): (
        {"broadcast"}, "shared dropout / drop-path masks, allocated like the activations"),
    ("distvit/parallel/parallelize_causal.py", "_sum_over.hook"): (
        {"all_reduce"}, "sp's gradient sum (causal ViT): on the parameter's device"),
    ("distvit/parallel/hybrid.py", "hybrid_groups"): (
        {"all_gather_object"}, "an object collective: torch picks the group's device itself (_get_object_coll_device)"),
}
# Every torch.distributed (or deepspeed.comm) name that moves tensor data between ranks. barrier and
# monitored_barrier move none and are fine anywhere.
COLLECTIVES = {
    "all_reduce", "all_reduce_coalesced", "broadcast", "broadcast_object_list", "all_gather", "all_gather_object",
    "all_gather_into_tensor", "all_gather_coalesced", "_all_gather_base", "reduce", "reduce_scatter",
    "reduce_scatter_tensor", "_reduce_scatter_base", "all_to_all", "all_to_all_single", "gather", "gather_object",
    "scatter", "scatter_object_list", "send", "recv", "isend", "irecv", "batch_isend_irecv", "P2POp",
    "send_object_list", "recv_object_list", "inference_all_reduce",
}
DIST_MODULES = {"torch.distributed", "deepspeed.comm"}


def _direct_collectives(path: Path) -> dict[str, set[str]]:
    """{enclosing function's qualified name: torch.distributed collectives it names directly} in one file.

    Follows the file's own imports: `import torch.distributed as dist`, `from torch import distributed`,
    `import deepspeed.comm as c`, `torch.distributed.all_reduce(...)`, `from torch.distributed import
    all_reduce`. A name counts when referenced at all (called or passed, as dist.isend is to P2POp).
    """
    import ast

    tree = ast.parse(path.read_text(), str(path))
    modules, names = set(), {}  # local names bound to a dist module; local name -> collective
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in DIST_MODULES and a.asname:
                    modules.add(a.asname)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                if f"{node.module}.{a.name}" in DIST_MODULES:
                    modules.add(a.asname or a.name)
                elif node.module in DIST_MODULES and a.name in COLLECTIVES:
                    names[a.asname or a.name] = a.name

    def dotted(expr) -> str | None:
        parts = []
        while isinstance(expr, ast.Attribute):
            parts.append(expr.attr)
            expr = expr.value
        if not isinstance(expr, ast.Name):
            return None
        return ".".join([expr.id, *reversed(parts)])

    found: dict[str, set[str]] = {}

    def visit(node, scope: list[str]) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            scope = [*scope, node.name]
        op = None
        if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES:
            owner = dotted(node.value)
            if owner in modules or owner in DIST_MODULES:
                op = node.attr
        elif isinstance(node, ast.Name) and node.id in names:
            op = names[node.id]
        if op is not None:
            found.setdefault(".".join(scope) or "<module>", set()).add(op)
        for child in ast.iter_child_nodes(node):
            visit(child, scope)

    visit(tree, [])
    return found


def test_the_scan_sees_every_spelling_of_a_direct_collective(tmp_path):
    src = tmp_path / "m.py"
    src.write_text(
        "import torch\nimport torch.distributed as d\nimport deepspeed.comm as dsc\n"
        "from torch.distributed import broadcast as bc\nfrom torch import distributed\n"
        "def a(t):\n    d.all_reduce(t)\n"
        "class B:\n    def f(self, t):\n        torch.distributed.all_gather([t], t)\n"
        "        return [d.P2POp(d.isend, t, 1)]\n"
        "def c(t):\n    bc(t, 0)\n    distributed.broadcast_object_list([t])\n    dsc.all_reduce(t)\n"
        "def fine(t):\n    d.barrier()\n    d.get_rank()\n"
    )
    assert _direct_collectives(src) == {"a": {"all_reduce"}, "B.f": {"all_gather", "P2POp", "isend"},
                                        "c": {"broadcast", "broadcast_object_list", "all_reduce"}}


def test_no_direct_collectives_in_distvit_outside_the_seam():
    """Every collective distvit issues on a tensor that may be on the CPU goes through distvit.parallel.comm,
    which moves it to the group's device (a group with only NCCL refuses CPU tensors). The exceptions
    run on activations and are listed, each with its reason, in ALLOWED_DIRECT."""
    found = {}
    for path in sorted((ROOT / "distvit").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel == "distvit/parallel/comm.py":  # the seam itself
            continue
        for scope, ops in _direct_collectives(path).items():
            found[(rel, scope)] = ops
    unexpected = {k: sorted(v) for k, v in found.items() if k not in ALLOWED_DIRECT or not v <= ALLOWED_DIRECT[k][0]}
    assert not unexpected, (
        f"direct torch.distributed collectives {unexpected}: route them through distvit.parallel.comm "
        "(all_reduce / broadcast / broadcast_many), which runs them on the group's device; or, for a collective "
        "on activations, add it to ALLOWED_DIRECT with the reason")
    stale = sorted(k for k in ALLOWED_DIRECT if k not in found)
    assert not stale, f"ALLOWED_DIRECT lists {stale}, which issue no direct collective any more: remove them"
    assert all(reason for _, reason in ALLOWED_DIRECT.values())


def test_the_start_up_broadcast_goes_through_the_seam():
    par = (ROOT / "distvit/parallel/parallelize.py").read_text()
    body = par[par.index("def broadcast_parameters"):par.index("def _global_rank")]
    assert "comm.broadcast_many" in body


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

    # 4. resume: the ranks agree on each load phase (checkpoint/resume.py try_load) and on rank 0's
    #    reshape outcome (checkpoint/elastic.py, without a rendezvous store): a CPU flag each time
    from distvit.checkpoint import elastic, resume

    out["all_ok"] = [resume._all_ok(True), resume._all_ok(rank == 0)]  # rank 1 failed its phase
    out["reshaped"] = elastic._outcome_of_rank0(None if rank == 1 else "boom", rank == 0, world, "step_1")
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
    # resume: one rank's failure moves both on together
    for r in (r0, r1):
        assert r["all_ok"] == [True, False]
    assert r0["reshaped"] == "boom" and r1["reshaped"] == "rank 0 could not reshape it (its log says why)"


# ------------------------------------------------------------------ sp's packed drop path: no host read, no CPU tensor


class _RecordingDist:
    """Stands in for torch.distributed in parallelize.py: records the collectives (sp rank 0's view)."""

    ReduceOp = dist.ReduceOp

    def __init__(self):
        self.calls = []

    def broadcast(self, tensor, src, group=None):
        self.calls.append(("broadcast", tensor.device.type, tuple(tensor.shape)))

    def all_reduce(self, tensor, op=None, group=None):
        self.calls.append(("all_reduce", tensor.device.type, tuple(tensor.shape)))


@pytest.mark.parametrize("device", ["meta", "cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])])
def test_packed_group_shared_drop_path_needs_no_host_read_and_no_cpu_collective(monkeypatch, device):
    """GroupSharedDropPath on packed rows sizes its per-image mask without reading the device (meta
    tensors have no values: any host read raises) and issues collectives on the activations' device
    only; on CUDA, under sync debug mode "error", nothing synchronizes."""
    from distvit.parallel import parallelize

    fake = _RecordingDist()
    monkeypatch.setattr(parallelize, "dist", fake)
    plan = SimpleNamespace(group=None, sp_size=2, sp_rank=0)
    layer = parallelize.GroupSharedDropPath(0.5, plan).train()
    # This rank's share of 2 packed rows: images 0-4 over both ranks, padding (-1) at the end.
    ids = torch.tensor([[0, 0, 0, 1, 1, 2], [3, 3, 4, 4, -1, -1]])
    torch.manual_seed(0)
    x = torch.randn(2, 6, 4)
    x, ids = x.to(device), ids.to(device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        y = layer(x, seq_ids=ids)
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode(0)
    assert y.shape == x.shape and y.device == x.device
    assert [c[:2] for c in fake.calls] == [("broadcast", torch.device(device).type)]  # the mask; no all_reduce
    (_, _, (slots,)), = fake.calls
    assert slots >= 5  # a slot for every image of the packed batch
    if device != "meta":
        ratio = (y / x).cpu()
        for image in range(5):
            values = ratio[ids.cpu() == image]  # (tokens of the image on this rank, features)
            assert torch.allclose(values, values[0, 0].expand_as(values)), image  # one draw per image
            assert values[0, 0].item() in (0.0, pytest.approx(2.0))  # dropped, or kept and scaled by 1/keep
        assert torch.allclose(ratio[ids.cpu() == -1], torch.tensor(2.0))  # padding is never dropped
