"""CReFF (Shang et al., IJCAI 2022; METHODS.md §3.4): classifier re-training with federated features, over
any strategy (``strategy.base``, default FedAvg) whose model has one ``nn.Linear`` classifier.

Each round: (1) the round's cohort receives the global backbone with the re-trained classifier spliced in and
sends, per class it holds, ∇_(W, b) CE on ``batch_real`` real images of that class (mean of ``repeats``
draws; query ``class-grads``); (2) the base strategy's normal round (local training, FedAvg); (3) the server
averages each class's gradients over the clients holding it, updates the federated features F (C ×
``num_features`` × d, N(0, 1) at start) for ``match_steps`` SGD steps of gradient matching, and trains a
fresh Linear(d, C) on F for ``crt_epochs`` epochs. Evaluation: FedAvg backbone + that classifier; the FedAvg
model (not the re-trained one) goes on to the next round. Repo sizes: 100 features, 100 steps, 300 epochs.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from pydantic import Field
from torch import nn

from fedlt.errors import FedLTError
from fedlt.experiment import STREAM_CENTRAL, torch_generator
from fedlt.federation.compose import StrategyWrapper, global_model_metrics, with_classifier
from fedlt.federation.features import average_class_grads, fit_classifier, match_features
from fedlt.federation.records import to_arrays, to_state
from fedlt.registry import STRATEGIES


class CReFFMixin:
    def wrap_init(self, opts: "CReFF.Options") -> None:
        self.creff_opts = opts
        self.creff_features: torch.Tensor | None = None
        self.creff_classifier: dict | None = None
        self.creff_for: ArrayRecord | None = None

    def run_round(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                  grid: Grid) -> tuple[ArrayRecord | None, MetricRecord | None]:
        o, C = self.creff_opts, self.num_classes
        state = to_state(arrays)
        if "classifier.weight" not in state or "classifier.bias" not in state:
            raise FedLTError("creff needs a model with an nn.Linear classifier (model.classifier=linear)")
        if self.creff_classifier is not None:
            state.update({f"classifier.{k}": v for k, v in self.creff_classifier.items()})
        W, b = state["classifier.weight"].float(), state["classifier.bias"].float()
        replies = self.query(grid, self.cohort(server_round), to_arrays(state), "class-grads",
                             {"batch": o.batch_real, "repeats": o.repeats}, server_round=server_round)
        new, metrics = super().run_round(server_round, arrays, config, grid)
        grads = [r.content["grads"] for r in replies]
        gw, gb, present = average_class_grads([g["weight"].numpy() for g in grads], [g["bias"].numpy() for g in grads],
                                              [g["has"].numpy() for g in grads])
        gen = torch_generator(self.cfg.seed, STREAM_CENTRAL, 102, server_round)
        if self.creff_features is None:
            init = torch_generator(self.cfg.seed, STREAM_CENTRAL, 102, 0)
            self.creff_features = torch.randn(C, o.num_features, W.shape[1], generator=init)
        self.creff_features = match_features(self.creff_features, W, b, torch.as_tensor(gw, dtype=torch.float32),
                                             torch.as_tensor(gb, dtype=torch.float32), present, o.match_steps,
                                             o.match_lr)
        fresh = nn.Linear(W.shape[1], C)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
            fresh.reset_parameters()
        feats = self.creff_features.reshape(-1, W.shape[1])
        labels = torch.arange(C).repeat_interleave(self.creff_features.shape[1])
        clf = fit_classifier(fresh, feats, labels, o.crt_epochs, o.crt_lr, o.crt_batch, gen)
        self.creff_classifier = {k: v.detach().clone() for k, v in clf.state_dict().items()}
        self.creff_for = new
        return new, metrics

    def eval_model(self, model: nn.Module) -> nn.Module:
        return with_classifier(super().eval_model(model), self.creff_classifier, self.creff_for is self.global_arrays)

    def summary_extras(self) -> dict:
        out = {**super().summary_extras()}
        if self.global_arrays is not None:
            out["creff_base_classifier"] = global_model_metrics(self, super().eval_model, super().transform_logits)
        return out

    def state_dict(self) -> dict:
        return {**super().state_dict(), "creff_features": self.creff_features,
                "creff_classifier": self.creff_classifier}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.creff_features, self.creff_classifier = state.get("creff_features"), state.get("creff_classifier")


@STRATEGIES.register("creff")
class CReFF(StrategyWrapper):
    mixin = CReFFMixin

    class Options(StrategyWrapper.Options):
        num_features: int = Field(100, gt=0, description="federated features per class")
        match_steps: int = Field(100, gt=0, description="gradient-matching steps per round")
        match_lr: float = Field(0.1, gt=0, description="gradient-matching learning rate")
        crt_epochs: int = Field(300, gt=0, description="classifier re-training epochs on the federated features")
        crt_lr: float = Field(0.01, gt=0, description="classifier re-training learning rate")
        crt_batch: int = Field(32, gt=0, description="classifier re-training batch size")
        batch_real: int = Field(32, gt=0, description="real images per class for a client's class gradient")
        repeats: int = Field(10, gt=0, description="draws averaged into a client's class gradient")
