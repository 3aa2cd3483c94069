"""npuconv: convert quantized LLM checkpoints into Ascend NPU-ready checkpoints, and verify them."""

__version__ = "0.1.0"
