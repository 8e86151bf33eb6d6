# Two commands do all the set-up on a fresh machine:
#   make demo   the demo federation on bundled data, on this CPU
#   make test   the test suite (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# The CPU build of torch: pinned so that a fresh install never pulls a CUDA build.
TORCH   = torch==2.13.0

.PHONY: demo test lint bench setup clean

$(BIN)/atoll: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check "$(TORCH)" -e ".[dev]"
	@touch $@

setup: $(BIN)/atoll

demo: $(BIN)/atoll
	$(BIN)/atoll demo

test: $(BIN)/atoll
	$(BIN)/ruff check atoll bench tests
	$(BIN)/python -m pytest -q

bench: $(BIN)/atoll
	$(BIN)/python bench/overhead.py

clean:
	rm -rf $(VENV) runs .pytest_cache
