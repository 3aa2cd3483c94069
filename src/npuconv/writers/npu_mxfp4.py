"""``--to npu-mxfp4``: MXFP4 (E2M1) weights for ``npu_quant_matmul`` MX mode (Ascend 950). Layout: :mod:`npuconv.writers.mx`."""

from npuconv.model import FP4_E2M1
from npuconv.offline import MXFP4_RECIPE
from npuconv.writers.mx import MxTarget


class NpuMxfp4Target(MxTarget):
    """Also quantizes the linears of float checkpoints (:data:`npuconv.offline.MXFP4_RECIPE`)."""

    native_rank = 70
    name = "npu-mxfp4"
    summary = "MXFP4 weights + E8M0 scales for npu_quant_matmul (CT mxfp4, ModelSlim W4A8_MXFP / W4A4_MXFP4)"
    offline_recipe = MXFP4_RECIPE
    weight_format = FP4_E2M1

