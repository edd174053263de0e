# airlock: build, test and demo entry points. `make test` is what CI runs (.ci/run).
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: all build deps test lint fmt-check clippy unit e2e demo bench clean-demo help package fuzz fuzz-smoke

all: build

help:
	@echo "make build   - cargo build --bins (airlockd, airlock, airlock-testkit, ...)"
	@echo "make deps    - install the pinned test clients (python venv + node modules)"
	@echo "make lint    - cargo fmt --check and clippy -D warnings"
	@echo "make test    - deps, lint, build, every test (unit + end-to-end), a short fuzz run"
	@echo "make fuzz    - long fuzz runs (FUZZ_SECONDS per target, FUZZ_TARGETS; docs/testing.md)"
	@echo "make demo    - a production job gets credentials, a feature branch is refused"
	@echo "make bench   - the performance benchmark (release build)"
	@echo "make package - release .deb and .rpm in target/packages (docs/packaging.md)"

build:
	$(CARGO) build --bins

deps:
	scripts/setup-test-deps.sh

fmt-check:
	$(CARGO) fmt --all --check
	$(CARGO) fmt --manifest-path fuzz/Cargo.toml --check

clippy:
	$(CARGO) clippy --all-targets -- -D warnings

lint: fmt-check clippy

# The end-to-end tests run the binaries built here; `cargo test` alone does not build them
# for another crate's tests. The short fuzz run comes first, so the test runner's summary
# stays the last thing printed.
test: deps lint build
	$(MAKE) fuzz-smoke
	@if command -v cargo-nextest >/dev/null 2>&1; then \
		$(CARGO) nextest run --workspace --no-fail-fast; \
	else \
		echo "cargo-nextest not found: falling back to cargo test"; \
		$(CARGO) test --workspace --no-fail-fast; \
	fi

# Fuzzing (docs/testing.md, "Fuzzing"): the self-test and about ten seconds of each target
# in `make test`; long runs with `FUZZ_SECONDS=3600 make fuzz` (seconds per target,
# FUZZ_TARGETS="dns endpoint" to choose). A crash fails either.
FUZZ_SECONDS ?= 600
FUZZ_TARGETS ?=
fuzz-smoke:
	scripts/fuzz.sh smoke

fuzz:
	FUZZ_SECONDS=$(FUZZ_SECONDS) scripts/fuzz.sh run $(FUZZ_TARGETS)

unit:
	$(CARGO) test --workspace --lib --bins

e2e: deps build
	$(CARGO) test -p airlock-tests --tests

demo: deps build
	scripts/demo.sh

# Release builds of the agent, measured against a bare hyper server in the same run; then the
# sandbox (root only), measured against bubblewrap in the same run; then egress (root only):
# a job's rules against a namespace without rules, its resolver against the upstream; then
# the noisy neighbour (root only): a job's latency while another job attacks the agent,
# against its latency quiet.
BENCH_BIN_DIR = $(if $(CARGO_TARGET_DIR),$(abspath $(CARGO_TARGET_DIR)),$(CURDIR)/target)/release
# The agent's benchmark starts sandboxed jobs too (their RSS), so the release shim is built
# with the agent, before any program runs.
bench: deps
	$(CARGO) build --release -p airlock-agent -p airlock-shim --bins
	AIRLOCK_BIN_DIR=$(BENCH_BIN_DIR) $(CARGO) run -p airlock-tests --bin airlock-bench --release
	scripts/setup-bench-deps.sh
	AIRLOCK_BIN_DIR=$(BENCH_BIN_DIR) $(CARGO) run -p airlock-tests --bin airlock-sandbox-bench --release
	$(CARGO) run -p airlock-tests --bin airlock-egress-bench --release
	AIRLOCK_BIN_DIR=$(BENCH_BIN_DIR) $(CARGO) run -p airlock-tests --bin airlock-noisy-bench --release

# Release .deb and .rpm (docs/packaging.md): the pinned cargo-deb and cargo-generate-rpm, a
# release build of the three installed binaries only, then packaging/build-packages.sh.
package:
	scripts/setup-package-deps.sh
	$(CARGO) build --release -p airlock-agent -p airlock-shim --bin airlockd --bin airlock --bin airlock-shim
	packaging/build-packages.sh release
