"""Streaming, sharded `distvit ckpt consolidate`:

- a real 2-rank ZeRO-3 checkpoint consolidates to exactly DeepSpeed's zero_to_fp32 weights, one
  file or sharded with a Hugging Face index, and `models.create(..., checkpoint=index)` loads it;
  so do ZeRO-2 bf16 and ZeRO-1 fp32 checkpoints;
- on a larger ZeRO-3 checkpoint in DeepSpeed's format (2 ranks, synthetic weights on a real
  save's template: tests/zero3_synthetic.py), the CLI's peak RSS (a subprocess's VmHWM minus its
  RSS after imports, the mark reset there; ru_maxrss would carry the forking parent's peak
  over exec) is above zero and below a quarter of the fp32 model and below twice the largest
  shard, and the shards load strict into timm's model with the same logits as ours.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distvit import models
from distvit.checkpoint import io as ckio
from distvit.checkpoint.cli import main as ckpt_main
from distvit.checkpoint.consolidate import consolidated_state_dict
from distvit.models.weights import load_state_dict
from ops.harness import train_args
from trainer_helpers import ROOT, launch, run_env
from zero3_synthetic import finish, write_zero3

MEASURE = r"""
import json, sys
import torch, safetensors.torch, deepspeed
from distvit.checkpoint import cli, consolidate, safe_load, stream
safe_load._deepspeed_globals()  # DeepSpeed's modules imported before the baseline
# The peak RSS of this process image (VmHWM; ru_maxrss would also keep the peak of the parent that
# forked us, carried over exec) is reset after the imports, whose own transient peak would hide
# what follows (Linux: clear_refs "5"); the baseline is the RSS then.
def hwm():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
open("/proc/self/clear_refs", "w").write("5")
base = hwm()
code = cli.main(sys.argv[1:])
peak = hwm()
print(json.dumps({"code": code, "base_kib": base, "peak_kib": peak}))
"""


def consolidate_rss(argv: list[str]) -> dict:
    """Run `distvit ckpt <argv>` in a fresh process; its peak RSS growth after imports, in bytes."""
    proc = subprocess.run([sys.executable, "-c", MEASURE, *argv], cwd=ROOT, env=run_env(PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["code"] == 0, proc.stderr[-3000:]
    return {**out, "growth": (out["peak_kib"] - out["base_kib"]) * 1024}


@pytest.fixture(scope="module")
def zero3_tag(digits_dir, tmp_path_factory) -> Path:
    """A real 2-rank ZeRO-3 checkpoint (torchrun, gloo), 2 steps of vit_digits."""
    root = tmp_path_factory.mktemp("z3")
    launch(train_args(digits_dir, root, "z3", 2, "parallel.zero_stage=3", "checkpoint.export=false"))
    return root / "z3" / "checkpoints" / ckio.tag_for_step(2)


def test_zero3_streams_to_deepspeeds_weights_one_file_or_sharded(zero3_tag, tmp_path, capsys):
    reference = consolidated_state_dict(zero3_tag)  # DeepSpeed's zero_to_fp32, in memory
    one = tmp_path / "one" / "model.safetensors"
    assert ckpt_main(["consolidate", str(zero3_tag), "--out", str(one)]) == 0
    sharded = tmp_path / "sharded" / "model.safetensors"
    assert ckpt_main(["consolidate", str(zero3_tag), "--out", str(sharded), "--max-shard-size", "100KB"]) == 0
    index = json.loads((sharded.parent / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in sharded.parent.iterdir())
    n = len(files) - 1
    assert n > 1 and files[:-1] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert set(index["weight_map"]) == set(reference) and set(index["weight_map"].values()) == set(files[:-1])
    assert index["metadata"]["total_size"] == sum(v.numel() * 4 for v in reference.values())
    assert max((sharded.parent / f).stat().st_size for f in files[:-1]) < 100_000 + 4096  # header aside
    for path in (one, sharded.parent / "model.safetensors.index.json", sharded):  # sharded: the index beside it
        got = load_state_dict(path)
        assert got.keys() == reference.keys() and all(torch.equal(got[k], reference[k]) for k in reference), path
    model = models.create("vit_digits", checkpoint=str(sharded.parent / "model.safetensors.index.json"))
    assert torch.equal(model.state_dict()["head.weight"], reference["head.weight"])
    capsys.readouterr()
    # Back to one file with --overwrite: the old shards and index go, so nothing shadows the new file.
    assert ckpt_main(["consolidate", str(zero3_tag), "--out", str(sharded), "--overwrite"]) == 0
    assert sorted(p.name for p in sharded.parent.iterdir()) == ["model.safetensors"]
    assert ckpt_main(["consolidate", str(zero3_tag), "--out", str(tmp_path / "x.safetensors"), "--max-shard-size", "5XB"]) == 2
    assert "--max-shard-size '5XB': give a size such as 5GB" in capsys.readouterr().err


@pytest.mark.parametrize("stage,precision", [(2, "bf16"), (1, "fp32")])
def test_zero1_2_stream_to_deepspeeds_weights(digits_dir, tmp_path, stage, precision):
    """ZeRO-1/2 partitions cut parameters anywhere (with alignment padding); bf16 files are bf16_*."""
    launch(train_args(digits_dir, tmp_path, "z", 2, f"parallel.zero_stage={stage}", f"parallel.precision={precision}",
                      "checkpoint.export=false"))
    tag = tmp_path / "z" / "checkpoints" / ckio.tag_for_step(2)
    reference = consolidated_state_dict(tag)
    out = tmp_path / "out" / "model.safetensors"
    assert ckpt_main(["consolidate", str(tag), "--out", str(out), "--max-shard-size", "100KB"]) == 0
    got = load_state_dict(out.parent / "model.safetensors.index.json")
    assert got.keys() == reference.keys()
    assert all(torch.equal(got[k], reference[k]) and got[k].dtype == reference[k].dtype for k in reference)


@pytest.mark.slow
def test_consolidate_memory_is_bounded_and_timm_loads_the_shards(zero3_tag, tmp_path, timm_module):
    torch.manual_seed(0)
    ours = models.create("vit_small_patch16_224").eval()  # 22M parameters, 88 MB in fp32
    weights = {k: v.detach().clone() for k, v in ours.state_dict().items()}
    tag = write_zero3(zero3_tag, tmp_path / "checkpoints" / "step_00000002", weights, world=2)
    finish(zero3_tag, tag, "vit_small_patch16_224")
    fp32_bytes = sum(v.numel() * 4 for v in weights.values())
    reference = consolidated_state_dict(tag)  # DeepSpeed reads the synthetic files back to the weights
    assert all(torch.equal(reference[k], weights[k]) for k in weights)
    del reference

    out = tmp_path / "out" / "model.safetensors"
    rss = consolidate_rss(["consolidate", str(tmp_path / "checkpoints"), "--out", str(out), "--max-shard-size", "20MB"])
    shards = sorted(out.parent.glob("model-*.safetensors"))
    largest = max(p.stat().st_size for p in shards)
    assert len(shards) >= 4
    print(f"consolidate RSS growth {rss['growth'] / 1e6:.1f} MB; fp32 {fp32_bytes / 1e6:.0f} MB; largest shard {largest / 1e6:.0f} MB")
    assert 0 < rss["growth"] < fp32_bytes / 4, (rss, fp32_bytes)
    assert rss["growth"] < 2 * largest, (rss, largest)

    got = load_state_dict(out.parent / "model.safetensors.index.json")
    assert all(torch.equal(got[k], weights[k]) for k in weights)
    theirs = timm_module.create_model("vit_small_patch16_224", pretrained=False).eval()
    theirs.load_state_dict(got, strict=True)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x), atol=1e-5, rtol=1e-4)
