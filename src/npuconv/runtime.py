"""Run converted layers on the Ascend kernels: the loader side of npuconv outputs.

``load_output(OUT)`` checks the manifest checksums, reads each converted layer's tensors by role and
puts them on the kernel backend's device (NZ tiles restored: on an NPU with the ND +
``npu_format_cast(t, 29)`` fallback described in docs/layouts.md, in the emulation as plain ND);
``NpuLinear.forward(x)`` calls the kernel exactly as vLLM-Ascend / SGLang do. ``verify`` uses the
same :func:`run_kernel`, so what is verified is what a loader would run.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from npuconv import layouts
from npuconv.model import FP4_E2M1, FP8_E4M3, LinearSpec


@dataclass
class NpuLinear:
    """One converted layer ready for its kernel: manifest entry, spec, ND tensors by role on the backend's device."""

    spec: LinearSpec
    entry: dict
    tensors: dict[str, torch.Tensor]
    backend: object

    tp: int = 1  # tensor-parallel degree emulated for layers whose kernel tensors depend on it (W4A8 scale_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_kernel(self.backend, self.entry, self.spec, self.tensors, x, tp=self.tp)[0]


def load_output(path: str | Path, device: str | None = None, check_checksums: bool = True) -> dict[str, NpuLinear]:
    """Every converted linear of an npuconv output, keyed by module name, ready to run."""
    from npuconv.checkpoint import Checkpoint
    from npuconv.errors import InputError
    from npuconv.kernels import get_backend
    from npuconv.readers import open_reader
    from npuconv.readers.npuconv_output import NpuconvReader
    from npuconv.verify import check_shards

    backend = get_backend(device)
    checkpoint = Checkpoint(Path(path))
    reader = open_reader(checkpoint)
    if not isinstance(reader, NpuconvReader):
        raise InputError(f"{path}: not an npuconv output (no npuconv.json with quant_method npuconv)")
    if check_checksums:
        check_shards(checkpoint, reader.manifest)
    layers = {}
    for spec in reader.linear_specs():
        entry = reader.manifest["layers"][spec.name]
        tensors = {role: to_backend(t, entry["tensors"][role], backend) for role, t in reader.tensors_of(spec).items()}
        layers[spec.name] = NpuLinear(spec, entry, tensors, backend)
    return layers


def to_backend(tensor: torch.Tensor, entry: dict, backend) -> torch.Tensor:
    """Move an ND tensor to the backend; on a real NPU, NZ entries become NZ tensors again."""
    tensor = tensor.to(backend.device)
    if entry.get("layout") == "nz" and backend.name == "npu":
        if entry.get("packing") == "int4pack":
            # int4pack NZ tiles are 16 rows × 32 bytes: cast the bytes as int8 (C0 = 32), then view as
            # int32, as vLLM-Ascend does (npu_loaders.md §3.6); npu_format_cast on int32 would use C0 = 16
            return backend.npu_format_cast(tensor.view(torch.int8), 29).view(torch.int32)
        tensor = backend.npu_format_cast(tensor, 29)
    return tensor


def run_kernel(
    backend, entry: dict, spec: LinearSpec, t: dict, x: torch.Tensor, *, tp: int | None = None,
    group_list: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Call the layer's kernel as the engines do; returns (y, the activations the reference must use).

    ``tp``: for layers whose kernel tensors depend on tensor parallelism (``kernel_mode`` ``a8w4``:
    ``scale_bias`` partial sums), run as ``tp`` row-parallel ranks and sum their outputs. ``None``
    (what ``verify`` passes) runs every configuration the written tensors serve and stacks them along
    the token axis: the tokens at TP=1, then again at the manifest's ``verify_tp``, so ``y`` and the
    returned activations may hold a multiple of ``x``'s rows.

    ``group_list`` (stacked experts only; what a serving engine passes): ``x`` is ``[T, K]`` tokens
    already dispatched to experts, sorted by expert, ``group_list[e]`` rows for expert ``e`` (counts,
    ``group_list_type=1``); ``y`` is ``[T, N]``. Without it every token goes through every expert.
    """
    mode = entry.get("kernel_mode")
    if mode == "a8w4":
        return _a8w4(backend, entry, spec, t, x, tp)
    if spec.num_experts is not None:  # a stacked MoE layer: y [E, ..., N] (see run_experts)
        return run_experts(backend, entry, spec, t, x, group_list=group_list)
    if mode == "a4w4":
        return _a4w4(backend, t, x)
    if mode == "dual_level_mx":
        return _dual_level(backend, t, x)
    kernel = entry["kernel"]
    if kernel == "npu_weight_quant_batchmatmul":
        return _weight_only(backend, entry, t, x), x
    if "weight_dtype" in entry:
        return _mx(backend, entry, spec, t, x)
    return _w8a8(backend, entry, spec, t, x)


def _weight_only(backend, entry: dict, t: dict, x: torch.Tensor) -> torch.Tensor:
    if "perm" in t:
        x = x[..., t["perm"].long()]
    scale = t["antiquant_scale"].to(x.dtype)
    offset = t["antiquant_offset"].to(x.dtype) if "antiquant_offset" in t else None
    bias = t.get("bias")
    if bias is not None:
        bias = bias.to(torch.float32 if x.dtype == torch.bfloat16 else x.dtype)
    return backend.npu_weight_quant_batchmatmul(
        x, t["weight"], scale, antiquant_offset=offset, bias=bias, antiquant_group_size=entry["antiquant_group_size"]
    )


def _w8a8(backend, entry: dict, spec: LinearSpec, t: dict, x: torch.Tensor):
    if "deq_scale" in t:  # static per-tensor activation quantization
        k = spec.in_features
        input_scale, input_offset = t["input_scale"].float(), t["input_offset"].float()
        x_q = backend.npu_quantize(
            x, (1.0 / input_scale).expand(k).to(x.dtype), input_offset.expand(k).to(x.dtype), torch.qint8, -1, False
        )
        y = backend.npu_quant_matmul(x_q, t["weight"], t["deq_scale"], bias=t["quant_bias"], output_dtype=x.dtype)
        x_effective = (x_q.double() - input_offset.double().to(x_q.device)) * input_scale.double().to(x_q.device)
        return y, x_effective
    x_q, x_scale = backend.npu_dynamic_quant(x)
    bias = t.get("bias")
    y = backend.npu_quant_matmul(
        x_q, t["weight"], t["weight_scale"], pertoken_scale=x_scale,
        bias=None if bias is None else bias.float(), output_dtype=x.dtype,
    )
    return y, x_q.double() * x_scale.double().unsqueeze(-1)


def _mx(backend, entry: dict, spec: LinearSpec, t: dict, x: torch.Tensor):
    fp4_weight = entry["weight_dtype"] == "float4_e2m1fn_x2"
    act_kind = spec.activation.kind if spec.activation is not None else FP8_E4M3
    fp4_act = act_kind == FP4_E2M1
    act_type = layouts.NPU_DTYPE_IDS["float4_e2m1fn_x2"] if fp4_act else torch.float8_e4m3fn
    x_q, x_scale = backend.npu_dynamic_mx_quant(x, dst_type=act_type)
    weight, scale = t["weight"], t["weight_scale"]
    if entry.get("view") == "transpose":  # sglang: [N, K] storage viewed as [K, N]
        weight, scale = weight.transpose(-1, -2), scale.transpose(-3, -2)
    fp4 = layouts.NPU_DTYPE_IDS["float4_e2m1fn_x2"]
    e8m0 = layouts.NPU_DTYPE_IDS["float8_e8m0fnu"]
    y = backend.npu_quant_matmul(
        x_q, weight, scale, scale_dtype=e8m0, pertoken_scale=x_scale, pertoken_scale_dtype=e8m0,
        x1_dtype=fp4 if fp4_act else None, x2_dtype=fp4 if fp4_weight else None,
        group_sizes=[0, 0, 32] if (fp4_weight and not fp4_act) else [1, 1, 32],
        output_dtype=x.dtype, bias=t.get("bias"),
    )
    k = spec.in_features
    codes = layouts.fp4_unpack(x_q.cpu()) if fp4_act else x_q.cpu()
    kb = -(-k // 32)
    x_scale_blocks = layouts.mx_scale_unpairs(x_scale.cpu(), kb)
    x_effective = layouts.mx_dequantize(codes, x_scale_blocks, FP4_E2M1 if fp4_act else FP8_E4M3)
    return y, x_effective.double()


# ---------------------------------------------------------------------------- W4A8 (A8W4 grouped matmul)
def _a8w4(backend, entry: dict, spec: LinearSpec, t: dict, x: torch.Tensor, tp: int | None):
    if tp is not None:
        return _a8w4_ranks(backend, spec, t, x, tp)
    y, x_effective = _a8w4_ranks(backend, spec, t, x, 1)
    check = int(entry.get("verify_tp") or 1)
    if check == 1:
        return y, x_effective
    y_tp, x_tp = _a8w4_ranks(backend, spec, t, x, check)
    return torch.cat([y, y_tp], dim=-2), torch.cat([x_effective, x_tp], dim=-2)


def _a8w4_ranks(backend, spec: LinearSpec, t: dict, x: torch.Tensor, tp: int):
    """``tp`` row-parallel ranks, each on its K slice with its own activation quantization and its
    ``scale_bias`` share (partial-sum columns ``[r·16/tp, (r+1)·16/tp)``); outputs summed (all-reduce)."""
    k = spec.in_features
    weight, scale = t["weight"], t["scale"]
    per_group = scale.dim() > len(spec.batch_shape) + 1  # [.., G, N]
    if tp == 1:
        shares = [t["scale_bias"]]
    else:
        if "scale_bias_partials" not in t or 16 % tp or k % tp:
            raise ValueError(f"{spec.name}: cannot run at tp={tp} (no scale_bias partial sums for it)")
        partials = t["scale_bias_partials"].float()
        width = partials.shape[-1] // tp
        shares = [partials[..., r * width:(r + 1) * width].sum(-1) for r in range(tp)]
    rows = k // tp
    groups = scale.shape[-2] // tp if per_group else 1
    outputs, activations = [], []
    for r in range(tp):
        x_r = x[..., r * rows:(r + 1) * rows]
        w_r = weight[..., r * rows:(r + 1) * rows, :]
        s_r = scale[..., r * groups:(r + 1) * groups, :] if per_group else scale
        y_r, x_eff = _a8w4_gmm(backend, spec, x_r, w_r, s_r, shares[r])
        outputs.append(y_r.float())
        activations.append(x_eff)
    y = torch.stack(outputs).sum(0)
    if "bias" in t:
        y = y + t["bias"].float()
    return y.to(x.dtype), torch.cat(activations, dim=-1)


def _a8w4_gmm(backend, spec: LinearSpec, x: torch.Tensor, weight, scale, scale_bias):
    """One rank: ``npu_dynamic_quant`` + the A8W4 ``npu_grouped_matmul`` (MoE form; a dense layer is E = 1)."""
    k = x.shape[-1]
    lead = x.shape[:-1]
    x_q, pts = backend.npu_dynamic_quant(x.reshape(-1, k))
    m = x_q.shape[0]
    experts = spec.num_experts
    if experts is None:
        weights, scales, biases, xs, counts = weight[None], scale[None], scale_bias[None], x_q, [m]
    else:  # every token through every expert: rows [e·M, (e+1)·M) go to expert e
        weights, scales, biases = weight, scale, scale_bias
        xs, counts = x_q.repeat(experts, 1), [m] * experts
        pts = pts.repeat(experts)
    group_list = torch.tensor(counts, dtype=torch.int64, device=x_q.device)
    y = backend.npu_grouped_matmul(
        [xs], [weights], scale=[scales], bias=[biases.float()], per_token_scale=[pts], group_list=group_list,
        split_item=2, group_type=0, group_list_type=1, output_dtype=x.dtype,
    )[0]
    if experts is not None:
        y = y.reshape(experts, *lead, -1)
    else:
        y = y.reshape(*lead, -1)
    x_effective = (x_q.double() * pts[:m].double().unsqueeze(-1)).reshape(*lead, k)
    return y, x_effective


# ---------------------------------------------------------------------------- W4A4 (int4 × int4 quant matmul)
def _a4w4(backend, t: dict, x: torch.Tensor):
    """``npu_dynamic_quant(x, dst_type=quint4x2)`` + ``npu_quant_matmul`` int4 × int4, per-token (SGLang)."""
    k = x.shape[-1]
    lead = x.shape[:-1]
    x_q, x_scale = backend.npu_dynamic_quant(x.reshape(-1, k), dst_type=torch.quint4x2)
    bias = t.get("bias")
    y = backend.npu_quant_matmul(
        x_q, t["weight"], t["weight_scale"], pertoken_scale=x_scale,
        bias=None if bias is None else bias.float(), output_dtype=x.dtype,
    )
    values = layouts.int4unpack(x_q.cpu()).double()  # [M, K] signed int4 activations
    x_effective = (values * x_scale.cpu().double().unsqueeze(-1)).reshape(*lead, k)
    return y.reshape(*lead, -1), x_effective


# ---------------------------------------------------------------------------- dual-level MXFP4 (950)
def _dual_level(backend, t: dict, x: torch.Tensor):
    """``npu_dynamic_dual_level_mx_quant`` + ``npu_dual_level_quant_matmul`` (ops §5.3, §5.4)."""
    k = x.shape[-1]
    lead = x.shape[:-1]
    x_q, x_l0, x_l1 = backend.npu_dynamic_dual_level_mx_quant(x.reshape(-1, k))
    bias = t.get("bias")
    y = backend.npu_dual_level_quant_matmul(
        x_q, t["weight"], x_l0, t["weight_scale_level0"], x_l1, t["weight_scale_level1"],
        bias=None if bias is None else bias.float(), output_dtype=x.dtype,
    )
    codes = layouts.fp4_unpack(x_q.cpu())[..., :k]
    scale = layouts.dual_level_scale(x_l0.cpu(), layouts.mx_scale_unpairs(x_l1.cpu(), -(-k // 32)), k)
    values = layouts.fp4_decode(codes).double() * scale.double().repeat_interleave(32, dim=-1)[..., :k]
    return y.reshape(*lead, -1), values.reshape(*lead, k)


# ---------------------------------------------------------------------------- stacked MoE experts
def run_experts(
    backend, entry: dict, spec: LinearSpec, t: dict, x: torch.Tensor, group_list: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A stacked expert layer (``spec.num_experts = E``, tensors ``[E, ...]``): every token through every
    expert, so ``y`` is ``[E, *x.shape[:-1], N]`` (expert ``e``'s output for all tokens in ``y[e]``).

    Weight-only and W8A8-dynamic stacks run on ``npu_grouped_matmul`` as the engines call it (MoE form:
    ``x`` repeated E times, ``group_list`` = tokens per expert, ``group_list_type=1``, ``group_type=0``;
    npu_loaders.md §3.3, §6.3). Other kernels (MX, static W8A8, W4A4, dual-level) loop the experts
    through the dense kernel, each with its ``[E, ...]`` tensors sliced (a tensor is per-expert when it
    has ≥ 2 dims and E leading). The second value is the activations the reference must use:
    ``[*x.shape[:-1], K]``, or ``[E, ..., K]`` when they differ per expert (static per-expert input scales).
    With ``group_list`` (routed tokens, see :func:`run_kernel`) both are ``[T, ...]`` rows.
    """
    kernel = entry["kernel"]
    if "kernel_mode" not in entry and kernel == "npu_weight_quant_batchmatmul" and "perm" not in t:
        return _gmm_weight_only(backend, spec, t, x, group_list), x
    if "kernel_mode" not in entry and kernel == "npu_quant_matmul" and "weight_dtype" not in entry and "deq_scale" not in t:
        return _gmm_w8a8_dynamic(backend, spec, t, x, group_list)
    experts = spec.num_experts
    dense = replace(spec, num_experts=None)
    if group_list is not None:  # routed rows: each expert's slice through the dense kernel
        outputs, activations, start = [], [], 0
        for e, count in enumerate(int(c) for c in group_list.tolist()):
            t_e = {role: v[e] if v.dim() >= 2 and v.shape[0] == experts else v for role, v in t.items()}
            y_e, x_e = run_kernel(backend, entry, dense, t_e, x[start:start + count])
            outputs.append(y_e)
            activations.append(x_e)
            start += count
        return torch.cat(outputs), torch.cat(activations)
    outputs, activations = [], []
    for e in range(experts):
        t_e = {role: v[e] if v.dim() >= 2 and v.shape[0] == experts else v for role, v in t.items()}
        y_e, x_e = run_kernel(backend, entry, dense, t_e, x)
        outputs.append(y_e)
        activations.append(x_e)
    same = all(torch.equal(activations[0], a) for a in activations[1:])
    return torch.stack(outputs), activations[0] if same else torch.stack(activations)


def _moe_rows(x: torch.Tensor, experts: int, group_list: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` as ``[M, K]`` repeated for every expert, and ``group_list`` (counts) = M per expert; or, given
    routed rows and their ``group_list``, those unchanged."""
    if group_list is not None:
        return x, group_list.to(device=x.device, dtype=torch.int64)
    rows = x.reshape(-1, x.shape[-1])
    counts = torch.full((experts,), rows.shape[0], dtype=torch.int64, device=x.device)
    return rows.repeat(experts, 1), counts


def _gmm_weight_only(backend, spec: LinearSpec, t: dict, x: torch.Tensor, group_list=None) -> torch.Tensor:
    """``npu_grouped_matmul`` antiquant (W4A16/W8A16 MoE): ``W = (w + antiquant_offset) * antiquant_scale``.
    A symmetric stack gets a zero offset, as vLLM-Ascend passes one (npu_loaders.md §6.3)."""
    experts = spec.num_experts
    scale = t["antiquant_scale"].to(x.dtype)
    offset = t["antiquant_offset"].to(x.dtype) if "antiquant_offset" in t else torch.zeros_like(scale)
    bias = t.get("bias")
    if bias is not None:
        bias = bias.to(torch.float32 if x.dtype == torch.bfloat16 else x.dtype)
    rows, counts = _moe_rows(x, experts, group_list)
    y = backend.npu_grouped_matmul(
        [rows], [t["weight"]], antiquant_scale=[scale], antiquant_offset=[offset],
        bias=None if bias is None else [bias], group_list=counts,
        split_item=2, group_type=0, group_list_type=1, output_dtype=x.dtype,
    )[0]
    return y if group_list is not None else y.reshape(experts, *x.shape[:-1], -1)


def _gmm_w8a8_dynamic(backend, spec: LinearSpec, t: dict, x: torch.Tensor, group_list=None):
    """``npu_dynamic_quant`` + ``npu_grouped_matmul`` int8 × int8 with per-token scales (W8A8_DYNAMIC MoE).
    The weight scale goes in the activation dtype for bf16 (vLLM-Ascend casts ``w13_scale_fp32`` to the
    params dtype; a bf16 scale gives bf16 output, torch_npu_ops.md §6.1), float32 otherwise."""
    experts = spec.num_experts
    k = x.shape[-1]
    x_q, x_scale = backend.npu_dynamic_quant(x.reshape(-1, k))
    scale = t["weight_scale"]
    if x.dtype == torch.bfloat16:
        scale = scale.to(torch.bfloat16)
    bias = t.get("bias")
    rows, counts = _moe_rows(x_q, experts, group_list)
    y = backend.npu_grouped_matmul(
        [rows], [t["weight"]], scale=[scale], per_token_scale=[x_scale if group_list is not None else x_scale.repeat(experts)],
        bias=None if bias is None else [bias.float()], group_list=counts,
        split_item=2, group_type=0, group_list_type=1, output_dtype=x.dtype,
    )[0]
    x_effective = (x_q.double() * x_scale.double().unsqueeze(-1)).reshape(*x.shape[:-1], k)
    if group_list is not None:
        return y, x_effective
    return y.reshape(experts, *x.shape[:-1], -1), x_effective
