"""Peak memory of consolidating a ZeRO-3 checkpoint: `distvit ckpt consolidate` vs DeepSpeed's zero_to_fp32.

The checkpoint: ViT-L/16 (304M parameters, 1.2 GB in fp32) as a 2-rank ZeRO-3 save in DeepSpeed's
format, with Adam moments (3.6 GB on disk). Training it here is out of reach, so its files are
built from a real 2-rank ZeRO-3 save of the digits demo (the template: every field DeepSpeed
wrote is kept, the model-dependent ones replaced; tests/zero3_synthetic.py); DeepSpeed's own
reader checks the result at test scale (tests/test_consolidate_stream.py).

Each side runs in a fresh process; after its imports (torch, safetensors, DeepSpeed) the peak-RSS
mark is reset (/proc/self/clear_refs "5"), and the figure is the peak RSS at the end (VmHWM, the
same mark as ru_maxrss without the forking parent's peak that ru_maxrss keeps across exec) minus
the RSS then, i.e. what consolidating added at its peak.
    ours: `distvit ckpt consolidate DIR --out model.safetensors --max-shard-size S` (S: 5GB, 500MB)
    peer: deepspeed.utils.zero_to_fp32.convert_zero_checkpoint_to_fp32_state_dict(
              DIR, OUT, max_shard_size="5GB", safe_serialization=True)   (lazy mode, its default)

    python benchmarks/consolidate_memory.py                     # ~10 min on 2 CPU cores, 8 GB of disk
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

OURS = r"""
import json, sys
import torch, safetensors.torch, deepspeed
from distvit.checkpoint import cli, consolidate, safe_load, stream
safe_load._deepspeed_globals()
# The peak RSS of this process image (VmHWM; ru_maxrss would also keep the peak of the parent that
# forked us, carried over exec) is reset after the imports, whose own transient peak would hide
# what follows (Linux: clear_refs "5"); the baseline is the RSS then.
def hwm():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
open("/proc/self/clear_refs", "w").write("5")
base = hwm()
code = cli.main(sys.argv[1:])
print(json.dumps({"code": code, "base_kib": base, "peak_kib": hwm()}))
"""

PEER = r"""
import json, sys
import torch, safetensors.torch, deepspeed, huggingface_hub
from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict
# The peak RSS of this process image (VmHWM; ru_maxrss would also keep the peak of the parent that
# forked us, carried over exec) is reset after the imports, whose own transient peak would hide
# what follows (Linux: clear_refs "5"); the baseline is the RSS then.
def hwm():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
open("/proc/self/clear_refs", "w").write("5")
base = hwm()
convert_zero_checkpoint_to_fp32_state_dict(sys.argv[1], sys.argv[2], max_shard_size=sys.argv[4],
                                           safe_serialization=True, tag=sys.argv[3])
print(json.dumps({"code": 0, "base_kib": base, "peak_kib": hwm()}))
"""


def env() -> dict:
    e = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    e.pop("RANK", None)
    e.pop("WORLD_SIZE", None)
    return e


def measured(code: str, argv: list[str]) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, env=env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{argv}: exited {proc.returncode}\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"rss_growth_mb": round((out["peak_kib"] - out["base_kib"]) / 1024, 1),
            "peak_rss_mb": round(out["peak_kib"] / 1024, 1), "wall_s": round(time.perf_counter() - t0, 1)}


def template(work: Path) -> Path:
    """A real 2-rank ZeRO-3 save (torchrun, gloo): the digits demo, 1 step."""
    from distvit.data.write import write_digits

    write_digits(work / "digits")
    sets = [f"run.output_dir={work}", "run.name=template", "run.max_steps=1", "parallel.zero_stage=3",
            f"data.train={work}/digits/train-*.tar", "data.val=null", "data.batch_size=16", "log.progress=false",
            "log.tensorboard=false", "checkpoint.export=false"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-port=29671",
           str(ROOT / "launch" / "train.py"), "--config", "demo_digits"]
    for s in sets:
        cmd += ["--set", s]
    subprocess.run(cmd, cwd=ROOT, env=env(), check=True, capture_output=True)
    return work / "template" / "checkpoints" / "step_00000001"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_large_patch16_224")
    p.add_argument("--shard-sizes", default="5GB,500MB")
    p.add_argument("--work", default=None, help="folder for the files (default: a temp folder, removed)")
    p.add_argument("--note", default=None)
    args = p.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    sys.path.insert(0, str(ROOT / "tests"))
    import torch

    from distvit import models
    from zero3_synthetic import finish, write_zero3

    work = Path(args.work or tempfile.mkdtemp(prefix="distvit-consolidate-"))
    tag = work / "checkpoints" / "step_00000001"
    if not (tag / "COMPLETE").is_file():
        tmpl = template(work)
        torch.manual_seed(0)
        weights = models.create(args.model).state_dict()
        write_zero3(tmpl, tag, weights, world=2)
        finish(tmpl, tag, args.model)
        del weights
    from distvit.checkpoint.stream import Zero3Reader

    reader = Zero3Reader(tag)
    entries = reader.entries()
    reader.close()
    params = sum(s.numel() for _, s, _ in entries)
    fp32_mb = params * 4 / 1e6
    ckpt_mb = sum(f.stat().st_size for f in tag.iterdir()) / 1e6
    largest_tensor_mb = max(s.numel() for _, s, _ in entries) * 4 / 1e6

    peer_out = work / "peer"
    peer = measured(PEER, [str(tag.parent), str(peer_out), tag.name, "5GB"])
    shutil.rmtree(peer_out, ignore_errors=True)
    for size in args.shard_sizes.split(","):
        out = work / f"ours_{size}" / "model.safetensors"
        ours = measured(OURS, ["consolidate", str(tag.parent), "--out", str(out), "--max-shard-size", size])
        files = [f for f in out.parent.iterdir() if f.suffix == ".safetensors"]
        largest_mb = max(f.stat().st_size for f in files) / 1e6
        print(json.dumps({
            "bench": "consolidate_memory", "model": args.model, "params_m": round(params / 1e6, 1),
            "zero_stage": 3, "ranks": 2, "fp32_mb": round(fp32_mb), "checkpoint_mb": round(ckpt_mb),
            "max_shard_size": size, "shards": len(files), "largest_shard_mb": round(largest_mb),
            "largest_tensor_mb": round(largest_tensor_mb, 1),
            "rss_growth_mb": ours["rss_growth_mb"], "wall_s": ours["wall_s"],
            "bound_quarter_fp32_mb": round(fp32_mb / 4), "bound_2x_largest_shard_mb": round(2 * largest_mb),
            "within_bounds": ours["rss_growth_mb"] < min(fp32_mb / 4, 2 * largest_mb),
            "peer": "deepspeed zero_to_fp32 (lazy, max_shard_size=5GB, safetensors)",
            "peer_rss_growth_mb": peer["rss_growth_mb"], "peer_wall_s": peer["wall_s"],
            "peer_peak_rss_mb": peer["peak_rss_mb"], "peak_rss_mb": ours["peak_rss_mb"],
            "ratio_rss_ours_over_peer": (round(ours["rss_growth_mb"] / peer["rss_growth_mb"], 4)
                                         if peer["rss_growth_mb"] > 0 else None),
            "load_1min": round(os.getloadavg()[0], 1), "note": args.note,
        }), flush=True)
        shutil.rmtree(out.parent, ignore_errors=True)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
