# `make demo`: fresh machine -> virtual environment -> patched open_clip_train -> the whole ParaCLIP demo.
# `make test`: fresh machine -> virtual environment -> the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first and pinned: the CPU machines here install torch 2.14.1 from local disk.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: venv demo test clean wheelhouse gpu-check

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
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# the GPU proof (scripts/gpu_check.sh): `make wheelhouse` here, then `make gpu-check` on the GPU
# machine with .whl/ carried along (it has no package index); OUT= names the results folder
wheelhouse: venv
	PYTHON=$(BIN)/python bash scripts/wheelhouse.sh

gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) demo_output
