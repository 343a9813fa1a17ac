"""Centralized baselines: the same trainer, model, test set and metrics on the pooled long-tailed data.

A centralized method (registered in ``CENTRALIZED``) is a :class:`CentralizedMethod`: an objective, a
sampler and an optional post-hoc logit transform, all given the training class counts.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import nn

from fedlt.device import environment, resolve_device
from fedlt.evaluation import evaluate_model, progress_line
from fedlt.experiment import STREAM_CENTRAL, augment_for, experiment_for, model_for, torch_generator
from fedlt.metrics import GROUPS
from fedlt.registry import CENTRALIZED
from fedlt.rundir import RunDir
from fedlt.train import (Objective, OptimConfig, Sampler, TensorData, cross_entropy_objective,
                         instance_balanced_sampler, make_optimizer, train)


class CentralizedMethod:
    """Cross-entropy with instance-balanced sampling (the reference every long-tail method is measured against)."""

    options: dict[str, Any] = {}

    def __init__(self, cfg: dict, train_counts: np.ndarray) -> None:
        self.cfg = cfg
        self.train_counts = train_counts

    def objective(self, epoch: int) -> Objective:
        return cross_entropy_objective

    def sampler(self) -> Sampler:
        return instance_balanced_sampler

    def transform_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits


CENTRALIZED.register("ce", CentralizedMethod)


def centralized_optim(cfg: dict) -> OptimConfig:
    c, t = cfg["centralized"], cfg["train"]

    def pick(key: str, fallback: str | None = None) -> Any:
        return c[key] if c.get(key) is not None else t[fallback or key]

    return OptimConfig(lr=pick("lr"), momentum=pick("momentum"), weight_decay=pick("weight_decay"),
                       nesterov=pick("nesterov"), batch_size=pick("batch_size"), warmup_epochs=c["warmup_epochs"],
                       schedule=c["schedule"], milestones=list(c["milestones"]), gamma=c["gamma"])


def run_centralized(cfg: dict, run: RunDir) -> dict:
    """Train ``centralized.method`` on the pooled long-tailed set, epoch by epoch, resumable; return the summary."""
    exp = experiment_for(cfg)
    device = resolve_device(cfg["device"])
    model: nn.Module = model_for(cfg, exp).to(device)
    method: CentralizedMethod = CENTRALIZED.get(cfg["centralized"]["method"])(cfg, exp.train_counts)
    opt = centralized_optim(cfg)
    optimizer = make_optimizer(model, opt)
    data: TensorData = exp.tensor_data("train", device=device)
    test = exp.tensor_data("test", device=device)
    epochs = cfg["centralized"]["epochs"]
    gen = torch_generator(cfg["seed"], STREAM_CENTRAL)
    name = cfg["centralized"]["method"]

    ckpt = run.load_checkpoint() if run.same_config(cfg) else None
    if ckpt is None:
        run.reset()
        run.write_config(cfg)
        run.write_env(environment(device))
        run.write_partition(exp.train_counts[None, :], exp.train_counts, exp.test.class_counts, "pooled")
        start, elapsed = 0, 0.0
    else:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        gen.set_state(ckpt["generator"])
        start, elapsed = ckpt["epoch"], ckpt["elapsed"]
        run.truncate_metrics("epoch", start)
        print(f"[centralized {name}] resuming after epoch {start}", flush=True)

    total = int(np.ceil(epochs))
    for epoch in range(start, total):
        t0 = time.time()
        result = train(model, data, method.objective(epoch), opt=opt, epochs=min(1.0, epochs - epoch),
                       generator=gen, augment=augment_for(cfg), sampler=method.sampler(), optimizer=optimizer,
                       start_epoch=epoch, total_epochs=epochs)
        m = evaluate_model(model, test, exp.train_counts, cfg["eval"]["batch_size"], method.transform_logits)
        seconds = time.time() - t0
        elapsed += seconds
        run.append_metrics({"epoch": epoch + 1, "loss": m["loss"], "accuracy": m["accuracy"],
                            "balanced_accuracy": m["balanced_accuracy"], **{g: m[g] for g in GROUPS},
                            "ece": m["ece"], "train_loss": result.loss, "seconds": seconds})
        print(progress_line(f"[centralized {name}] epoch {epoch + 1}/{total}", m, seconds), flush=True)
        run.save_checkpoint({"epoch": epoch + 1, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "generator": gen.get_state(), "elapsed": elapsed})

    final = evaluate_model(model, test, exp.train_counts, cfg["eval"]["batch_size"], method.transform_logits,
                           with_bins=True)
    summary = {"mode": "centralized", "method": name, "seed": cfg["seed"], "epochs": epochs,
               "wall_clock_seconds": elapsed, "train_class_counts": exp.train_counts.tolist(), **final}
    run.write_summary(summary)
    return summary
