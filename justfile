# Everyday recipes. `just --list` shows them.

# A whole local cluster in one process (meta on SQLite, three storage nodes, a router; tenant demo).
dev:
    cargo run --release -p pairdb-cli -- dev

# Run the whole test suite (what CI runs after the lint steps).
test:
    cargo test --workspace

# Formatting and lints exactly as CI checks them.
lint:
    cargo fmt --all --check
    cargo clippy --workspace --all-targets -- -D warnings

# Everything CI does, including service checks.
ci:
    bash .ci/run

# Core micro-benchmarks (preference-list lookup, DVVS merge/encode).
bench-core:
    cargo bench -p pairdb-core --bench core

# Benchmarks: the core micro-benchmarks, then YCSB workload A against a running cluster (`just dev`).
bench workload="A" duration="20s": bench-core
    cargo run --release -p pairdb-cli -- bench --workload {{workload}} --duration {{duration}}

# Check docker/ and deploy/: the linters and validators CI runs (deploy/check.sh), then against the
# binaries (flags, variables, ports, probes).
deploy-check:
    bash deploy/check.sh
    cargo test -p pairdb-tests --test deploy

# Container images from docker/Dockerfile (one shared build stage), tagged :dev as compose and k8s expect.
images:
    docker build -f docker/Dockerfile --target meta -t pairdb-meta:dev .
    docker build -f docker/Dockerfile --target storage -t pairdb-storage:dev .
    docker build -f docker/Dockerfile --target router -t pairdb-router:dev .
    docker build -f docker/Dockerfile --target cli -t pairdb-cli:dev .

# The compose stack (PostgreSQL, Redis, Jaeger UI on http://localhost:16686, 2 meta, 3 storage, 2 routers;
# `docker compose ... --profile monitoring up -d` adds Prometheus and Grafana).
compose-up:
    test -f deploy/compose/cluster/cluster-secret || cargo run --release -p pairdb-cli -- cluster init --out deploy/compose/cluster --storage-nodes 3
    docker compose -f deploy/compose/compose.yaml up --build -d

compose-down:
    docker compose -f deploy/compose/compose.yaml down

# Build the service binaries in release mode (no debuginfo; symbols kept).
build:
    cargo build --release --workspace --bins

# Release-optimized binaries with line tables, for `perf` (target/profiling/; PAIRDB_BIN for deploy/bench).
build-profiling:
    cargo build --profile profiling --workspace --bins
