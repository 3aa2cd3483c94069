"""``--to npu-mxfp8``: MXFP8 weights for ``npu_quant_matmul`` MX mode (Ascend 950). Layout: :mod:`npuconv.writers.mx`."""

from npuconv.model import FP8_E4M3
from npuconv.offline import MXFP8_RECIPE
from npuconv.writers.mx import MxTarget


class NpuMxfp8Target(MxTarget):
    """Also quantizes the linears of float checkpoints (:data:`npuconv.offline.MXFP8_RECIPE`)."""

    native_rank = 60
    name = "npu-mxfp8"
    summary = "MXFP8 weights + E8M0 scales for npu_quant_matmul (CT mxfp8, ModelSlim W8A8_MXFP8)"
    offline_recipe = MXFP8_RECIPE
    weight_format = FP8_E4M3

