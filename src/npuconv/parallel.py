"""Which linears tensor parallelism splits along N (column-parallel) or along K (row-parallel).

One name rule for every target that needs it (the W4A8 ``scale_bias`` of ``npu-w4a8`` and of
``--to modelslim``). Serving engines decide by module class (vLLM's ``QKVParallelLinear`` /
``MergedColumnParallelLinear`` vs ``RowParallelLinear``); a checkpoint only has names, so the rule
is a table of **leaf** module names (the part after the last dot), as those classes are used for
them in the Hugging Face / vLLM model definitions. A leaf in neither table is unknown (``None``):
each caller says what it does then (``npu-w4a8`` writes both forms; ``modelslim`` follows
msModelSlim's fallthrough, with a warning).

msModelSlim's own ``process_scale`` tests substrings of the whole name
(``up_proj, gate_proj, q_proj, k_proj, v_proj, w1, w3`` → column; ``down_proj, o_proj, w2`` → row);
for those names the leaf table gives the same answer. Names it misses (``q_a_proj``, ``kv_b_proj``,
``dense_4h_to_h``, …) get the engines' answer here instead of its ``[N, K]`` fallthrough.
"""

from __future__ import annotations

from npuconv.errors import InputError

COLUMN = "column"
ROW = "row"

#: leaves of column-parallel linears (K never split: every rank sees all input features)
COLUMN_PARALLEL_LEAVES = frozenset({
    "q_proj", "k_proj", "v_proj", "qkv_proj", "gate_proj", "up_proj", "gate_up_proj", "w1", "w3",
    "query_key_value", "c_attn", "c_fc", "fc1", "dense_h_to_4h", "q_a_proj", "q_b_proj",
    "kv_a_proj_with_mqa", "kv_b_proj", "fused_qkv_a_proj", "wq", "wk", "wv", "wqkv",
})
#: leaves of row-parallel linears (K split across ranks, outputs all-reduced)
ROW_PARALLEL_LEAVES = frozenset({
    "o_proj", "down_proj", "w2", "dense", "dense_4h_to_h", "c_proj", "fc2", "out_proj", "wo",
})


def parallel_kind(name: str) -> str | None:
    """``"column"``, ``"row"`` or None (unknown) for a linear's module name, by its leaf."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf in COLUMN_PARALLEL_LEAVES:
        return COLUMN
    if leaf in ROW_PARALLEL_LEAVES:
        return ROW
    return None


def refuse_static_quant_bias(name: str) -> None:
    """Static W8A8 ``quant_bias`` (``round(bias/deq − input_offset·Σ_k q)``) folds the activation offset
    over all of K: no row-parallel rank can hold its share of it."""
    raise InputError(f"{name}: quant_bias folds the activation offset over all of K; "
                     "a row-parallel split of static W8A8 is not exact")


def check_partial_sums_share(name: str, world: int, chunks: int) -> None:
    """A row-parallel rank sums ``chunks / world`` consecutive partial sums (W4A8 ``scale_bias``):
    ``world`` must divide ``chunks``."""
    if chunks % world:
        raise InputError(f"{name}: tp={world} does not divide the {chunks} scale_bias partial sums")
