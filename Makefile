# Every target creates or reuses .venv; `make demo` and `make test` work from a fresh clone.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.bertforge-installed
# Olive (a benchmark peer) lives in its own environment: olive-ai pins its own dependency ranges.
OLIVE_VENV := .venv-olive
OLIVE_STAMP := $(OLIVE_VENV)/.installed

.PHONY: demo test test-avx2 test-avx512 bench lint clean

$(STAMP): pyproject.toml requirements-demo.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned: it must be the CPU build (TORCH_INDEX: a CPU-only wheel index, where pip's
	# own index would serve the CUDA build)
	$(BIN)/python -m pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps --require-hashes -r requirements-demo.txt
	touch $(STAMP)

$(OLIVE_STAMP): benchmarks/requirements-olive.txt
	test -x $(OLIVE_VENV)/bin/python || $(PY) -m venv $(OLIVE_VENV)
	$(OLIVE_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(OLIVE_VENV)/bin/python -m pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(OLIVE_VENV)/bin/python -m pip install --quiet -r benchmarks/requirements-olive.txt
	touch $(OLIVE_STAMP)

demo: $(STAMP)
	$(BIN)/bertforge build --recipe configs/demo.yaml --out out/demo

test: $(STAMP)
	$(BIN)/python -m pytest

# The suite as an AVX2-only CPU sees it (no AVX-512, VNNI, AMX), on an x86 machine with CPUID faulting;
# test-avx512: as an AVX-512 CPU without VNNI (a Skylake-SP). tools/as-cpu says how.
test-avx2: $(STAMP)
	tools/as-avx2 $(BIN)/python -m pytest

test-avx512: $(STAMP)
	tools/as-cpu avx512 $(BIN)/python -m pytest

bench: $(STAMP) $(OLIVE_STAMP)
	$(BIN)/python benchmarks/run.py --olive-python $(OLIVE_VENV)/bin/python

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf out .pytest_cache $(OLIVE_VENV)
