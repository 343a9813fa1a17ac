"""The centralized epoch loop: train ``centralized.method`` (:class:`~fedlt.centralized.base.CentralizedMethod`)
on the pooled long-tailed set with the same trainer, model, test set and metrics as the federated runs;
resumable epoch by epoch, across the two stages of a decoupled method."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import nn

from fedlt.centralized.base import CentralizedMethod
from fedlt.config import Config
from fedlt.device import environment, resolve_device
from fedlt.evaluation import due, evaluate_model, metrics_row, progress_line
from fedlt.experiment import STREAM_CENTRAL, augment_for, experiment_for, torch_generator
from fedlt.registry import CENTRALIZED
from fedlt.rundir import RunDir
from fedlt.train import OptimConfig, TensorData, make_optimizer, train


def centralized_optim(cfg: Config) -> OptimConfig:
    c, t = cfg.centralized, cfg.train

    def pick(key: str) -> Any:
        value = getattr(c, key)
        return value if value is not None else getattr(t, key)

    return OptimConfig(lr=pick("lr"), momentum=pick("momentum"), weight_decay=pick("weight_decay"),
                       nesterov=pick("nesterov"), batch_size=pick("batch_size"), warmup_epochs=c.warmup_epochs,
                       schedule=c.schedule, milestones=list(c.milestones), gamma=c.gamma)


def stage2_optim(cfg: Config, method: CentralizedMethod) -> OptimConfig:
    """Stage 2: stage 1's SGD settings, lr ``stage2_lr`` (default: stage 1's lr), cosine, no warm-up."""
    base = centralized_optim(cfg)
    lr = getattr(method.opt, "stage2_lr", None)
    return OptimConfig(lr=base.lr if lr is None else float(lr), momentum=base.momentum,
                       weight_decay=base.weight_decay, nesterov=base.nesterov, batch_size=base.batch_size,
                       schedule="cosine")


def run_centralized(cfg: Config, run: RunDir) -> dict:
    """Train ``centralized.method`` on the pooled long-tailed set, epoch by epoch, resumable; return the summary."""
    exp = experiment_for(cfg)
    device = resolve_device(cfg.device)
    method: CentralizedMethod = CENTRALIZED.get(cfg.centralized.method)(cfg, exp.train_counts)
    model: nn.Module = method.build_model(exp).to(device)
    opt, opt2 = centralized_optim(cfg), stage2_optim(cfg, method)
    optimizer = make_optimizer(model, opt)
    data: TensorData = exp.tensor_data("train", device=device)
    test = exp.tensor_data("test", device=device)
    epochs = cfg.centralized.epochs
    gen = torch_generator(cfg.seed, STREAM_CENTRAL)
    name = cfg.centralized.method
    augment = method.augment(data)
    stage1, stage2 = int(np.ceil(epochs)), method.stage2_epochs()

    def begin_stage2() -> torch.optim.Optimizer:
        method.start_stage2(model)
        model.to(device)
        return make_optimizer(model, opt2) if stage2 > 0 else optimizer

    ckpt = run.load_checkpoint() if run.same_config(cfg) else None
    stage = 1
    if ckpt is None:
        run.reset()
        run.write_config(cfg)
        run.write_env(environment(device))
        run.write_partition(exp.train_counts[None, :], exp.train_counts, exp.test.class_counts, "pooled")
        start, elapsed = 0, 0.0
    else:
        stage = ckpt.get("stage", 1)
        if stage == 2:
            optimizer = begin_stage2()
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        gen.set_state(ckpt["generator"])
        method.load_state_dict(ckpt.get("method", {}))
        start, elapsed = ckpt["epoch"], ckpt["elapsed"]
        run.truncate_metrics("epoch", start)
        print(f"[centralized {name}] resuming after epoch {start}", flush=True)

    total = stage1 + stage2
    for epoch in range(start, total):
        t0 = time.time()
        if epoch >= stage1 and stage == 1:
            optimizer, stage = begin_stage2(), 2
        if stage == 1:
            result = train(model, data, method.objective(epoch), opt=opt, epochs=min(1.0, epochs - epoch),
                           generator=gen, augment=augment, sampler=method.sampler(), optimizer=optimizer,
                           start_epoch=epoch, total_epochs=epochs)
        else:
            result = train(model, data, method.stage2_objective(epoch - stage1), opt=opt2, epochs=1.0,
                           generator=gen, augment=augment_for(cfg), sampler=method.stage2_sampler(),
                           optimizer=optimizer, start_epoch=epoch - stage1, total_epochs=stage2)
        m = None
        if due(epoch + 1, total, cfg.eval.every):
            m = evaluate_model(model, test, exp.train_counts, cfg.eval.batch_size, method.transform_logits)
        seconds = time.time() - t0
        elapsed += seconds
        run.append_metrics({"epoch": epoch + 1, "stage": stage, **(metrics_row(m) if m else {}),
                            "train_loss": result.loss, "seconds": seconds})
        print(progress_line(f"[centralized {name}] epoch {epoch + 1}/{total}", m, seconds, result.loss), flush=True)
        run.save_checkpoint({"epoch": epoch + 1, "stage": stage, "model": model.state_dict(),
                             "optimizer": optimizer.state_dict(), "generator": gen.get_state(),
                             "method": method.state_dict(), "elapsed": elapsed})
    if method.two_stage and stage == 1:  # a second stage without training (τ-norm)
        begin_stage2()

    final = evaluate_model(model, test, exp.train_counts, cfg.eval.batch_size, method.transform_logits,
                           with_bins=True)
    summary = {"mode": "centralized", "method": name, "seed": cfg.seed, "epochs": epochs,
               "stage2_epochs": stage2, "wall_clock_seconds": elapsed,
               "train_class_counts": exp.train_counts.tolist(), **final}
    run.write_summary(summary)
    return summary
