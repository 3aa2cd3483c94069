"""``--to npu-int8``: W8A16 for ``npu_weight_quant_batchmatmul`` from 8-bit integer sources.

Layout: see :mod:`npuconv.writers.weight_only` (int8 ``[K, N]`` of ``q - 128``, offset
``128 - z``). NZ (C0 = 32 int8) by default for per-channel layers, as vLLM-Ascend's
``maybe_trans_nz`` does for W8A16 (npu_loaders.md §3.9); per-group int8 stays ND (the kernel's NZ
path is per-channel only).
"""

from npuconv.writers.weight_only import WeightOnlyIntTarget


class NpuInt8Target(WeightOnlyIntTarget):
    name = "npu-int8"
    summary = "W8A16 int8 weights for npu_weight_quant_batchmatmul (8-bit GPTQ/CT/ModelSlim)"
    storage_bits = 8
    accepted_bits = (8,)
    native_rank = 40
    nz_default = True
    working_bytes_per_weight = 0.25  # measured ≈ 0 (the stored int8 bytes are handed over)

    def nz_c0(self, spec):
        if self.options.nz is None and spec.num_groups > 1:
            return None  # default: per-group int8 stays ND silently
        return super().nz_c0(spec)

