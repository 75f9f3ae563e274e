# Everyday recipes. `just --list` shows them.

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

# Build the service binaries in release mode.
build:
    cargo build --release --workspace --bins
