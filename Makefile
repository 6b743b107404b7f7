# Two commands on a fresh machine (Python 3.10+, pip, make):
#   make demo   set up .venv and run the main job: the digits demo on 2 CPU ranks (torchrun, DeepSpeed ZeRO-2)
#   make test   set up .venv with the dev extras and run the whole test suite
# On a GPU machine without a package registry (README, "GPU check"):
#   make wheelhouse   (on a connected machine) the wheels such a machine lacks, into wheelhouse/
#   make gpu-check    (on the GPU machine) install from wheelhouse/ offline, pytest -m gpu, benchmarks
# Re-running either when nothing changed does not reinstall (stamp files in .venv).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
# The CPU build of torch this project pins for its own machines (a range in pyproject admits it).
TORCH_PIN := torch==2.13.0
# timm is a test-time reference only, installed beside the venv (not into it: accelerate's CLI
# imports timm when it is installed, and timm needs torchvision, which cannot load beside the CPU
# torch pin). --no-deps for the same reason; tests stub torchvision for timm's model code.
TIMM_PIN  := timm==1.0.31
TIMM_DIR  := $(VENV)/reference
RUN_NAME  ?= demo_digits-$(shell date +%Y%m%d-%H%M%S)
DEMO_LINK ?= runs/demo_digits# points at the newest demo run (the README's next commands use it)
DEMO_EPOCHS ?= 30# e.g. make demo DEMO_EPOCHS=3 for a shorter demo
DEMO_RANKS ?= 2
PYTEST_ARGS ?=
WHEELHOUSE ?= wheelhouse

.PHONY: demo test test-fast bench install install-dev clean help wheelhouse gpu-check

help:
	@echo "make demo | make test | make test-fast | make bench | make clean | make wheelhouse | make gpu-check"

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) install $(TORCH_PIN)
	$(PIP) install -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(PIP) install -e '.[dev]'
	$(PIP) install --no-deps --target $(TIMM_DIR) $(TIMM_PIN)
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

data/digits/dataset.json: | $(VENV)/.installed
	$(VENV)/bin/distvit data write digits --out data/digits

# torchrun, not the `deepspeed` launcher: torchrun passes SIGTERM on to every rank (they save and
# exit); the single-host `deepspeed` runner dies alone and leaves its ranks training (docs/reliability.md).
demo: $(VENV)/.installed data/digits/dataset.json
	DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 $(VENV)/bin/distvit torchrun --nproc-per-node $(DEMO_RANKS) --master-port $$($(PY) -c 'import distvit.parallel.mesh as d; print(d.free_port())') \
		launch/train.py --config configs/demo_digits.yaml --set run.name=$(RUN_NAME) --set run.epochs=$(DEMO_EPOCHS)
	$(PY) -m distvit.run_link runs/$(RUN_NAME) $(DEMO_LINK)

test: $(VENV)/.installed-dev
	-bash tests/ops/install_ops_deps.sh  # Slurm + Open MPI for tests/test_slurm.py, test_mpi.py, test_multinode.py (they skip, saying why, if this fails; test_multinode starts and removes its two-node namespace cluster itself)
	DS_ACCELERATOR=cpu $(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(VENV)/.installed-dev
	DS_ACCELERATOR=cpu $(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: $(VENV)/.installed-dev
	DS_ACCELERATOR=cpu $(PY) benchmarks/data_throughput.py
	DS_ACCELERATOR=cpu $(PY) benchmarks/trainer_overhead.py

# The versions pinned are the ones in .venv (make install first); DeepSpeed's wheel is built from its sdist.
wheelhouse: | $(PY)
	bash benchmarks/wheelhouse.sh $(PY) $(WHEELHOUSE)

# Runs with the GPU machine's own python ($(PYTHON)) and CUDA torch; never touches .venv.
gpu-check:
	bash benchmarks/gpu_check.sh $(PYTHON) $(WHEELHOUSE)

clean:
	rm -rf $(VENV) build *.egg-info
