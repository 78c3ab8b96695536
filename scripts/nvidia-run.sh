#!/usr/bin/env bash
# On the NVIDIA benchmark machine (see ../shared/nvidia.md): unpacks the Vulkan loader from
# .gl/, then runs the prebuilt binaries in .devbin/ (vllm-apple, and the test binaries
# `kernels` and `metal_guard` from `cargo test --release --no-run`). Usage:
#   scripts/nvidia-run.sh [bench args...]
set -uo pipefail
for f in .gl/*.deb; do dpkg -x "$f" /; done
ldconfig
export WGPU_BACKEND=vulkan
if ! .devbin/vllm-apple env >/dev/null 2>&1; then
  export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
.devbin/vllm-apple env
for t in .devbin/kernels .devbin/attention .devbin/metal_guard; do
  [ -x "$t" ] && "$t" 2>&1 | grep -E "test GPU|^test |test result|panicked|relative error" 
done
[ $# -gt 0 ] && .devbin/vllm-apple "$@"
