#!/usr/bin/env bash
# Installs what vllm-apple needs to build and run, and nothing that is already there.
#   Debian/Ubuntu: the Vulkan loader and Mesa's lavapipe (a CPU Vulkan driver, for machines
#                  without a GPU), a C toolchain, and Rust through rustup when cargo is absent.
#                  On Debian 12 it enables bookworm-backports for Mesa 25, which runs our
#                  kernels 2-4x faster than bookworm's Mesa 22.3.
#   macOS:         only Rust (Metal ships with the system).
set -euo pipefail

need_rust() {
  if ! command -v cargo >/dev/null 2>&1; then
    if [ -x "$HOME/.cargo/bin/cargo" ]; then return 0; fi
    echo "install-deps: installing Rust with rustup" >&2
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
  fi
}

sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# Debian 12's own sources file names the mirror this machine uses; the backports entry is
# the same mirror with the "-backports" suite, so no host name is written here.
enable_backports() {
  local src=/etc/apt/sources.list.d/debian.sources out=/etc/apt/sources.list.d/vllm-apple-backports.sources
  [ -f "$src" ] || return 0
  grep -q '^VERSION_CODENAME=bookworm' /etc/os-release 2>/dev/null || return 0
  [ -f "$out" ] && return 0
  local uri keyring
  uri=$(awk '/^URIs:/{u=$2} /^Suites:/{ for(i=2;i<=NF;i++) if ($i=="bookworm") {print u; exit} }' "$src")
  keyring=$(awk '/^Signed-By:/{print $2; exit}' "$src")
  [ -n "$uri" ] || return 0
  printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: %s\n' \
    "$uri" "${keyring:-/usr/share/keyrings/debian-archive-keyring.gpg}" | sudo_ tee "$out" >/dev/null
  echo "install-deps: enabled bookworm-backports from $uri" >&2
}

linux() {
  local missing=()
  ldconfig -p 2>/dev/null | grep -q 'libvulkan.so.1' || missing+=(libvulkan1)
  ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1 || missing+=(mesa-vulkan-drivers)
  command -v cc >/dev/null 2>&1 || missing+=(build-essential)
  command -v curl >/dev/null 2>&1 || missing+=(curl ca-certificates)
  python3 -m pip --version >/dev/null 2>&1 || missing+=(python3 python3-pip)
  python3 -c 'import ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
  command -v npm >/dev/null 2>&1 || missing+=(npm)
  local mesa_old=0
  if dpkg-query -W -f='${Version}' mesa-vulkan-drivers 2>/dev/null | grep -q '^22\.'; then mesa_old=1; fi
  if [ ${#missing[@]} -gt 0 ] || [ $mesa_old = 1 ]; then
    enable_backports
    sudo_ apt-get update -qq
    if [ ${#missing[@]} -gt 0 ]; then
      sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    if grep -q '^VERSION_CODENAME=bookworm' /etc/os-release 2>/dev/null; then
      sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t bookworm-backports \
        mesa-vulkan-drivers libvulkan1 >/dev/null || echo "install-deps: backports Mesa not installed; using the distribution's" >&2
    fi
  fi
  need_rust
}

case "$(uname -s)" in
  Linux) linux ;;
  Darwin)
    need_rust
    command -v npm >/dev/null 2>&1 || echo "install-deps: the tests need npm (brew install node)" >&2
    ;;
  *) echo "install-deps: unsupported OS $(uname -s); install Rust and a Vulkan driver by hand" >&2 ;;
esac
