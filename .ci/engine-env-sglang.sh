#!/usr/bin/env bash
# The SGLang venv the engine tests run in (tests/engines/sglang): the real, pinned, unmodified
# sglang 0.5.23 wheel, installed WITHOUT its dependencies (its CUDA stack cannot run here) on top of
# the system's CPU torch (--system-site-packages + a torch pin, so pip never swaps torch), plus the
# pure-Python packages its imports of the model / linear / MoE / loader code need.
# Idempotent: a venv whose stamp matches this script is reused as it is.
set -euo pipefail
. "$(dirname "$0")/venv-lib.sh"
ROOT="${NPUCONV_ENGINE_ENVS:-$HOME/.cache/npuconv/engines}"
VENV="$ROOT/sglang"
STAMP="$VENV/.npuconv-stamp"
WANT="$(sha256sum "$0" | cut -c1-16)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && "$VENV/bin/python" -c "import sglang" 2>/dev/null; then
  exit 0
fi
TORCH="$(python3 -c 'import torch; print(torch.__version__.split("+")[0])')"
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==$TORCH" > "$CONSTRAINTS"
remove_venv "$VENV"
mkdir -p "$ROOT"
python3 -m venv --system-site-packages "$VENV"
PIP=("$VENV/bin/pip" install -q --disable-pip-version-check -c "$CONSTRAINTS")
"${PIP[@]}" --no-deps sglang==0.5.23 apache-tvm-ffi==0.1.11
"${PIP[@]}" transformers==5.19.0 triton==3.9.0 compressed-tensors==0.18.0 sentencepiece==0.2.1 \
  psutil pybase64 pillow starlette msgspec pyzmq aiohttp dill gguf einops openai partial_json_parser
echo "$WANT" > "$STAMP"
