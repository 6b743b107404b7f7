"""docs/reliability.md, "Config checks at load": the rejections it lists that tests/test_config.py's table
does not already hold (optim.eps, a negative schedule.min_lr, model.in_chans against data.in_chans)."""
import pytest

from distvit.config import ConfigError, load_config


@pytest.mark.parametrize("override, expected", [
    ("optim.eps=0", "bad value for config key 'optim.eps' (from --set optim.eps=0): must be > 0, got 0.0"),
    ("optim.eps=-1e-8", "bad value for config key 'optim.eps' (from --set optim.eps=-1e-8): must be > 0"),
    ("schedule.min_lr=-1", "bad value for config key 'schedule.min_lr' (from --set schedule.min_lr=-1): must be >= 0"),
    ("model.in_chans=3", "bad value for config key 'model.in_chans' (from --set model.in_chans=3): 3, but the data "
                         "loader yields data.in_chans=1 (from defaults); set both to the same value, or leave "
                         "model.in_chans unset (it follows data.in_chans)"),
])
def test_rejected_at_load_in_one_line(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value).startswith(expected) and "\n" not in str(e.value)


def test_in_chans_equal_to_the_datas_or_unset_loads():
    assert load_config(None, ["model.in_chans=1"]).model.in_chans == 1
    assert load_config(None, []).model.in_chans is None  # follows data.in_chans
