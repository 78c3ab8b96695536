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
cargo test --workspace --locked
