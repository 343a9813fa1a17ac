"""Conversions between PyTorch state dicts / numpy arrays and Flower records."""

from __future__ import annotations

import math
from collections.abc import Mapping
from io import BytesIO

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, MetricRecord
from flwr.common.constant import SType

# The .npy header of each (dtype, shape) written, and each header read, once per process: np.save and np.load
# spend most of their time formatting and parsing it (ast.literal_eval), ~25 µs an array, and a ResNet-32 state
# has ~200 arrays, sent and received by every client every round.
_HEADERS_WRITTEN: dict[tuple[str, tuple[int, ...]], tuple[bytes, str]] = {}  # -> (header, dtype's name)
_HEADERS_READ: dict[bytes, tuple[np.dtype, tuple[int, ...], int] | None] = {}  # -> (dtype, shape, count)
_MAX_HEADERS = 65536  # distinct layouts kept (a model has a few hundred); past it, np.save / np.load as before
_MAGIC_1 = np.lib.format.magic(1, 0)


def numpy_to_array(ndarray: np.ndarray) -> Array:
    """``Array(ndarray)`` — the same fields and the same .npy bytes as Flower's ``Array.from_numpy_ndarray``
    (``np.save``) — with the header made once per dtype and shape: header + ``ndarray.tobytes()``. Arrays that
    are not C-contiguous, or of an object or structured dtype, go through ``np.save``."""
    dtype = ndarray.dtype
    if not ndarray.flags.c_contiguous or dtype.hasobject or dtype.fields is not None:
        return Array(ndarray)
    key = (dtype.str, ndarray.shape)
    known = _HEADERS_WRITTEN.get(key)
    if known is None:
        buffer = BytesIO()
        np.save(buffer, ndarray, allow_pickle=False)
        data = buffer.getvalue()
        if len(_HEADERS_WRITTEN) < _MAX_HEADERS:
            _HEADERS_WRITTEN[key] = (data[:len(data) - ndarray.nbytes], str(dtype))
        return Array(dtype=str(dtype), shape=tuple(ndarray.shape), stype=SType.NUMPY, data=data)
    header, name = known
    return _numpy_array(name, key[1], header + ndarray.tobytes())


def _numpy_array(dtype: str, shape: tuple[int, ...], data: bytes) -> Array:
    """``Array(dtype=dtype, shape=shape, stype=SType.NUMPY, data=data)``, the fields set as Flower's constructor
    sets them (its four fields, marked dirty: the same ``__dict__``, tested against flwr's) without its
    argument checks, which were half of encoding a reply of ~400 arrays; the fields here are ours (a dtype's
    name, a tuple of ints, the .npy bytes)."""
    array = Array.__new__(Array)
    array.__dict__.update(_is_dirty=True, dtype=dtype, shape=shape, stype=SType.NUMPY, data=data)
    return array


def array_to_numpy(array: Array) -> np.ndarray:
    """``array.numpy()`` (``np.load`` of its .npy bytes: a new, writable array) with each distinct header parsed
    once: the data are then copied straight from the bytes. A header other than format 1.0 of a C-ordered
    plain dtype goes through ``array.numpy()``."""
    data = array.data
    if array.stype != SType.NUMPY or not data.startswith(_MAGIC_1):
        return array.numpy()
    end = 10 + int.from_bytes(data[8:10], "little")
    header = data[:end]
    if header not in _HEADERS_READ:
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(BytesIO(data[8:end]))
        plain = not fortran and not dtype.hasobject and dtype.fields is None
        if len(_HEADERS_READ) >= _MAX_HEADERS:
            return array.numpy()
        _HEADERS_READ[header] = (dtype, shape, math.prod(shape)) if plain else None
    layout = _HEADERS_READ[header]
    if layout is None:
        return array.numpy()
    dtype, shape, count = layout
    if len(data) - end != count * dtype.itemsize:  # a truncated or padded payload: np.load's own error
        return array.numpy()
    return np.frombuffer(data, dtype=dtype, count=count, offset=end).reshape(shape).copy()


def array_record(arrays: Mapping[str, Array]) -> ArrayRecord:
    """An ArrayRecord holding ``arrays`` themselves (``ArrayRecord(arrays)`` builds every Array a second time)."""
    record = ArrayRecord()
    for key, array in arrays.items():
        record[key] = array
    return record


def to_cpu(value: torch.Tensor | np.ndarray | list) -> torch.Tensor:
    """A tensor that may leave the process: detached from autograd and on the CPU (an array or list is wrapped)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    return torch.as_tensor(np.asarray(value))


def to_arrays(values: Mapping[str, torch.Tensor | np.ndarray | list]) -> ArrayRecord:
    """An ArrayRecord of ``values`` (a state dict, or a client's extra arrays), each moved through :func:`to_cpu`.
    Every tensor that leaves a client (weights, prior-estimate classifiers, feature statistics, class
    gradients) goes through here, so a computation may leave its results on the GPU or attached to a graph."""
    return array_record({k: numpy_to_array(to_cpu(v).numpy()) for k, v in values.items()})


def to_state(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    """The state dict of ``arrays`` (Flower's ``ArrayRecord.to_torch_state_dict``, through :func:`array_to_numpy`)."""
    return {k: torch.from_numpy(array_to_numpy(v)) for k, v in arrays.items()}


def load_into(model: torch.nn.Module, arrays: ArrayRecord) -> torch.nn.Module:
    """Load an ArrayRecord into ``model``, casting each tensor to the model's own dtype."""
    return load_state(model, to_state(arrays))


def load_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """Load a state dict into ``model``, casting each tensor to the model's own dtype."""
    own = model.state_dict()
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    return model


def keep_dtypes(arrays: ArrayRecord, like: ArrayRecord) -> ArrayRecord:
    """``arrays`` (an aggregate) with each array back in the dtype of the same key in ``like`` (a reply's),
    in place. Flower's weighted mean Σ_k (n_k/Σ n_j)·a_k turns an integer array (BatchNorm's
    ``num_batches_tracked``) into float64, which a later cast truncates (49.999… -> 49): an integer array
    is rounded to the nearest integer instead (as LFME's :func:`strategies.lfme.weighted_average`)."""
    for key, ref in like.items():
        if key not in arrays:
            continue
        dtype, value = np.dtype(ref.dtype), array_to_numpy(arrays[key])
        if value.dtype != dtype:
            value = np.rint(value) if np.issubdtype(dtype, np.integer) else value
            arrays[key] = numpy_to_array(np.asarray(value).astype(dtype))
    return arrays


def metric_record(values: dict) -> MetricRecord:
    out = {}
    for k, v in values.items():
        if isinstance(v, (bool, np.bool_)):
            v = int(v)
        if isinstance(v, (np.integer,)):
            v = int(v)
        if isinstance(v, (np.floating,)):
            v = float(v)
        if isinstance(v, (list, tuple, np.ndarray)):
            v = [float(x) for x in np.asarray(v).ravel()]
        out[k] = v
    return MetricRecord(out)

