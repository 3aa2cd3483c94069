"""safetensors header validation, tensor reads and the streaming writer."""

from __future__ import annotations

import json
import math
import struct

import pytest
import torch
from hypothesis import given, settings, strategies as st

from npuconv.errors import InputError, OutputError
from npuconv.io.safetensors_io import (
    MAP_MIN_BYTES,
    StreamingWriter,
    TensorPlan,
    encode_header,
    integer_range,
    iter_values,
    read_header,
    read_ints,
    read_tensor,
    save_file,
)


def raw_file(path, header: dict, data: bytes = b"", *, hlen: int | None = None) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if hlen is None else hlen) + raw + data)


def test_round_trip_all_dtypes(tmp_path):
    tensors = {
        "a": torch.arange(12, dtype=torch.int32).reshape(3, 4),
        "b": torch.randn(5, dtype=torch.bfloat16),
        "c": torch.randn(2, 3).to(torch.float8_e4m3fn),
        "d": torch.tensor([], dtype=torch.float16),
        "e": torch.tensor([1, -2], dtype=torch.int64),
    }
    path = tmp_path / "x.safetensors"
    save_file(tensors, path, {"format": "pt"})
    infos, metadata = read_header(path)
    assert metadata == {"format": "pt"}
    for name, tensor in tensors.items():
        got = read_tensor(infos[name])
        assert got.dtype == tensor.dtype and got.shape == tensor.shape
        assert torch.equal(got.view(torch.uint8), tensor.view(torch.uint8))


def test_values_read_without_torch_equal_the_tensors(tmp_path, monkeypatch):
    """iter_values (struct, no torch) gives torch's values for every dtype Python can hold, across chunks."""
    monkeypatch.setattr("npuconv.io.safetensors_io.VALUES_PER_CHUNK", 3)
    tensors = {
        "bool": torch.tensor([[True, False, True], [False, False, True]]),
        "u8": torch.tensor([0, 255, 7], dtype=torch.uint8),
        "i8": torch.tensor([-128, 127, -1, 0], dtype=torch.int8),
        "i16": torch.tensor([-32768, 32767], dtype=torch.int16),
        "i32": torch.tensor([[-2**31, 2**31 - 1], [5, -6]], dtype=torch.int32),
        "i64": torch.tensor([-2**63, 2**63 - 1, 3, 4, 5, 6, 7], dtype=torch.int64),
        "f16": torch.tensor([0.1, -65504.0, float("inf"), 6e-8, -0.0, 3.0, 2.5], dtype=torch.float16),
        "bf16": torch.tensor([[0.1, -3e38, float("-inf")], [1e-40, 8.0, -0.5]], dtype=torch.bfloat16),
        "f32": torch.tensor([0.1, -1e-45, 3.4e38], dtype=torch.float32),
        "f64": torch.tensor([0.1, 1e-300, -1e300, 0.5], dtype=torch.float64),
        "empty": torch.zeros(0, 4, dtype=torch.float32),
    }
    path = tmp_path / "v.safetensors"
    save_file(tensors, path)
    infos, _ = read_header(path)
    for name, tensor in tensors.items():
        got = list(iter_values(infos[name]))
        assert got == tensor.flatten().tolist(), name
        assert all(type(a) is type(b) for a, b in zip(got, tensor.flatten().tolist())), name
    nan = torch.tensor([float("nan")], dtype=torch.bfloat16)
    save_file({"nan": nan}, path)
    assert math.isnan(next(iter_values(read_header(path)[0]["nan"])))


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int8, torch.int16, torch.uint16, torch.int32,
                                   torch.int64, torch.uint64, torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("values, expected", [
    ([[3, 0, 3, 7], [7, 1, 0, 3]], (0, 7)),
    ([[3, 0, 3, 7], [7, 1.5, 0, 3]], None),
    ([[3, 0, float("nan"), 7], [7, 1, 0, 3]], None),
    ([[3, 0, float("inf"), 7], [7, 1, 0, 3]], None),
])
def test_integer_range_is_the_same_with_and_without_torch(tmp_path, monkeypatch, dtype, values, expected):
    tensor = torch.tensor(values)
    if not dtype.is_floating_point:
        if expected is None:
            return  # an integer tensor holds only integers
        expected = (0, 1) if dtype == torch.bool else expected
    path = tmp_path / "r.safetensors"
    save_file({"t": tensor.to(dtype)}, path)
    info = read_header(path)[0]["t"]
    without_torch = integer_range(info)
    monkeypatch.setattr("npuconv.io.safetensors_io.TORCH_FREE_VALUES", 7)  # 8 values: read with torch
    assert integer_range(info) == without_torch == expected
    assert expected is None or list(map(type, without_torch)) == [int, int]


def test_values_of_float8_and_ints_of_floats_are_refused(tmp_path, monkeypatch):
    path = tmp_path / "v.safetensors"
    save_file({"f8": torch.zeros(2).to(torch.float8_e4m3fn), "f32": torch.zeros(2)}, path)
    infos, _ = read_header(path)
    with pytest.raises(InputError, match="tensor 'f8' is float8_e4m3fn; expected an integer, bool or float16"):
        iter_values(infos["f8"])
    with pytest.raises(InputError, match="tensor 'f8' is float8_e4m3fn"):
        integer_range(infos["f8"])
    monkeypatch.setattr("npuconv.io.safetensors_io.TORCH_FREE_VALUES", 1)  # the same dtypes when read with torch
    with pytest.raises(InputError, match="tensor 'f8' is float8_e4m3fn"):
        integer_range(infos["f8"])
    with pytest.raises(InputError, match="tensor 'f32' is float32, not an integer type"):
        read_ints(infos["f32"])


def test_compatible_with_reference_library(tmp_path):
    """Files we write load with the safetensors library, and files it writes load with ours."""
    from safetensors.torch import load_file, save_file as st_save

    tensors = {"w": torch.randn(4, 8), "q": torch.randint(-8, 8, (8, 2), dtype=torch.int32)}
    ours = tmp_path / "ours.safetensors"
    save_file(tensors, ours, {"format": "pt"})
    theirs = load_file(ours)
    assert all(torch.equal(theirs[k], v) for k, v in tensors.items())
    ref = tmp_path / "ref.safetensors"
    st_save(tensors, ref)
    infos, _ = read_header(ref)
    assert all(torch.equal(read_tensor(infos[k]), v) for k, v in tensors.items())


def test_header_is_deterministic_and_aligned():
    plans = [TensorPlan("b", torch.float16, (3,)), TensorPlan("a", torch.int8, (5,))]
    one, two = encode_header(plans, {"format": "pt"}), encode_header(plans, {"format": "pt"})
    assert one == two
    assert len(one) % 8 == 0


BAD_HEADERS = [
    ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, 8, "byte span 4 != 8"),
    ({"t": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, 8, "unknown dtype"),
    ({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 8]}}, 8, "shape"),
    ({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 8, "beyond"),
    ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, 8, "increasing"),
    ({"t": {"dtype": "F32", "shape": [2]}}, 8, "data_offsets"),
    ({"t": [1, 2]}, 8, "not an object"),
    (
        {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        },
        12,
        "overlap",
    ),
]


@pytest.mark.parametrize("header,size,message", BAD_HEADERS)
def test_bad_headers_name_file_and_tensor(tmp_path, header, size, message):
    path = tmp_path / "bad.safetensors"
    raw_file(path, header, b"\0" * size)
    with pytest.raises(InputError, match=message) as info:
        read_header(path)
    assert "bad.safetensors" in str(info.value)


def test_header_length_beyond_file(tmp_path):
    path = tmp_path / "bad.safetensors"
    raw_file(path, {}, hlen=10_000)
    with pytest.raises(InputError, match="exceeds the file size"):
        read_header(path)


def test_header_not_json_and_too_short(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 4) + b"nope")
    with pytest.raises(InputError, match="not valid JSON"):
        read_header(path)
    path.write_bytes(b"abc")
    with pytest.raises(InputError, match="too short"):
        read_header(path)


def test_truncated_tensor_read(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"t": torch.arange(64, dtype=torch.float32)}, path)
    infos, _ = read_header(path)
    path.write_bytes(path.read_bytes()[:-16])
    with pytest.raises(InputError, match="truncated"):
        read_tensor(infos["t"])


def test_large_tensors_are_mapped_privately(tmp_path):
    # tensors of MAP_MIN_BYTES and more are mapped copy-on-write: same values, writable, and a write
    # to the tensor never reaches the file (the input is never modified)
    path = tmp_path / "x.safetensors"
    values = torch.arange(MAP_MIN_BYTES // 4 + 3, dtype=torch.int32)
    save_file({"small": torch.ones(3), "t": values}, path)
    before = path.read_bytes()
    infos, _ = read_header(path)
    assert infos["t"].nbytes >= MAP_MIN_BYTES and infos["t"].start % 4096  # not page-aligned: offset handled
    tensor = read_tensor(infos["t"])
    assert torch.equal(tensor, values)
    tensor.fill_(-1)
    assert path.read_bytes() == before
    assert torch.equal(read_tensor(infos["t"]), values)


def test_truncated_mapped_tensor_read(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"t": torch.zeros(MAP_MIN_BYTES // 4, dtype=torch.float32)}, path)
    infos, _ = read_header(path)
    path.write_bytes(path.read_bytes()[:-16])
    with pytest.raises(InputError, match=r"truncated \(\d+ of \d+ bytes\)"):
        read_tensor(infos["t"])


def test_streaming_writer_checks_plan(tmp_path):
    plans = [TensorPlan("a", torch.float32, (2,)), TensorPlan("b", torch.int8, (3,))]
    writer = StreamingWriter(tmp_path / "x.safetensors", plans)
    writer.write("a", torch.zeros(2))
    with pytest.raises(OutputError, match="does not match"):
        writer.write("b", torch.zeros(3))
    with pytest.raises(OutputError, match="never written"):
        writer.close()


def test_streaming_writer_memory_is_one_tensor(tmp_path):
    """Writing N tensors one at a time never holds more than one of them (tracked allocations)."""
    import gc
    import weakref

    plans = [TensorPlan(f"t{i}", torch.float32, (256, 256)) for i in range(8)]
    writer = StreamingWriter(tmp_path / "x.safetensors", plans)
    alive = []
    for i in range(8):
        tensor = torch.full((256, 256), float(i))
        writer.write(f"t{i}", tensor)
        alive.append(weakref.ref(tensor))
        del tensor
        gc.collect()
        assert sum(ref() is not None for ref in alive) == 0
    writer.close()
    infos, _ = read_header(tmp_path / "x.safetensors")
    assert read_tensor(infos["t7"])[0, 0] == 7.0


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=300))
def test_fuzz_header_bytes_only_clean_errors(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("fuzz") / "f.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob)
    try:
        infos, _ = read_header(path)
    except InputError as error:
        assert_clean_error(error, path)
    else:
        assert_faithful(path, infos)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 2**40) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["t", "u", "__metadata__"]), json_values, max_size=3), st.binary(max_size=64))
def test_fuzz_structured_headers_only_clean_errors(tmp_path_factory, header, data):
    path = tmp_path_factory.mktemp("fuzz") / "f.safetensors"
    raw_file(path, header, data)
    try:
        infos, _ = read_header(path)
        assert_faithful(path, infos)
    except InputError as error:
        assert_clean_error(error, path)


def assert_clean_error(error: InputError, path) -> None:
    """A rejection is one line and names the file."""
    message = str(error)
    assert path.name in message and "\n" not in message, message


def assert_faithful(path, infos: dict) -> None:
    """An accepted file reads back exactly what its header says, decoded here from the format's text
    (8-byte little-endian header length, JSON header, ``data_offsets`` relative to the data section)."""
    raw = path.read_bytes()
    start = 8 + struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:start])
    assert sorted(infos) == sorted(k for k in header if k != "__metadata__")
    for name, info in infos.items():
        begin, end = header[name]["data_offsets"]
        tensor = read_tensor(info)
        assert list(tensor.shape) == header[name]["shape"], name
        assert tensor.contiguous().view(torch.uint8).flatten().numpy().tobytes() == raw[start + begin:start + end], name
