"""Runs INSIDE the SGLang venv (see conftest.py): SGLang 0.5.23's own, unmodified model, linear, MoE
and weight-loading code on CPU, with npuconv's quantization method, at TP = 1 or 2 over gloo.

    python harness.py OUT FIXTURE --tp 2 [--engine-gptq]      # prints one JSON line of results

Stubs, infrastructure only: ``torchvision`` (imported by SGLang's multimodal configs; the PyPI wheel
needs CUDA ops) as an import-only module, and a ``torch_npu`` module whose ops are npuconv's
emulation (npuconv.kernels.emulated) for SGLang's own NPU GPTQ kernel class (``--engine-gptq``).
Everything else — registration, ModelConfig, the model loader (get_model → DefaultModelLoader:
get_quant_config, LlamaForCausalLM / Qwen2MoeForCausalLM / MixtralForCausalLM construction, its
safetensors iterator, load_weights, process_weights_after_loading), RowParallel all-reduce, FusedMoE
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
def init_parallel(rank: int, world: int, port: int, first_model: str) -> None:
    """gloo process groups the way SGLang's workers make them: publish server args, then the
    world group, then the model-parallel groups."""
    from sglang.srt.layers.quantization import QUANTIZATION_METHODS
    from sglang.srt.plugins import load_plugins
    load_plugins()  # SGLang's own discovery: finds npuconv where it is pip-installed with its entry point
    if "npuconv" not in QUANTIZATION_METHODS:  # npuconv on PYTHONPATH only: what the entry point calls
        import npuconv.engines.sglang as integration
        integration.register()
    from sglang.srt.distributed import init_distributed_environment, initialize_model_parallel
    _publish(first_model, rank, world)
    init_distributed_environment(world_size=world, rank=rank, local_rank=rank, backend="gloo",
                                 distributed_init_method=f"tcp://127.0.0.1:{port}")
    initialize_model_parallel(backend="gloo")


def _publish(model: str, rank: int, world: int) -> None:
    from sglang.srt.runtime_context import SpawnRanks, publish
    from sglang.srt.server_args import ServerArgs
    publish(ServerArgs(model_path=model, tp_size=world, device="cpu"), role="scheduler",
            ranks=SpawnRanks(world_rank=rank))


def build(out: str):
    """What ``python -m sglang.launch_server --model-path OUT`` does to get the model: SGLang's
    ModelConfig (checks quant_method against its registry), then its model loader
    (``sglang.srt.model_loader.get_model``: ``DefaultModelLoader`` → get_quant_config, the model class
    of config.json, its own safetensors iterator into the model's ``load_weights``, every quant
    method's ``process_weights_after_loading``), on the CPU device."""
    from sglang.srt.configs.device_config import DeviceConfig
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.model_loader import get_model

    model_config = ModelConfig(model_path=out)
    model = get_model(model_config=model_config, load_config=LoadConfig(), device_config=DeviceConfig(device="cpu"))
    return model, model_config


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", action="append", required=True, help="NAME=OUT=FIXTURE")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--port", type=int, default=29555)
    args = ap.parse_args()
    install_stubs()
    if args.tp == 1:
        print("RESULT " + json.dumps([worker(0, args)]))
        return
    import torch.multiprocessing as mp
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(r, args, queue)) for r in range(args.tp)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    print("RESULT " + json.dumps(sorted(results, key=lambda r: r["rank"])))


def _child(rank, args, queue):
    try:
        queue.put(worker(rank, args))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        queue.put({"rank": rank, "error": f"{type(e).__name__}: {e}"})


def worker(rank: int, args) -> dict:
    """Every case on this rank: {"rank", "cases": {name: {"quantization", "layers"} | {"error"}}}."""
    from checks import run_checks
    cases = [c.split("=") for c in args.case]
    init_parallel(rank, args.tp, args.port, cases[0][1])
    results = {}
    for name, out, fixture in cases:
        try:
            _publish(out, rank, args.tp)
            model, model_config = build(out)
            results[name] = run_checks(model, model_config, fixture, rank, args.tp)
            results[name]["quantization"] = model_config.quantization
        except Exception as e:  # noqa: BLE001 - a refusal is a one-line reason in the result
            results[name] = {"error": f"{type(e).__name__}: {e}"}
    return {"rank": rank, "cases": results}


if __name__ == "__main__":
    main()
