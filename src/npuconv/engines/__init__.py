"""Serving-engine integrations: load npuconv outputs as written into vLLM / vLLM-Ascend and SGLang.

:mod:`npuconv.engines.layers` is the engine-neutral core (what to create per TP rank, how each tensor
splits, the kernel call through the layer's target; MoE experts under their checkpoint names, run
routed); :mod:`npuconv.engines.vllm_plugin` is the vLLM / vLLM-Ascend plugin (entry point
``vllm.general_plugins``: ``npuconv = npuconv.engines.vllm_plugin:register``);
:mod:`npuconv.engines.sglang` is the SGLang method (entry point ``sglang.srt.plugins``);
:mod:`npuconv.engines.support` says which engine serves which output.
"""
