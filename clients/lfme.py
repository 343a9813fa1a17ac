"""LFME client (Xiang et al., ECCV 2020; xiangly55/LFME), the federated variant of ``centralized.method=lfme``
(:mod:`fedlt.centralized.lfme`), driven by ``strategy.name=lfme`` (:mod:`strategies.lfme`).

The model is :class:`~fedlt.centralized.lfme.LFMEModel`: the configured model as the student plus one expert per
class group (many/medium/few of the global training counts, :func:`fedlt.centralized.lfme.lfme_groups`), built
alike on the server and every client (:meth:`adapt_model`).

- phase 1 (config ``lfme-phase`` = 1): each expert trains on the client's samples of its group (labels
  renumbered within the group, as the official ``Shot_Dataset``); the reply counts them (``n-expert<g>``) so
  the server averages expert g over the clients that hold group-g data, weighted by those counts; the student
  is not trained (``n-student`` = 0);
- phase 2 (``lfme-phase`` = 2): the experts frozen, the student trains on :func:`fedlt.losses.lfme.lfme_loss`
  with the experts' logits computed here, the server's self-paced weights ``lfme-lambdas``, and curriculum
  instance weights from the experts' confidence on the client's (un-augmented) samples, min–max scaled per
  class over the client's samples (the official scales over the whole training set, which no client holds),
  scheduled over the phase-2 rounds (``lfme-round`` e = 1, 2, … of ``lfme-rounds``). Local batches are drawn
  instance-balanced, as every fedlt client's (the official class-aware sampler over one client's data would
  repeat its handful of tail samples in every batch).

The query ``lfme-accuracy`` answers, per class, how many of the client's samples the student and the class's
expert classify correctly, and the counts: the server's accuracies for the self-paced weights.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedlt.centralized.lfme import LFMEModel, RecordedOrder, expert_statistics, group_data, lfme_groups, with_experts
from fedlt.client_method import ClientMethod, FitResult
from fedlt.config import Config
from fedlt.experiment import experiment_for
from fedlt.losses.lfme import group_thresholds, lfme_loss, scheduled_instance_weight
from fedlt.registry import CLIENTS
from fedlt.train import Augment, TensorData, instance_balanced_sampler, predict_logits, train


def lfme_model_of(model: nn.Module) -> LFMEModel:
    if not isinstance(model, LFMEModel):
        raise TypeError("the lfme client needs the model its adapt_model builds (an LFMEModel)")
    return model


def group_thresholds_of(counts: np.ndarray, groups: list[torch.Tensor]) -> np.ndarray:
    group_of = np.zeros(len(counts), dtype=int)
    for g, cls in enumerate(groups):
        group_of[cls.numpy()] = g
    return group_thresholds(counts, group_of)


@CLIENTS.register("lfme")
class LFMEClient(ClientMethod):
    strategy = "lfme"  # its phases
    replaced_head = "an LFMEModel (experts and a student, whose classifier is student.classifier)"

    @classmethod
    def adapt_model(cls, model: nn.Module, cfg: Config, num_classes: int) -> nn.Module:
        exp = experiment_for(cfg)
        return with_experts(cfg, model, exp.in_channels, lfme_groups(exp.train_counts))

    def _epochs(self) -> dict:
        t = self.cfg.train
        return {"epochs": None if t.local_steps else t.local_epochs, "steps": t.local_steps}

    def fit(self, model: nn.Module, data: TensorData, config: dict, generator: torch.Generator,
            augment: Augment) -> FitResult:
        model = lfme_model_of(model)
        if int(config["lfme-phase"]) == 1:
            counts, metrics = self.train_experts(model, data, config, generator, augment)
        else:
            counts, metrics = self.train_student(model, data, config, generator, augment)
        return FitResult(state={k: v.detach().cpu() for k, v in model.state_dict().items()},
                         metrics={**metrics, **counts, "num-examples": len(data)})

    def train_experts(self, model: LFMEModel, data: TensorData, config: dict, generator: torch.Generator,
                      augment: Augment) -> tuple[dict, dict]:
        counts, loss, seen, steps = {"n-student": 0}, 0.0, 0, 0
        for g, (expert, cls) in enumerate(zip(model.experts, model.groups)):
            sub, _ = group_data(data, cls)
            r = train(expert, sub, opt=self.optim(config), generator=generator, augment=augment,
                      sampler=instance_balanced_sampler, **self._epochs())
            counts[f"n-expert{g}"] = len(sub) if r.steps > 0 else 0  # too few samples: no update to average
            loss, seen, steps = loss + r.loss * r.num_examples, seen + r.num_examples, steps + r.steps
        return counts, {"train_loss": loss / max(seen, 1), "steps": steps, "train-images": seen}

    def train_student(self, model: LFMEModel, data: TensorData, config: dict, generator: torch.Generator,
                      augment: Augment) -> tuple[dict, dict]:
        model.freeze_experts()
        counts = {"n-student": len(data), **{f"n-expert{g}": 0 for g in range(len(model.groups))}}
        lambdas = [float(v) for v in config["lfme-lambdas"]]
        temperature, groups = float(config["lfme-temperature"]), model.groups
        opt = self.optim(config)
        order = RecordedOrder(instance_balanced_sampler, opt.batch_size)
        v = None
        if bool(config["lfme-curriculum"]):
            thresholds = group_thresholds_of(experiment_for(self.cfg).train_counts, groups)
            _, w = expert_statistics(model, data, thresholds, self.cfg.eval.batch_size)
            v = scheduled_instance_weight(torch.as_tensor(w, dtype=torch.float32), int(config["lfme-round"]),
                                          float(config["lfme-rounds"]))

        def objective(m: LFMEModel, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            weights = v[order.next_batch(y)] if v is not None else None
            return lfme_loss(m(x), m.expert_logits(x), groups, y, weights, lambdas, temperature)

        r = train(model, data, objective, opt=opt, generator=generator, augment=augment, sampler=order,
                  **self._epochs())
        return counts, {"train_loss": r.loss, "steps": r.steps, "train-images": r.num_examples}

    def query(self, action: str, model: nn.Module, data: TensorData, config: dict,
              generator: torch.Generator, augment: Augment) -> FitResult:
        if action != "lfme-accuracy":
            return super().query(action, model, data, config, generator, augment)
        model = lfme_model_of(model)
        c = data.num_classes
        labels = data.labels.cpu()
        student = predict_logits(model, data, self.cfg.eval.batch_size).argmax(1) == labels
        expert = torch.zeros(len(data), dtype=torch.bool)
        for e, cls in zip(model.experts, model.groups):
            sub, idx = group_data(data, cls)
            if len(sub):
                expert[idx.cpu()] = predict_logits(e, sub, self.cfg.eval.batch_size).argmax(1) == sub.labels.cpu()
        per_class = {name: torch.bincount(labels, weights=hit.double(), minlength=c).tolist()
                     for name, hit in (("student-correct", student), ("expert-correct", expert))}
        return FitResult(state={}, metrics={**per_class, "count": torch.bincount(labels, minlength=c).tolist(),
                                            "num-examples": len(data)})
