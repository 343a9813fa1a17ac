"""Conversions between PyTorch state dicts / numpy arrays and Flower records."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, MetricRecord


def to_cpu(value: torch.Tensor | np.ndarray | list) -> torch.Tensor:
    """A tensor that may leave the process: detached from autograd and on the CPU (an array or list is wrapped)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    return torch.as_tensor(np.asarray(value))


def to_arrays(values: Mapping[str, torch.Tensor | np.ndarray | list]) -> ArrayRecord:
    """An ArrayRecord of ``values`` (a state dict, or a client's extra arrays), each moved through :func:`to_cpu`.
    Every tensor that leaves a client (weights, prior-estimate classifiers, feature statistics, class
    gradients) goes through here, so a computation may leave its results on the GPU or attached to a graph."""
    return ArrayRecord({k: to_cpu(v) for k, v in values.items()})


def to_state(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    return arrays.to_torch_state_dict()


def load_into(model: torch.nn.Module, arrays: ArrayRecord) -> torch.nn.Module:
    """Load an ArrayRecord into ``model``, casting each tensor to the model's own dtype."""
    own = model.state_dict()
    state = {k: v.to(own[k].dtype) for k, v in to_state(arrays).items()}
    model.load_state_dict(state)
    return model


def keep_dtypes(arrays: ArrayRecord, like: ArrayRecord) -> ArrayRecord:
    """``arrays`` (an aggregate) with each array back in the dtype of the same key in ``like`` (a reply's),
    in place. Flower's weighted mean Σ_k (n_k/Σ n_j)·a_k turns an integer array (BatchNorm's
    ``num_batches_tracked``) into float64, which a later cast truncates (49.999… -> 49): an integer array
    is rounded to the nearest integer instead (as LFME's :func:`strategies.lfme.weighted_average`)."""
    for key, ref in like.items():
        if key not in arrays:
            continue
        dtype, value = ref.numpy().dtype, arrays[key].numpy()
        if value.dtype != dtype:
            value = np.rint(value) if np.issubdtype(dtype, np.integer) else value
            arrays[key] = Array(np.asarray(value).astype(dtype))
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

