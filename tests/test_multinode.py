"""slurm/train.sbatch across two nodes: the two-node test cluster of tests/ops/start_cluster2.sh (two
network namespaces, dvtest-n1 and dvtest-n2, joined by a veth pair; slurmctld on the first, one slurmd
on each), 2 tasks per node, 4 gloo ranks with rendezvous on dvtest-n1's address.

- a 2-node job trains like a 4-rank run on one host (torchrun), bitwise, and its traffic crosses the veth;
- a USR1 to the batch shell checkpoints both nodes' ranks at one step and requeues; the requeued job
  finishes bitwise like the uninterrupted one;
- losing a node (its link, slurmd and ranks gone) makes Slurm mark it DOWN and requeue the job; once
  the node is back, the job resumes from the newest complete checkpoint and finishes bitwise the same.
- elastic resume: the run of a 2-node job, submitted again onto 1 node, reshapes its 4-rank checkpoint
  by itself and finishes on 2 ranks; a job submitted with a node range (`--nodes 1-2 --exclusive`,
  DISTVIT_TASKS_PER_NODE=2) that loses a node is requeued onto the node left and does the same with
  no manual step.
- `mpirun --host` and DeepSpeed's multi-node launcher with a hostfile (openmpi, --no_ssh per node,
  pdsh over ssh) across the two nodes train like the single-host run, bitwise.
The cluster is torn down after the module, failed or not. Skipped, with a one-line reason, where the
machine allows no network namespaces or Slurm cannot be installed.
"""
from __future__ import annotations

import fcntl
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distvit.checkpoint import io as ckio
from ops.harness import (CLUSTER2_UNSUPPORTED, NODE_IFACE, NODES, OPS, cluster2_env, file_text, iface_bytes, is_root, job_info, run, sbatch,
                         slurm, start_cluster2, stop_cluster2, train_args, wait_job)
from trainer_helpers import ROOT, launch, load_weights, losses, read_metrics, run_env, summary

SBATCH = str(ROOT / "slurm" / "train.sbatch")
STEPS = 30
EXTRA = ("checkpoint.every_steps=5", "checkpoint.keep=10")  # every run gets them: saving changes no numbers
TWO_NODES = ["--nodes", "2", "--ntasks-per-node", "2"]


def test_where_namespaces_are_not_allowed_the_cluster_script_says_why_in_one_line():
    """What the tests skip with: exit status 3 and one line (here: an unprivileged user)."""
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           "bash", str(OPS / "start_cluster2.sh")], capture_output=True, text=True, timeout=30)
    assert proc.returncode == CLUSTER2_UNSUPPORTED, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "start_cluster2: needs root (network namespaces, and slurmd runs jobs as any user only as root)"]


@pytest.fixture(scope="module")
def env():
    if not is_root():
        pytest.skip("the two-node test cluster needs root (network namespaces, slurmd), and this user is not root")
    # One two-node cluster per machine (fixed namespace names): a second test session waits for it.
    with open("/tmp/distvit-slurm2.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            conf = start_cluster2()
        except BaseException:
            stop_cluster2()  # a half-made cluster
            raise
        try:
            yield cluster2_env(conf)
        finally:
            stop_cluster2()


def job_args(digits_dir: Path, run_root: Path) -> list[str]:
    """The sbatch script's arguments: CONFIG then --set ... (run.name comes from the job id)."""
    args = train_args(digits_dir, run_root, "unused", STEPS, *EXTRA)
    i = args.index("run.name=unused")
    return [args[1], *args[2:i - 1], *args[i + 1:]]


def submit(digits_dir: Path, root: Path, env: dict) -> tuple[str, Path]:
    job = sbatch([*TWO_NODES, "-o", str(root / "%x-%j.out"), SBATCH, *job_args(digits_dir, root)], cwd=root, env=env)
    return job, root / f"distvit-{job}"


def wait_for_step(run_dir: Path, step: int, job: str, env: dict, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "metrics.csv").is_file() and len(read_metrics(run_dir)) >= step:
            return
        time.sleep(0.2)
    slurm("scancel", job, env=env, check=False)
    raise AssertionError(f"job {job} did not log step {step} within {timeout} s")


def assert_same_run(run_dir: Path, reference: Path) -> None:
    assert summary(run_dir)["status"] == "finished" and summary(run_dir)["steps"] == STEPS
    assert losses(run_dir) == losses(reference)  # as text: bitwise
    a, b = load_weights(reference / "model.safetensors"), load_weights(run_dir / "model.safetensors")
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def single_host(digits_dir, tmp_path_factory, env):
    """The reference: the same 4-rank run on one host, under torchrun."""
    root = tmp_path_factory.mktemp("single_host")
    launch(train_args(digits_dir, root, "torchrun4", STEPS, *EXTRA), nproc=4, timeout=600)
    return root / "torchrun4"


@pytest.mark.slow
@pytest.mark.multirank
def test_two_node_job_trains_like_a_four_rank_single_host_run(digits_dir, tmp_path, env, single_host):
    before = iface_bytes(NODES[1])
    job, run_dir = submit(digits_dir, tmp_path, env)
    info = wait_job(job, timeout=600, env=env)
    log = file_text(tmp_path / f"distvit-{job}.out")
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), info | {"log": log[-3000:]}
    assert info["NodeList"] == "dvtest-n[1-2]"
    # rendezvous on the first node by name (it resolves to 10.218.18.1 on both nodes), not localhost
    assert f"on dvtest-n[1-2], 4 task(s), master {NODES[0]}:" in log
    assert "on 4 rank(s) [slurm], dp=4" in log
    # the gradients' all-reduce crossed the veth pair: megabytes, not a few control messages
    assert iface_bytes(NODES[1]) - before > 5_000_000
    assert_same_run(run_dir, single_host)


@pytest.mark.slow
@pytest.mark.multirank
def test_usr1_requeue_across_nodes_finishes_like_the_single_host_run(digits_dir, tmp_path, env, single_host):
    job, run_dir = submit(digits_dir, tmp_path, env)
    wait_for_step(run_dir, 3, job, env)
    slurm("scancel", "--signal=USR1", "--batch", job, env=env)
    info = wait_job(job, timeout=600, env=env,
                    until=lambda i: i.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED") and i.get("Restarts") != "0")
    log = file_text(tmp_path / f"distvit-{job}.out")
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), info | {"log": log[-3000:]}
    assert "got SIGUSR1" in log and "status 'preempted'" in log
    assert f"checkpoint saved; requeueing job {job} (it resumes with --resume auto)" in log
    assert log.count(f"on dvtest-n[1-2], 4 task(s), master {NODES[0]}:") == 2
    stops = [int(line.split(" at step ")[1].split(",")[0]) for line in log.splitlines() if "resumed from" in line]
    assert len(stops) == 1 and 3 <= stops[0] < STEPS, stops
    # the stop step was saved by all 4 ranks, on both nodes
    stop_dir = run_dir / "checkpoints" / ckio.tag_for_step(stops[0])
    assert ckio.is_complete(stop_dir)
    assert sorted(p.name for p in stop_dir.iterdir() if p.name.startswith("distvit_rank")) == \
        sorted(name for r in range(4) for name in ckio.rank_state_files(r))
    assert_same_run(run_dir, single_host)


def lose_node(node: str, state_dir: Path) -> None:
    """The node drops off: its link goes down, then its slurmd and every process on it are killed."""
    subprocess.run(["ip", "netns", "exec", node, "ip", "link", "set", NODE_IFACE, "down"], check=True)
    pid = (state_dir / f"slurmd-{node}.pid").read_text().strip()
    subprocess.run(["kill", "-9", pid], check=False)
    pids = subprocess.run(["ip", "netns", "pids", node], capture_output=True, text=True, check=True).stdout.split()
    if pids:
        subprocess.run(["kill", "-9", *pids], check=False)


def ranks_on(node: str) -> list[str]:
    """Training processes still alive in the node's namespace."""
    pids = subprocess.run(["ip", "netns", "pids", node], capture_output=True, text=True, check=True).stdout.split()
    alive = []
    for pid in pids:
        try:
            if b"launch/train.py" in Path(f"/proc/{pid}/cmdline").read_bytes():
                alive.append(pid)
        except OSError:
            pass  # ended meanwhile
    return alive


@pytest.mark.slow
@pytest.mark.multirank
def test_losing_a_node_requeues_and_resumes_from_the_last_complete_checkpoint(digits_dir, tmp_path, env, single_host):
    job, run_dir = submit(digits_dir, tmp_path, env)
    ckpts = run_dir / "checkpoints"
    wait_for_step(run_dir, 7, job, env)
    assert ckio.complete_checkpoints(ckpts), f"job {job} saved no complete checkpoint by step 7"
    lose_node(NODES[1], Path(env["SLURM_CONF"]).parent)

    # Slurm notices (SlurmdTimeout), sets the node DOWN and requeues the job: it waits for 2 nodes.
    info = wait_job(job, timeout=120, env=env, until=lambda i: i.get("Restarts") == "1")
    assert info["JobState"] in ("COMPLETING", "REQUEUED", "PENDING"), info  # requeued, not ended
    ctld_log = file_text(Path(env["SLURM_CONF"]).parent / "slurmctld.log")
    assert f"requeue job JobId={job} due to failure of node {NODES[1]}" in ctld_log
    node = slurm("sinfo", "-h", "-n", NODES[1], "-o", "%t", env=env).strip()
    assert node.startswith("down"), node
    deadline = time.monotonic() + 60
    while ranks_on(NODES[0]):  # the first node's ranks are killed with the job (after KillWait)
        assert time.monotonic() < deadline, f"ranks still running on {NODES[0]} 60 s after the requeue"
        time.sleep(0.5)
    last = ckio.complete_checkpoints(ckpts)[-1]  # the newest complete one, now that no rank runs

    bring_back(NODES[1], env)
    info = wait_job(job, timeout=600, env=env)
    log = file_text(tmp_path / f"distvit-{job}.out")
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), info | {"log": log[-3000:]}
    assert f"=== distvit job {job} restart 1:" in log
    step = ckio.step_of(last.name)
    assert 5 <= step < STEPS
    assert f"resumed from {last} at step {step}" in log
    assert_same_run(run_dir, single_host)


def bring_back(node: str, env: dict) -> None:
    """A lost node returns (link up; start_cluster2.sh restarts its slurmd and RESUMEs it)."""
    subprocess.run(["ip", "netns", "exec", node, "ip", "link", "set", NODE_IFACE, "up"], check=True)
    proc = subprocess.run(["bash", str(OPS / "start_cluster2.sh")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
@pytest.mark.multirank
def test_a_node_range_job_requeued_after_losing_a_node_resumes_on_the_smaller_world(digits_dir, tmp_path, env):
    """Elastic requeue, no manual step: a job submitted with a node range (`--nodes=1-2`) gets both
    nodes (Slurm allocates as many as it can); when one is lost, Slurm requeues it under the same id,
    it starts on the one node left, and `--resume auto` reshapes the 4-rank checkpoint onto 2 ranks."""
    # tasks per node through the script, not sbatch: sbatch's --ntasks-per-node would fix 4 tasks, and
    # the requeued job would wait for 2 nodes again (measured: ReqNodeNotAvail, NumTasks=4)
    job = sbatch(["--nodes", "1-2", "--exclusive", "-o", str(tmp_path / "%x-%j.out"), SBATCH,
                  *job_args(digits_dir, tmp_path)], cwd=tmp_path, env={**env, "DISTVIT_TASKS_PER_NODE": "2"})
    run_dir, ckpts = tmp_path / f"distvit-{job}", tmp_path / f"distvit-{job}" / "checkpoints"
    wait_for_step(run_dir, 7, job, env)
    assert job_info(job, env)["NodeList"] == "dvtest-n[1-2]"  # the range's upper end, both nodes idle
    assert ckio.complete_checkpoints(ckpts), f"job {job} saved no complete checkpoint by step 7"
    lose_node(NODES[1], Path(env["SLURM_CONF"]).parent)
    try:
        info = wait_job(job, timeout=900, env=env)
        log = file_text(tmp_path / f"distvit-{job}.out")
        assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), info | {"log": log[-3000:]}
        assert info["NodeList"] == NODES[0]  # restarted on the node left, without waiting for the lost one
        assert f"=== distvit job {job} restart 1:" in log and f"on {NODES[0]}, 2 task(s)" in log
        lines = [line for line in log.splitlines() if "elastic resume:" in line]
        assert len(lines) == 1, log[-3000:]
        assert "was saved by 4 rank(s) (sp=1), this run has 2 (sp=1)" in lines[0]
        assert summary(run_dir)["status"] == "finished" and summary(run_dir)["steps"] == STEPS
        assert [s for s, _ in losses(run_dir)] == list(range(1, STEPS + 1))
        assert ckio.read_meta(ckio.complete_checkpoints(ckpts)[-1]).world_size == 2
    finally:
        bring_back(NODES[1], env)  # the tests after this one need both nodes



@pytest.mark.slow
@pytest.mark.multirank
def test_a_run_resubmitted_onto_one_node_resumes_elastically(digits_dir, tmp_path, env):
    """Elastic resume under Slurm: a 2-node job (4 ranks) checkpoints on USR1 and ends without a requeue
    (DISTVIT_REQUEUE=0); the same run submitted onto 1 node (2 ranks) reshapes that checkpoint by itself
    (`--resume auto`, checkpoint/elastic.py), says so in one line, and finishes on 2 ranks."""
    job, run_dir = submit(digits_dir, tmp_path, {**env, "DISTVIT_REQUEUE": "0"})
    wait_for_step(run_dir, 3, job, env)
    slurm("scancel", "--signal=USR1", "--batch", job, env=env)
    wait_job(job, timeout=600, env=env)
    stop = ckio.complete_checkpoints(run_dir / "checkpoints")[-1]
    assert ckio.read_meta(stop).world_size == 4 and 3 <= ckio.step_of(stop.name) < STEPS
    job2 = sbatch(["--nodes", "1", "--ntasks-per-node", "2", "-o", str(tmp_path / "%x-%j.out"), SBATCH,
                   *job_args(digits_dir, tmp_path), "--set", f"run.name=distvit-{job}"], cwd=tmp_path, env=env)
    info = wait_job(job2, timeout=900, env=env)
    log = file_text(tmp_path / f"distvit-{job2}.out")
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), info | {"log": log[-3000:]}
    lines = [line for line in log.splitlines() if "elastic resume:" in line]
    assert len(lines) == 1, log[-3000:]
    assert f"{stop} was saved by 4 rank(s) (sp=1), this run has 2 (sp=1)" in lines[0]
    assert "unseen samples" in lines[0] and "the RNG state carried over" in lines[0]
    assert summary(run_dir)["status"] == "finished" and summary(run_dir)["steps"] == STEPS
    assert [s for s, _ in losses(run_dir)] == list(range(1, STEPS + 1))
    assert ckio.read_meta(ckio.complete_checkpoints(run_dir / "checkpoints")[-1]).world_size == 2


# ---------------------------------------------------------------- Open MPI across the nodes


def node_mpirun(nproc_per_node: int, port: int) -> list[str]:
    """mpirun from the first node: ranks on both nodes, its daemon started on the second through
    tests/ops/node_rsh.sh (the cluster's ssh), all its traffic on the veth pair."""
    hosts = ",".join(f"{n}:{nproc_per_node}" for n in NODES)
    return ["bash", str(OPS / "on_node.sh"), NODES[0], shutil.which("mpirun") or "mpirun",
            "-np", str(nproc_per_node * len(NODES)), "--host", hosts, "--allow-run-as-root",
            "--mca", "plm_rsh_agent", str(OPS / "node_rsh.sh"), "--mca", "oob_tcp_if_include", NODE_IFACE,
            "--mca", "btl", "self,vader,tcp", "--mca", "btl_tcp_if_include", NODE_IFACE,
            # distvit agrees MASTER_ADDR through mpi4py when it is installed; given here, it needs none
            "-x", f"MASTER_ADDR={NODES[0]}", "-x", f"MASTER_PORT={port}", "-x", f"GLOO_SOCKET_IFNAME={NODE_IFACE}"]


def clean_env(**extra) -> dict:
    """The test's environment without a launcher's or an allocation's variables."""
    env = run_env(**extra)
    for name in [k for k in env if k.startswith(("SLURM_", "MASTER_", "OMPI_", "PMI_"))] + ["LOCAL_RANK"]:
        env.pop(name, None)
    return env


@pytest.mark.slow
@pytest.mark.multirank
def test_mpirun_across_nodes_trains_like_the_single_host_run(digits_dir, tmp_path, env, single_host):
    mpi = clean_env()
    before = iface_bytes(NODES[1])
    proc = run(node_mpirun(2, 29500) + [sys.executable, str(ROOT / "launch" / "train.py"),
                                        *train_args(digits_dir, tmp_path, "mpirun", STEPS, *EXTRA)],
               env=mpi, timeout=900)
    assert "on 4 rank(s) [openmpi]" in proc.stdout
    assert iface_bytes(NODES[1]) - before > 5_000_000
    assert_same_run(tmp_path / "mpirun", single_host)


# ---------------------------------------------------------------- DeepSpeed's multi-node launcher


def ds_hostfile(path: Path) -> Path:
    path.write_text("".join(f"{n} slots=2\n" for n in NODES))
    return path


@pytest.mark.slow
@pytest.mark.multirank
def test_deepspeed_openmpi_launcher_with_a_hostfile_across_nodes(digits_dir, tmp_path, env, single_host):
    """`deepspeed --hostfile --launcher openmpi` from the first node: its mpirun reaches the second
    node through tests/ops/node_rsh.sh."""
    mpi_args = ["--allow-run-as-root", "--mca", "plm_rsh_agent", str(OPS / "node_rsh.sh"),
                "--mca", "oob_tcp_if_include", NODE_IFACE, "--mca", "btl_tcp_if_include", NODE_IFACE,
                "-x", f"GLOO_SOCKET_IFNAME={NODE_IFACE}",
                # DeepSpeed's openmpi launcher does not pass --master_addr/--master_port on to the ranks;
                # without mpi4py distvit needs them given (it says so otherwise)
                "-x", f"MASTER_ADDR={NODES[0]}", "-x", "MASTER_PORT=29501"]
    cmd = ["bash", str(OPS / "on_node.sh"), NODES[0], str(Path(sys.executable).parent / "deepspeed"),
           "--hostfile", str(ds_hostfile(tmp_path / "hostfile")), "--launcher", "openmpi", "--no_ssh_check",
           "--master_addr", NODES[0], "--master_port", "29501", "--launcher_args", shlex.join(mpi_args),
           str(ROOT / "launch" / "train.py"), *train_args(digits_dir, tmp_path, "ds_openmpi", STEPS, *EXTRA)]
    proc = run(cmd, env=clean_env(), timeout=900)
    assert "on 4 rank(s) [openmpi]" in proc.stdout
    assert_same_run(tmp_path / "ds_openmpi", single_host)


@pytest.mark.slow
@pytest.mark.multirank
def test_deepspeed_no_ssh_launcher_one_per_node(digits_dir, tmp_path, env, single_host):
    """`deepspeed --hostfile --no_ssh --node_rank N` started on each node (what a scheduler without
    ssh does): the two launchers agree on dvtest-n1 and run 4 ranks."""
    hostfile = ds_hostfile(tmp_path / "hostfile")
    procs = []
    for rank, node in enumerate(NODES):
        cmd = ["bash", str(OPS / "on_node.sh"), node, str(Path(sys.executable).parent / "deepspeed"),
               "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(rank),
               "--master_addr", NODES[0], "--master_port", "29502",
               str(ROOT / "launch" / "train.py"), *train_args(digits_dir, tmp_path, "ds_no_ssh", STEPS, *EXTRA)]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=clean_env(GLOO_SOCKET_IFNAME=NODE_IFACE),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n---\n".join(o[-3000:] for o in outs)
    assert "on 4 rank(s) [torch]" in outs[0]
    assert_same_run(tmp_path / "ds_no_ssh", single_host)


@pytest.mark.slow
@pytest.mark.multirank
def test_deepspeed_pdsh_launcher_over_ssh_across_nodes(digits_dir, tmp_path, env, single_host):
    """DeepSpeed's default multi-node launcher: pdsh ssh-es into each node of the hostfile (an sshd per
    namespace, tests/ops/start_sshd2.sh) and starts deepspeed.launcher.launch there."""
    proc = subprocess.run(["bash", str(OPS / "start_sshd2.sh")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    ds_env = tmp_path / "deepspeed_env"  # what pdsh's remote shells export (DS_ENV_FILE)
    ds_env.write_text(f"DS_ACCELERATOR=cpu\nOMP_NUM_THREADS=1\nPYTHONUNBUFFERED=1\nGLOO_SOCKET_IFNAME={NODE_IFACE}\n")
    cmd = ["bash", str(OPS / "on_node.sh"), NODES[0], str(Path(sys.executable).parent / "deepspeed"),
           "--hostfile", str(ds_hostfile(tmp_path / "hostfile")), "--launcher", "pdsh", "--no_ssh_check",
           "--master_addr", NODES[0], "--master_port", "29503",
           str(ROOT / "launch" / "train.py"), *train_args(digits_dir, tmp_path, "ds_pdsh", STEPS, *EXTRA)]
    out = run(cmd, env=clean_env(PDSH_SSH_ARGS_APPEND=f"-F {proc.stdout.strip()}", DS_ENV_FILE=ds_env),
              timeout=900)
    assert f"{NODES[0]}: " in out.stdout and f"{NODES[1]}: " in out.stdout  # pdsh's per-host prefix
    assert "on 4 rank(s) [torch]" in out.stdout
    assert_same_run(tmp_path / "ds_pdsh", single_host)
