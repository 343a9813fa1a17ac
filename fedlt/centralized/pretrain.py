"""Self-supervised pre-training for imbalance (SSP; Yang & Xu, "Rethinking the Value of Labels for Improving
Class-Imbalanced Learning", NeurIPS 2020; follows YyzHarry/imbalanced-semi-self ``pretrain_rot.py``,
``utils.py`` ``rotation`` and ``train.py --pretrained_model``): rotation prediction (Gidaris et al., ICLR 2018)
as a stage before any centralized method (``centralized.pretrain=rotation``, ``centralized.pretrain_epochs``).

Stage 0 trains the method's feature extractor with a 4-way linear head on the training images (labels unused,
the run's instance-balanced batch order, crop/flip): every image of a batch is rotated by k·90°, k from a random
permutation of [0, 1, 2, 3]·(⌊B/4⌋ + 1) cut to B (a balanced mix per batch), loss CE(head(features(rot_k x)), k).
Then the method's stage 1 starts from those features with its own, untouched classifier (the official
``train.py`` loads every key but ``fc``/``linear`` into a freshly initialised model) and a fresh optimizer.
Stage 0 uses stage 1's optimizer settings and lr schedule over ``pretrain_epochs`` (the official CIFAR
pre-training and training share ``adjust_learning_rate``: 5 warm-up epochs, ×0.01 at 160 and 180). Not copied:
the official ``train.py`` keeps the epoch with the best test accuracy; fedlt reports the last.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedlt.errors import FedLTError
from fedlt.models.base import SplitModel
from fedlt.train import Objective

NUM_ROTATIONS = 4


def rotation_batch(x: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(rot_k(x_i), k_i): k = permutation([0, 1, 2, 3]·(⌊B/4⌋ + 1))[:B], rot_k = ``torch.rot90(·, k, dims=(H, W))``
    (counter-clockwise, as ``rot90(image, k, [1, 2])`` of a C×H×W image)."""
    b = x.shape[0]
    k = torch.as_tensor(rng.permutation([0, 1, 2, 3] * (b // 4 + 1))[:b], dtype=torch.long)
    out = torch.stack([torch.rot90(x[i], int(k[i]), [1, 2]) for i in range(b)]) if b else x
    return out, k.to(x.device)


def rotation_model(model: nn.Module, seed: int) -> SplitModel:
    """The model's ``features`` (shared, not copied) with a 4-way linear head, drawn from ``seed``: weight
    Kaiming-normal (the official ``resnet32(num_classes=4)``'s ``_weights_init``, models/resnet_cifar.py, std
    √(2/d)), bias PyTorch's default."""
    features, dim = getattr(model, "features", None), getattr(model, "feature_dim", None)
    if not isinstance(features, nn.Module) or dim is None:
        raise FedLTError("centralized.pretrain=rotation needs a model with one feature extractor "
                         f"({type(model).__name__} has none, e.g. a multi-expert model)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Linear(dim, NUM_ROTATIONS)
        nn.init.kaiming_normal_(head.weight)
    return SplitModel(features, head, dim)


def rotation_objective(rng: np.random.Generator) -> Objective:
    """CE of the rotation head on the rotated batch (the class labels are not used)."""

    def objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        xr, k = rotation_batch(x, rng)
        return F.cross_entropy(model(xr).float(), k)

    return objective
