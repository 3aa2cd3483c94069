"""SGLang's OWN GPTQ NPU path (``GPTQLinearAscendKernel``, SGLang 0.5.23) on an asymmetric GPTQ
checkpoint, next to npuconv's output of the same layer — runs inside the SGLang venv.

``torch.ops.npu`` (SGLang calls the torch_npu ops through it) is bound to npuconv's emulated ops:
custom-op registration is infrastructure; the conversion under test (``process_weights_after_loading``)
and the kernel call are SGLang's.

    python engine_gptq.py FIXTURE OUT LAYER      # prints RESULT {"sglang": rel_l2, "npuconv": rel_l2}
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import torch


def main(fixture: str, out: str, layer: str) -> None:
    from harness import install_stubs
    install_stubs()
    from npuconv.kernels import emulated
    torch.ops.npu = types.SimpleNamespace(  # the two ops GPTQLinearAscendKernel calls
        npu_convert_weight_to_int4pack=emulated.npu_convert_weight_to_int4pack,
        npu_weight_quant_batchmatmul=emulated.npu_weight_quant_batchmatmul,
    )
    from safetensors.torch import load_file
    from sglang.srt.hardware_backend.npu.quantization.gptq_kernels import GPTQLinearAscendKernel
    from sglang.srt.layers.quantization.gptq.gptq import GPTQConfig

    from npuconv.runtime import load_output

    root = Path(fixture)
    config = json.loads((root / "quantize_config.json").read_text())
    tensors = load_file(root / "model.safetensors")
    module = torch.nn.Module()
    for role in ("qweight", "qzeros", "scales"):
        module.register_parameter(role, torch.nn.Parameter(tensors[f"{layer}.{role}"], requires_grad=False))
    kernel = GPTQLinearAscendKernel(GPTQConfig.from_config(config))
    kernel.process_weights_after_loading(module)
    ref_w = load_file(root / "reference_dequant.safetensors")[f"{layer}.weight"].double()
    x = torch.randn(8, ref_w.shape[1], generator=torch.Generator().manual_seed(3)).to(module.scales.dtype)
    ref = x.double() @ ref_w.T
    y_sglang = kernel.apply(module, x)
    y_npuconv = load_output(out, device="cpu")[layer].forward(x)
    err = {name: float((y.double() - ref).norm() / ref.norm()) for name, y in (("sglang", y_sglang), ("npuconv", y_npuconv))}
    print("RESULT " + json.dumps(err))


if __name__ == "__main__":
    main(*sys.argv[1:4])
