# `make demo` and `make test` each create .venv and install what they need on first use.
# torch: an already importable torch (e.g. a CUDA build you installed into .venv first) is kept; otherwise
# TORCH_SPEC is tried (a CPU wheel), then the CPU-only index, so a CPU machine never downloads a CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.rf-installed

.PHONY: install demo test lint format clean

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)" \
		|| $(PY) -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
	$(PY) -m pip install -q -e ".[dev,tensorboard,wandb]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/quickstart.py

test: $(STAMP)
	$(PY) -m pytest -q

# mypy: the public API as a user's script calls it (tests/typecheck_public_api.py; settings in pyproject.toml)
lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) out rf_demo_out .pytest_cache .mypy_cache
