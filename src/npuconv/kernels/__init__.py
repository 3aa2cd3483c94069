"""Kernel backends: the real torch_npu ops, or their pure-PyTorch emulation on CPU or CUDA.

>>> backend = get_backend()            # npu if present, else cuda, else cpu
>>> y = backend.ops.npu_quant_matmul(x1, x2, scale, pertoken_scale=s, output_dtype=torch.bfloat16)

A :class:`Backend` is ``.name`` (``"npu"``, ``"emulated-cpu"``, ``"emulated-cuda"``), ``.device`` (a
device string such as ``"cpu"`` or ``"npu:0"``: where its inputs must live) and ``.ops``, the ops
module implementing :class:`npuconv.kernels.ops.KernelOps` (:data:`OP_NAMES`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from npuconv.errors import UnsupportedError
from npuconv.kernels import emulated, npu
from npuconv.kernels.ops import KernelOps

#: the op names of :class:`KernelOps`, in declaration order
OP_NAMES = tuple(name for name in vars(KernelOps) if name.startswith("npu_"))


@dataclass(frozen=True)
class Backend:
    """The kernel ops of one implementation, for inputs on one device."""

    name: str
    device: str  # a string: "npu:0" is a valid torch device only once torch_npu is imported
    ops: KernelOps  # npuconv.kernels.npu or npuconv.kernels.emulated

    @property
    def emulated(self) -> bool:
        return self.ops is emulated


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
