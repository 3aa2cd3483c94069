"""msModelSlim's AscendV1 checkpoint schema: file names, type strings, tensor suffixes, name tables.

The one place that spells msModelSlim's vocabulary; :mod:`npuconv.readers.modelslim` (type → canonical
layer) and :mod:`npuconv.writers.modelslim` (canonical layer → type) both use it, so a type the reader
knows is written with the same storage width, activation and suffixes. Sources: msModelSlim 26.1.0
``ascendv1_saver`` / ``llm_ptq`` savers, npu_loaders.md §3.
"""

from __future__ import annotations

from npuconv.layouts import MX_BLOCK
from npuconv.model import FP4_E2M1, FP8_E4M3, INT, ActivationQuant

DESCRIPTION = "quant_model_description.json"
DESCRIPTION_GLOB = "quant_model_description*.json"
FLOAT = "FLOAT"
MX_GROUP = MX_BLOCK  # the E8M0 block of every MX type

# top-level keys of the description that are not tensor names
META_KEYS = {
    "version",
    "model_quant_type",
    "group_size",
    "metadata",
    "optional",
    "kv_cache_type",
    "kv_quant_type",
    "fa_quant_type",
    "indexer_quant_type",
    "is_rot_used",
    "ignore",
    "packed_modules_mapping",
}
# tensors the v1 saver writes without a description entry (QuaRot online rotation)
UNDESCRIBED_SUFFIXES = (".heads_rotation", ".kronecker_rotation_m", ".kronecker_rotation_n")
# non-linear types whose tensors pass through unchanged
NON_LINEAR_TYPES = {"C8", "FAQuant", "FAKQuant"}

_INT8_DYN = ActivationQuant(INT, 8, dynamic=True, strategy="token")
_INT4_DYN = ActivationQuant(INT, 4, dynamic=True, strategy="token")
_FP8_DYN = ActivationQuant(FP8_E4M3, 8, dynamic=True, strategy="token")
_MXFP8_ACT = ActivationQuant(FP8_E4M3, 8, dynamic=True, strategy="group")
_MXFP4_ACT = ActivationQuant(FP4_E2M1, 4, dynamic=True, strategy="group")

# integer weight + weight_scale (+ weight_offset): type → (bits, activation)
INT_TYPES: dict[str, tuple[int, ActivationQuant | None]] = {
    "W8A16": (8, None),
    "W8A8_DYNAMIC": (8, _INT8_DYN),
    "W4A4_DYNAMIC": (4, _INT4_DYN),
    "W4A16": (4, None),
    "W4A8_DYNAMIC": (4, _INT8_DYN),
}
STATIC_TYPES = {"W8A8", "W8A8_MIX"}
FP8_TYPES = {"WFP8AFP8_DYNAMIC": _FP8_DYN}
# MX: type → (weight format, bits, activation)
MX_TYPES: dict[str, tuple[str, int, ActivationQuant | None]] = {
    "W8A8_MXFP8": (FP8_E4M3, 8, _MXFP8_ACT),
    "W4A8_MXFP": (FP4_E2M1, 4, _MXFP8_ACT),
    "W4A4_MXFP4": (FP4_E2M1, 4, _MXFP4_ACT),
    "W4A16_MXFP4": (FP4_E2M1, 4, None),
}
SUPPORTED_TYPES = {*INT_TYPES, *STATIC_TYPES, *FP8_TYPES, *MX_TYPES}

# suffixes each family may consume (beyond "weight"); anything else typed like the layer is refused
SUFFIXES_INT = ("weight_scale", "weight_offset")
SUFFIXES_W4A8 = ("weight_scale", "weight_offset", "weight_scale_second", "weight_offset_second", "scale_bias")
SUFFIXES_STATIC = ("weight_scale", "weight_offset", "input_scale", "input_offset", "deq_scale", "quant_bias")
SUFFIXES_FP8 = ("weight_scale", "weight_offset")
SUFFIXES_MX = ("weight_scale",)

# int weight layouts
UNPACKED = "unpacked"  # one signed value per int8 byte [N, K] (int8 or int4)
PAIRS_N = "pairs_n"  # int4 pairs along N: [N/2, K]
PAIRS_K = "pairs_k"  # int4 pairs along K: [N, K/2]

VERSION = "1.0.0"  # quant_model_description.json "version" written by the v1 saver

# msModelSlim AscendV1Saver.QUANT_TYPE_PRIORITY (later = higher); W4A8_DYNAMIC deliberately absent
QUANT_TYPE_PRIORITY = (
    "FLOAT",
    "W16A16S",
    "W8A16",
    "W8A8_DYNAMIC",
    "W8A8_MIX",
    "W8A8",
    "WFP8AFP8_DYNAMIC",
    "W8A8_MXFP8",
    "W4A8_MXFP",
    "W4A4_DYNAMIC",
    "W4A4_MXFP4",
    "W4A4_MXFP4_DUALSCALE",
    "W4A4_MXFP4_SVD",
)

# shards that engines fuse into one layer: leaf name → group
FUSED_SHARDS = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up",
                "w1": "gate_up", "w3": "gate_up"}
MOE_SHARDS = {"gate_proj": "w13", "up_proj": "w13", "w1": "w13", "w3": "w13", "down_proj": "w2", "w2": "w2"}

INT_SUFFIXES = ("weight_scale", "weight_offset")
KERNELS = {  # what the engines run for the type (npu_loaders.md §3)
    "W8A16": "npu_weight_quant_batchmatmul",
    "W4A16": "none (no linear method)",
    "W8A8_DYNAMIC": "npu_quant_matmul (dynamic)",
    "W8A8": "npu_quant_matmul (static)",
    "W4A8_DYNAMIC": "npu_grouped_matmul (MoE)",
    "W4A4_DYNAMIC": "npu_quant_matmul (int4)",
    "WFP8AFP8_DYNAMIC": "none (no engine method)",
    "W8A8_MXFP8": "npu_quant_matmul (MX)",
    "W4A8_MXFP": "npu_quant_matmul (MX)",
    "W4A4_MXFP4": "npu_quant_matmul (MX)",
    "W4A16_MXFP4": "npu_grouped_matmul (MoE)",
}
# integer types → storage width B of the signed codes
STORAGE_BITS = {**{qtype: bits for qtype, (bits, _) in INT_TYPES.items()}, "W8A8": 8}


def mx_type(weight_format: str, activation_kind: str | None) -> str | None:
    """The MX type string of (weight format, MX activation element kind or None), from :data:`MX_TYPES`."""
    for qtype, (fmt, _bits, act) in MX_TYPES.items():
        if fmt == weight_format and (act.kind if act is not None else None) == activation_kind:
            return qtype
    return None


def fused_group(prefix: str) -> tuple[str, str] | None:
    """(owner, group) of a shard that engines fuse with its siblings, or None."""
    parts = prefix.split(".")
    leaf = parts[-1]
    if len(parts) >= 3 and parts[-3] == "experts" and parts[-2].isdigit():
        group = MOE_SHARDS.get(leaf)
        return None if group is None else (".".join(parts[:-2]), group)
    group = FUSED_SHARDS.get(leaf)
    return None if group is None else (".".join(parts[:-1]), group)
