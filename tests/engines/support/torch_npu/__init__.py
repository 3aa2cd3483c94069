"""A fake ``torch_npu`` for running the serving engines' real Python code on a CPU-only machine.

Test infrastructure only. The ``npu_*`` kernels are npuconv's emulation (:mod:`npuconv.kernels.emulated`),
so an engine that calls ``torch_npu.npu_weight_quant_batchmatmul(...)`` runs the same emulated op that
``npuconv verify`` runs on CPU. Everything else is the minimum an engine needs to import and to set up
gloo on CPU (engines.md, "Running the engines' real layer code on a CPU-only machine"):
a ``torch.npu`` namespace, the ``npu`` device name, a PrivateUse1 hooks registration (else the gloo
barrier fails), ``torch.distributed.is_hccl_available`` and ``torch_npu._C._distributed_c10d``.
Any other ``torch_npu.X`` is a stub that raises ``NotImplementedError`` when *called*, so a test fails
loudly if an engine reaches a kernel that is not emulated.
"""

from __future__ import annotations

import sys
import types

import torch

from npuconv.kernels import OP_NAMES, emulated
from npuconv.layouts import NPU_DTYPE_IDS

__version__ = "2.10.0.post4"  # what vLLM-Ascend 0.23 pins; nothing numeric depends on it

for _op in OP_NAMES:
    globals()[_op] = getattr(emulated, _op)

# dtype markers (torch_npu exposes these as module attributes; the emulation takes the ids)
float4_e2m1fn_x2 = NPU_DTYPE_IDS["float4_e2m1fn_x2"]
float8_e8m0fnu = NPU_DTYPE_IDS["float8_e8m0fnu"]
hifloat8 = NPU_DTYPE_IDS.get("hifloat8", 290)


def _not_emulated(name: str):
    def call(*args, **kwargs):
        raise NotImplementedError(f"torch_npu.{name} is not emulated (fake torch_npu for tests)")

    call.__name__ = name
    return call


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return _not_emulated(name)


class _Stream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Config:
    allow_internal_format = False


def _module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    module.__getattr__ = lambda attr: _not_emulated(f"{name}.{attr}") if not attr.startswith("__") else (_ for _ in ()).throw(AttributeError(attr))
    sys.modules[name] = module
    return module


npu = _module(
    "torch_npu.npu",
    is_available=lambda: False,
    device_count=lambda: 0,
    current_device=lambda: 0,
    set_device=lambda *a, **k: None,
    synchronize=lambda *a, **k: None,
    empty_cache=lambda *a, **k: None,
    Stream=_Stream,
    Event=_Stream,
    stream=lambda *a, **k: _Stream(),
    current_stream=lambda *a, **k: _Stream(),
    default_stream=lambda *a, **k: _Stream(),
    config=_Config(),
    is_initialized=lambda: False,
    mem_get_info=lambda *a, **k: (1 << 34, 1 << 34),
    get_device_name=lambda *a, **k: "Ascend910B1 (fake)",
    get_device_properties=lambda *a, **k: types.SimpleNamespace(name="Ascend910B1 (fake)", total_memory=1 << 34),
    utils=types.SimpleNamespace(),
    _is_in_bad_fork=lambda: False,
    manual_seed=lambda *a, **k: None,
    manual_seed_all=lambda *a, **k: None,
    seed=lambda *a, **k: None,
    _lazy_init=lambda: None,
    is_bf16_supported=lambda *a, **k: True,
    NPUGraph=type("NPUGraph", (), {}),  # a type (annotations of vLLM-Ascend's graph capture); never captured here
)
_C = _module("torch_npu._C")
_module("torch_npu._C._distributed_c10d", ProcessGroupHCCL=type("ProcessGroupHCCL", (), {"Options": type("Options", (), {})}))
profiler = _module("torch_npu.profiler", dynamic_profile=_module("torch_npu.profiler.dynamic_profile"))
_module("torch_npu.op_plugin")
_module("torch_npu.op_plugin.atb")
_module("torch_npu.op_plugin.atb._atb_ops", _register_atb_extensions=lambda *a, **k: None)
_module("torch_npu.multiprocessing")
_module("torch_npu.multiprocessing.reductions")
contrib = _module("torch_npu.contrib", transfer_to_npu=None)


class _PrivateUse1Hooks(torch._C._acc.PrivateUse1Hooks if hasattr(torch._C, "_acc") else object):
    def is_available(self) -> bool:
        return False

    def has_primary_context(self, device_index: int) -> bool:
        return False


def _install() -> None:
    """Name the PrivateUse1 backend ``npu``, expose ``torch.npu`` and the HCCL probe (once)."""
    if getattr(torch, "npu", None) is npu:
        return
    try:
        torch.utils.rename_privateuse1_backend("npu")
    except RuntimeError:
        pass  # already renamed in this process
    if hasattr(torch._C, "_acc") and hasattr(torch._C._acc, "register_python_privateuseone_hook"):
        torch._C._acc.register_python_privateuseone_hook(_PrivateUse1Hooks())
    torch._register_device_module("npu", npu)
    torch.distributed.is_hccl_available = lambda: False


_install()
