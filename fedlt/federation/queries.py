"""Client computations any client method answers, whatever its objective: a strategy asks for them with
``FedLTStrategy.query(grid, pids, arrays, action, config)``; the ClientApp runs them on the received
weights and the client's own data. A new one registers with ``@QUERIES.register("name")``.

- ``prior-epoch``: one local epoch of plain CE from the received weights; returns the classifier weight
  in (d, C) layout (GBME's prior estimator, METHODS.md §3.2 (a)). No other weights leave the client.
- ``feature-stats``: per-class mean, unbiased covariance and count of the penultimate features (CCVR).
- ``class-grads``: per-class gradient of CE w.r.t. the linear classifier on real features (CReFF).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedlt.client_method import FitResult
from fedlt.config import Config
from fedlt.data.augment import normalize
from fedlt.federation.prior import classifier_weight_dc
from fedlt.registry import Registry
from fedlt.train import Augment, OptimConfig, TensorData, cross_entropy_objective, prepare_batch, train

QUERIES: Registry = Registry("client query", "client queries")


@QUERIES.register("prior-epoch")
def prior_epoch(cfg: Config, model: nn.Module, data: TensorData, config: dict, generator: torch.Generator,
                augment: Augment) -> FitResult:
    t = cfg.train
    opt = OptimConfig(lr=float(config.get("lr", t.lr)), momentum=t.momentum, weight_decay=t.weight_decay,
                      nesterov=t.nesterov, batch_size=t.batch_size)
    result = train(model, data, cross_entropy_objective, opt=opt, epochs=1.0, generator=generator, augment=augment)
    return FitResult(state={}, metrics={"num-examples": len(data), "train_loss": result.loss},
                     extra_arrays={"classifier": {"weight": classifier_weight_dc(model)}})


@torch.no_grad()
def features_of(model: nn.Module, data: TensorData, batch_size: int = 512) -> torch.Tensor:
    """Penultimate features (``model.features``) of every sample, no augmentation, eval mode."""
    model.eval()
    out = [model.features(normalize(data.images[i:i + batch_size], data.mean, data.std)).float()
           for i in range(0, len(data), batch_size)]
    return torch.cat(out).cpu().double() if out else torch.empty(0, model.feature_dim, dtype=torch.float64)


def class_feature_stats(h: torch.Tensor, y: torch.Tensor, num_classes: int) -> dict[str, np.ndarray]:
    """Per class: mean (C, d), unbiased covariance (C, d, d; zero where n < 2) and count (C,)."""
    d = h.shape[1]
    mean, cov, count = np.zeros((num_classes, d)), np.zeros((num_classes, d, d)), np.zeros(num_classes)
    for c in range(num_classes):
        hc = h[y == c]
        count[c] = len(hc)
        if len(hc):
            mean[c] = hc.mean(0).numpy()
        if len(hc) > 1:
            centred = hc - hc.mean(0)
            cov[c] = (centred.T @ centred / (len(hc) - 1)).numpy()
    return {"mean": mean, "cov": cov, "count": count}


@QUERIES.register("feature-stats")
def feature_stats(cfg: Config, model: nn.Module, data: TensorData, config: dict, generator: torch.Generator,
                  augment: Augment) -> FitResult:
    h = features_of(model, data)
    return FitResult(state={}, metrics={"num-examples": len(data)},
                     extra_arrays={"stats": class_feature_stats(h, data.labels.cpu(), data.num_classes)})


@QUERIES.register("class-grads")
def class_grads(cfg: Config, model: nn.Module, data: TensorData, config: dict, generator: torch.Generator,
                augment: Augment) -> FitResult:
    """For each class c the client holds: ∇_(W, b) CE(classifier(features(x)), c) on ``batch`` real images of c
    (backbone in eval mode, augmented), averaged over ``repeats`` draws (CReFF step 1)."""
    batch, repeats = int(config.get("batch", 32)), int(config.get("repeats", 10))
    clf = model.classifier
    if not isinstance(clf, nn.Linear):
        raise TypeError("class-grads needs an nn.Linear classifier (CReFF)")
    model.eval()
    C = data.num_classes
    gw, gb, has = np.zeros((C, *clf.weight.shape)), np.zeros((C, C)), np.zeros(C)
    labels = data.labels.cpu()
    for c in range(C):
        idx = torch.nonzero(labels == c).flatten()
        if len(idx) == 0:
            continue
        has[c] = 1
        for _ in range(repeats):
            pick = idx[torch.randperm(len(idx), generator=generator)[:batch]]
            x, y = prepare_batch(data, pick, augment, generator)
            with torch.no_grad():
                h = model.features(x).float()
            loss = F.cross_entropy(clf(h), y)
            w, b = torch.autograd.grad(loss, [clf.weight, clf.bias])
            gw[c] += w.double().numpy() / repeats
            gb[c] += b.double().numpy() / repeats
    return FitResult(state={}, metrics={"num-examples": len(data)},
                     extra_arrays={"grads": {"weight": gw, "bias": gb, "has": has}})
