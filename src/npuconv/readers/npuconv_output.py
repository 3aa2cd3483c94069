"""npuconv's own outputs (``npuconv.json`` + ``quantization_config.quant_method == "npuconv"``).

Each layer's canonical spec is stored in the manifest; its tensors are decoded back to canonical
form by the target that produced them (:func:`npuconv.registry.layer_target`; layout knowledge stays
with the targets).
This is what lets ``inspect`` describe a converted checkpoint and ``verify`` check that it
decodes back to the source.
"""

from __future__ import annotations

from functools import cached_property

from npuconv.io.checkpoint import Checkpoint
from npuconv.entries import from_storage
from npuconv.errors import InputError
from npuconv.model import LinearSpec, QuantizedLinear, spec_from_dict
from npuconv.readers.base import Reader
from npuconv.io.publish import MANIFEST
from npuconv.registry import layer_target


class NpuconvReader(Reader):
    format = "npuconv"

    @classmethod
    def matches(cls, checkpoint: Checkpoint) -> bool:
        return (checkpoint.root / MANIFEST).is_file() and checkpoint.quantization_config.get("quant_method") == "npuconv"

    @cached_property
    def manifest(self) -> dict:
        manifest = self.ckpt.read_json(MANIFEST)
        if not manifest or not isinstance(manifest.get("layers"), dict) or "target" not in manifest:
            raise InputError(f"{MANIFEST}: missing 'target' or 'layers'")
        return manifest

    def target_of(self, spec: LinearSpec):
        """The Target that wrote this layer (``npuconv.json`` layer entry ``target``, else the top-level one)."""
        return layer_target(self.manifest, self.manifest["layers"][spec.name])

    def summary(self) -> dict:
        source = self.manifest.get("source") or {}
        return {"target": self.manifest["target"], "source_format": source.get("format"), "source": source.get("id")}

    def consumed_files(self) -> list[str]:
        return [MANIFEST]

    def scan(self) -> list[LinearSpec]:
        specs = []
        for name, layer in self.manifest["layers"].items():
            try:
                tensors = tuple(entry["name"] for entry in layer["tensors"].values())
                specs.append(spec_from_dict(layer["spec"], tensors))
            except (KeyError, TypeError, AttributeError) as e:
                raise InputError(f"{MANIFEST}: layer '{name}' entry is malformed ({e})") from None
        return specs

    def tensors_of(self, spec: LinearSpec) -> dict:
        """The layer's stored tensors by role, NZ tiles undone (ND, still packed)."""
        entries = self.manifest["layers"][spec.name]["tensors"]
        out = {}
        for role, entry in entries.items():
            tensor = self.ckpt.get(entry["name"])
            if list(tensor.shape) != entry["storage_shape"]:
                raise InputError(
                    f"tensor '{entry['name']}' has shape {list(tensor.shape)}, manifest says {entry['storage_shape']}"
                )
            out[role] = from_storage(tensor, entry)
        return out

    def load_layer(self, spec: LinearSpec) -> QuantizedLinear:
        return self.target_of(spec).read_layer(spec, self.tensors_of(spec))


