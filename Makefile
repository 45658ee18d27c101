# Two entry points for a newcomer: `make demo` (generate with the embedded model) and `make test`.
# Everything installs into .venv from scratch; torch is installed first and pinned, because an
# unpinned torch pulls several GB of CUDA packages.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv
PY := $(VENV)/bin/python
PROMPT ?= a red circle moving right on a blue background

.PHONY: setup demo demo-model test test-slow test-parallel clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

# outputs/demo.mp4 is replaced on each run: without --overwrite, a new PROMPT would be skipped as already written.
demo: setup
	$(VENV)/bin/dit generate "$(PROMPT)" -o outputs/demo.mp4 --overwrite $(if $(MODEL),--model $(MODEL))

# Retrain the embedded demo model from scratch (VAE, base transformer, relay stage) into dit/assets/demo;
# resumes where it stopped. See docs/demo_model.md.
demo-model: setup
	OMP_NUM_THREADS=2 $(PY) -m dit.demo.build

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

test-parallel: setup
	$(PY) -m pytest -q -m parallel

clean:
	rm -rf $(VENV) .pytest_cache
