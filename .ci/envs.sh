#!/usr/bin/env bash
# Build (once; each script is idempotent) the venvs that the oracle and engine tests run their tools
# in: msModelSlim + compressed-tensors (tests/oracle_env.py), vLLM + vLLM-Ascend (tests/engines/vllm),
# SGLang (tests/engines/sglang). Cached under ~/.cache/npuconv (NPUCONV_ORACLE_ENVS,
# NPUCONV_ENGINE_ENVS). Without them those tests skip locally and fail when CI=true.
set -euo pipefail
here="$(dirname "$0")"
bash "$here/oracle-env.sh"
bash "$here/engine-env-vllm.sh" >/dev/null
bash "$here/engine-env-sglang.sh"
