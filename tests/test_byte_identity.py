"""Byte identity of every conversion against a table recorded from an earlier, trusted version.

Every fixture in tests/fixtures (and a seeded hand-made float model, for offline quantization) is
converted to every target it fits, with the option variants that change bytes (``--nz`` /
``--no-nz``, ``--mx-layout sglang``, ``--dtype``); the sha256 of every output file must equal the
recorded one. ``npuconv.json`` is compared after removing what legitimately differs between runs
(source path, fingerprint) and the fields added on purpose since the table was recorded
(``IGNORED_LAYER_KEYS`` / ``IGNORED_TENSOR_KEYS`` / ``IGNORED_MANIFEST_KEYS``; per-tensor shard
checksum records as the whole-file sha256 the table recorded). A target that refuses a fixture must still
refuse it (the reason is not compared).

Regenerate (only after a deliberate format change, and say so in the commit)::

    PYTHONPATH=src python3 tests/test_byte_identity.py --write
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import pytest
import torch

TABLE = Path(__file__).parent / "data" / "byte_identity.json"
FIXTURES = Path(__file__).parent / "fixtures"
FLOAT_SOURCE = "float_model_seed0"

# manifest fields added by design after the table was recorded (not part of the compared bytes)
IGNORED_LAYER_KEYS = ("target",)
IGNORED_TENSOR_KEYS = ("split",)
IGNORED_MANIFEST_KEYS = ("files",)  # issue 16: the output's file list (the table's own keys list them already)
# issue 15: shard checksums became per-tensor records (sha256-parts-1, checked by tests/test_digests.py);
# the table holds the sha256 of each whole shard, so a record is compared as that (its file's own bytes)


def _variants(target: str) -> list[tuple[str, dict]]:
    """(variant name, WriterOptions kwargs) that can change the bytes of ``target``."""
    variants = [("default", {})]
    if target.startswith("npu-"):
        variants += [("nz", {"nz": True}), ("no-nz", {"nz": False})]
    if "mx" in target:
        variants += [("sglang", {"mx_layout": "sglang"})]
    if target == "float":
        variants += [("float16", {"dtype": torch.float16}), ("float32", {"dtype": torch.float32})]
    return variants


def _sources(scratch: Path) -> dict[str, Path]:
    sources = {p.name: p for p in sorted(FIXTURES.iterdir()) if (p / "config.json").is_file()}
    sys.path.insert(0, str(Path(__file__).parent / "schemes"))
    from scheme_helpers import make_float_model

    make_float_model(scratch / FLOAT_SOURCE, seed=0)
    sources[FLOAT_SOURCE] = scratch / FLOAT_SOURCE
    return sources


def _normalized_manifest(data: dict, out: Path) -> dict:
    data = dict(data)
    data.pop("source_fingerprint", None)
    data["shards"] = {
        name: hashlib.sha256((out / name).read_bytes()).hexdigest() if isinstance(record, dict) else record
        for name, record in (data.get("shards") or {}).items()
    }
    for key in IGNORED_MANIFEST_KEYS:
        data.pop(key, None)
    data["source"] = {k: v for k, v in (data.get("source") or {}).items() if k != "id"}
    layers = {}
    for name, entry in (data.get("layers") or {}).items():
        entry = {k: v for k, v in entry.items() if k not in IGNORED_LAYER_KEYS}
        if isinstance(entry.get("tensors"), dict):
            entry["tensors"] = {
                role: {k: v for k, v in t.items() if k not in IGNORED_TENSOR_KEYS} for role, t in entry["tensors"].items()
            }
        layers[name] = entry
    data["layers"] = layers
    return data


def _digest_output(out: Path) -> dict[str, str]:
    digests = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = str(path.relative_to(out))
        if rel == "npuconv.json":
            text = json.dumps(_normalized_manifest(json.loads(path.read_text()), out), sort_keys=True)
            digests[rel] = hashlib.sha256(text.encode()).hexdigest()
        elif rel == "npuconv_nz.json":  # npu-float's NZ listing: tensor entries, like the manifest's
            data = json.loads(path.read_text())
            data["tensors"] = {
                name: {k: v for k, v in t.items() if k not in IGNORED_TENSOR_KEYS} for name, t in data["tensors"].items()
            }
            text = json.dumps(data, indent=2, sort_keys=True) + "\n"  # as npuconv.io.output.write_json
            digests[rel] = hashlib.sha256(text.encode()).hexdigest()
        else:
            digests[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def compute_table() -> dict[str, dict]:
    """``"<source>/<target>/<variant>"`` → ``{file: sha256}`` or ``{"refused": true}``."""
    from npuconv.convert import ConvertOptions, convert
    from npuconv.errors import NpuconvError
    try:
        from npuconv.registry import target_names
    except ImportError:  # the version the table was recorded from
        from npuconv.writers.targets import TARGETS

        def target_names():
            return sorted(TARGETS)

    table = {}
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        for source_name, source in _sources(scratch).items():
            for target in target_names():
                for variant, kwargs in _variants(target):
                    from npuconv.writers import WriterOptions

                    out = scratch / "out" / f"{source_name}-{target}-{variant}"
                    options = ConvertOptions(target=target, writer=WriterOptions(**kwargs))
                    try:
                        convert(source, out, options)
                    except NpuconvError:
                        table[f"{source_name}/{target}/{variant}"] = {"refused": True}
                        continue
                    table[f"{source_name}/{target}/{variant}"] = _digest_output(out)
    return table


def test_every_conversion_is_byte_identical_to_the_recorded_table():
    expected = json.loads(TABLE.read_text())
    actual = compute_table()
    assert sorted(actual) == sorted(expected)
    differing = [key for key in expected if actual[key] != expected[key]]
    assert not differing, f"{len(differing)} conversions changed, e.g. {differing[:5]}"


if __name__ == "__main__":
    if "--write" not in sys.argv:
        sys.exit(pytest.main([__file__, "-q"]))
    TABLE.parent.mkdir(exist_ok=True)
    TABLE.write_text(json.dumps(compute_table(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {TABLE}")
