"""Tool reference for msModelSlim (AscendV1) sources: msModelSlim's own readers and packers.

Per module, by its ``quant_model_description`` type (the same calls the fixture references were
made with, tests/fixtures/README.md):

- ``W8A16``, ``W4A16``, ``W8A8_DYNAMIC``, ``W4A8_DYNAMIC``, ``W4A4_DYNAMIC``: int4 bytes are split
  into their two nibbles (low nibble = even element, along N for the pairs-along-N layouts, along K
  otherwise) and the split is proven by re-packing with msModelSlim's own packer (``w4a8_pack_int4``,
  ``_w4a16_pack_int4``) to the stored bytes; then ``FakeLinearQuantizerOfW8A16OrW4A16.set_param``
  dequantizes ``(q - offset) * scale``. ``W4A8_DYNAMIC``'s ``scale_bias`` is recomputed with
  msModelSlim's ``process_scale`` and must equal the stored one.
- ``W8A8`` (static): ``FakeLinearQuantizerOfW8A8.set_param`` (weight = q * deq_scale / input_scale;
  a float ``deq_scale`` goes through msModelSlim's ``deqscale2int64`` first, as its saver does).
- ``WFP8AFP8_DYNAMIC``: ``msmodelslim.ir.api.dequantize`` per channel.
- ``W8A8_MXFP8``, ``W4A8_MXFP``, ``W4A4_MXFP4``, ``W4A16_MXFP4``: FP4 nibbles decoded with the E2M1
  table and proven by ``pack_fp4_to_uint8``; then ``reshape_to_blocks`` + ``ir.api.dequantize``.

Any other type (e.g. the legacy two-stage W4A8 ``weight_scale_second``) has no msModelSlim reader:
:meth:`Reference.module_weight` returns None and verify uses npuconv's reference for that layer.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

import torch

from npuconv.references import ToolMismatch, ToolReference, dump_main

#: OCP MX E2M1 magnitudes by code & 7 (sign in bit 3)
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
INT_TYPES = ("W8A16", "W4A16", "W8A8_DYNAMIC", "W4A8_DYNAMIC", "W4A4_DYNAMIC")
MX_TYPES = ("W8A8_MXFP8", "W4A8_MXFP", "W4A4_MXFP4", "W4A16_MXFP4")


def _expect(ok: bool, what: str) -> None:
    if not ok:
        raise ToolMismatch(f"{what} (checked with msModelSlim's packer)")


def _nibbles(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Signed int4 pairs of int8 ``w`` split along ``dim`` (low nibble first) → int8, twice as long there."""
    low, high = (w << 4) >> 4, w >> 4
    pairs = torch.stack([low, high], dim + 1)
    shape = list(w.shape)
    shape[dim] *= 2
    return pairs.reshape(shape).to(torch.int8)


def _int_weight(qtype: str, prefix: str, get: Callable[[str], torch.Tensor]) -> torch.Tensor:
    from msmodelslim.core.quant_service.modelslim_v1.save.utils.pack import process_scale, w4a8_pack_int4
    from msmodelslim.pytorch.llm_ptq.llm_ptq_tools.calibrator.calibrator_classes.fake_quantize import (
        FakeLinearQuantizerOfW8A16OrW4A16,
    )
    from msmodelslim.pytorch.llm_ptq.llm_ptq_tools.save.complex_quantifier import _w4a16_pack_int4

    w, scale, offset = get(f"{prefix}.weight"), get(f"{prefix}.weight_scale"), get(f"{prefix}.weight_offset")
    values = w
    if qtype == "W4A8_DYNAMIC" or (qtype == "W4A16" and 2 * w.shape[0] == scale.shape[0]):  # pairs along N
        values = _nibbles(w, 0)
        packer = w4a8_pack_int4 if qtype == "W4A8_DYNAMIC" else (lambda v: _w4a16_pack_int4(v, False))
        _expect(torch.equal(packer(values), w), f"{prefix}.weight: not msModelSlim's int4 packing along N")
    elif qtype == "W4A16":  # per-channel: pairs along K
        values = _nibbles(w, 1)
        _expect(torch.equal(_w4a16_pack_int4(values, True), w), f"{prefix}.weight: not msModelSlim's int4 packing along K")
    if qtype == "W4A8_DYNAMIC":  # msModelSlim's own scale_bias from the unpacked values
        deq = values.float().T * scale[:, 0].float()
        _expect(torch.equal(process_scale(prefix, deq.T, 16), get(f"{prefix}.scale_bias")), f"{prefix}.scale_bias")
    fake = FakeLinearQuantizerOfW8A16OrW4A16()
    fake.set_param(linear=torch.nn.Linear(values.shape[1], values.shape[0], bias=False),
                   quant_weight=values.float(), weight_offset=offset.float(), weight_scale=scale.float())
    return fake.deq_weight.float()


def _static_weight(prefix: str, get: Callable[[str], torch.Tensor]) -> torch.Tensor:
    from msmodelslim.core.quant_service.modelslim_v1.save.utils.deqscale import deqscale2int64
    from msmodelslim.pytorch.llm_ptq.llm_ptq_tools.calibrator.calibrator_classes.fake_quantize import (
        FakeLinearQuantizerOfW8A8,
    )

    w, deq = get(f"{prefix}.weight"), get(f"{prefix}.deq_scale")
    if deq.dtype != torch.int64:
        deq = deqscale2int64(deq)
    fake = FakeLinearQuantizerOfW8A8()
    fake.set_param(linear=torch.nn.Linear(w.shape[1], w.shape[0], bias=False), is_dynamic=False, deq_scale=deq,
                   input_offset=get(f"{prefix}.input_offset"), input_scale=get(f"{prefix}.input_scale"),
                   quant_weight=w.float())
    return fake.weight.float()


def _fp8_weight(prefix: str, get: Callable[[str], torch.Tensor]) -> torch.Tensor:
    from msmodelslim.ir.api import dequantize
    from msmodelslim.ir.qal import QDType, QParam, QScheme, QScope, QStorage

    _expect(not bool(get(f"{prefix}.weight_offset").any()), f"{prefix}.weight_offset: WFP8AFP8_DYNAMIC is symmetric")
    scheme = QScheme(scope=QScope.PER_CHANNEL, dtype=QDType.FP8_E4M3, symmetric=True)
    param = QParam(scheme=scheme, ext={"scale": get(f"{prefix}.weight_scale")[:, 0]})
    return dequantize(QStorage(dtype=QDType.FP8_E4M3, value=get(f"{prefix}.weight")).T, param).T.value.float()


def _mx_weight(qtype: str, prefix: str, get: Callable[[str], torch.Tensor]) -> torch.Tensor:
    from msmodelslim.core.quant_service.modelslim_v1.save.utils.pack import pack_fp4_to_uint8
    from msmodelslim.ir.api import dequantize
    from msmodelslim.ir.qal import QDType, QParam, QScheme, QScope, QStorage
    from msmodelslim.ir.utils import reshape_to_blocks, undo_reshape_to_blocks

    w = get(f"{prefix}.weight")
    if qtype == "W8A8_MXFP8":
        values = w.float()
    else:
        nibbles = torch.stack([w & 0xF, w >> 4], -1).reshape(w.shape[0], -1).long()
        table = torch.tensor(E2M1)
        values = torch.where(nibbles >= 8, -table[nibbles & 7], table[nibbles & 7])
        _expect(torch.equal(pack_fp4_to_uint8(values), w), f"{prefix}.weight: not msModelSlim's FP4 packing")
    dtype = QDType.MXFP8 if qtype == "W8A8_MXFP8" else QDType.MXFP4
    storage = QStorage(dtype=dtype, value=values)
    storage.value, _, shape, padded = reshape_to_blocks(storage.value, [1], 32)  # [N, Kb, 32]
    exponent = (get(f"{prefix}.weight_scale").to(torch.int32) - 127).unsqueeze(-1).float()
    param = QParam(scheme=QScheme(scope=QScope.PER_BLOCK, dtype=dtype, symmetric=True), ext={"scale": exponent})
    return undo_reshape_to_blocks(dequantize(storage, param).value, padded, shape, [1]).float()


def module_weight(qtype: str, prefix: str, get: Callable[[str], torch.Tensor]) -> torch.Tensor | None:
    """msModelSlim's dequantization of module ``prefix`` of type ``qtype`` (None: no msModelSlim reader)."""
    if qtype in INT_TYPES:
        return _int_weight(qtype, prefix, get)
    if qtype == "W8A8":
        return _static_weight(prefix, get)
    if qtype == "WFP8AFP8_DYNAMIC":
        return _fp8_weight(prefix, get)
    if qtype in MX_TYPES:
        return _mx_weight(qtype, prefix, get)
    return None


class Reference(ToolReference):
    library = "msmodelslim"
    distribution = "msmodelslim"

    def module_weight(self, spec):
        qtype = self.reader.entries.get(f"{spec.name}.weight")
        if not isinstance(qtype, str):
            return None
        return module_weight(qtype, spec.name, self.ckpt.get)


def dequantize_directory(path: str) -> dict[str, torch.Tensor]:
    """Every quantized module of an AscendV1 directory → float32 weight (module prefix → tensor)."""
    from safetensors.torch import load_file

    directory = Path(path)
    description: dict = {}
    for file in sorted(directory.glob("quant_model_description*.json")):
        description.update(json.loads(file.read_text()))
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        if file.name != "reference_dequant.safetensors":
            tensors.update(load_file(file))
    out = {}
    for key, qtype in description.items():
        if key.endswith(".weight") and isinstance(qtype, str) and qtype != "FLOAT":
            weight = module_weight(qtype, key[: -len(".weight")], tensors.__getitem__)
            if weight is not None:
                out[key[: -len(".weight")]] = weight
    return out


if __name__ == "__main__":
    dump_main(dequantize_directory, sys.argv[1:])
