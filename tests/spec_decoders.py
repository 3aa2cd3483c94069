"""Independent decoders of every npuconv target, written from the layout text — not from npuconv.

Sources of each rule: docs/layouts.md (the output contract) and the torch_npu op semantics it
cites (ops §0.1 int4 packing, §0.2 E8M0, §2.1 WQBMM ``W = (weight + offset) · scale``, §3.1
FRACTAL_NZ, §4.3/§4.5 quant_matmul scales, §6.2 A8W4 grouped matmul) and the OCP MX v1.0 spec
(E2M1 table, E8M0 ``2^(e − 127)``). Plain integer/float arithmetic on tensors read with the
``safetensors`` library; nothing here imports ``npuconv.layouts``, ``npuconv.packing``, the
writers, the readers or the kernels, so a convention changed consistently inside npuconv (nibble
order, NZ tile order, E8M0 bias, offset sign) makes these decoders disagree with it.

:func:`decode_output` returns, per layer of an npuconv output directory, the float64 weight the
NPU kernel computes with, in the source's ``[N, K]`` orientation (``[E, N, K]`` for expert stacks).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

#: OCP MX v1.0 §5.3.3: FP4 E2M1 magnitudes of codes 0..7 (bit 3 is the sign)
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
#: packed elements per stored element, by the manifest's ``packing``
PER_STORED = {None: 1, "int4pack": 8, "fp4x2": 2}
#: FRACTAL_NZ C0 on Atlas A2/A3 (ops §3.2): 32 bytes per fractal row; int4pack int32 words → 8 (ops §1 step 3)
NZ_C0 = {("int8", None): 32, ("uint8", None): 32, ("uint8", "fp4x2"): 32, ("float8_e4m3fn", None): 32,
         ("float16", None): 16, ("bfloat16", None): 16, ("float32", None): 16, ("int32", "int4pack"): 8}


def nz_to_nd(storage: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """FRACTAL_NZ (ops §3.1): storage ``[*B, C1, R1, 16, C0]`` holds ND ``[*B, R, C]`` with
    ``nd[r1*16 + r0, c1*C0 + c0] = nz[c1, r1, r0, c0]``; zero padding dropped. Loops, no reshapes."""
    *batch, c1n, r1n, r0n, c0n = storage.shape
    assert r0n == 16, storage.shape
    out = storage.new_zeros((*batch, r1n * 16, c1n * c0n))
    for c1 in range(c1n):
        for r1 in range(r1n):
            out[..., r1 * 16:(r1 + 1) * 16, c1 * c0n:(c1 + 1) * c0n] = storage[..., c1, r1, :, :]
    return out[..., :rows, :cols]


def signed_nibbles_of_int32(words: torch.Tensor) -> torch.Tensor:
    """ops §0.1: element ``8j + t`` is bits ``4t..4t+3`` of int32 word ``j``, two's complement."""
    u = words.to(torch.int64) & 0xFFFFFFFF
    fields = torch.stack([(u >> (4 * t)) & 0xF for t in range(8)], dim=-1).flatten(-2)
    return torch.where(fields >= 8, fields - 16, fields)


def fp4_of_bytes(data: torch.Tensor) -> torch.Tensor:
    """Two E2M1 codes per byte, the even element in the low nibble (float4_e2m1fn_x2) → float64 values."""
    b = data.to(torch.int64) & 0xFF
    codes = torch.stack([b & 0xF, b >> 4], dim=-1).flatten(-2)
    magnitude = E2M1[codes & 7]
    return torch.where(codes >= 8, -magnitude, magnitude)


def e8m0(scale: torch.Tensor) -> torch.Tensor:
    """OCP MX E8M0: ``2^(byte − 127)``, 255 is NaN (float64 holds 2^-127 exactly)."""
    e = scale.to(torch.int64)
    return torch.where(e == 255, torch.nan, torch.pow(2.0, (e - 127).double()))


def fp32_of_int64(t: torch.Tensor) -> torch.Tensor:
    """loaders §1.4a: the fp32 bit pattern in the low 32 bits of an int64, high word 0."""
    t = t.to(torch.int64)
    assert bool((t >> 32 == 0).all()), "high word must be 0"
    low = torch.where(t >= 2**31, t - 2**32, t)
    return low.to(torch.int32).view(torch.float32).double()


def ocp_mx_reference(w: torch.Tensor, element: str, round_mode: str = "rint") -> torch.Tensor:
    """OCP MX v1.0 §6.3 conversion of ``w`` ``[..., K]`` in 32-blocks along the last dim, dequantized:
    shared exponent ``X = floor(log2(amax)) − emax_elem`` (emax 8 for E4M3, 2 for E2M1; clamped to
    the E8M0 range), elements ``w / 2^X`` rounded on the element grid (``rint``: nearest, ties to the
    even code; ``round``: ties away from zero) and saturated to the max normal (448, 6); ``Q · 2^X``."""
    *lead, k = w.shape
    padded = torch.nn.functional.pad(w.double(), (0, (-k) % 32)).reshape(*lead, -1, 32)
    amax = padded.abs().amax(-1, keepdim=True)
    emax = 8 if element == "fp8" else 2
    x = torch.where(amax > 0, torch.floor(torch.log2(torch.where(amax > 0, amax, 1.0))) - emax, -127.0).clamp(-127, 127)
    p = padded / torch.pow(2.0, x)
    if element == "fp8":
        assert round_mode == "rint"
        q = p.clamp(-448, 448).to(torch.float8_e4m3fn).double()  # torch's cast rounds to nearest even
    else:
        distance = (p.abs().clamp(max=6).unsqueeze(-1) - E2M1).abs()
        tied = distance == distance.min(-1, keepdim=True).values
        if round_mode == "rint":  # of tied grid points, the even code
            pick = torch.where(tied, torch.tensor([0, 1, 0, 1, 0, 1, 0, 1]), 9).argmin(-1)
        else:  # the larger magnitude
            pick = torch.where(tied, torch.arange(8), -1).argmax(-1)
        q = torch.sign(p) * E2M1[pick]
    return (q * torch.pow(2.0, x)).reshape(*lead, -1)[..., :k]


def _tensor(files: dict, entry: dict, role: str) -> torch.Tensor | None:
    """A stored tensor in ND, still packed: NZ untiled to ``[..., rows, cols/packing]``."""
    info = entry["tensors"].get(role)
    if info is None:
        return None
    t = files[info["name"]]
    assert list(t.shape) == info.get("storage_shape", list(t.shape)), (info["name"], t.shape)
    if info["layout"] == "nz":
        c0 = NZ_C0[(info["dtype"], info.get("packing"))]
        assert t.shape[-1] == c0 and t.shape[-2] == 16, (info["name"], tuple(t.shape), c0)
        *_, rows, cols = info["shape"]
        t = nz_to_nd(t, rows, cols // PER_STORED[info.get("packing")])
    return t


def _per_k(values: torch.Tensor, k: int) -> torch.Tensor:
    """``[*B, G, N]`` group values → ``[*B, K, N]``: row ``k`` takes group ``k // (K/G)``."""
    return values.repeat_interleave(k // values.shape[-2], dim=-2)


def _wqbmm(files, entry) -> torch.Tensor:
    """ops §2.1: ``W[k, n] = (weight[k, n] + offset[g(k), n]) · scale[g(k), n]``; act-order rows sorted by ``perm``."""
    w = _tensor(files, entry, "weight")
    q = signed_nibbles_of_int32(w) if entry["tensors"]["weight"]["packing"] == "int4pack" else w.to(torch.int64)
    k = q.shape[-2]
    per_channel = entry["antiquant_group_size"] == 0
    scale = _tensor(files, entry, "antiquant_scale").double()
    offset = _tensor(files, entry, "antiquant_offset")
    if per_channel:
        scale = scale.unsqueeze(-2)
        offset = offset.unsqueeze(-2) if offset is not None else None
    weight = (q.double() + (0 if offset is None else _per_k(offset.double(), k))) * _per_k(scale, k)
    perm = _tensor(files, entry, "perm")
    if perm is not None:  # stored row i is original row perm[i]
        original = torch.empty_like(weight)
        original[..., perm.long(), :] = weight
        weight = original
    return weight.transpose(-1, -2)


def _quant_matmul(files, entry) -> torch.Tensor:
    """W8A8 (ops §4.3): dynamic ``W = weight · weight_scale``; static ``W = weight · deq_scale / input_scale``.
    A4W4: ``W = int4(weight) · weight_scale``. MX (ops §4.5, OCP MX): ``W = elem · 2^(scale − 127)`` per 32-block."""
    if entry.get("kernel_mode") == "a4w4":
        q = signed_nibbles_of_int32(_tensor(files, entry, "weight"))
        return (q.double() * _tensor(files, entry, "weight_scale").double()).transpose(-1, -2)
    if entry["tensors"]["weight_scale"]["dtype"] == "uint8":  # E8M0 block scales: MX mode
        return _mx(files, entry)
    q = _tensor(files, entry, "weight").double()
    if "deq_scale" in entry["tensors"]:
        deq = _tensor(files, entry, "deq_scale")
        deq = fp32_of_int64(deq) if deq.dtype == torch.int64 else deq.double()
        scale = deq / _tensor(files, entry, "input_scale").double()
        return (q * scale).transpose(-1, -2)
    return (q * _tensor(files, entry, "weight_scale").double().unsqueeze(-2)).transpose(-1, -2)


def _mx(files, entry) -> torch.Tensor:
    info = entry["tensors"]["weight"]
    w = _tensor(files, entry, "weight")
    scale = _tensor(files, entry, "weight_scale")
    if entry.get("view") == "transpose":  # sglang: [N, K] storage, scale [N, Kb/2, 2]
        values = fp4_of_bytes(w) if info["packing"] == "fp4x2" else w.double()  # [N, K]
        blocks = scale.reshape(scale.shape[0], -1)  # [N, Kb (padded)]
    else:  # vLLM-Ascend: [K, N] (FP4 pairs along N), scale [Kb/2, N, 2]: block j of n at [j//2, n, j%2]
        values = (fp4_of_bytes(w) if info["packing"] == "fp4x2" else w.double()).T
        blocks = scale.permute(1, 0, 2).reshape(scale.shape[1], -1)
    k = values.shape[1]
    per_element = e8m0(blocks)[:, torch.arange(k) // 32]
    return values * per_element


def _dual_level(files, entry) -> torch.Tensor:
    """docs/layouts.md npu-mxfp4-dual: ``W[n,k] = e2m1 · level0[k//512, n] · 2^(level1[n, k//32] − 127)``."""
    values = fp4_of_bytes(_tensor(files, entry, "weight"))  # [N, K], pairs along K
    k = values.shape[1]
    level0 = _tensor(files, entry, "weight_scale_level0").double().T[:, torch.arange(k) // 512]
    level1 = e8m0(_tensor(files, entry, "weight_scale_level1").reshape(values.shape[0], -1))[:, torch.arange(k) // 32]
    return values * level0 * level1


def _a8w4(files, entry) -> torch.Tensor:
    """ops §6.2 A8W4: ``W[k, n] = int4(weight[k, n]) · scale[g(k), n]`` (fp32 bits in int64); also checks
    ``scale_bias = 8 · Σ_k W[k, n]`` and that the 16 partials sum to it (docs/layouts.md npu-w4a8)."""
    q = signed_nibbles_of_int32(_tensor(files, entry, "weight")).double()
    scale = fp32_of_int64(_tensor(files, entry, "scale"))
    if scale.dim() == q.dim() - 1:  # per channel [*B, N]
        scale = scale.unsqueeze(-2)
    weight = q * _per_k(scale, q.shape[-2])
    expected_bias = 8 * weight.sum(-2)
    assert torch.allclose(_tensor(files, entry, "scale_bias").double(), expected_bias, rtol=1e-5, atol=1e-5)
    partials = _tensor(files, entry, "scale_bias_partials")
    if partials is not None:
        assert torch.allclose(partials.double().sum(-1), expected_bias, rtol=1e-5, atol=1e-5)
    return weight.transpose(-1, -2)


def _float(files, entry) -> torch.Tensor:
    return _tensor(files, entry, "weight").double()


KERNELS = {
    "npu_weight_quant_batchmatmul": _wqbmm,
    "npu_quant_matmul": _quant_matmul,
    "npu_grouped_matmul": _a8w4,
    "npu_dual_level_quant_matmul": _dual_level,
}


def decode_layers(layers: dict[str, dict], files: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Layers (name → manifest entry) of stored tensors ``files`` → float64 ``[N, K]`` (``[E, N, K]``) weights."""
    return {name: KERNELS.get(entry["kernel"], _float)(files, entry) for name, entry in layers.items()}


def decode_output(directory: Path) -> dict[str, torch.Tensor]:
    """Every quantized layer of an npuconv output directory → float64 ``[N, K]`` (``[E, N, K]``) weight."""
    directory = Path(directory)
    manifest = json.loads((directory / "npuconv.json").read_text())
    files: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        files.update(load_file(path))
    return decode_layers(manifest["layers"], files)


def tool_weight(reference: dict[str, torch.Tensor], name: str, experts: int | None) -> torch.Tensor:
    """The tool's weight of layer ``name`` from a ``<module>.weight`` dict; an npuconv expert stack
    ``<p>.experts.<proj>`` is the tool's per-expert modules ``<p>.experts.<e>.<proj>`` stacked."""
    if experts is None:
        return reference[f"{name}.weight"]
    prefix, proj = name.rsplit(".experts.", 1)
    return torch.stack([reference[f"{prefix}.experts.{e}.{proj}.weight"] for e in range(experts)])


def assert_decodes_to_tool(directory: Path, reference: dict[str, torch.Tensor]) -> None:
    """Every layer of an output, spec-decoded, equals the writing tool's dequantization (up to the
    float32 rounding of the tool's own product: lossless targets)."""
    decoded = decode_output(directory)
    assert decoded, f"{directory}: no quantized layer"
    for name, weight in decoded.items():
        expected = tool_weight(reference, name, weight.shape[0] if weight.dim() == 3 else None).double()
        assert weight.shape == expected.shape, name
        assert torch.allclose(weight, expected, rtol=2e-6, atol=1e-12), (name, (weight - expected).abs().max())
