"""Config loading, inheritance, overrides and every user-facing error (message asserted)."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distvit.config import CONFIG_DIR, Config, ConfigError, load_config, parse_override, shipped_configs

ROOT = Path(__file__).resolve().parent.parent


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_validate():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.model.name == "vit_digits"
    assert cfg.parallel.zero_stage == 2


def test_every_shipped_config_loads():
    names = shipped_configs()
    assert "demo_digits.yaml" in names
    for name in names:
        load_config(CONFIG_DIR / name)


def test_inheritance_and_overrides(tmp_path):
    base = write(tmp_path / "base.yaml", "run: {name: base, seed: 3}\noptim: {lr: 0.1, betas: [0.8, 0.9]}\n")
    write(tmp_path / "child.yaml", "base: base.yaml\nrun: {name: child}\nparallel: {zero_stage: 3}\n")
    cfg = load_config(tmp_path / "child.yaml", ["optim.lr=3e-4", "data.num_workers=2", "log.peak_tflops=null",
                                                "optim.betas=[0.9, 0.95]", "log.tensorboard=false"])
    assert cfg.run.name == "child" and cfg.run.seed == 3  # child wins, base fills in
    assert cfg.parallel.zero_stage == 3
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.data.num_workers == 2
    assert cfg.log.peak_tflops is None
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.log.tensorboard is False
    assert base.exists()


def test_multiple_bases_merge_in_order(tmp_path):
    write(tmp_path / "a.yaml", "run: {name: a, seed: 1}\n")
    write(tmp_path / "b.yaml", "run: {name: b}\n")
    write(tmp_path / "c.yaml", "base: [a.yaml, b.yaml]\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert (cfg.run.name, cfg.run.seed) == ("b", 1)


def test_unknown_key_in_file_names_file_and_suggestion(tmp_path):
    f = write(tmp_path / "bad.yaml", "optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    msg = str(e.value)
    assert "unknown config key 'optim.lrr'" in msg
    assert str(f.resolve()) in msg
    assert "did you mean 'optim.lr'?" in msg
    assert "\n" not in msg


def test_unknown_key_from_flag_names_flag():
    with pytest.raises(ConfigError, match=r"unknown config key 'parallel.zero_stag' \(from --set parallel.zero_stag=3\); did you mean 'parallel.zero_stage'\?"):
        load_config(None, ["parallel.zero_stag=3"])


def test_key_in_wrong_section_is_suggested():
    with pytest.raises(ConfigError, match=r"did you mean 'optim.lr'\?"):
        load_config(None, ["run.lr=0.1"])


def test_unknown_section():
    with pytest.raises(ConfigError, match=r"unknown config key 'optimizer'.*did you mean 'optim'\?"):
        load_config(None, ["optimizer.lr=1"])


def test_wrong_type_names_key_value_and_type(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.batch_size=lots"])
    msg = str(e.value)
    assert "config key 'data.batch_size'" in msg and "--set data.batch_size=lots" in msg
    assert "'lots'" in msg and "integer" in msg
    f = write(tmp_path / "t.yaml", "run:\n  epochs: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"config key 'run.epochs' \(from .*t.yaml\): got \[1, 2\]"):
        load_config(f)


def test_literal_choice_error_lists_choices():
    with pytest.raises(ConfigError, match=r"'parallel.offload'.*'gpu'.*'none', 'cpu', 'partial' or 'interleaved'"):
        load_config(None, ["parallel.offload=gpu"])


def test_cross_field_rule_names_fix():
    with pytest.raises(ConfigError, match=r"parallel.offload=interleaved .*set parallel.zero_stage=3"):
        load_config(None, ["parallel.offload=interleaved", "parallel.zero_stage=2"])


def test_offload_modes_and_fraction_are_checked_at_load():
    with pytest.raises(ConfigError, match=r"parallel.offload=partial .*set parallel.zero_stage=3"):
        load_config(None, ["parallel.offload=partial", "parallel.zero_stage=2", "parallel.offload_gpu_fraction=0.5"])
    with pytest.raises(ConfigError, match=r"parallel.offload=partial .*set parallel.offload_gpu_fraction to a number"):
        load_config(None, ["parallel.offload=partial", "parallel.zero_stage=3"])
    with pytest.raises(ConfigError, match=r"parallel.offload_gpu_fraction=0.5 has no effect with parallel.offload=cpu"):
        load_config(None, ["parallel.offload=cpu", "parallel.zero_stage=3", "parallel.offload_gpu_fraction=0.5"])
    cfg = load_config(None, ["parallel.offload=partial", "parallel.zero_stage=3", "parallel.offload_gpu_fraction=0.25"])
    assert cfg.parallel.offload == "partial" and cfg.parallel.offload_gpu_fraction == 0.25


def test_missing_file_lists_shipped_configs():
    with pytest.raises(ConfigError) as e:
        load_config("configs/nope.yaml")
    assert "config file 'configs/nope.yaml' not found" in str(e.value)
    assert "demo_digits.yaml" in str(e.value)


def test_config_by_name():
    assert load_config("demo_digits").run.name == "demo_digits"


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="expected section.key=value"):
        parse_override("optim.lr")
    with pytest.raises(ConfigError, match="must name a section and a field"):
        parse_override("lr=3")


def test_inheritance_loop(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="config inheritance loops"):
        load_config(tmp_path / "a.yaml")


def test_yaml_round_trip():
    cfg = load_config("demo_digits", ["optim.lr=0.01"])
    again = Config.model_validate(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


def test_print_config_cli():
    out = subprocess.run(
        [sys.executable, str(ROOT / "launch/train.py"), "--config", "configs/demo_digits.yaml", "--print-config",
         "--set", "optim.lr=0.5"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout
    printed = yaml.safe_load(out)
    assert printed["optim"]["lr"] == 0.5
    assert printed["model"]["name"] == "vit_digits"


def test_cli_error_is_one_line_exit_2():
    proc = subprocess.run(
        [sys.executable, "-m", "distvit.cli", "train", "--set", "optim.lrr=1", "--print-config"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("distvit: error: unknown config key 'optim.lrr'")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_distvit_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "distvit.cli", "--help"], capture_output=True, text=True, check=True).stdout
    for sub in ("train", "data", "ckpt"):
        assert sub in out


@pytest.mark.parametrize("override, expected", [
    ("log.every_steps=0", "'log.every_steps' (from --set log.every_steps=0): must be >= 1"),
    ("run.max_steps=-1", "'run.max_steps' (from --set run.max_steps=-1): must be >= 1 or null, got -1"),
    ("run.max_steps=0", "'run.max_steps' (from --set run.max_steps=0): must be >= 1 or null, got 0"),
    ("run.epochs=0", "'run.epochs' (from --set run.epochs=0): must be >= 1 or null"),
    ("schedule.warmup_steps=-5", "'schedule.warmup_steps' (from --set schedule.warmup_steps=-5): must be >= 0"),
    ("checkpoint.keep=0", "'checkpoint.keep' (from --set checkpoint.keep=0): must be >= 1"),
    ("optim.betas=[1.5, 0.9]", "'optim.betas' (from --set optim.betas=[1.5, 0.9]): both must be in [0, 1), got [1.5, 0.9]"),
    ("optim.betas=[0.9, 1.0]", "both must be in [0, 1)"),
    ("optim.lr=0", "'optim.lr' (from --set optim.lr=0): must be > 0"),
    ("run.collective_timeout_s=0", "'run.collective_timeout_s' (from --set run.collective_timeout_s=0): must be > 0"),
    ("schedule.min_lr=1", "'schedule.min_lr' (from --set schedule.min_lr=1): 1.0 is above the peak optim.lr=0.001 "
                          "(from defaults); set schedule.min_lr <= optim.lr"),
    ("model.name=vit_digit", "'model.name' (from --set model.name=vit_digit): no model named 'vit_digit'; did you mean vit_digits"),
    ("distill.teacher=regnety_16", "'distill.teacher' (from --set distill.teacher=regnety_16): no model named 'regnety_16'"),
    ("model.img_size=10", "'model.img_size' (from --set model.img_size=10): 10, but the data loader yields data.img_size=8 "
                          "(from defaults); set both to the same value, or leave model.img_size unset"),
])
def test_values_that_break_later_are_rejected_at_load(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_accepted_edge_values_still_load():
    cfg = load_config(None, ["run.max_steps=1", "schedule.min_lr=0.001", "checkpoint.keep=1", "optim.betas=[0, 0.999]",
                             "model.img_size=8", "run.collective_timeout_s=0.5"])
    assert cfg.run.max_steps == 1 and cfg.schedule.min_lr == cfg.optim.lr


def test_section_name_typo_from_flag_names_the_flag():
    with pytest.raises(ConfigError, match=r"unknown config key 'optimizer' \(from --set optimizer.lr=1\); did you mean 'optim'\?"):
        load_config(None, ["optimizer.lr=1"])


def test_offload_zero_conflict_names_where_each_key_came_from(tmp_path):
    f = write(tmp_path / "z0.yaml", "parallel:\n  zero_stage: 0\n  grad_accum: 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(f, ["parallel.offload=cpu"])
    msg = str(e.value)
    assert f"parallel.zero_stage from {f.resolve()}" in msg and "parallel.offload from --set parallel.offload=cpu" in msg
    assert "set parallel.zero_stage=2 or 3" in msg
    f2 = write(tmp_path / "off.yaml", "parallel:\n  offload: interleaved\n")
    with pytest.raises(ConfigError) as e:
        load_config(f2)
    assert f"parallel.offload from {f2.resolve()}" in str(e.value) and "parallel.zero_stage from defaults" in str(e.value)


# ---------------------------------------------------------------- rules checked before start-up
# Each rule below used to fire only after the process group (and for EMA, the DeepSpeed engine) existed;
# load_config or resolve() (config/resolve.py, what the Trainer and --print-config run) refuse it now, with
# the same one-line text, and no process group is started by either.

def _no_process_group():
    import torch.distributed as dist

    return not dist.is_initialized()


def test_ema_under_zero3_is_refused_at_load():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["optim.ema_decay=0.9", "parallel.zero_stage=3"])
    assert str(err.value) == ("optim.ema_decay needs full weights on every rank, which ZeRO-3 partitions; "
                              "use parallel.zero_stage <= 2 or set optim.ema_decay=null")
    load_config(None, ["optim.ema_decay=0.9", "parallel.zero_stage=2"])  # ZeRO 0-2 keep full weights
    assert _no_process_group()


def test_a_run_without_length_is_refused_at_load():
    with pytest.raises(ConfigError, match=r"^set run.epochs or run.max_steps \(both are empty\)$"):
        load_config(None, ["run.epochs=null", "run.max_steps=null"])


def test_repeated_aug_above_the_dp_ranks_is_refused_by_resolve():
    import torch

    from distvit.config.resolve import resolve

    cfg = load_config(None, ["data.repeated_aug=3"])
    with pytest.raises(ConfigError) as err:
        resolve(cfg, dp_size=2, device=torch.device("cpu"))
    assert str(err.value) == ("data.repeated_aug=3 repeats each sample on that many different ranks, but there are 2 "
                              "data-parallel ranks; set data.repeated_aug <= 2 (1: off)")
    resolve(cfg, dp_size=3, device=torch.device("cpu"))
    assert _no_process_group()


def test_interleaved_offload_with_param_offload_is_refused_by_resolve(tmp_path):
    import json

    import torch

    from distvit.config.resolve import resolve

    extra = tmp_path / "ds.json"
    extra.write_text(json.dumps({"zero_optimization": {"offload_param": {"device": "cpu"}}}))
    cfg = load_config(None, ["parallel.zero_stage=3", "parallel.offload=interleaved", "parallel.precision=fp32",
                             "parallel.sub_group_size=1000", f"parallel.deepspeed_extra={extra}"])
    with pytest.raises(ConfigError) as err:
        resolve(cfg, dp_size=1, device=torch.device("cuda", 0))  # a GPU launch; none is needed to refuse it
    assert str(err.value) == (
        "interleaved offload updates the ZeRO-3 parameter partitions on the cuda device, but "
        f"zero_optimization.offload_param.device is 'cpu' (from parallel.deepspeed_extra '{extra}'), which keeps them "
        "in host memory; remove offload_param from the DeepSpeed config, or use parallel.offload=cpu (DeepSpeed's own "
        "offload, which supports offload_param)")
    resolve(cfg, dp_size=1, device=torch.device("cpu"))  # on the CPU the partitions belong in host memory
    assert _no_process_group()


PACKING = ["data.packing.max_tokens=64", "data.packing.min_side=4", "data.packing.max_side=8"]


def test_packing_without_a_packed_forward_is_refused_by_resolve():
    import torch

    from distvit.config.resolve import resolve

    cpu = torch.device("cpu")
    with pytest.raises(ConfigError, match=r"^data.packing needs a model with a packed forward .* set data.packing=null$"):
        resolve(load_config("swin_digits", PACKING), dp_size=1, device=cpu)
    teacher = ["distill.kind=hard", "distill.teacher=swin_digits", "distill.teacher_checkpoint=teacher.safetensors"]
    with pytest.raises(ConfigError) as err:
        resolve(load_config("demo_digits", PACKING + teacher), dp_size=1, device=cpu)
    assert str(err.value) == ("data.packing: the teacher distill.teacher='swin_digits' has no packed forward (it must "
                              "see the student's packed batch); pick a ViT/DeiT teacher or set data.packing=null")
    ok = ["distill.kind=hard", "distill.teacher=vit_digits", "distill.teacher_checkpoint=teacher.safetensors"]
    resolve(load_config("demo_digits", PACKING + ok), dp_size=1, device=cpu)  # a ViT teacher packs too
    assert _no_process_group()


def test_sp_size_that_does_not_divide_the_world_is_refused_before_the_process_group(monkeypatch):
    from distvit.config.resolve import for_launch

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "6")
    with pytest.raises(ValueError, match=r"parallel.sp_size=4 does not divide the world size 6"):
        for_launch(load_config(None, ["parallel.sp_size=4", "run.device=cpu"]))
    cfg, _, launch = for_launch(load_config(None, ["parallel.sp_size=3", "run.device=cpu", "optim.lr=1e-3"]))
    assert (launch.world_size, launch.dp_size, launch.device.type) == (6, 2, "cpu") and cfg.parallel.precision == "fp32"
    assert _no_process_group()
