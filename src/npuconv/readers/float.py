"""Plain float checkpoints: no quantized linears; every tensor passes through.

Opt-in offline quantization: after :meth:`FloatReader.quantize_float_linears` (called by the converter
and by ``verify`` with the target's ``offline_recipe``), the float linears are listed and loaded as
canonical layers quantized by that recipe (see :mod:`npuconv.offline`), each one's error reported by
:meth:`FloatReader.layer_report`. Without the call nothing changes: ``inspect`` of a float model
still shows no quantized layer.

This is the fallback reader, so it also refuses what only *looks* like a float checkpoint because
the file saying how it is quantized is missing: a tensor with a suffix that only quantized
formats write (``qweight``, ``weight_packed``, …) or an integer/fp8 ``weight``, or a ``quant_method`` of
``npuconv`` without its ``npuconv.json`` manifest. Passing those through would turn packed codes
into "float" weights.
"""

from __future__ import annotations


from npuconv.io.checkpoint import Checkpoint
from npuconv.errors import InputError, UnsupportedError
from npuconv.model import LinearSpec, QuantizedLinear
from npuconv.readers.base import Reader

KNOWN_QUANT_METHODS = {"gptq", "gptqmodel", "awq", "compressed-tensors", "npuconv"}
# tensor suffixes that only quantized checkpoints write (GPTQ/AWQ, compressed-tensors, msModelSlim);
# an integer or fp8 ``.weight`` is quantized too (a learned ``weight_scale`` parameter is not proof)
QUANTIZED_SUFFIXES = (".qweight", ".qzeros", ".weight_packed", ".weight_zero_point", ".deq_scale")
QUANTIZED_WEIGHT_DTYPES = ("int8", "uint8", "int32", "float8_e4m3fn", "float8_e5m2")  # dtype names


class FloatReader(Reader):
    format = "float"
    recipe = None  # npuconv.offline.Recipe once quantize_float_linears() chose one

    def quantize_float_linears(self, recipe) -> None:
        self.recipe = recipe
        self.__dict__.pop("_specs", None)  # scan again with the recipe
        self._linears = {}
        self._errors: dict[str, float] = {}

    def layer_report(self, spec: LinearSpec) -> dict:
        if self.recipe is None or spec.name not in getattr(self, "_linears", {}):
            return {}
        from npuconv.offline import report

        return {"offline_quantization": report(self.recipe, spec, self._errors.get(spec.name))}

    def summary(self) -> dict:
        if self.recipe is None:
            return {}
        return {"offline_quantization": self.recipe.target}

    def load_layer(self, spec: LinearSpec) -> QuantizedLinear:
        linear = getattr(self, "_linears", {}).get(spec.name)
        if self.recipe is None or linear is None:
            raise InputError(f"'{spec.name}' is not a quantized layer of this float checkpoint")
        weight = self.tensor(linear.weight)
        bias = self.tensor(linear.bias) if linear.bias else None
        result = self.recipe.quantize(spec, weight, bias)
        self._errors[spec.name] = result.rel_l2
        return result.layer

    def _offline_specs(self) -> list[LinearSpec]:
        from npuconv.offline import float_linears

        specs = []
        for linear in float_linears(self.ckpt):
            reason = self.recipe.unsupported_reason(linear)
            if reason:
                self.warn(f"{linear.prefix}: kept float, not quantized for {self.recipe.target} ({reason})")
                continue
            self._linears[linear.prefix] = linear
            specs.append(self.recipe.spec(linear))
        return specs

    @classmethod
    def matches(cls, checkpoint: Checkpoint) -> bool:
        method = checkpoint.quantization_config.get("quant_method")
        if method and method not in KNOWN_QUANT_METHODS:
            raise UnsupportedError(
                f"config.json: quantization_config.quant_method {method!r} is not supported "
                "(supported: gptq, awq, compressed-tensors, msModelSlim, float)"
            )
        return True

    def scan(self) -> list[LinearSpec]:
        if self.ckpt.quantization_config.get("quant_method") == "npuconv":
            raise InputError(
                "config.json: quant_method 'npuconv' but npuconv.json (the conversion manifest) is missing"
            )
        for name in self.ckpt.names():
            quantized_weight = name.endswith(".weight") and self.ckpt.info(name).dtype_name in QUANTIZED_WEIGHT_DTYPES
            if name.endswith(QUANTIZED_SUFFIXES) or quantized_weight:
                raise InputError(
                    f"tensor '{name}' holds quantized data, but no quantization config was found "
                    "(config.json quantization_config, quantize_config.json or quant_model_description.json)"
                )
        return [] if self.recipe is None else self._offline_specs()


