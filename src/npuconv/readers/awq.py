"""AWQ checkpoints (AutoAWQ; the layout vLLM, transformers and GPTQModel also read) → canonical layers.

Facts: ``docs/research/checkpoint_formats.md`` §2 (read from AutoAWQ 0.2.9; the GEMM layout is
checked against the AutoAWQ-written fixture ``tests/fixtures/awq_gemm_g128``).

Configuration: ``config.json["quantization_config"]`` (else ``quantize_config.json``) with
``quant_method: "awq"``, ``bits`` (``w_bit``) = 4, ``group_size`` (``q_group_size``; -1: one group
of K), ``zero_point`` (must be true: AutoAWQ cannot pack ``zero_point: false``), ``version``
(transformers ≥ 5 also ``format``; missing: ``"gemm"``), ``modules_to_not_convert`` (a module
whose name contains one of these strings is not quantized, as AutoAWQ and transformers match).
``gemv_fast`` (llm-awq interleaved int16 layout), ``marlin`` and any other version are refused.

AWQ is always asymmetric: zero points are stored as is (no −1 as in GPTQ v1), unsigned 0..15,
and there is no act-order. Canonical rule ``w[n, k] = (q[n, k] - z[n, k // g]) * s[n, k // g]``.

GEMM (``version: "gemm"``, ``WQLinear_GEMM``), tensors of a linear ``<p>``:

=============  =======  =============  ==============================================================
``qweight``    int32    ``[K, N/8]``   packed along N; nibble i of a word holds logical column
                                       ``8c + AWQ_ORDER[i]``, ``AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]``
``qzeros``     int32    ``[G, N/8]``   same packing
``scales``     float    ``[G, N]``     fp16
``bias``       float    ``[N]``        optional
=============  =======  =============  ==============================================================

→ codes = ``awq_unpack(qweight)`` ``[K, N]`` transposed to ``[N, K]``; zero =
``awq_unpack(qzeros).T`` int16 ``[N, G]``; scale = ``scales.T``.

GEMV (``version: "gemv"``, ``WQLinear_GEMV``):

=============  =======  ===============  ============================================================
``qweight``    int32    ``[N, K/8]``     packed along K, sequential nibbles (k = 8c + i at nibble i)
``qzeros``     int32    ``[N, Wz]``      zero points along the group axis, sequential nibbles;
                                         ``Wz = ceil(ceil(G/8) / m) * m``, m = 1 (g ≥ 128), 2 (64),
                                         4 (32): padded beyond G
``scales``     float    ``[N, Wz*8]``    only the first G columns are meaningful (rest zero)
=============  =======  ===============  ============================================================

→ codes = the ``qweight`` bitstream unpacked as is ``[N, K]``; zero = the first G fields of each
``qzeros`` row; scale = ``scales[:, :G]``. (AutoAWQ has no torch dequantizer for GEMV: its
fused kernel computes the same formula in fp16.)
"""

from __future__ import annotations

from dataclasses import dataclass

from npuconv.lazy_torch import torch

from npuconv.io.checkpoint import Checkpoint
from npuconv.io.safetensors_io import is_float
from npuconv.errors import InputError, UnsupportedError
from npuconv import model
from npuconv.model import LinearSpec, QuantizedLinear
from npuconv.packing import NIBBLE_HIGH_BITS, awq_unpack, awq_words_to_bitstream, int4_words_nk_to_kn, unpack_bitstream
from npuconv.readers.base import Reader, module_prefixes

GEMM = "gemm"
GEMV = "gemv"
REFUSED_VERSIONS = {
    "gemv_fast": "llm-awq's interleaved int16 layout",
    "marlin": "a Marlin kernel repacking",
}
PACK = 8  # 4-bit codes per int32 word


def unpack_gemm(words: torch.Tensor, out_features: int) -> torch.Tensor:
    """AWQ GEMM ``qweight [K, N/8]`` or ``qzeros [G, N/8]`` → uint8 ``[N, K]`` / ``[N, G]`` in logical order.

    Returned as the transposed *view* of the contiguous ``[K, N]`` unpack (no copy; NPU writers
    want ``[K, N]``)."""
    return awq_unpack(words, out_features).t()


def unpack_gemv(words: torch.Tensor, count: int) -> torch.Tensor:
    """AWQ GEMV ``qweight [N, K/8]`` / ``qzeros [N, Wz]`` → uint8 ``[N, count]`` (sequential nibbles)."""
    return unpack_bitstream(words, 4, count)


@dataclass(frozen=True)
class AWQConfig:
    source: str
    version: str
    group_size: int
    modules_to_not_convert: tuple[str, ...]

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint) -> "AWQConfig":
        raw, source = checkpoint.quantization_config, "config.json: quantization_config"
        if str(raw.get("quant_method", "")).lower() != "awq":
            raw, source = checkpoint.read_json("quantize_config.json") or {}, "quantize_config.json"
        version = raw.get("version") or raw.get("format") or GEMM
        if not isinstance(version, str):
            raise InputError(f"{source}: version {version!r} is not a string")
        version = version.lower()
        if version in REFUSED_VERSIONS:
            raise UnsupportedError(f"{source}: AWQ version '{version}' ({REFUSED_VERSIONS[version]}) is not supported; use 'gemm' or 'gemv'")
        if version not in (GEMM, GEMV):
            raise UnsupportedError(f"{source}: AWQ version '{version}' is not supported (expected 'gemm' or 'gemv')")
        bits = raw.get("bits", raw.get("w_bit", 4))
        if bits != 4 or isinstance(bits, bool):
            raise UnsupportedError(f"{source}: bits {bits!r} is not supported (AWQ stores 4-bit codes only)")
        group_size = raw.get("group_size", raw.get("q_group_size", 128))
        if isinstance(group_size, bool) or not isinstance(group_size, int) or not (group_size == -1 or group_size > 0):
            raise InputError(f"{source}: group_size {group_size!r} must be -1 or a positive integer")
        if raw.get("zero_point", True) is not True:
            raise UnsupportedError(f"{source}: zero_point {raw.get('zero_point')!r} is not supported (AWQ is written with zero points)")
        skip = raw.get("modules_to_not_convert") or []
        if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
            raise InputError(f"{source}: modules_to_not_convert must be a list of strings or null")
        return cls(source, version, group_size, tuple(skip))

    def excluded(self, name: str) -> str | None:
        """The ``modules_to_not_convert`` entry that keeps ``name`` in float, if any (substring match)."""
        return next((key for key in self.modules_to_not_convert if key in name), None)


class AWQReader(Reader):
    format = "awq"
    stack_experts = True  # MoE experts → one [E, N, K] layer (npuconv.experts)

    def __init__(self, checkpoint: Checkpoint):
        super().__init__(checkpoint)
        self.config = AWQConfig.from_checkpoint(checkpoint)

    @classmethod
    def matches(cls, checkpoint: Checkpoint) -> bool:
        if str(checkpoint.quantization_config.get("quant_method", "")).lower() == "awq":
            return True
        raw = checkpoint.read_json("quantize_config.json")
        return raw is not None and str(raw.get("quant_method", "")).lower() == "awq"

    def consumed_files(self) -> list[str]:
        return ["quantize_config.json"] if (self.ckpt.root / "quantize_config.json").is_file() else []

    def summary(self) -> dict:
        return {"version": self.config.version, "bits": 4, "group_size": self.config.group_size, "zero_point": True}

    def scan(self) -> list[LinearSpec]:
        prefixes = module_prefixes(self.ckpt.names(), ".qweight")
        if not prefixes:
            raise InputError(f"{self.config.source} declares AWQ, but no '*.qweight' tensor is in the checkpoint")
        specs = []
        for prefix in prefixes:
            key = self.config.excluded(prefix)
            if key is not None:
                raise InputError(
                    f"tensor '{prefix}.qweight': the module matches modules_to_not_convert entry {key!r} "
                    f"of {self.config.source}, but it is stored quantized"
                )
            specs.append(self._spec(prefix))
        return specs

    def _spec(self, prefix: str) -> LinearSpec:
        names = {part: f"{prefix}.{part}" for part in ("qweight", "qzeros", "scales", "bias")}
        for part in ("qzeros", "scales"):
            self.require(names[part], f"AWQ module '{prefix}'")
        qweight, qzeros, scales = (self.ckpt.info(names[p]) for p in ("qweight", "qzeros", "scales"))
        for info in (qweight, qzeros):
            if info.dtype_name != "int32":
                raise UnsupportedError(f"tensor '{info.name}': dtype {info.dtype}, AWQ packs into int32")
        for info in (qweight, qzeros, scales):
            if len(info.shape) != 2:
                raise InputError(f"tensor '{info.name}': expected 2 dimensions, got shape {list(info.shape)}")
        bias = self.ckpt.info(names["bias"]) if self.ckpt.has(names["bias"]) else None
        if not is_float(scales.dtype_name):
            raise InputError(f"tensor '{scales.name}': dtype {scales.dtype}, expected a float dtype")
        if self.config.version == GEMM:
            k, n = qweight.shape[0], qweight.shape[1] * PACK
        else:
            n, k = qweight.shape[0], qweight.shape[1] * PACK
        if k == 0 or n == 0:
            raise InputError(f"tensor '{qweight.name}': shape {list(qweight.shape)} holds no weights")
        size = k if self.config.group_size == -1 else self.config.group_size
        if k % size:
            raise InputError(f"tensor '{qweight.name}': group_size {size} does not divide in_features K = {k}")
        groups = k // size
        if self.config.version == GEMM:
            _expect_shape(scales, (groups, n), f"[K/g, N] for K = {k}, N = {n}")
            _expect_shape(qzeros, (groups, n // PACK), f"[K/g, N/8] for K = {k}, N = {n}")
        else:
            width = qzeros.shape[1]
            if qzeros.shape[0] != n or width * PACK < groups:
                raise InputError(
                    f"tensor '{qzeros.name}': shape {list(qzeros.shape)} cannot hold [N, G] = [{n}, {groups}] zero points"
                )
            if scales.shape[0] != n or scales.shape[1] < groups:
                raise InputError(f"tensor '{scales.name}': shape {list(scales.shape)} cannot hold [N, G] = [{n}, {groups}] scales")
        return LinearSpec(
            name=prefix,
            out_features=n,
            in_features=k,
            bits=4,
            group_size=self.config.group_size,
            symmetric=False,
            scale_dtype=scales.dtype_name,
            has_bias=bias is not None,
            bias_dtype=None if bias is None else bias.dtype_name,
            source_scheme=f"awq_{self.config.version}",
            source_tensors=tuple(name for name in names.values() if self.ckpt.has(name)),
        )

    def load_layer(self, spec: LinearSpec) -> QuantizedLinear:
        prefix = spec.name
        qweight = self.tensor(f"{prefix}.qweight")
        qzeros = self.tensor(f"{prefix}.qzeros")
        scales = self.tensor(f"{prefix}.scales")
        groups = spec.num_groups
        # fast path: codes stay packed, only nibbles move (model.QuantizedLinear.packed_kn)
        fused = model.PACKED_CODES and spec.out_features % 8 == 0 and spec.in_features % 8 == 0
        packed = codes = None
        if self.config.version == GEMM:
            if fused:
                packed = awq_words_to_bitstream(qweight, NIBBLE_HIGH_BITS)
            else:
                codes = unpack_gemm(qweight, spec.out_features)
            zero = unpack_gemm(qzeros, spec.out_features)
            scale = scales.t().contiguous()
        else:
            if fused and qweight.shape[1] * 8 == spec.in_features:
                packed = int4_words_nk_to_kn(qweight, NIBBLE_HIGH_BITS)
            else:
                codes = unpack_gemv(qweight, spec.in_features)
            zero = unpack_gemv(qzeros, groups)
            scale = scales[:, :groups].contiguous()
        self.check_scale(f"{prefix}.scales", scales if self.config.version == GEMM else scale)  # GEMV: padding excluded
        bias = self.tensor(f"{prefix}.bias") if spec.has_bias else None
        return QuantizedLinear(spec=spec, qweight=codes, scale=scale, zero=zero.to(torch.int16), bias=bias, packed_kn=packed)


def _expect_shape(info, shape: tuple[int, int], what: str) -> None:
    if tuple(info.shape) != shape:
        raise InputError(f"tensor '{info.name}': shape {list(info.shape)}, expected {list(shape)} ({what})")


