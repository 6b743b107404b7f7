"""The DeepSpeed config generated from ours: stages, precision, offload, user JSON merge and conflicts."""
import json

import pytest
import torch

from distvit.config import ConfigError, load_config
from distvit.parallel.deepspeed_config import DEEPSPEED_SUB_GROUP_SIZE, build_ds_config

CPU = torch.device("cpu")


def ds(*overrides, **kw):
    return build_ds_config(load_config(None, list(overrides)), CPU, **kw)


def test_batch_accumulation_and_clipping():
    c = ds("data.batch_size=48", "parallel.grad_accum=4", "optim.grad_clip=0.5")
    assert c["train_micro_batch_size_per_gpu"] == 48
    assert c["gradient_accumulation_steps"] == 4
    assert c["gradient_clipping"] == 0.5
    # 0 (off) must be explicit: DeepSpeed 0.19 clips at norm 1.0 when the key is absent
    assert ds("optim.grad_clip=null")["gradient_clipping"] == 0.0
    assert ds("optim.grad_clip=0.5", "optim.clip_mode=value")["gradient_clipping"] == 0.0  # engine/optim.py clamps


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage(stage):
    z = ds(f"parallel.zero_stage={stage}")["zero_optimization"]
    assert z["stage"] == stage
    assert ("sub_group_size" in z) == (stage == 3)


def test_precision_auto_is_fp32_on_cpu_and_bf16_explicit():
    c = ds()
    assert not c["bf16"]["enabled"] and not c["fp16"]["enabled"]
    assert ds("parallel.precision=bf16")["bf16"]["enabled"]
    with pytest.raises(ConfigError, match="parallel.precision=bf16 on the CPU needs parallel.zero_stage >= 1"):
        ds("parallel.precision=bf16", "parallel.zero_stage=0")


def test_stock_cpu_offload():
    z = ds("parallel.offload=cpu")["zero_optimization"]
    assert z["offload_optimizer"]["device"] == "cpu"
    assert z["offload_optimizer"]["ratio"] == 1.0
    assert "offload_optimizer" not in ds("parallel.offload=none")["zero_optimization"]


def test_partial_offload_is_deepspeed_ratio():
    z = ds("parallel.zero_stage=3", "parallel.offload=partial", "parallel.offload_gpu_fraction=0.25")["zero_optimization"]
    assert z["offload_optimizer"]["device"] == "cpu"
    assert z["offload_optimizer"]["ratio"] == 0.75  # DeepSpeed's ratio is the CPU share


def test_sub_group_size_auto():
    z = ds("parallel.zero_stage=3", "parallel.offload=cpu", elements_per_rank=80_000)["zero_optimization"]
    assert z["sub_group_size"] == DEEPSPEED_SUB_GROUP_SIZE  # stock behaviour unless interleaved
    z = ds("parallel.zero_stage=3", "parallel.offload=interleaved", elements_per_rank=80_000)["zero_optimization"]
    assert z["sub_group_size"] == 10_000  # about 1/8 of a rank's elements: something to interleave
    assert z["offload_optimizer"]["device"] == "cpu"
    z = ds("parallel.zero_stage=3", "parallel.offload=interleaved", "parallel.sub_group_size=1234",
           elements_per_rank=80_000)["zero_optimization"]
    assert z["sub_group_size"] == 1234  # an explicit value wins


def test_user_json_merges_new_keys(tmp_path):
    f = tmp_path / "extra.json"
    f.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 12345}, "flops_profiler": {"enabled": True}}))
    c = ds(f"parallel.deepspeed_extra={f}")
    assert c["zero_optimization"]["reduce_bucket_size"] == 12345
    assert c["zero_optimization"]["stage"] == 2
    assert c["flops_profiler"] == {"enabled": True}


def test_user_json_conflict_is_an_error_naming_both(tmp_path):
    f = tmp_path / "extra.json"
    f.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 7}))
    with pytest.raises(ConfigError) as e:
        ds(f"parallel.deepspeed_extra={f}")
    msg = str(e.value)
    assert "zero_optimization.stage is 3 in the JSON but 2 from distvit" in msg
    assert "train_micro_batch_size_per_gpu is 7 in the JSON but 64 from distvit" in msg
    assert "set these in the distvit config" in msg


def test_user_json_missing_or_invalid(tmp_path):
    with pytest.raises(ConfigError, match="parallel.deepspeed_extra: '/nope.json' not found"):
        ds("parallel.deepspeed_extra=/nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        ds(f"parallel.deepspeed_extra={bad}")


def test_harmless_keys_take_the_users_value_inline_or_from_a_file(tmp_path):
    """Issue 20: wall_clock_breakdown / steps_per_print were refused with advice to set distvit keys that do not exist."""
    extra = {"wall_clock_breakdown": True, "steps_per_print": 50, "zero_optimization": {"overlap_comm": True},
             "fp16": {"initial_scale_power": 12}}
    f = tmp_path / "extra.json"
    f.write_text(json.dumps(extra))
    inline = "parallel.deepspeed_extra=" + json.dumps(extra)  # --set parses it as a YAML mapping
    quoted = "parallel.deepspeed_extra='" + json.dumps(extra) + "'"  # ... or quoted: JSON text
    for override in (f"parallel.deepspeed_extra={f}", inline, quoted):
        c = ds(override)
        assert c["wall_clock_breakdown"] is True and c["steps_per_print"] == 50, override
        assert c["zero_optimization"]["overlap_comm"] is True and c["zero_optimization"]["stage"] == 2
        assert c["fp16"]["initial_scale_power"] == 12 and c["fp16"]["enabled"] is False


def test_true_conflicts_name_the_distvit_key_to_set():
    with pytest.raises(ConfigError) as e:
        ds('parallel.deepspeed_extra={"gradient_clipping": 5.0, "bf16": {"enabled": true}, '
           '"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}')
    msg = str(e.value)
    assert msg.startswith("parallel.deepspeed_extra (inline) conflicts with the distvit config: ")
    assert "gradient_clipping is 5.0 in the JSON but 1.0 from distvit (set optim.grad_clip)" in msg
    assert "bf16.enabled is True in the JSON but False from distvit (set parallel.precision)" in msg
    assert "zero_optimization.offload_optimizer is {'device': 'cpu'} in the JSON but derived by distvit (set parallel.offload)" in msg
    # Repeating a value distvit generates is no conflict.
    assert ds('parallel.deepspeed_extra={"zero_optimization": {"stage": 2}}')["zero_optimization"]["stage"] == 2
    with pytest.raises(ConfigError, match=r"inline JSON .* is not valid JSON .*quote it for the shell"):
        ds("parallel.deepspeed_extra='{steps_per_print: 5'")
