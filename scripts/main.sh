#!/usr/bin/env bash
# The main job on a fresh Debian/Ubuntu or macOS machine: installs what is missing, builds,
# then shows the GPU we run on and benchmarks our kernels on it. (Until a model runs, this
# is what vllm-apple can do; see docs/.)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
if [ "$(uname -s)" = Linux ]; then export WGPU_BACKEND=${WGPU_BACKEND:-vulkan}; fi
cargo build --release --bin vllm-apple
target/release/vllm-apple env
target/release/vllm-apple bench kernels --decode-m 1 --prefill-m 64 --reps 2
