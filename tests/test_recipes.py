"""The recipe configs (configs/recipes/*.yaml) parse, state their source and top-1, and print resolved."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distvit.config import load_config

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "configs" / "recipes").glob("*.yaml"))
EXPECTED = {  # recipe: (model, global batch on 8 GPUs, top-1 stated)
    "deit_small_imagenet": ("deit_small_patch16_224", 1024, "79.8"),
    "deit_base_imagenet": ("deit_base_patch16_224", 1024, "81.8"),
    "vit_base_patch16_finetune": ("vit_base_patch16_224", 1024, "83.6"),
    "deit3_base_imagenet": ("deit3_base_patch16_224", 2048, "83.8"),
    "swin_tiny_imagenet": ("swin_tiny_patch4_window7_224", 1024, "81.2"),
}


def test_every_recipe_is_there():
    assert sorted(p.stem for p in RECIPES) == sorted(EXPECTED)


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_parses_and_states_source_and_top1(path):
    cfg = load_config(path)
    model, batch, top1 = EXPECTED[path.stem]
    assert cfg.model.name == model
    assert cfg.data.batch_size * cfg.parallel.grad_accum * 8 == batch
    text = path.read_text()
    assert re.search(r"# Source: .+\d{4}", text) and f"Published top-1: {top1}" in text
    assert "8 GPUs:" in text and "64 GPUs:" in text
    # every 64-GPU command keeps the global batch
    sets = dict(s.split("=") for s in re.findall(r"--set (\S+)", text.split("64 GPUs:")[1].splitlines()[0]))
    cfg64 = load_config(path, [f"{k}={v}" for k, v in sets.items()])
    assert cfg64.data.batch_size * cfg64.parallel.grad_accum * 64 == batch
    # the docs table names the recipe and its top-1
    assert re.search(rf"\| `{path.stem}` .*\| {re.escape(top1)} ", (ROOT / "docs" / "recipes.md").read_text())


def test_print_config_of_a_recipe():
    """The 8-GPU launch the recipe names, previewed here (no GPU needed): the launcher's environment says 8 ranks."""
    out = subprocess.run([sys.executable, str(ROOT / "launch/train.py"), "--config", "recipes/deit_small_imagenet",
                          "--set", "run.device=cuda", "--print-config"], capture_output=True, text=True, cwd=ROOT,
                         timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "DS_ACCELERATOR": "cpu",
                                           "RANK": "0", "WORLD_SIZE": "8"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("# resolved for device cuda, world size 8, launcher torch; lr 0.001 = ")
    printed = yaml.safe_load(out.stdout)
    assert printed["data"]["auto_augment"] == "rand-m9-mstd0.5-inc1" and printed["data"]["mixup"] == 0.8
    assert printed["optim"]["label_smoothing"] == 0.1 and printed["model"]["drop_path_rate"] == 0.1
    # Resolved for that launch: the lr from lr_base at its global batch (8 ranks), a concrete precision.
    cfg = load_config("recipes/deit_small_imagenet")
    global_batch = cfg.data.batch_size * cfg.parallel.grad_accum * 8
    assert printed["optim"]["lr"] == pytest.approx(cfg.optim.lr_base * global_batch / cfg.optim.lr_base_size)
    assert printed["optim"]["lr_base"] is None
    assert printed["parallel"]["precision"] == ("bf16" if cfg.parallel.precision == "auto" else cfg.parallel.precision)


PUBLISHED_LR = {  # recipe: the peak LR its source uses at its own global batch
    "deit_small_imagenet": 1e-3, "deit_base_imagenet": 1e-3, "vit_base_patch16_finetune": 2e-3,
    "deit3_base_imagenet": 3e-3, "swin_tiny_imagenet": 1e-3,
}


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_lr_follows_the_global_batch(path):
    """Recipes give optim.lr_base at a reference batch: at the published global batch (8 GPUs) the
    resolved LR is the published one, and it scales linearly on 16 GPUs with the per-GPU batch kept."""
    from distvit.config.resolve import resolve_lr

    cfg = load_config(path)
    assert cfg.optim.lr_base is not None and "lr" not in cfg.optim.model_fields_set
    lr8, _ = resolve_lr(cfg, dp_size=8)
    lr16, _ = resolve_lr(cfg, dp_size=16)
    assert lr8 == pytest.approx(PUBLISHED_LR[path.stem], rel=1e-12)
    assert lr16 == pytest.approx(2 * lr8, rel=1e-12)


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_print_config_of_every_recipe_for_its_gpus(path, capsys, monkeypatch):
    """Every recipe, as `--print-config` resolves it for the launch it targets (8 GPUs, `--set run.device=cuda`,
    previewed on any machine): exit 0, the header names that launch, and the LR is the published one. On one
    CPU process some could not run (DeiT III: bf16 at ZeRO-0 on the CPU; DeiT: repeated augmentation x3)."""
    from distvit.cli import main

    for name in ("LOCAL_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "8")
    rc = main(["train", "--config", f"recipes/{path.stem}", "--set", "run.device=cuda", "--print-config"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out.startswith("# resolved for device cuda, world size 8, launcher torch; lr ")
    printed = yaml.safe_load(out)
    assert printed["optim"]["lr"] == pytest.approx(PUBLISHED_LR[path.stem], rel=1e-12)
    assert printed["optim"]["lr_base"] is None and printed["parallel"]["precision"] == "bf16"
    assert printed["model"]["name"] == EXPECTED[path.stem][0]
