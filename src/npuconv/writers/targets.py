"""Target name → writer module (no imports, so the CLI can list targets without loading torch)."""

# target name → module defining WRITER (imported lazily)
TARGETS: dict[str, str] = {
    "float": "npuconv.writers.float",
    "npu-int4": "npuconv.writers.npu_int4",
    "npu-int8": "npuconv.writers.npu_int8",
    "npu-w8a8": "npuconv.writers.npu_w8a8",
    "npu-mxfp8": "npuconv.writers.npu_mxfp8",
    "npu-mxfp4": "npuconv.writers.npu_mxfp4",
    "npu-w4a8": "npuconv.writers.npu_w4a8",
    "npu-w4a4": "npuconv.writers.npu_w4a4",
    "npu-mxfp4-dual": "npuconv.writers.npu_mxfp4_dual",
    "npu-float": "npuconv.writers.npu_float",
    "modelslim": "npuconv.writers.modelslim",
}
