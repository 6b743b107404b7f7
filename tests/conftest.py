import os
import sys

import pytest

# Tests run on the CPU with DeepSpeed's CPU accelerator and few threads (2-core CI machine).
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="session")
def timm_module():
    from torchvision_stub import import_timm

    timm = import_timm()
    if timm is None:
        pytest.skip("timm is not installed (make test installs it with --no-deps)")
    return timm


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    """The demo's digits shards, written once per test session (read-only for the tests), or
    DISTVIT_DIGITS_DIR when set: make gpu-check sets it to the copy make wheelhouse wrote, as the GPU
    machine has no scikit-learn to write them."""
    shipped = os.environ.get("DISTVIT_DIGITS_DIR")
    if shipped:
        from pathlib import Path

        if not (Path(shipped) / "dataset.json").is_file():
            pytest.fail(f"DISTVIT_DIGITS_DIR={shipped} holds no dataset.json; run make wheelhouse again")
        return Path(shipped)
    from distvit.data import write_digits

    out = tmp_path_factory.mktemp("digits")
    write_digits(out)
    return out
