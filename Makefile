# make demo: install, then a quick study on the embedded synthetic set and its ensemble.
# make test: install, then the whole test suite (what CI runs).
# make test-fast: the tests not marked slow: tiny data, real stores, no study training.
# make lock: re-resolve requirements.lock from pyproject.toml, keeping its pins where the ranges still
# admit them; make upgrade-lock: the newest releases the ranges admit. Both need uv on PATH.
VENV ?= .venv
PYTHON ?= python3
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install demo test test-fast bench stores lock upgrade-lock

# The locked versions of everything, then the project itself on top (its ranges are already met).
$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -r requirements.lock
	$(VENV)/bin/python -m pip install -qq --no-deps -e .  # -qq: keeps setuptools' editable-install notice out of the output
	touch $@

install: $(VENV)/.installed

demo: install
	mlflow run . -e train -P preset=quick --env-manager local
	python -m emnist_exp.ensemble --study quick --top 3
	@echo "see the runs: .venv/bin/mlflow ui, then the address printed above"

test: install
	python -m pytest -q

test-fast: install
	python -m pytest -q -m "not slow"

bench: install
	python benchmarks/pipeline.py

# The local stores (mlflow.db, optuna.db), created once under a lock before `mlflow run` workers start together.
stores: install
	python -m emnist_exp.stores

# One lock for every platform (markers), for the Python of conda.yaml and the Dockerfile.
LOCK_COMMAND = uv pip compile pyproject.toml --extra test --universal --python-version 3.11 \
	--custom-compile-command "make lock" --quiet -o requirements.lock
lock:
	$(LOCK_COMMAND)
upgrade-lock:
	$(LOCK_COMMAND) --upgrade
