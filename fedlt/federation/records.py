"""Conversions between PyTorch state dicts / numpy arrays and Flower records."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord, MetricRecord


def to_arrays(state: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu() for k, v in state.items()})


def to_state(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    return arrays.to_torch_state_dict()


def load_into(model: torch.nn.Module, arrays: ArrayRecord) -> torch.nn.Module:
    """Load an ArrayRecord into ``model``, casting each tensor to the model's own dtype."""
    own = model.state_dict()
    state = {k: v.to(own[k].dtype) for k, v in to_state(arrays).items()}
    model.load_state_dict(state)
    return model


def numpy_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: torch.as_tensor(np.asarray(v)) for k, v in arrays.items()})


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

