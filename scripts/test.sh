#!/usr/bin/env bash
# The whole test suite on a fresh Debian/Ubuntu or macOS machine: installs what is missing,
# then runs every test. Kernels execute on the machine's GPU, or on lavapipe (Mesa's CPU
# Vulkan driver) where there is none, as in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
if [ "$(uname -s)" = Linux ]; then export WGPU_BACKEND=${WGPU_BACKEND:-vulkan}; fi
bash scripts/fetch-assets.sh --tests
# Release mode: the dependencies compile once for the tests, the server binary and the
# Python package (and lavapipe runs the same GPU work either way).
cargo test --workspace --release --locked
# End to end: the server with the real `openai` client, and the Python package.
cargo build --release --locked --bin vllm-apple
[ -x .cache/venv/bin/python ] || python3 -m venv .cache/venv
.cache/venv/bin/pip install -q -r tests/python/requirements.txt
VIRTUAL_ENV="$PWD/.cache/venv" .cache/venv/bin/maturin develop --release --locked -q -m crates/python/Cargo.toml
.cache/venv/bin/python -m pytest -q tests/python
