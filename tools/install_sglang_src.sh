#!/usr/bin/env bash
# SGLang 0.5.23's Python source (and msgspec, which its /generate contract decoder needs) into
# .sglang-src/ (gitignored), for the CPU tests that judge the trainer's requests with SGLang's own
# code (tests/helpers/sglang_source.py). Idempotent: does nothing when that version is there.
# SGLang is NOT importable from there (it needs CUDA packages); tests load single files by path.
# Usage: tools/install_sglang_src.sh [python]   (default: .venv/bin/python, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.5.23
TARGET=.sglang-src
PYTHON="${1:-}"
if [[ -z "$PYTHON" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [[ -d "$TARGET/sglang-$VERSION.dist-info" && -d "$TARGET/msgspec" ]]; then
  exit 0
fi
rm -rf "$TARGET.tmp"
"$PYTHON" -m pip install --quiet --no-deps --target "$TARGET.tmp" "sglang==$VERSION" msgspec
rm -rf "$TARGET"
mv "$TARGET.tmp" "$TARGET"
echo "sglang $VERSION source in $TARGET"
