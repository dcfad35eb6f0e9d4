# `make demo`: fresh machine -> virtual environment -> patched open_clip_train -> the whole ParaCLIP demo.
# `make test`: fresh machine -> virtual environment -> ruff (lint, format check), the test suite, then open_clip's own tests on the
# patched install (tests/open_clip_suite.py); all three always run, each reports on its own, any failing fails.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first and pinned: the CPU machines here install torch 2.14.1 from local disk.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# pytest-xdist processes for `make test`'s suite (2: the 2-core CI machine; most of a test is process start-up)
PYTEST_WORKERS ?= 2

.PHONY: venv demo test test-slurm test-open-clip clean wheelhouse gpu-check

$(BIN)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/paraclip-patch apply
	$(BIN)/python -m paraclip_plugin.demo $(DEMO_ARGS)

test: venv
	status=0; \
	$(BIN)/ruff check . && $(BIN)/ruff format --check . || status=$$?; \
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist worksteal $(PYTEST_ARGS) || status=$$?; \
	$(BIN)/python tests/open_clip_suite.py -q $(OPEN_CLIP_TEST_ARGS) || status=$$?; \
	exit $$status

# the sbatch recipes on a one-host SLURM cluster (scripts/slurm_cluster.sh: root, installs slurm-wlm + munge
# when missing, stops its daemons at the end); the `slurm` tests are left out of `make test`
test-slurm: venv
	bash scripts/slurm_cluster.sh $(BIN)/python -m pytest -q -m slurm tests/test_slurm_jobs.py $(PYTEST_ARGS)

test-open-clip: venv
	$(BIN)/python tests/open_clip_suite.py -q $(OPEN_CLIP_TEST_ARGS)

# the GPU proof (scripts/gpu_check.sh): `make wheelhouse` here, then `make gpu-check` on the GPU
# machine with .whl/ carried along (it has no package index); OUT= names the results folder
wheelhouse: venv
	PYTHON=$(BIN)/python bash scripts/wheelhouse.sh

gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) demo_output
