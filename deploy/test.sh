#!/usr/bin/env bash
# The whole test suite, on a fresh Debian 12 machine with only the Rust toolchain: sets up
# what the tests need (deploy/setup.sh), builds the workspace once, runs every test.
#
#   deploy/test.sh [extra cargo test arguments]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
deploy/setup.sh
# The system tests start the built binaries: build them and the tests in one go.
cargo build --workspace --all-targets --locked
cargo test --workspace --locked "$@"
