"""Shard planning, index, atomic publication of the output directory."""

from __future__ import annotations

import pytest
import torch

from npuconv.errors import InputError, OutputError
from npuconv.io.output import AtomicDirectory, Unit, index_json, parse_size, plan_shards, write_shards
from npuconv.io.safetensors_io import TensorPlan, read_header, read_tensor


def unit(name: str, n: int) -> Unit:
    return Unit([TensorPlan(name, torch.uint8, (n,))], lambda: {name: torch.full((n,), 7, dtype=torch.uint8)}, name)


def test_single_shard_name():
    shards = plan_shards([unit("a", 10), unit("b", 10)], 100)
    assert [s.filename for s in shards] == ["model.safetensors"]
    assert index_json(shards) is None


def test_greedy_split_and_index(tmp_path):
    shards = plan_shards([unit("a", 60), unit("b", 60), unit("c", 30), unit("d", 200)], 100)
    assert [[p.name for p in s.plans] for s in shards] == [["a"], ["b", "c"], ["d"]]
    assert shards[0].filename == "model-00001-of-00003.safetensors"
    name, index = index_json(shards)
    assert name == "model.safetensors.index.json"
    assert index["weight_map"]["c"] == "model-00002-of-00003.safetensors"
    assert index["metadata"]["total_size"] == 350
    digests = write_shards(tmp_path, shards)
    assert set(digests) == {s.filename for s in shards}
    infos, metadata = read_header(tmp_path / shards[2].filename)
    assert metadata == {"format": "pt"}
    assert read_tensor(infos["d"]).sum() == 7 * 200


def test_atomic_directory_publishes_only_on_success(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with AtomicDirectory(target) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("boom")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []
    with AtomicDirectory(target) as tmp:
        (tmp / "done").write_text("x")
    assert (target / "done").read_text() == "x"


def test_atomic_directory_refuses_existing_without_force(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old").write_text("old")
    with pytest.raises(OutputError, match="already exists"):
        with AtomicDirectory(target):
            pass
    with pytest.raises(OutputError, match="not an npuconv output"):  # not npuconv's: never replaced
        with AtomicDirectory(target, force=True):
            pass
    (target / "npuconv.json").write_text('{"files": ["old", "npuconv.json"]}')
    with AtomicDirectory(target, force=True) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("text,value", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30), ("123", 123)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "five", "-1GB", "0", "3XB"])
def test_parse_size_rejects(text):
    with pytest.raises(InputError):
        parse_size(text)


@pytest.mark.parametrize("workers", [1, 3, 8])
def test_producer_queue_is_bounded_by_bytes(tmp_path, workers):
    """Units start only while the output bytes in flight (queued, in production or being written)
    fit the budget, or when nothing else is queued; the order and the bytes never change."""
    import threading

    lock = threading.Lock()
    started: list[int] = []
    written: list[int] = []
    peaks: list[int] = []

    def unit(i: int, size: int) -> Unit:
        def produce():
            with lock:
                started.append(i)
                peaks.append(sum(sizes[j] for j in started if j not in written))
            return {f"t{i}": torch.full((size,), i % 256, dtype=torch.uint8)}

        return Unit([TensorPlan(f"t{i}", torch.uint8, (size,))], produce, f"u{i}")

    sizes = [100, 100, 300, 100, 100, 100, 50, 50, 50, 50]
    units = [unit(i, s) for i, s in enumerate(sizes)]

    def on_unit(done: Unit) -> None:
        with lock:
            written.append(int(done.label[1:]))

    shards = plan_shards(units, 10_000)
    write_shards(tmp_path, shards, on_unit, workers=workers, bytes_ahead=500)  # 250 output bytes
    assert written == list(range(len(sizes)))
    assert max(peaks) <= 300  # the 300-byte unit alone (nothing else in flight), else within 250
    tensors = {name: read_tensor(info) for name, info in read_header(tmp_path / shards[0].filename)[0].items()}
    assert all(torch.equal(tensors[f"t{i}"], torch.full((s,), i, dtype=torch.uint8)) for i, s in enumerate(sizes))


class _InlineFuture:
    """A future that runs its work when its result is first asked for (no thread)."""

    def __init__(self, fn, *args):
        self._call, self._done = (lambda: fn(*args)), None

    def result(self):
        if self._done is None:
            self._done = (self._call(),)
        return self._done[0]

    def cancel(self) -> bool:
        return self._done is None


class _RecordingPool:
    """Stands in for the producer thread pool: every admission is recorded, in the consumer's thread."""

    def __init__(self, on_submit):
        self.on_submit = on_submit

    def __call__(self, max_workers, thread_name_prefix=""):
        return self

    def submit(self, fn, unit):
        self.on_submit(unit)
        return _InlineFuture(fn, unit)

    def shutdown(self, wait=True, cancel_futures=False):
        pass


@pytest.mark.parametrize("workers", [1, 2, 16])
def test_producer_queue_admits_within_its_budget_by_unit_cost(tmp_path, monkeypatch, workers):
    """Admission is charged each unit's cost (its target's estimate of inputs and temporaries, at
    least twice its output), never just its output: the costs of the units admitted and not yet
    written never exceed ``bytes_ahead``, except a unit admitted alone. Deterministic: admissions are
    recorded as they happen, the work runs inline."""
    from npuconv.io import output

    admitted: list[Unit] = []
    written: list[Unit] = []
    charged: list[int] = []

    def on_submit(unit: Unit) -> None:
        admitted.append(unit)
        in_flight = [u for u in admitted if u not in written]
        charged.append(sum(output.unit_cost(u) for u in in_flight) if len(in_flight) > 1 else 0)

    monkeypatch.setattr(output, "ThreadPoolExecutor", _RecordingPool(on_submit))
    # output bytes 100 each; costs: 2x output (no estimate), 6x, 10x (a layer that unpacks its codes)
    costs = [0, 600, 1000, 0, 600, 0, 0, 1000, 600, 0, 0, 0]
    units = [Unit([TensorPlan(f"t{i}", torch.uint8, (100,))],
                  lambda i=i: {f"t{i}": torch.full((100,), i, dtype=torch.uint8)}, f"u{i}", cost)
             for i, cost in enumerate(costs)]
    assert [output.unit_cost(u) for u in units[:3]] == [200, 600, 1000]
    write_shards(tmp_path, plan_shards(units, 10_000), written.append, workers=workers, bytes_ahead=1200)
    assert written == units and admitted == units
    assert max(charged) <= 1200
    if workers > 1:
        assert max(charged) > 600  # several units were in flight together


def test_layer_units_carry_their_targets_production_cost():
    """convert's plan charges each layer what its target estimates (float: dequantization chunks on
    top of twice the output), so the queue's budget covers the layer's temporaries."""
    from conftest import FIXTURES

    from npuconv.convert import ConvertOptions, make_plan
    from npuconv.io.checkpoint import Checkpoint
    from npuconv.io.output import unit_cost

    plan = make_plan(Checkpoint(FIXTURES / "gptq_v1_b4_g32_sym"), ConvertOptions("float"))
    layers = {spec.name: spec for spec in plan.layers}
    units = [u for shard in plan.shards for u in shard.units if u.label in layers]
    assert len(units) == len(layers) > 0
    for u in units:
        assert u.cost == plan.writer.production_cost(layers[u.label], u.nbytes)
        assert unit_cost(u) >= 2 * u.nbytes + plan.writer.working_bytes_fixed > 2 * u.nbytes
