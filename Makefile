# moerail: every target does its own set-up into .venv on a fresh machine.
#   make demo    build, install and run the example MoE training (4 ranks, 2 virtual nodes)
#   make test    build, then cargo test and pytest (against Megatron-Core 0.16 and 0.19)
#   make bench   benchmarks against Megatron-Core in the same run -> benches/BENCHMARKS.md
#   make lint    cargo fmt --check, cargo clippy -D warnings, ruff
#   make wheel   the manylinux_2_17 abi3 wheel and the sdist -> dist/ (maturin --zig, auditwheel show)
#   make docs    the API reference from the docstrings -> site/ (mkdocs --strict)
#   make gpu-bundle  the offline bundle for benches/gpu_check.sh on a GPU machine -> gpu-bundle/
#   make stubs   regenerate the type stubs of moerail._native from the built extension
#   make fuzz    the fuzzers for FUZZ_MINUTES (default 20): the core's harness (cargo, overflow checks
#                on) with fresh seeds, then every Python entry point in a child process

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# Rust build products live outside the clone so fresh clones reuse them.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/moerail/target
# Megatron-Core >= 0.17 (5-tuple permute) declares Python >= 3.12 but its moe_utils runs on
# 3.11: it is unpacked beside the venv so the tests compare against both APIs.
MCORE_NEXT_VERSION ?= 0.19.2
MCORE_NEXT := $(VENV)/megatron-core-$(MCORE_NEXT_VERSION)

DEPS_STAMP := $(VENV)/.deps-stamp
BUILD_STAMP := $(VENV)/.build-stamp
RUST_SOURCES := $(shell find rust -name '*.rs' -o -name Cargo.toml 2>/dev/null) Cargo.toml pyproject.toml

.PHONY: all setup build demo test test-rust test-python test-dist bench lint fmt clean gpu-bundle wheel docs stubs fuzz

all: test

$(DEPS_STAMP): requirements-dev.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check -r requirements-dev.txt
	@touch $@

$(MCORE_NEXT)/.stamp: $(DEPS_STAMP)
	@rm -rf $(MCORE_NEXT)
	$(PIP) install -q --disable-pip-version-check --no-deps --ignore-requires-python \
		--target $(MCORE_NEXT) megatron-core==$(MCORE_NEXT_VERSION)
	@touch $@

# MindSpore (CPU wheel, ~800 MB) for the MindSpore integration tests; where it cannot be installed
# those tests skip and say why.
MINDSPORE_STAMP := $(VENV)/.mindspore-stamp
$(MINDSPORE_STAMP): $(DEPS_STAMP)
	$(PIP) install -q --disable-pip-version-check mindspore || echo "mindspore did not install: its tests will skip"
	@touch $@

$(BUILD_STAMP): $(DEPS_STAMP) $(RUST_SOURCES)
	VIRTUAL_ENV=$(abspath $(VENV)) PATH=$(abspath $(VENV))/bin:$$PATH $(VENV)/bin/maturin develop --release -q
	@touch $@

setup: $(BUILD_STAMP) $(MCORE_NEXT)/.stamp $(MINDSPORE_STAMP)

build: $(BUILD_STAMP)

demo: $(BUILD_STAMP)
	$(PY) examples/train_moe_ep.py --out out/demo

# CUDA 12's NVRTC (the one torch's cu12x wheels bring), so the kernels' compile check runs with
# both majors moerail supports; 12.8 also lacks options 12.9+ have. Unpacked beside the venv.
NVRTC12_VERSION ?= 12.8.93
NVRTC12 := $(VENV)/nvrtc-cu12-$(NVRTC12_VERSION)
$(NVRTC12)/.stamp: $(DEPS_STAMP)
	@rm -rf $(NVRTC12)
	$(PIP) install -q --disable-pip-version-check --no-deps --target $(NVRTC12) \
		nvidia-cuda-nvrtc-cu12==$(NVRTC12_VERSION)
	@touch $@

# The venv first: its torch brings CUDA 13's NVRTC; both NVRTCs must compile every kernel.
test-rust: $(DEPS_STAMP) $(NVRTC12)/.stamp
	VIRTUAL_ENV=$(abspath $(VENV)) MOERAIL_REQUIRE_NVRTC=12,13 \
		MOERAIL_TEST_NVRTC_DIRS=$(abspath $(NVRTC12))/nvidia/cuda_nvrtc/lib cargo test --workspace -q

PY_SOURCES := $(shell find python -name '*.py' -o -name '*.pyi' -o -name '*.json' 2>/dev/null) $(wildcard csrc/cuda/*)

# The wheel a package index takes: abi3 (one wheel for CPython >= 3.9), manylinux_2_17 x86-64,
# linked by zig against glibc 2.17's symbols (the ziglang package from requirements-dev.txt), so it
# installs on any x86-64 Linux with glibc >= 2.17; `auditwheel show` must agree. And the sdist.
DIST ?= dist
WHEEL_STAMP := $(DIST)/.wheel-stamp
$(WHEEL_STAMP): $(DEPS_STAMP) $(RUST_SOURCES) $(PY_SOURCES) LICENSE README.md CHANGELOG.md
	@mkdir -p $(DIST) && rm -f $(DIST)/moerail-*.whl $(DIST)/moerail-*.tar.gz
	PATH=$(abspath $(VENV))/bin:$$PATH $(VENV)/bin/maturin build --release --zig --compatibility manylinux2014 \
		-q --out $(DIST)
	PATH=$(abspath $(VENV))/bin:$$PATH $(VENV)/bin/maturin sdist --out $(DIST)
	$(VENV)/bin/auditwheel show $(DIST)/moerail-*.whl
	@touch $@

wheel: $(WHEEL_STAMP)

# The wheel installed into a fresh venv with no Rust on PATH and smoke-tested (every run); the
# sdist built into a wheel, installed and smoke-tested once per sdist.
$(DIST)/.sdist-stamp: $(WHEEL_STAMP) tools/check_dist.py tools/smoke.py
	$(PY) tools/check_dist.py --dist $(DIST) --sdist
	@touch $@

test-dist: $(DIST)/.sdist-stamp
	$(PY) tools/check_dist.py --dist $(DIST)

# The API reference, built from the docstrings; --strict fails on any warning (broken references).
docs: $(BUILD_STAMP)
	$(VENV)/bin/mkdocs build --strict -q -d site

# The offline bundle for a GPU machine (benches/gpu_check.sh): moerail's abi3 wheel (make wheel),
# the megatron-core wheels (cp312, downloaded once) and Megatron's MoE test tarballs; under 64 MiB.
GPU_BUNDLE ?= gpu-bundle
MEGATRON_TESTS_DIR ?= ../shared/third_party
$(GPU_BUNDLE)/manifest.json: $(WHEEL_STAMP) tools/gpu_bundle.py
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) tools/gpu_bundle.py --out $(GPU_BUNDLE) --wheel $(DIST) \
		--pip "$(PY) -m pip" --megatron-tests $(MEGATRON_TESTS_DIR) || { rm -f $@; exit 1; }

gpu-bundle: $(GPU_BUNDLE)/manifest.json

# tests/test_gpu_check.py rehearses benches/gpu_check.sh on this machine with the bundle.
test-python: setup gpu-bundle
	MOERAIL_GPU_BUNDLE=$(abspath $(GPU_BUNDLE)) $(PY) -m pytest -q
	MOERAIL_MEGATRON_PATH=$(abspath $(MCORE_NEXT)) $(PY) -m pytest -q -m megatron

test: test-rust test-python test-dist docs

# The type stubs of moerail._native (python/moerail/_native/*.pyi), generated from the built
# extension; tests/test_native_stubs.py fails when they are stale.
stubs: $(BUILD_STAMP)
	$(PY) tools/gen_stubs.py

# The long fuzz run (make test runs the same fuzzers briefly): half the time the core's harness,
# seed after seed, half the Python entry points (tests/fuzz_entry_points.py), each in a child; ends
# with the cases, clean errors and crashes per entry point (tools/fuzz_run.py).
FUZZ_MINUTES ?= 20
fuzz: $(BUILD_STAMP)
	$(PY) tools/fuzz_run.py --minutes $(FUZZ_MINUTES)

bench: $(BUILD_STAMP)
	# torch's OpenMP workers spin for milliseconds after each parallel region by default and take
	# the cores from any other thread pool in the process (moerail's included); see BENCHMARKS.md.
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(PY) benches/run_all.py --out benches/BENCHMARKS.md

lint: $(DEPS_STAMP)
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -q -- -D warnings
	$(VENV)/bin/ruff check python tests examples benches tools

fmt: $(DEPS_STAMP)
	cargo fmt --all
	$(VENV)/bin/ruff check --fix python tests examples benches tools

clean:
	rm -rf $(VENV) $(CARGO_TARGET_DIR) $(DIST) site
