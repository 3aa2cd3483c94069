"""Runs INSIDE the SGLang venv: ``python per_expert_refusal.py OUT`` (OUT: a converted Mixtral).

SGLang 0.5.23 builds a quantized Mixtral as ``QuantMixtralForCausalLM`` (one linear per expert) for
methods outside its hard-coded list; npuconv's ``register`` keeps ``MixtralForCausalLM`` for
``quant_method: npuconv``. Here that choice is undone (SGLang's own ``get_model_architecture``
restored), so the model is built per expert, and npuconv must refuse it with a one-line reason
rather than leave the stacked experts unloaded. Prints ``RESULT {"fused": ..., "per_expert": ...}``.
"""

from __future__ import annotations

import json
import sys

import harness


def main(out: str) -> None:
    harness.install_stubs()
    harness.init_parallel(0, 1, harness_port(), out)
    model, _ = harness.build(out)
    fused = type(model).__name__
    import sglang.srt.model_loader.loader as loader
    import sglang.srt.model_loader.utils as utils

    loader.get_model_architecture = utils.get_model_architecture = utils.get_model_architecture.__wrapped__
    try:
        harness.build(out)
        refused = None
    except Exception as e:  # noqa: BLE001 - the refusal is the result
        refused = f"{type(e).__name__}: {e}"
    print("RESULT " + json.dumps({"fused": fused, "per_expert": refused}))


def harness_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main(sys.argv[1])
