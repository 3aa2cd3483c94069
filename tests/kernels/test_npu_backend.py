"""The npu backend passes arguments through to torch_npu unchanged (a fake torch_npu records the calls)."""

from __future__ import annotations

import inspect
import sys
import types

import pytest
import torch

from npuconv.errors import UnsupportedError
from npuconv.kernels import OP_NAMES, available_devices, emulated, get_backend
from npuconv.kernels import npu as npu_ops


class FakeTorchNpu(types.ModuleType):
    """Records (op, args, kwargs) for every ``npu_*`` call; has the dtype attributes of torch_npu 2.14 (ops §0.2)."""

    def __init__(self, available: bool = True) -> None:
        super().__init__("torch_npu")
        self.calls: list[tuple[str, tuple, dict]] = []
        self.npu = types.SimpleNamespace(is_available=lambda: available, device_count=lambda: int(available))
        self.int4 = 285
        self.float8_e8m0fnu = 293
        self.float4_e2m1fn_x2 = 296
        for op in OP_NAMES:
            setattr(self, op, self._recorder(op))

    def _recorder(self, op: str):
        def record(*args, **kwargs):
            self.calls.append((op, args, kwargs))
            return f"result:{op}"

        return record

    def last(self) -> tuple[str, tuple, dict]:
        assert self.calls, "no torch_npu call was made"
        return self.calls[-1]


@pytest.fixture
def fake(monkeypatch) -> FakeTorchNpu:
    module = FakeTorchNpu()
    monkeypatch.setitem(sys.modules, "torch_npu", module)
    return module


@pytest.fixture
def backend(fake):
    b = get_backend()
    assert b.name == "npu" and b.device == "npu:0" and not b.emulated
    return b


def test_selection_with_npu(fake):
    assert available_devices()[0] == "npu"
    assert get_backend("npu:1").device == "npu:1"
    assert get_backend("cpu").name == "emulated-cpu"


def test_selection_without_torch_npu(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # import torch_npu -> ImportError
    assert "npu" not in available_devices()
    assert get_backend().name in ("emulated-cpu", "emulated-cuda")
    with pytest.raises(UnsupportedError):
        get_backend("npu")
    with pytest.raises(UnsupportedError):
        get_backend("tpu")


def test_selection_npu_without_device(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", FakeTorchNpu(available=False))
    assert get_backend().name != "npu"


def _parameters(function) -> list[tuple]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values() if p.name != "self"]


@pytest.mark.parametrize("op", OP_NAMES)
def test_both_backends_implement_the_declared_op(op):
    from npuconv.kernels.ops import KernelOps

    declared = _parameters(getattr(KernelOps, op))
    assert _parameters(getattr(emulated, op)) == declared
    assert _parameters(getattr(npu_ops, op)) == declared


def test_op_names_are_the_protocol():
    assert len(OP_NAMES) == 11 and "npu_grouped_matmul" in OP_NAMES


def test_weight_quant_batchmatmul(backend, fake):
    x = torch.zeros(2, 64, dtype=torch.float16)
    w = torch.zeros(16, 8, dtype=torch.int32).t()  # int4pack of (N=16, K=64) -> transposed view (K/8, N)
    scale = torch.zeros(2, 16, dtype=torch.float16)
    assert backend.ops.npu_weight_quant_batchmatmul(x, w, scale, scale, antiquant_group_size=32) == "result:npu_weight_quant_batchmatmul"
    op, args, kwargs = fake.last()
    assert op == "npu_weight_quant_batchmatmul"
    assert args[0] is x and args[1] is w and args[2] is scale and args[1].stride() == (1, 8)
    assert kwargs == dict(
        antiquant_offset=scale, quant_scale=None, quant_offset=None, bias=None, antiquant_group_size=32, inner_precise=0
    )  # weight_dtype=None is left out
    backend.ops.npu_weight_quant_batchmatmul(x, torch.zeros(64, 8, dtype=torch.uint8), scale, weight_dtype="int4")
    assert fake.last()[2]["weight_dtype"] == 285


def test_quant_matmul_w8a8(backend, fake):
    x1, x2 = torch.zeros(3, 32, dtype=torch.int8), torch.zeros(32, 8, dtype=torch.int8)
    scale, pts = torch.zeros(8), torch.zeros(3)
    bias = torch.zeros(8, dtype=torch.int32)
    backend.ops.npu_quant_matmul(x1, x2, scale, pertoken_scale=pts, bias=bias, output_dtype=torch.bfloat16)
    op, args, kwargs = fake.last()
    assert op == "npu_quant_matmul" and args == (x1, x2, scale)
    assert set(kwargs) == {"offset", "pertoken_scale", "bias", "output_dtype"}  # newer kwargs left out when None
    assert kwargs["pertoken_scale"] is pts and kwargs["bias"].dtype == torch.int32 and kwargs["output_dtype"] == torch.bfloat16


def test_quant_matmul_mx(backend, fake):
    x1 = torch.zeros(3, 32, dtype=torch.uint8)
    x2 = torch.zeros(8, 32, dtype=torch.uint8).t()
    scale = torch.zeros(8, 1, 2, dtype=torch.uint8).transpose(0, 1)
    pts = torch.zeros(3, 1, 2, dtype=torch.uint8)
    backend.ops.npu_quant_matmul(
        x1,
        x2,
        scale,
        pertoken_scale=pts,
        output_dtype=torch.bfloat16,
        x1_dtype="float4_e2m1fn_x2",
        x2_dtype=296,
        scale_dtype="float8_e8m0fnu",
        pertoken_scale_dtype="torch_npu.float8_e8m0fnu",
        group_sizes=(1, 1, 32),
    )
    _, args, kwargs = fake.last()
    assert args[2].shape == (1, 8, 2) and args[2] is scale
    assert kwargs["x1_dtype"] == 296 and kwargs["x2_dtype"] == 296
    assert kwargs["scale_dtype"] == 293 and kwargs["pertoken_scale_dtype"] == 293
    assert kwargs["group_sizes"] == [1, 1, 32]


def test_dynamic_quant(backend, fake):
    x = torch.zeros(4, 16, dtype=torch.bfloat16)
    backend.ops.npu_dynamic_quant(x)
    assert fake.last() == ("npu_dynamic_quant", (x,), {"dst_type": torch.int8})
    smooth = torch.ones(16)
    backend.ops.npu_dynamic_quant(x, smooth_scales=smooth, dst_type=torch.quint4x2)
    _, _, kwargs = fake.last()
    assert kwargs["smooth_scales"] is smooth and kwargs["dst_type"] == torch.quint4x2 and "group_index" not in kwargs


def test_dynamic_mx_quant(backend, fake):
    x = torch.zeros(4, 64, dtype=torch.bfloat16)
    backend.ops.npu_dynamic_mx_quant(x, dst_type=torch.float8_e4m3fn)
    assert fake.last() == (
        "npu_dynamic_mx_quant",
        (x,),
        {"axis": -1, "round_mode": "rint", "dst_type": torch.float8_e4m3fn, "block_size": 32},
    )
    backend.ops.npu_dynamic_mx_quant(x, round_mode="round", dst_type="float4_e2m1fn_x2", scale_alg=1)
    kwargs = fake.last()[2]
    assert kwargs["dst_type"] == 296 and kwargs["round_mode"] == "round" and kwargs["scale_alg"] == 1


def test_quantize_positional(backend, fake):
    x, s, z = torch.zeros(2, 8), torch.ones(8), torch.zeros(8)
    backend.ops.npu_quantize(x, s, z, torch.qint8, -1, False)
    assert fake.last() == ("npu_quantize", (x, s, z, torch.qint8, -1, False), {})
    backend.ops.npu_quantize(x, s, None, torch.quint4x2)
    assert fake.last()[1][2:] == (None, torch.quint4x2, 1, True)  # torch_npu defaults (ops §8)


def test_layout_ops(backend, fake):
    s = torch.ones(8)
    backend.ops.npu_trans_quant_param(s)
    assert fake.last() == ("npu_trans_quant_param", (s, None), {})
    backend.ops.npu_trans_quant_param(s, s, round_mode=1)
    assert fake.last() == ("npu_trans_quant_param", (s, s), {"round_mode": 1})
    w = torch.zeros(16, 64, dtype=torch.int32)
    backend.ops.npu_convert_weight_to_int4pack(w)
    assert fake.last() == ("npu_convert_weight_to_int4pack", (w,), {"inner_k_tiles": 0})
    backend.ops.npu_format_cast(w, 29)
    assert fake.last() == ("npu_format_cast", (w, 29), {})
    u = torch.zeros(8, 32, dtype=torch.uint8)
    backend.ops.npu_format_cast(u, 29, customize_dtype=torch.float8_e4m3fn, input_dtype="float4_e2m1fn_x2")
    assert fake.last() == ("npu_format_cast", (u, 29), {"customize_dtype": torch.float8_e4m3fn, "input_dtype": 296})


def test_grouped_matmul(backend, fake):
    x = torch.zeros(5, 32, dtype=torch.int8)
    w = torch.zeros(2, 32, 2, dtype=torch.int32)
    scale = torch.zeros(2, 1, 16, dtype=torch.int64)
    bias = torch.zeros(2, 16)
    pts = torch.zeros(5)
    group_list = torch.tensor([2, 3])
    backend.ops.npu_grouped_matmul(
        [x], [w], scale=[scale], bias=[bias], per_token_scale=[pts], group_list=group_list,
        split_item=2, group_type=0, group_list_type=1, output_dtype=torch.bfloat16,
    )  # fmt: skip
    op, args, kwargs = fake.last()
    assert op == "npu_grouped_matmul" and args[0][0] is x and args[1][0] is w
    assert kwargs["scale"][0].dtype == torch.int64 and kwargs["bias"][0] is bias and kwargs["per_token_scale"][0] is pts
    assert kwargs["group_list"] is group_list and kwargs["group_list_type"] == 1 and kwargs["split_item"] == 2
    assert kwargs["group_type"] == 0 and kwargs["output_dtype"] == torch.bfloat16 and kwargs["act_type"] == 0
    assert "antiquant_scale" not in kwargs and "tuning_config" not in kwargs
