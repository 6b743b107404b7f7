"""The autoregressive task (task.kind=autoregressive) through the trainer, on 2 CPU ranks.

- ZeRO-3 with activation checkpointing: the loss falls, eval reports the held-out next-patch MSE,
  metrics carry tokens/s, the summary the final MSE;
- ZeRO-2 + CPU offload + EMA: kill -9 of one rank, then --resume auto equals the uninterrupted
  run bitwise (losses and weights);
- sp = 2 (ring with the zig-zag layout, and ulysses) with ZeRO-2, and dp = 2 with ZeRO-0, 1 and 3,
  equal the one-process torch AdamW loop trainer_helpers.reference_run on the same images, with the
  task's next-patch loss (per-patch normalised targets; prefix attention too for dp);
- config errors: a causal model under task classify, and the other misfits, are one line.
"""
from __future__ import annotations

import pytest
import torch

from distvit.config import ConfigError, load_config
from trainer_helpers import launch, load_weights, losses, read_metrics, reference_run, run_env, summary

STEPS = 5


def aim_args(digits_dir, run_root, name, *extra):
    sets = [
        f"run.output_dir={run_root}", f"run.name={name}", f"run.max_steps={STEPS}", "run.eval_every=1000",
        f"data.train={digits_dir}/train-*.tar", f"data.val={digits_dir}/val-*.tar",
        "data.batch_size=16", "log.every_steps=1", "log.tensorboard=false", "log.progress=false",
        "schedule.warmup_steps=2", "optim.lr=3e-3",
    ]
    args = ["--config", "aim_digits"]
    for s in [*sets, *extra]:
        args += ["--set", s]
    return args


def _equals_reference(run_dir, args, dp_size):
    cfg = load_config("aim_digits", args[3::2])
    # trainer_helpers.reference_run takes the task's loss (engine.tasks.NextPatch) under task.kind=autoregressive
    ref_state, ref_losses = reference_run(cfg, STEPS, dp_size)
    got = load_weights(run_dir / "model.safetensors")
    assert set(got) == set(ref_state)
    # fp32 throughout; as tests/test_trainer.py: the ranks' partial gradients are summed where the
    # reference takes one mean, so rounding differs at ~1e-7 relative and Adam keeps it there.
    for k, ref in ref_state.items():
        torch.testing.assert_close(got[k], ref.float(), rtol=1e-4, atol=2e-5, msg=lambda m: f"{k}: {m}")
    logged = [float(loss) for _, loss in losses(run_dir)]
    torch.testing.assert_close(torch.tensor(logged), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)


@pytest.mark.multirank
def test_zero3_activation_checkpointing_loss_falls(digits_dir, tmp_path):
    args = aim_args(digits_dir, tmp_path, "z3", "run.max_steps=40", "run.eval_every=20", "log.every_steps=5",
                    "parallel.zero_stage=3", "parallel.activation_checkpointing=true")
    proc = launch(args, timeout=600)
    assert "vit_causal_digits" in proc.stdout and "16 tokens/image" in proc.stdout
    rows = read_metrics(tmp_path / "z3")
    loss = [float(r["loss"]) for r in rows if r["loss"]]
    assert loss[-1] < 0.8 * loss[0], loss
    mse = [float(r["val_mse"]) for r in rows if r["val_mse"]]
    assert len(mse) == 2 and mse[1] < mse[0], mse
    assert all(float(r["tokens_per_s"]) > 0 for r in rows if r["loss"])
    s = summary(tmp_path / "z3")
    assert s["final_mse"] == mse[-1] and s["final_top1"] is None and s["tokens_per_s"] == pytest.approx(16 * s["img_per_s"])
    assert "val next-patch MSE" in proc.stdout


@pytest.mark.slow
@pytest.mark.multirank
def test_resume_is_bitwise_with_offload_and_ema(digits_dir, tmp_path):
    common = ["run.max_steps=8", "checkpoint.every_steps=4", "checkpoint.keep=5", "model.drop_path_rate=0.1",
              "parallel.zero_stage=2", "parallel.offload=cpu", "optim.ema_decay=0.9", "run.eval_every=8"]
    launch(aim_args(digits_dir, tmp_path, "straight", *common), timeout=600)
    args = aim_args(digits_dir, tmp_path, "interrupted", *common)
    crashed = launch(args, env=run_env(DISTVIT_TEST_FAULT="kill_at_step:6:1"), check=False, timeout=600)
    assert crashed.returncode != 0
    launch(args + ["--resume", "auto"], timeout=600)
    assert losses(tmp_path / "interrupted") == losses(tmp_path / "straight")
    a, b = load_weights(tmp_path / "straight" / "model.safetensors"), load_weights(tmp_path / "interrupted" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    last = read_metrics(tmp_path / "straight")[-1]
    assert float(last["ema_val_mse"]) > 0 and last["ema_val_mse"] == read_metrics(tmp_path / "interrupted")[-1]["ema_val_mse"]


@pytest.mark.slow
@pytest.mark.multirank
@pytest.mark.parametrize("impl", ["ring", "ulysses"])  # ring: the zig-zag layout
def test_sp2_zero2_equals_single_process(digits_dir, tmp_path, impl):
    args = aim_args(digits_dir, tmp_path, "sp", "parallel.zero_stage=2", "parallel.sp_size=2", f"parallel.sp_impl={impl}",
                    "task.prefix_patches=0", "task.norm_pix=true")
    proc = launch(args, timeout=600)
    assert "dp=1 sp=2" in proc.stdout
    _equals_reference(tmp_path / "sp", args, dp_size=1)


@pytest.mark.multirank
@pytest.mark.parametrize("stage", [pytest.param(0, marks=pytest.mark.slow), 1, 3])
def test_dp2_prefix_normalised_targets_equal_single_process(digits_dir, tmp_path, stage):
    args = aim_args(digits_dir, tmp_path, "dp", f"parallel.zero_stage={stage}", "task.prefix_patches=6",
                    "task.norm_pix=true")
    launch(args)
    _equals_reference(tmp_path / "dp", args, dp_size=2)


@pytest.mark.parametrize("sets,message", [
    (["--config", "demo_digits", "model.name=vit_causal_digits"],
     "bad value for config key 'model.name' (from --set model.name=vit_causal_digits): vit_causal_digits is an "
     "autoregressive next-patch model with no classifier; set task.kind=autoregressive (e.g. --config aim_digits), "
     "or pick a classifier such as vit_digits"),
    (["--config", "aim_digits", "model.name=vit_digits"],
     "bad value for config key 'task.kind' (from {aim}): autoregressive needs a causal model, but "
     "model.name=vit_digits; set model.name to one of vit_causal_base_patch16_224, vit_causal_digits"),
    (["--config", "aim_digits", "parallel.sp_size=2", "task.prefix_patches=4"],
     "bad value for config key 'task.prefix_patches' (from --set task.prefix_patches=4): 4 with "
     "task.kind=autoregressive: prefix attention is not sequence-parallel yet; set task.prefix_patches=0 or "
     "parallel.sp_size=1"),
    (["--config", "aim_digits", "data.mixup=0.8"],
     "bad value for config key 'data.mixup' (from --set data.mixup=0.8): 0.8 with task.kind=autoregressive: mixing "
     "images and labels is for classification; set it to 0"),
    (["--config", "demo_digits", "task.prefix_patches=3"],
     "bad config (task.kind from defaults, task.prefix_patches from --set task.prefix_patches=3): task.prefix_patches=3 applies to next-patch "
     "prediction; set task.kind=autoregressive (with a vit_causal_* model) or task.prefix_patches=0"),
])
def test_task_misfits_are_one_line(sets, message):
    from distvit.config import CONFIG_DIR

    config, overrides = sets[1], sets[2:]
    with pytest.raises(ConfigError) as err:
        load_config(config, overrides)
    assert str(err.value) == message.format(aim=CONFIG_DIR / "aim_digits.yaml")


def test_prefix_beyond_the_image_is_one_line(digits_dir):
    from distvit.engine.build import build_model

    cfg = load_config("aim_digits", ["task.prefix_patches=16", f"data.train={digits_dir}/train-*.tar"])
    with pytest.raises(ConfigError, match=r"^CausalViT: prefix_patches=16 \(task.prefix_patches\) must be in \[0, 15\]"):
        build_model(cfg)


def test_causal_model_named_on_the_demo_config_builds(digits_dir):
    # What a user tries first: the classifier demo with the causal model and the task switched.
    from distvit.engine.build import build_model
    from distvit.models.causal_vit import CausalViT

    cfg = load_config("demo_digits", ["model.name=vit_causal_digits", "task.kind=autoregressive",
                                      f"data.train={digits_dir}/train-*.tar"])
    model = build_model(cfg)
    assert isinstance(model, CausalViT)
    assert (model.cfg.img_size, model.cfg.in_chans, model.cfg.drop_path_rate, model.prefix_patches) == (8, 1, 0.1, 0)
