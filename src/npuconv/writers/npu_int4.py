"""``--to npu-int4``: W4A16 for ``npu_weight_quant_batchmatmul`` from any 2-, 3- or 4-bit integer source.

Layout: see :mod:`npuconv.writers.weight_only` (int32 ``[K, N/8]`` int4pack of ``q - 2**(b-1)``,
``antiquant_scale``/``antiquant_offset`` ``[K/g, N]``). ND by default: both engines keep GPTQ/AWQ
int4 antiquant weights ND (npu_loaders.md §3.14); ``--nz`` writes NZ tiles with C0 = 8 int32
(the layout ``npu_convert_weight_to_int4pack`` produces from an NZ input, torch_npu_ops.md §1)
where the kernel allows it (group size 64/128, N % 64 == 0), else ND with a warning.
"""

from npuconv.writers.weight_only import WeightOnlyIntTarget


class NpuInt4Target(WeightOnlyIntTarget):
    name = "npu-int4"
    summary = "W4A16 int4pack weights for npu_weight_quant_batchmatmul (GPTQ/AWQ/CT/ModelSlim 2-4 bit)"
    storage_bits = 4
    accepted_bits = (2, 3, 4)
    native_rank = 50
    nz_default = False
    working_bytes_per_weight = 1.0  # measured ≤ 0.72 (compressed-tensors W4A16 codes, transposed)

