"""The newcomer's path as the README writes it (issue 20): `make demo`, then the next commands on
`runs/demo_digits`, distillation and fine-tuning from the demo's weights, eval and predict.

`demo_run` runs the real `make demo` once (DEMO_EPOCHS=6, enough to fine-tune from) in a copy of the project files, with the
shared venv as VENV (its install stamps are kept newer than the copied pyproject.toml, so make installs
nothing) and this checkout first on PYTHONPATH.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from distvit.run_link import link_run
from trainer_helpers import ROOT, run_env, summary

VENV = Path(sys.executable).parent.parent
BIN = Path(sys.executable).parent


def _run(cmd: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = run_env(PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, digits_dir):
    """A project copy after `make demo DEMO_EPOCHS=6`: (project dir, make's stdout)."""
    if not (VENV / ".installed").is_file():
        pytest.skip(f"{VENV} has no make install stamp")
    proj = tmp_path_factory.mktemp("project")
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, proj / name)
    os.utime(proj / "pyproject.toml", (0, 0))  # older than the venv's stamps: make installs nothing
    for name in ("configs", "launch"):
        shutil.copytree(ROOT / name, proj / name)
    (proj / "data").mkdir()
    (proj / "data" / "digits").symlink_to(digits_dir, target_is_directory=True)
    proc = _run(["make", "demo", f"VENV={VENV}", "DEMO_EPOCHS=6", "RUN_NAME=demo_digits-test"], proj, timeout=900)
    return proj, proc.stdout


@pytest.mark.slow
@pytest.mark.multirank
def test_make_demo_links_runs_demo_digits_and_the_next_commands_work(demo_run):
    proj, out = demo_run
    assert "run folder: runs/demo_digits-test (linked as runs/demo_digits" in out
    assert (proj / "runs" / "demo_digits").is_symlink()
    assert summary(proj / "runs" / "demo_digits")["epochs"] == pytest.approx(6.0)
    inspect = _run([str(BIN / "distvit"), "ckpt", "inspect", "runs/demo_digits/checkpoints"], proj)
    assert "step" in inspect.stdout
    # configs/deit_digits_distill.yaml reads runs/demo_digits/model.safetensors: it starts and trains.
    _run([str(BIN / "distvit"), "train", "--config", "configs/deit_digits_distill.yaml", "--set", "run.max_steps=2",
          "--set", "log.progress=false", "--set", "checkpoint.export=false"], proj)
    assert summary(proj / "runs" / "deit_digits_distill")["steps"] == 2


def test_link_run_replaces_the_link_and_leaves_a_real_folder(tmp_path):
    for name in ("a", "b", "real"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text("run: {}\n")
    link = tmp_path / "demo"
    assert "linked as" in link_run(tmp_path / "a", link)
    assert os.readlink(link) == "a"
    link_run(tmp_path / "b", link)
    assert os.readlink(link) == "b" and (link / "config.yaml").is_file()
    assert "left as it is" in link_run(tmp_path / "a", tmp_path / "real")
    assert not (tmp_path / "real").is_symlink()
    with pytest.raises(FileNotFoundError, match="is not a run folder"):
        link_run(tmp_path / "nope", link)


def test_makefile_knobs_and_readme_paths_agree():
    dry = subprocess.run(["make", "-n", "demo", f"VENV={VENV}", "RUN_NAME=r1", "DEMO_EPOCHS=3"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert "--set run.name=r1 --set run.epochs=3" in dry
    assert "-m distvit.run_link runs/r1 runs/demo_digits" in dry
    readme = (ROOT / "README.md").read_text()
    assert "distvit ckpt inspect runs/demo_digits/checkpoints" in readme
    assert "DEMO_EPOCHS" in readme
    assert "runs/demo_digits/model.safetensors" in (ROOT / "configs" / "deit_digits_distill.yaml").read_text()


@pytest.mark.slow
@pytest.mark.multirank
def test_eval_and_predict_on_the_demo_run(demo_run, digits_dir):
    proj, _ = demo_run
    s = summary(proj / "runs" / "demo_digits")
    out = _run([str(BIN / "distvit"), "eval", "--checkpoint", "runs/demo_digits", "--data", "data/digits/val-*.tar"], proj).stdout
    # The same top-1 as the trainer's own validation at the end of the run (same samples, same preprocessing).
    assert f"top-1 {s['final_top1']:.2f}%" in out and "360 images" in out
    assert (proj / "runs" / "demo_digits" / "eval" / "confusion.png").is_file()
    import tarfile

    with tarfile.open(sorted(digits_dir.glob("val-*.tar"))[0]) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".png"))
        (proj / "digit.png").write_bytes(tar.extractfile(member).read())
    out = _run([str(BIN / "distvit"), "predict", "--checkpoint", "runs/demo_digits", "--top-k", "2", "digit.png"], proj).stdout
    assert out.startswith("digit.png: ") and out.count("(") == 2


@pytest.mark.slow
@pytest.mark.multirank
def test_finetune_config_trains_the_demo_weights_onto_5_classes(demo_run):
    proj, _ = demo_run
    out = _run([str(BIN / "distvit"), "data", "write", "digits", "--classes", "5", "--out", "data/digits5",
                "--no-progress"], proj).stdout
    assert "classes: 5" in out
    proc = _run([str(BIN / "distvit"), "train", "--config", "configs/finetune_digits.yaml", "--set", "log.progress=false",
                 "--set", "run.epochs=2"], proj)
    text = proc.stdout + proc.stderr
    assert text.count("classifier re-initialised for 5 classes (the file's has 10): head.weight, head.bias") == 1
    s = summary(proj / "runs" / "finetune_digits")
    # The same 2 epochs from scratch: the demo's trunk is what makes the difference.
    _run([str(BIN / "distvit"), "train", "--config", "configs/finetune_digits.yaml", "--set", "log.progress=false",
          "--set", "run.epochs=2", "--set", "model.checkpoint=null", "--set", "run.name=scratch"], proj)
    scratch = summary(proj / "runs" / "scratch")
    print("demo", summary(proj / "runs" / "demo_digits")["final_top1"], "fine-tuned", s["final_top1"], "scratch", scratch["final_top1"])
    # Measured once (2 busy cores): demo 50.3%, fine-tuned 71.3%, scratch 26.0% top-1 (deterministic on CPU).
    assert s["status"] == "finished" and s["final_top1"] > scratch["final_top1"] + 20, (s, scratch)
    from distvit import models
    from trainer_helpers import load_weights

    demo, tuned = load_weights(proj / "runs" / "demo_digits" / "model.safetensors"), load_weights(proj / "runs" / "finetune_digits" / "model.safetensors")
    assert tuned["head.weight"].shape == (5, 64) and demo["head.weight"].shape == (10, 64)
    models.create("vit_digits", num_classes=5, checkpoint=str(proj / "runs" / "finetune_digits" / "model.safetensors"))


def test_base_finds_a_shipped_config_by_name(tmp_path):
    from distvit.config import ConfigError, load_config

    mine = tmp_path / "mine.yaml"
    mine.write_text("base: demo_digits\nrun: {name: mine}\n")
    cfg = load_config(mine)
    assert cfg.run.name == "mine" and cfg.model.name == "vit_digits" and cfg.optim.lr == 2e-3
    (tmp_path / "local.yaml").write_text("run: {seed: 7}\n")
    mine.write_text("base: [demo_digits.yaml, local.yaml]\n")  # a file next to it still wins over nothing
    assert load_config(mine).run.seed == 7 and load_config(mine).run.epochs == 30
    mine.write_text("base: demo_digit\n")
    with pytest.raises(ConfigError, match=r"base 'demo_digit' not found .* name a shipped config: .*demo_digits.yaml"):
        load_config(mine)


@pytest.mark.slow
def test_resuming_a_finished_run_says_so_in_one_line(digits_dir, tmp_path):
    from trainer_helpers import launch

    sets = [f"run.output_dir={tmp_path}", "run.name=done", "run.max_steps=2", "log.progress=false",
            "log.tensorboard=false", f"data.train={digits_dir}/train-*.tar", "data.val=null", "checkpoint.export=false"]
    args = ["--config", "demo_digits"] + [a for s in sets for a in ("--set", s)]
    launch(args, launcher="distvit")
    before = (tmp_path / "done" / "summary.json").read_text()
    proc = launch(args + ["--resume", "auto"], launcher="distvit")
    lines = [line for line in proc.stdout.splitlines() if "nothing to train" in line]
    assert lines == [f"nothing to train: {tmp_path}/done/checkpoints/step_00000002 is at step 2 and run.max_steps=2 "
                     f"ends the run at step 2; its results are in {tmp_path}/done; raise run.max_steps to train further"]
    assert "done: finished" not in proc.stdout and "img/s" not in proc.stdout
    assert (tmp_path / "done" / "summary.json").read_text() == before
