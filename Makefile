# Two commands do all the set-up on a fresh machine:
#   make demo   the demo federation on bundled data, on this CPU
#   make test   ruff and the whole test suite (what CI runs)
# and the quick loop while developing:
#   make check  ruff and the tests not marked slow (under 3 minutes on 2 cores)
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# The CPU build of torch: pinned so that a fresh install never pulls a CUDA build.
TORCH   = torch==2.13.0

.PHONY: demo test check lint bench setup clean

$(BIN)/atoll: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check "$(TORCH)" -e ".[dev]"
	@touch $@

setup: $(BIN)/atoll

demo: $(BIN)/atoll
	$(BIN)/atoll demo

# Two pytest-xdist workers, one a core; tests of real Flower processes run one at a time on
# one of them (tests/conftest.py).
PYTEST  = $(BIN)/python -m pytest -q -n 2 --dist loadgroup

test: $(BIN)/atoll
	$(BIN)/ruff check atoll bench tests
	$(PYTEST)

check: $(BIN)/atoll
	$(BIN)/ruff check atoll bench tests
	$(PYTEST) -m "not slow"

bench: $(BIN)/atoll
	$(BIN)/python bench/overhead.py

clean:
	rm -rf $(VENV) runs .pytest_cache
