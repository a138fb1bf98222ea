#!/usr/bin/env bash
# The whole test suite: installs what it needs (scripts/setup.sh), then format and lint
# checks, then every test (unit, API, and the end-to-end tests that boot real guests in
# lab network namespaces). Runs as root (namespaces, taps).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export CARGO_TERM_COLOR=never
cargo fmt --all -- --check
(cd ui && npm run --silent check)
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace 2>&1
