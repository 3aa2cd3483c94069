"""``--to npu-w4a8``: int4 weights × int8 dynamic per-token activations (A8W4) for ``npu_grouped_matmul``.

Sources: symmetric 2/3/4-bit integer layers, per-channel or per-group with group 256 — msModelSlim
W4A8_DYNAMIC, and any symmetric GPTQ / AWQ / compressed-tensors layer when the user asks for int8
activations (the target adds them; the manifest says so). Both engines run W4A8 only through the
grouped matmul (npu_loaders.md §3.6), so a dense linear is written as a one-expert MoE (E = 1).

Written tensors per layer ``p`` (leading ``E`` for expert stacks), torch_npu_ops.md §6.2–6.3:

- ``p.weight`` int32 ``[K, N/8]``: the signed values ``q − 2**(b−1)`` transposed to ``[K, N]``,
  two per byte along N with the **even n in the low nibble**, viewed as int32 — the same bits as
  int4pack (ops §0.1, loaders §1.2). ND by default; ``--nz`` tiles it with C0 = 8 int32 (= the
  engines' int8 NZ cast with C0 = 32 bytes before the int32 view) when N % 64 == 0.
- ``p.scale`` int64: the fp32 weight scale's bit pattern in the low 32 bits, sign-extended
  (:func:`npuconv.layouts.float_bits_to_int64`, loaders §1.4a). Per-channel ``[N]``; per-group ``[K/g, N]`` with the scale first rounded
  fp32 → fp16 → fp32, as vLLM-Ascend ``process_scale`` does (:data:`GROUP_SCALE_VIA_FP16`).
- ``p.weight_scale`` fp32 ``[K/g, N]`` (per-group only): the exact source scale, not read by the
  kernel; it lets the layout check tell a lossy fp16 rounding apart from a corrupted ``scale``.
- ``p.scale_bias`` fp32 ``[N]`` = ``8 · Σ_k W[k, n] · s[g(k), n]`` (W the signed int4 values,
  s the scale the kernel is given), summed in float64: the bias the A8W4 kernel needs to cancel
  its ``−8·ΣW·s`` term (ops §6.3).
- ``p.scale_bias_partials`` fp32 ``[N, 16]`` for every layer not known to be column-parallel
  (:func:`npuconv.parallel.parallel_kind`): column ``c`` is ``8 · Σ_{k ∈ chunk c}`` over the 16 equal
  K-chunks ``[c·K/16, (c+1)·K/16)`` — msModelSlim's row-parallel ``scale_bias [N, 16]``. With
  tensor parallelism ``t`` (t | 16), rank ``r`` holds K rows ``[r·K/t, (r+1)·K/t)`` and its bias is
  the fp32 sum of columns ``[r·16/t, (r+1)·16/t)`` (what vLLM-Ascend does with its 16/t columns).
- ``p.bias`` fp32 ``[N]`` if the source layer has a bias: added **after** the kernel (the kernel's
  own bias slot is multiplied by the per-token scale, so it carries ``scale_bias``).

Kernel call (dense layer, E = 1; ``x_q, pts = npu_dynamic_quant(x)``)::

    y = npu_grouped_matmul([x_q], [weight[None]], scale=[scale[None]], bias=[scale_bias[None]],
                           per_token_scale=[pts], group_list=tensor([M]), split_item=2, group_type=0,
                           group_list_type=1, output_dtype=x.dtype)[0] (+ bias)
    # = pts · (Σ_g s[g,n] · Σ_{k∈g} x_q[m,k]·W[k,n] − 8·Σ_k W[k,n]·s[g(k),n] + scale_bias[n])

Kernel limits (ops-transformer ``aclnnGroupedMatmulWeightNz`` A8W4 symmetric): N % 8 == 0,
K ≤ 18432, per-group only with group 256 and K % 256 == 0.
"""

from __future__ import annotations

from npuconv.lazy_torch import torch

from npuconv import layouts
from npuconv.entries import tensor_entry
from npuconv.layouts import A8W4_SCALE_BIAS_CHUNKS
from npuconv.model import INT, LinearSpec, QuantizedLinear
from npuconv.errors import InputError
from npuconv.parallel import COLUMN, ROW, check_partial_sums_share, parallel_kind
from npuconv.writers.base import Target
from npuconv.writers.npu_common import maybe_nz, moe_rows

KERNEL = "npu_grouped_matmul"

#: Uncertain (ops-transformer aclnnGroupedMatmulWeightNz, [M]): the A8W4 symmetric kernel supports
#: quantGroupSize 256 only (per-channel is a single group). Other group sizes are refused.
A8W4_GROUP_SIZES = (256,)
#: A8W4 symmetric limit on K (same doc).
A8W4_MAX_K = 18432
#: vLLM-Ascend rounds the combined per-group scale fp32 → fp16 → fp32 before the int64 bit-cast
#: (loaders §3.6 step 2). The rounded value is then exact in the kernel's FP19 view of the scale.
GROUP_SCALE_VIA_FP16 = True
def signed_kn(layer: QuantizedLinear) -> torch.Tensor:
    """Signed int8 values ``q − 2**(bits−1)`` of the canonical codes, transposed to ``[..., K, N]``."""
    return layer.signed_codes().transpose(-1, -2).contiguous()


def codes_from_signed_kn(values_kn: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`signed_kn`: signed ``[..., K, N]`` → canonical uint8 codes ``[..., N, K]``."""
    return (values_kn.to(torch.int16) + 2 ** (bits - 1)).to(torch.uint8).transpose(-1, -2).contiguous()


def int4_weight_entry(spec: LinearSpec, c0: int | None) -> dict:
    p, n, k, batch = spec.name, spec.out_features, spec.in_features, spec.batch_shape
    return tensor_entry(f"{p}.weight", torch.int32, (*batch, k, n // 8), nz_c0=c0, packing="int4pack",
                        logical_shape=(*batch, k, n), n=-1, k=-2)


def _row(name: str) -> bool:
    """Layers not known to be column-parallel (:func:`npuconv.parallel.parallel_kind`) get the partial sums."""
    return parallel_kind(name) != COLUMN


def rounded_group_scale(scale: torch.Tensor) -> torch.Tensor:
    """The per-group scale the kernel gets: fp32, through fp16 when :data:`GROUP_SCALE_VIA_FP16`."""
    scale = scale.float()
    return scale.half().float() if GROUP_SCALE_VIA_FP16 else scale


class NpuW4A8Target(Target):
    name = "npu-w4a8"
    native_rank = 10
    summary = "W4A8 int4 weights + int8 dynamic activations for npu_grouped_matmul A8W4 (ModelSlim W4A8_DYNAMIC, symmetric GPTQ/AWQ/CT)"

    # ------------------------------------------------------------------ checks
    def accepts(self, spec: LinearSpec) -> str | None:
        act = spec.activation
        if spec.weight_format != INT or spec.bits not in (2, 3, 4):
            return "needs 2-, 3- or 4-bit integer weights"
        if not spec.symmetric:
            return "the A8W4 kernel is symmetric only (no weight zero point); use npu-int4"
        if act is not None and not (act.kind == INT and act.bits == 8 and act.dynamic and act.strategy == "token" and act.symmetric):
            return "the source quantizes activations differently (A8W4 takes int8 dynamic per-token); use npu-w4a4 or npu-int4"
        if spec.act_order:
            return "act-order (g_idx) layers cannot be written for the A8W4 kernel"
        n, k = spec.out_features, spec.in_features
        if n % 8:
            return f"N={n} is not a multiple of 8"
        if k > A8W4_MAX_K:
            return f"K={k}: the A8W4 kernel takes K ≤ {A8W4_MAX_K}"
        if spec.num_groups > 1 and (spec.group_size not in A8W4_GROUP_SIZES or k % spec.group_size):
            return f"group size {spec.group_size}: the A8W4 kernel takes per-channel or group {A8W4_GROUP_SIZES} dividing K"
        if _row(spec.name) and k % A8W4_SCALE_BIAS_CHUNKS:
            return f"K={k} is not a multiple of {A8W4_SCALE_BIAS_CHUNKS} (the scale_bias partial sums split K in 16 chunks)"
        return None

    def nz_c0(self, spec: LinearSpec) -> int | None:
        if not self.options.nz:
            return None
        if spec.out_features % 64:
            self.warn(f"{spec.name}: written ND instead of NZ (N={spec.out_features} is not a multiple of 64)")
            return None
        return layouts.nz_c0(torch.int32, int4_packed=True)

    # ------------------------------------------------------------------ plan
    def tensor_entries(self, spec: LinearSpec) -> dict[str, dict]:
        p, n, batch = spec.name, spec.out_features, spec.batch_shape
        groups = spec.num_groups
        scale_shape = (*batch, n) if groups == 1 else (*batch, groups, n)
        scale_k = None if groups == 1 else -2
        entries = {
            "weight": int4_weight_entry(spec, self.nz_c0(spec)),
            "scale": tensor_entry(f"{p}.scale", torch.int64, scale_shape, n=-1, k=scale_k),
        }
        if groups > 1:
            entries["weight_scale"] = tensor_entry(f"{p}.weight_scale", torch.float32, scale_shape, n=-1, k=scale_k)
        entries["scale_bias"] = tensor_entry(f"{p}.scale_bias", torch.float32, (*batch, n), n=-1)
        if _row(p):
            entries["scale_bias_partials"] = tensor_entry(f"{p}.scale_bias_partials", torch.float32,
                                                          (*batch, n, A8W4_SCALE_BIAS_CHUNKS), n=-2, k=-1)
        if spec.has_bias:
            entries["bias"] = tensor_entry(f"{p}.bias", torch.float32, (*batch, n), n=-1)
        return entries

    def verify_tp(self, spec: LinearSpec) -> int:
        """The largest TP degree ``t | 16`` whose K slices hold whole groups (1 for column-parallel layers)."""
        if not _row(spec.name):
            return 1
        unit = spec.effective_group_size if spec.num_groups > 1 else 1
        for tp in (16, 8, 4, 2):
            if spec.in_features % (tp * unit) == 0 and spec.in_features // tp >= 8:
                return tp
        return 1

    def describe_layer(self, spec: LinearSpec) -> dict:
        act = spec.activation
        row = _row(spec.name)
        k = spec.in_features
        return {
            "scheme": "w4a8_dynamic",
            "source_scheme": spec.source_scheme,
            "kernel": KERNEL,
            "kernel_mode": "a8w4",
            "activation": "int8-dynamic-per-token",
            "activation_added": act is None,
            "bits": spec.bits,
            "group_size": spec.group_size,
            "quant_group_size": 0 if spec.num_groups == 1 else spec.group_size,
            "symmetric": True,
            "code_offset": 2 ** (spec.bits - 1),
            "scale_encoding": "int64-fp32-bits",
            "group_scale_rounding": "fp16" if spec.num_groups > 1 and GROUP_SCALE_VIA_FP16 else None,
            "parallel": ROW if row else COLUMN,
            "scale_bias": {
                "formula": "8 * sum_k W[k,n] * scale[g(k),n]",
                "chunks": A8W4_SCALE_BIAS_CHUNKS if row else None,
                "chunk_size": k // A8W4_SCALE_BIAS_CHUNKS if row else None,
                "tp_rule": ("rank r of tp t (t | 16) holds K rows [r*K/t, (r+1)*K/t) and uses "
                            "scale_bias_partials[..., r*16/t:(r+1)*16/t].sum(-1)") if row else "every rank uses scale_bias",
            },
            "verify_tp": self.verify_tp(spec),
            "tensors": self.tensor_entries(spec),
        }

    # ------------------------------------------------------------------ write
    def write_layer(self, layer: QuantizedLinear) -> dict[str, torch.Tensor]:
        spec = layer.spec
        entries = self.tensor_entries(spec)
        values = signed_kn(layer)  # [.., K, N] int8
        canonical = layer.effective_scale()  # [.., N, G] fp32
        out: dict[str, torch.Tensor] = {"weight": maybe_nz(layouts.int4pack(values), entries["weight"].get("c0"))}
        if spec.num_groups == 1:
            kernel_scale = canonical[..., 0]  # [.., N]
            out["scale"] = layouts.float_bits_to_int64(kernel_scale)
            per_k = kernel_scale.unsqueeze(-2)  # [.., 1, N] broadcast over K
        else:
            exact = canonical.transpose(-1, -2).contiguous()  # [.., G, N]
            kernel_scale = rounded_group_scale(exact)
            out["scale"] = layouts.float_bits_to_int64(kernel_scale)
            out["weight_scale"] = exact
            per_k = kernel_scale.repeat_interleave(spec.group_size, dim=-2)  # [.., K, N]
            changed = int((kernel_scale != exact).sum())
            if changed:
                self.warn(f"{spec.name}: {changed} group scale(s) changed by the fp16 rounding vLLM-Ascend applies")
        values_nk, scale_nk = values.transpose(-1, -2), per_k.transpose(-1, -2)  # views [.., N, K]
        out["scale_bias"] = layouts.a8w4_scale_bias(values_nk, scale_nk)[..., 0]
        if "scale_bias_partials" in entries:
            out["scale_bias_partials"] = layouts.a8w4_scale_bias(values_nk, scale_nk, A8W4_SCALE_BIAS_CHUNKS).contiguous()
        if "bias" in entries:
            assert layer.bias is not None
            out["bias"] = layer.bias.float()
        return {entries[role]["name"]: out[role] for role in entries}

    def read_layer(self, spec: LinearSpec, tensors: dict[str, torch.Tensor]) -> QuantizedLinear:
        codes = codes_from_signed_kn(layouts.int4unpack(tensors["weight"]), spec.bits)
        kernel_scale = layouts.int64_bits_to_float(tensors["scale"])
        if spec.num_groups == 1:
            scale = kernel_scale.unsqueeze(-1)
        else:
            exact = tensors["weight_scale"].float()
            # the exact scale stands for the kernel's one only when the int64 holds its rounding
            consistent = torch.equal(rounded_group_scale(exact), kernel_scale)
            scale = (exact if consistent else kernel_scale).transpose(-1, -2).contiguous()
        return QuantizedLinear(spec, codes, scale, bias=tensors.get("bias"))

    # ------------------------------------------------------------------ kernel
    def serves(self, spec: LinearSpec) -> bool:
        act = spec.activation
        return (spec.weight_format == INT and act is not None and act.kind == INT and act.dynamic
                and act.bits == 8 and spec.bits <= 4 and self.accepts(spec) is None)

    def run(self, backend, entry: dict, spec: LinearSpec, tensors: dict, x: torch.Tensor, tp: int | None = None,
            group_list: torch.Tensor | None = None):
        """The A8W4 grouped matmul, as ``tp`` row-parallel ranks whose outputs are summed (all-reduce).

        ``tp=None`` (what ``verify`` passes) runs every configuration the written tensors serve and
        stacks them along the token axis: the tokens at TP=1, then again at the manifest's
        ``verify_tp``, so ``y`` and the returned activations may hold a multiple of ``x``'s rows.
        ``group_list``: routed expert rows (:meth:`Target.run`), each with its own per-token scale.
        """
        if tp is not None:
            return self._run_ranks(backend, entry, spec, tensors, x, tp, group_list)
        y, x_effective = self._run_ranks(backend, entry, spec, tensors, x, 1, group_list)
        check = int(entry.get("verify_tp") or 1)
        if check == 1:
            return y, x_effective
        y_tp, x_tp = self._run_ranks(backend, entry, spec, tensors, x, check, group_list)
        return torch.cat([y, y_tp], dim=-2), torch.cat([x_effective, x_tp], dim=-2)

    def _run_ranks(self, backend, entry: dict, spec: LinearSpec, t: dict, x: torch.Tensor, tp: int, group_list=None):
        """``tp`` row-parallel ranks, each on its K slice (:meth:`split`) with its own activation
        quantization and its ``scale_bias`` share; outputs summed in fp32, ``bias`` added once."""
        rows = spec.in_features // tp
        outputs, activations = [], []
        for r in range(tp):
            def share(role: str) -> torch.Tensor:
                return self.split(role, t[role], entry["tensors"][role], spec, r, tp, ROW)

            if tp == 1:
                scale_bias = t["scale_bias"]
            elif "scale_bias_partials" not in t:
                raise InputError(f"{spec.name}: cannot run at tp={tp} (a column-parallel layer has no scale_bias partial sums)")
            else:
                scale_bias = share("scale_bias_partials").float().sum(-1)
            y_r, x_eff = _a8w4_gmm(backend, spec, x[..., r * rows:(r + 1) * rows], share("weight"), share("scale"), scale_bias,
                                   group_list)
            outputs.append(y_r.float())
            activations.append(x_eff)
        y = torch.stack(outputs).sum(0)
        if "bias" in t:
            y = y + _expert_bias(t["bias"].float(), spec, group_list)
        return y.to(x.dtype), torch.cat(activations, dim=-1)

    # ------------------------------------------------------------------ tensor parallelism
    def split(self, role, tensor, entry, spec, rank, world, parallel):
        """As :meth:`Target.split`, plus the ``scale_bias`` rule: under row parallelism a rank's kernel
        bias is the sum of its ``scale_bias_partials`` columns ``[r·16/t, (r+1)·16/t)`` (the slice this
        returns for that role; ``t`` must divide 16), never a slice of the full ``scale_bias``."""
        if parallel == ROW and world > 1:
            if role == "scale_bias":
                raise InputError(f"{spec.name}: a row-parallel rank takes its scale_bias from scale_bias_partials")
            if role == "scale_bias_partials":
                check_partial_sums_share(spec.name, world, A8W4_SCALE_BIAS_CHUNKS)
        return super().split(role, tensor, entry, spec, rank, world, parallel)

    def split_unit(self, role, entry, spec, axis, parallel):
        if parallel == ROW and role in ("scale", "weight_scale"):
            return spec.group_size
        if parallel == ROW and role == "scale_bias_partials":
            return spec.in_features // A8W4_SCALE_BIAS_CHUNKS
        return super().split_unit(role, entry, spec, axis, parallel)


def _expert_bias(bias: torch.Tensor, spec: LinearSpec, group_list) -> torch.Tensor:
    """The bias added after the kernel, shaped for its output: ``[N]``; an expert stack's ``[E, N]`` as
    ``[E, 1, N]`` (every token through every expert) or one row per routed token."""
    if spec.num_experts is None:
        return bias
    return bias.unsqueeze(-2) if group_list is None else bias.repeat_interleave(group_list.to(bias.device), dim=0)


def _a8w4_gmm(backend, spec: LinearSpec, x: torch.Tensor, weight, scale, scale_bias, group_list=None):
    """One rank: ``npu_dynamic_quant`` + the A8W4 ``npu_grouped_matmul`` (MoE form; a dense layer is E = 1).
    An expert stack runs routed rows (``group_list``: tokens per expert, :func:`moe_rows`) or every
    token through every expert; either way each row keeps its own per-token scale."""
    k = x.shape[-1]
    lead = x.shape[:-1]
    x_q, pts = backend.ops.npu_dynamic_quant(x.reshape(-1, k))
    m = x_q.shape[0]
    experts = spec.num_experts
    if experts is None:
        weights, scales, biases, xs = weight[None], scale[None], scale_bias[None], x_q
        counts = torch.tensor([m], dtype=torch.int64, device=x_q.device)
    else:  # routed rows, or every token through every expert (rows [e·M, (e+1)·M) go to expert e)
        weights, scales, biases = weight, scale, scale_bias
        xs, counts = moe_rows(x_q, experts, group_list)
        pts = pts if group_list is not None else pts.repeat(experts)
    y = backend.ops.npu_grouped_matmul(
        [xs], [weights], scale=[scales], bias=[biases.float()], per_token_scale=[pts], group_list=counts,
        split_item=2, group_type=0, group_list_type=1, output_dtype=x.dtype,
    )[0]
    if experts is not None and group_list is None:
        y = y.reshape(experts, *lead, -1)
    else:
        y = y.reshape(*lead, -1)
    x_effective = (x_q.double() * pts[:m].double().unsqueeze(-1)).reshape(*lead, k)
    return y, x_effective
