#!/usr/bin/env bash
# Oracle environments: the libraries that WRITE the formats npuconv reads, each in its own venv
# (their pins clash with each other and with the main environment), used by the tests as
# independent decoders and by `npuconv verify --reference tool` when run with that venv's python.
#
#   ${NPUCONV_ORACLE_ENVS:-$HOME/.cache/npuconv/oracles}/<name>/bin/python
#
# Idempotent: a venv whose stamp matches its pinned requirement line is kept as it is; otherwise
# it is rebuilt. The venvs see the system site-packages, so they share the system torch (pinned to
# the main environment's, never a CUDA wheel). Prints one line per venv; exits non-zero on failure.
set -euo pipefail
. "$(dirname "$0")/venv-lib.sh"
ROOT="${NPUCONV_ORACLE_ENVS:-$HOME/.cache/npuconv/oracles}"
TORCH_PIN="torch==$(python3 -c 'import torch; print(torch.__version__.split("+")[0])')"
mkdir -p "$ROOT"

make_env() {  # make_env NAME IMPORT_CHECK REQUIREMENT...
  local name="$1" check="$2"; shift 2
  local dir="$ROOT/$name" want="$* $TORCH_PIN"
  if [ -x "$dir/bin/python" ] && [ "$(cat "$dir/.stamp" 2>/dev/null)" = "$want" ] \
     && "$dir/bin/python" -c "$check" >/dev/null 2>&1; then
    echo "oracle env $name: ready ($dir)"; return 0
  fi
  remove_venv "$dir.tmp"
  python3 -m venv --system-site-packages "$dir.tmp"
  printf '%s\n' "$TORCH_PIN" > "$dir.tmp/constraints.txt"
  "$dir.tmp/bin/python" -m pip install -q --disable-pip-version-check -c "$dir.tmp/constraints.txt" "$@"
  "$dir.tmp/bin/python" -c "$check"
  echo "$want" > "$dir.tmp/.stamp"
  remove_venv "$dir"; mv "$dir.tmp" "$dir"
  echo "oracle env $name: built ($dir)"
}

# msModelSlim 26.1.0 pins transformers 4.57.3 (the version the fixtures were made with).
make_env modelslim "import msmodelslim, transformers" msmodelslim==26.1.0 transformers==4.57.3
# compressed-tensors 0.20.0, the version that wrote the ct020_* fixtures.
make_env compressed-tensors "import compressed_tensors" compressed-tensors==0.20.0
