"""Kernel backends: the real torch_npu ops, or their pure-PyTorch emulation on CPU or CUDA.

>>> backend = get_backend()            # npu if present, else cuda, else cpu
>>> y = backend.npu_quant_matmul(x1, x2, scale, pertoken_scale=s, output_dtype=torch.bfloat16)

Every backend has the same op names and signatures (:data:`OP_NAMES`, see
:mod:`npuconv.kernels.emulated`), plus ``.name`` (``"npu"``, ``"emulated-cpu"``, ``"emulated-cuda"``)
and ``.device`` (a device string such as ``"cpu"`` or ``"npu:0"``: where its inputs must live).
"""

from __future__ import annotations

from types import ModuleType

import torch

from npuconv.errors import UnsupportedError
from npuconv.kernels import emulated, npu

OP_NAMES = (
    "npu_weight_quant_batchmatmul",
    "npu_quant_matmul",
    "npu_dynamic_quant",
    "npu_dynamic_mx_quant",
    "npu_quantize",
    "npu_trans_quant_param",
    "npu_convert_weight_to_int4pack",
    "npu_format_cast",
    "npu_grouped_matmul",
    "npu_dynamic_dual_level_mx_quant",
    "npu_dual_level_quant_matmul",
)


class Backend:
    """A set of the :data:`OP_NAMES` functions bound to one device."""

    def __init__(self, name: str, device: str, ops: ModuleType) -> None:
        self.name = name
        self.device = device  # a string: "npu:0" is a valid torch device only once torch_npu is imported
        self.emulated = ops is emulated
        for op in OP_NAMES:
            setattr(self, op, getattr(ops, op))

    def __repr__(self) -> str:
        return f"Backend({self.name!r}, device={self.device!r})"


def available_devices() -> list[str]:
    """Devices a backend can run on, best first: some of ``"npu"``, ``"cuda"``, and always ``"cpu"``."""
    devices = []
    if npu.is_available():
        devices.append("npu")
    if torch.cuda.is_available():
        devices.append("cuda")
    devices.append("cpu")
    return devices


def get_backend(device: str | None = None) -> Backend:
    """The backend for ``device``: ``"npu[:i]"`` (real torch_npu ops), ``"cuda[:i]"`` or ``"cpu"`` (emulation).

    ``None`` picks the first of :func:`available_devices`. Asking for a device that is not present raises
    :class:`npuconv.errors.UnsupportedError`.
    """
    if device is None:
        device = available_devices()[0]
    kind = device.split(":", 1)[0].lower()
    if kind == "npu":
        if not npu.is_available():
            raise UnsupportedError("no Ascend NPU: torch_npu is not installed or reports no device")
        return Backend("npu", device if ":" in device else "npu:0", npu)
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise UnsupportedError("no CUDA device is available for the emulated kernels")
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 accumulation means fp32, not TF32
        return Backend("emulated-cuda", device, emulated)
    if kind == "cpu":
        return Backend("emulated-cpu", "cpu", emulated)
    raise UnsupportedError(f"unknown device {device!r} (use npu, cuda or cpu)")
