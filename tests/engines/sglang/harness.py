"""Runs INSIDE the SGLang venv (see conftest.py): SGLang 0.5.23's own, unmodified model, linear, MoE
and weight-loading code on CPU, with npuconv's quantization method, at TP = 1 or 2 over gloo.

    python harness.py OUT FIXTURE --tp 2 [--engine-gptq]      # prints one JSON line of results

Stubs, infrastructure only: ``torchvision`` (imported by SGLang's multimodal configs; the PyPI wheel
needs CUDA ops) as an import-only module, and a ``torch_npu`` module whose ops are npuconv's
emulation (npuconv.kernels.emulated) for SGLang's own NPU GPTQ kernel class (``--engine-gptq``).
Everything else — registration, ModelConfig, get_quant_config, LlamaForCausalLM /
Qwen2ForCausalLM / Qwen2MoeForCausalLM construction, load_weights, RowParallel all-reduce, FusedMoE
— is SGLang's code.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import json
import os
import sys
import types


# ------------------------------------------------------------------------------ infrastructure stubs
class _Any:
    def __init__(self, *a, **k): pass
    def __call__(self, *a, **k): return _Any()
    def __getattr__(self, n): return _Any()


class _StubLoader(importlib.abc.Loader):
    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = lambda n: (_ for _ in ()).throw(AttributeError(n)) if n.startswith("__") else _Any
        return module

    def exec_module(self, module): pass


class _StubFinder(importlib.abc.MetaPathFinder):
    def __init__(self, *names): self.names = names
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in self.names:
            return importlib.machinery.ModuleSpec(name, _StubLoader(), is_package=True)
        return None


def install_stubs() -> None:
    # transformers decides once (cached) whether torchvision exists: ask before the stub appears
    from transformers.utils import import_utils
    import_utils.is_torchvision_available()
    # vllm: only `vllm._custom_ops.rotary_embedding`, which the rotary constructor imports off CUDA/CPU
    # (attention is not under test and never runs here)
    sys.meta_path.insert(0, _StubFinder("torchvision", "vllm"))


def fake_torch_npu() -> types.ModuleType:
    """``torch_npu`` for SGLang's own NPU kernel classes: npuconv's emulated ops, nothing else
    (installed after SGLang has decided it runs on CPU)."""
    from npuconv.kernels import OP_NAMES, emulated
    fake = types.ModuleType("torch_npu")
    fake.__spec__ = importlib.machinery.ModuleSpec("torch_npu", None)
    for op in OP_NAMES:
        setattr(fake, op, getattr(emulated, op))
    sys.modules["torch_npu"] = fake
    return fake


# ------------------------------------------------------------------------------ SGLang set-up
def setup(out: str, rank: int, world: int, port: int):
    import npuconv.engines.sglang as integration
    integration.register()
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.distributed import init_distributed_environment, initialize_model_parallel
    from sglang.srt.runtime_context import SpawnRanks, publish
    from sglang.srt.server_args import ServerArgs

    args = ServerArgs(model_path=out, tp_size=world, device="cpu")
    publish(args, role="scheduler", ranks=SpawnRanks(world_rank=rank))
    init_distributed_environment(world_size=world, rank=rank, local_rank=rank, backend="gloo",
                                 distributed_init_method=f"tcp://127.0.0.1:{port}")
    initialize_model_parallel(backend="gloo")
    model_config = ModelConfig(model_path=out)  # SGLang's own check of quant_method against its registry
    return model_config


def build(model_config):
    import torch
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.model_loader.weight_utils import get_quant_config, safetensors_weights_iterator
    from sglang.srt.models.registry import ModelRegistry

    arch = model_config.hf_config.architectures[0]
    model_class, _ = ModelRegistry.resolve_model_cls([arch])
    quant_config = get_quant_config(model_config, LoadConfig(), getattr(model_class, "packed_modules_mapping", {}))
    torch.set_default_dtype(model_config.dtype)
    model = model_class(config=model_config.hf_config, quant_config=quant_config)
    torch.set_default_dtype(torch.float32)
    files = sorted(os.path.join(model_config.model_path, f) for f in os.listdir(model_config.model_path)
                   if f.endswith(".safetensors"))
    model.load_weights(safetensors_weights_iterator(files))
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is not None and hasattr(method, "process_weights_after_loading"):
            method.process_weights_after_loading(module)
    return model, quant_config


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("fixture")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--port", type=int, default=29555)
    args = ap.parse_args()
    install_stubs()
    import torch.multiprocessing as mp
    if args.tp == 1:
        print(json.dumps(worker(0, args)))
        return
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(r, args, queue)) for r in range(args.tp)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    results.sort(key=lambda r: r.get("rank", 0))
    print(json.dumps({"ranks": results}))


def _child(rank, args, queue):
    try:
        queue.put(worker(rank, args))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        import traceback
        queue.put({"rank": rank, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]})


def worker(rank: int, args) -> dict:
    from checks import run_checks
    try:
        model_config = setup(args.out, rank, args.tp, args.port)
        model, quant_config = build(model_config)
        result = run_checks(model, quant_config, model_config, args.fixture, rank, args.tp)
    except Exception as e:  # noqa: BLE001 - one-line reasons are part of the result
        import traceback
        return {"rank": rank, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:],
                "quantization": None}
    result["rank"] = rank
    result["quantization"] = model_config.quantization
    return result


if __name__ == "__main__":
    main()
