"""The record conversions at the Flower boundary: fedlt's fast .npy encode/decode equals Flower's own, byte for
byte, and its weighted mean equals Flower's ``aggregate_arrayrecords``; the fused engine's boundary helpers."""

from __future__ import annotations

import copy
from io import BytesIO

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedlt.federation import fused
from fedlt.federation.records import array_to_numpy, numpy_to_array, to_arrays, to_state
from fedlt.federation.strategy import weighted_mean_arrays
from fedlt.models import build_model

RNG = np.random.default_rng(0)
CASES = {
    "0-d float32": np.array(3.5, dtype=np.float32),
    "0-d int64": np.array(5, dtype=np.int64),
    "empty": np.zeros((0, 3), np.float32),
    "matrix float32": RNG.standard_normal((4, 5)).astype(np.float32),
    "int64": np.arange(7, dtype=np.int64),
    "bool": np.array([True, False, True]),
    "3-d float64": RNG.standard_normal((2, 3, 4)),
    "float16": RNG.standard_normal((3, 4)).astype(np.float16),
    "uint8": RNG.integers(0, 255, (3, 2), dtype=np.uint8),
    "big-endian": RNG.standard_normal(4).astype(">f4"),
    "fortran order": np.asfortranarray(RNG.standard_normal((3, 4))),
    "strided view": RNG.standard_normal((4, 6))[:, ::2],
}


@pytest.mark.parametrize("name", list(CASES))
def test_encode_gives_flowers_bytes_and_decode_its_array(name):
    a = CASES[name]
    for _ in range(2):  # the second time with the header cached
        ref, ours = Array(a), numpy_to_array(a)
        assert (ours.dtype, ours.shape, ours.stype, ours.data) == (ref.dtype, ref.shape, ref.stype, ref.data)
        assert vars(ours) == vars(ref) and type(ours) is Array  # the object Flower's constructor builds
        assert ours.object_id == ref.object_id and ours.deflate() == ref.deflate()  # and sends alike
        want, got = ref.numpy(), array_to_numpy(ref)
        assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want)
        assert got.flags.writeable and got.flags.f_contiguous == want.flags.f_contiguous
        got[...] = 0  # a copy: the record's bytes are untouched
        assert np.array_equal(ref.numpy(), want)


def test_decode_falls_back_to_numpy_for_other_npy_formats_and_bad_payloads():
    a = RNG.standard_normal((2, 3)).astype(np.float32)
    buffer = BytesIO()
    np.lib.format.write_array(buffer, a, version=(2, 0))  # a version-2.0 header
    v2 = Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=buffer.getvalue())
    assert np.array_equal(array_to_numpy(v2), a)
    good = Array(a)
    truncated = Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=good.data[:-4])
    with pytest.raises(ValueError):  # np.load's own error, not a silently short array
        array_to_numpy(truncated)


def test_state_round_trip_equals_flowers_conversions():
    state = build_model("resnet8", 10, 1).state_dict()
    ours, ref = to_arrays(state), ArrayRecord(state)
    assert list(ours.keys()) == list(ref.keys()) and all(ours[k].data == ref[k].data for k in ref)
    back, want = to_state(ours), ref.to_torch_state_dict()
    assert all(torch.equal(back[k], want[k]) and back[k].dtype == want[k].dtype for k in want)


def test_weighted_mean_arrays_equals_flowers_aggregate_bit_for_bit():
    records = []
    for k, n in enumerate([37, 64, 90]):  # int weights (num-examples), an extra record (FedLoGe's l-head)
        arrays = ArrayRecord({"w": Array(RNG.standard_normal((4, 3)).astype(np.float32)),
                              "n": Array(np.array(5 + k, dtype=np.int64)), "b": Array(RNG.standard_normal(3))})
        extra = ArrayRecord({"head": Array(RNG.standard_normal((2, 2)).astype(np.float32))})
        records.append(RecordDict({"arrays": arrays, "l-head": extra, "metrics": MetricRecord({"num-examples": n})}))
    want, got = aggregate_arrayrecords(records, "num-examples"), weighted_mean_arrays(records, "num-examples")
    assert list(got.keys()) == list(want.keys()) == ["w", "n", "b", "head"]
    assert all((got[k].dtype, got[k].shape, got[k].data) == (want[k].dtype, want[k].shape, want[k].data)
               for k in want)


def test_snapshot_is_a_detached_copy_of_the_state():
    model = build_model("resnet8", 10, 1)
    state = model.state_dict()
    snap = fused.snapshot(state)
    assert list(snap) == list(state)
    assert all(torch.equal(snap[k], v) and snap[k].dtype == v.dtype and snap[k].shape == v.shape
               for k, v in state.items())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert all(not torch.equal(snap[k], v) for k, v in model.state_dict().items() if v.is_floating_point()
               and "running" not in k)


def test_a_clients_start_is_shared_with_the_previous_only_while_the_model_is_unchanged():
    """One snapshot for clients starting from an unchanged model; a new one after an in-place write, a BatchNorm
    forward, a tensor swapped under a parameter (``.data =``) or an attached module, each equal to the model."""
    model = build_model("resnet8", 10, 1)
    start_of = fused._Starts()
    first = start_of(model)
    assert start_of(model) is first

    def changed() -> dict:
        start = start_of(model)
        assert start is not first and list(start) == list(model.state_dict())
        assert all(torch.equal(start[k], v) for k, v in model.state_dict().items())
        return start

    with torch.no_grad():
        next(model.parameters()).mul_(2)
    first = changed()
    model.train()(torch.randn(2, 1, 28, 28))
    first = changed()
    p = next(model.parameters())
    p.data = p.data + 1
    first = changed()
    model.extra = torch.nn.Linear(2, 2)  # a client's own module (attach_local)
    first = changed()
    assert start_of(model) is first


@pytest.mark.parametrize("one_copy", [False, True], ids=["slices", "one-copy-per-dtype"])
def test_per_client_on_host_gives_each_clients_slices(one_copy):
    """Both forms: the CPU's slices, and a device's one copy per dtype (run here on CPU tensors)."""
    stacked = {"w": torch.randn(3, 2, 4), "t": torch.randn(3), "n": torch.arange(3), "h": torch.randn(3, 5).double()}
    rows = (fused._per_client_in_one_copy if one_copy else fused.per_client_on_host)(stacked, 3)
    assert len(rows) == 3
    for j, row in enumerate(rows):
        assert list(row) == list(stacked)
        assert all(torch.equal(row[n], v[j]) and row[n].dtype == v.dtype and row[n].shape == v[j].shape
                   for n, v in stacked.items())


def test_through_flat_moves_each_dtype_in_one_call():
    state = build_model("resnet8", 10, 1).state_dict()
    moved = []
    out = fused._through_flat(state, lambda flat: moved.append(flat.dtype) or flat.clone())
    assert sorted(map(str, moved)) == ["torch.float32", "torch.int64"]  # weights and BN counters
    assert list(out) == list(state) and all(torch.equal(out[k], v) and out[k].shape == v.shape
                                            for k, v in state.items())


def test_received_weights_decode_each_distinct_record_once():
    state = build_model("resnet8", 10, 1).state_dict()
    arrays = to_arrays(state)
    received = fused._ReceivedWeights(torch.device("cpu"))
    first = received.state(copy.deepcopy(arrays))  # as the in-process grid delivers it: the same bytes objects
    assert received.state(copy.deepcopy(arrays)) is first
    assert all(torch.equal(first[k], v) for k, v in state.items())
    other = to_arrays({k: v + 1 if v.is_floating_point() else v for k, v in state.items()})
    second = received.state(other)  # other weights: decoded anew
    assert second is not first and all(torch.equal(second[k], other_v) for k, other_v in to_state(other).items())


def test_received_weights_load_again_only_where_the_model_was_written(monkeypatch):
    """The round's second client with the same weights: no second load (nothing wrote to the model); after an
    in-place write (a plug-in's set-up training the model), the weights are loaded again."""
    model = build_model("resnet8", 10, 1)
    arrays = to_arrays({k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()})
    loads = []
    original = fused.load_state
    monkeypatch.setattr(fused, "load_state", lambda m, s: loads.append(1) or original(m, s))
    received = fused._ReceivedWeights(torch.device("cpu"))
    received.load(model, copy.deepcopy(arrays))
    received.load(model, copy.deepcopy(arrays))
    assert len(loads) == 1
    want = to_state(arrays)
    with torch.no_grad():
        next(model.parameters()).mul_(0)  # written in place: its _version moves
    received.load(model, copy.deepcopy(arrays))
    assert len(loads) == 2 and all(torch.equal(model.state_dict()[k], v) for k, v in want.items())
    model.train()(torch.randn(2, 1, 28, 28))  # a forward pass in train mode updates BatchNorm's buffers in place
    received.load(model, copy.deepcopy(arrays))
    assert len(loads) == 3 and all(torch.equal(model.state_dict()[k], v) for k, v in want.items())
    p = next(model.parameters())
    p.data = p.data * 0  # a tensor swapped in under a parameter: not an in-place write, its storage moves
    received.load(model, copy.deepcopy(arrays))
    assert len(loads) == 4 and all(torch.equal(model.state_dict()[k], v) for k, v in want.items())
    received.load(model, copy.deepcopy(arrays))
    assert len(loads) == 4
