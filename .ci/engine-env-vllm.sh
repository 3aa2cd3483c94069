#!/usr/bin/env bash
# Build (once) the venv the vLLM / vLLM-Ascend engine tests run in, and point it at this checkout.
#
#   ${NPUCONV_ENGINE_ENVS:-$HOME/.cache/npuconv/engines}/vllm
#
# vllm 0.23.0 (the version vLLM-Ascend 0.23 requires) and vllm-ascend 0.23.0.post1 (sdist only, built
# as a pure-Python wheel without its C++ kernels) are installed WITHOUT their dependencies: both pin
# torch builds that do not exist for this CPU machine (vllm: torch 2.11, vllm-ascend: torch 2.10 +
# torch-npu). The venv sees the system packages (torch 2.13 CPU, transformers, …) and adds the exact
# pure-Python modules the engines import, each pinned, all with --no-deps, so pip can never replace
# torch (research/engines.md). torch_npu is NOT installed: the tests put a fake one (npuconv's
# kernel emulation) on PYTHONPATH. Idempotent: a marker holding this script's hash skips the build;
# only the editable install of the checkout (its vllm.general_plugins entry point) is redone.
set -euo pipefail
. "$(dirname "$0")/venv-lib.sh"
repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="${NPUCONV_ENGINE_ENVS:-$HOME/.cache/npuconv/engines}/vllm"
stamp="$(sha256sum "$0" | cut -c1-16)"
pip_q() { "$venv/bin/pip" install -q --disable-pip-version-check "$@"; }

if [ "$(cat "$venv/.npuconv-ready" 2>/dev/null)" != "$stamp" ]; then
  echo "building the vLLM engine venv in $venv" >&2
  remove_venv "$venv"
  python3 -m venv --system-site-packages "$venv"
  echo "torch==$(python3 -c 'import torch; print(torch.__version__.split("+")[0])')" > "$venv/constraints.txt"
  pip_q -c "$venv/constraints.txt" --no-deps vllm==0.23.0
  pip_q -c "$venv/constraints.txt" --no-deps setuptools-scm==10.3.4 vcs-versioning==2.6.0 wheel
  SOC_VERSION=ascend910b1 COMPILE_CUSTOM_KERNELS=0 \
    pip_q -c "$venv/constraints.txt" --no-deps --no-build-isolation vllm-ascend==0.23.0.post1
  pip_q -c "$venv/constraints.txt" --no-deps \
    aiohappyeyeballs==2.7.1 aiohttp==3.14.5 aiosignal==1.4.0 apache-tvm-ffi==0.1.15.post2 cachetools==8.0.2 \
    cbor2==6.3.0 compressed-tensors==0.20.0 einops==0.8.2 fastapi==0.165.0 frozenlist==1.8.0 gguf==0.19.0 \
    ijson==3.6.0 jiter==0.19.0 llguidance==1.9.1 loguru==0.7.3 mistral_common==1.13.1 msgspec==0.22.0 \
    multidict==7.2.1 openai==3.57.0 openai-harmony==0.0.8 opentelemetry-api==1.45.2 \
    partial-json-parser==0.2.1.1.post7 pillow==13.0.0 prometheus_client==0.26.0 propcache==0.5.4 psutil==7.2.2 \
    pybase64==1.5.1 pycountry==26.2.16 pydantic-extra-types==2.11.1 pyzmq==27.3.0 starlette==1.10.0 \
    tiktoken==0.14.0 triton==3.9.0 uvicorn==0.54.0 uvloop==0.23.0 xgrammar==0.2.8 yarl==1.25.1
  echo "$stamp" > "$venv/.npuconv-ready"
fi
# this checkout, editable, so vLLM's plugin loader finds npuconv's entry point (seconds)
pip_q --no-deps --no-build-isolation -e "$repo"
echo "$venv"
