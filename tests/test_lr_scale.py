"""optim.lr_base (issue 20): the LR follows the global batch, resolved where the world size is known."""
from __future__ import annotations

import pytest

from distvit.config import ConfigError, load_config
from distvit.config.resolve import apply, resolve_lr
from trainer_helpers import ROOT, launch, read_metrics


def _cfg(*sets):
    return load_config(None, ["data.batch_size=32", *sets])


def test_linear_and_sqrt_scaling_like_timm():
    lr, line = resolve_lr(_cfg("optim.lr_base=1e-3", "parallel.grad_accum=2"), dp_size=8)  # global 512
    assert lr == pytest.approx(2e-3)
    assert line == "lr 0.002 = optim.lr_base 0.001 x 512/256 (linear scaling to global batch 512)"
    lr, line = resolve_lr(_cfg("optim.lr_base=1e-3", "optim.lr_base_scale=sqrt", "optim.lr_base_size=128"), dp_size=16)
    assert lr == pytest.approx(1e-3 * 2.0)  # sqrt(512 / 128)
    assert "sqrt(512/128)" in line
    assert resolve_lr(_cfg("optim.lr=3e-4"), dp_size=8) == (3e-4, "lr 0.0003 (optim.lr)")


def test_lr_and_lr_base_together_is_one_line_error_and_resolution_is_idempotent():
    with pytest.raises(ConfigError, match=r"^optim.lr=0.002 and optim.lr_base=0.001 are both set; give one"):
        resolve_lr(load_config("configs/demo_digits.yaml", ["optim.lr_base=1e-3"]), dp_size=2)
    cfg = _cfg("optim.lr_base=1e-3")
    apply(cfg, 4)
    assert cfg.optim.lr == pytest.approx(5e-4)
    apply(cfg, 4)  # a second resolution of the same tree gives the same, without a conflict
    assert cfg.optim.lr == pytest.approx(5e-4)
    with pytest.raises(ConfigError, match="must be > 0"):
        resolve_lr(_cfg("optim.lr_base=1e-3", "optim.lr_base_size=0"), 1)


@pytest.mark.multirank
def test_two_ranks_train_at_the_scaled_lr_and_the_banner_says_so(digits_dir, tmp_path):
    sets = [f"run.output_dir={tmp_path}", "run.name=lrb", "run.max_steps=2", "log.progress=false", "log.tensorboard=false",
            "log.every_steps=1", f"data.train={digits_dir}/train-*.tar", "data.val=null", "checkpoint.export=false",
            "schedule.kind=constant", "schedule.warmup_steps=0", "optim.lr_base=1e-3", "optim.lr_base_size=16"]
    # demo_digits.yaml without its optim.lr (with it, lr_base is refused: test above).
    base = tmp_path / "base.yaml"
    base.write_text((ROOT / "configs" / "demo_digits.yaml").read_text().replace("  lr: 2.0e-3\n", ""))
    assert "lr:" not in base.read_text().split("optim:")[1].split("schedule:")[0]
    proc = launch(["--config", str(base)] + [a for s in sets for a in ("--set", s)], nproc=2)
    # global batch 32 x 2 ranks = 64 -> 1e-3 * 64 / 16
    assert "lr 0.004 = optim.lr_base 0.001 x 64/16 (linear scaling to global batch 64)" in proc.stdout
    assert [float(r["lr"]) for r in read_metrics(tmp_path / "lrb")] == pytest.approx([4e-3, 4e-3])


def test_resolve_makes_precision_and_lr_concrete_and_leaves_the_input_alone():
    import torch

    from distvit.config.resolve import resolve

    given = _cfg("optim.lr_base=1e-3", "data.batch_size=32")
    cfg, line = resolve(given, dp_size=4, device=torch.device("cpu"))  # global batch 128
    assert cfg.optim.lr == pytest.approx(5e-4) and cfg.optim.lr_base is None
    assert cfg.parallel.precision == "fp32" and given.parallel.precision == "auto"  # auto on the CPU
    assert given.optim.lr_base == 1e-3 and "lr" not in given.optim.model_fields_set
    assert line.startswith("lr 0.0005 = optim.lr_base 0.001 x 128/256")
    again, _ = resolve(load_config_from_yaml(cfg.to_yaml()), dp_size=4, device=torch.device("cpu"))
    assert again == cfg  # what --print-config prints (and the run folder keeps) loads and resolves to itself


def load_config_from_yaml(text: str):
    import yaml

    from distvit.config import Config

    return Config.model_validate(yaml.safe_load(text))
