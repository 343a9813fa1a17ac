"""CReFF: classifier re-training with federated features (Shang et al., "Federated Learning on Heterogeneous
and Long-Tailed Data via Classifier Re-Training with Federated Features", IJCAI 2022; official code
shangxinyi/CReFF-FL), over any strategy (``strategy.base``, default FedAvg) whose model has one ``nn.Linear``
classifier.

Each round: (1) the round's cohort receives the global backbone with the re-trained classifier spliced in (in
round 1 a freshly initialised Linear head, as the official ``temp_model = nn.Linear(256, 10)``) and sends, per
class it holds, ∇_(W, b) CE on ``batch_real`` real images of that class, each draw augmented by one Siamese
DSA op (``color_crop_cutout_flip_scale_rotate``, fedlt/data/dsa.py; ``strategy.dsa=false``: none, the
official ``--method DC``) (mean of ``repeats`` draws; query ``class-grads``); (2) the base strategy's normal round (local training, FedAvg); (3) the server
averages each class's gradients over the clients holding it, updates the federated features F (C ×
``num_features`` × d, N(0, 1) at start) for ``match_steps`` SGD steps of gradient matching, and trains a
fresh Linear(d, C) on F for ``crt_epochs`` epochs. The matching distance is the official ``distance_wb``:
Σ_rows 1 − ⟨g, t⟩ / (‖g‖·‖t‖ + 10⁻⁶). The official model is ``resnet8_x4`` (256-d features; configs/federated/
creff_cifar10_lt.yaml). Evaluation: the base's backbone + that classifier; the
base's model (not the re-trained one) goes on to the next round. The official sizes are 100 features,
100 matching steps and 300 re-training epochs. The re-trained classifier's round is kept and checkpointed,
so a run resumed after its last round reports the re-trained model; summary.json also gets the base
classifier's metrics (``creff_base_classifier``).

Official behaviour not copied: the clients' local training (``main.py`` ``local_train``) applies
``transforms.RandomCrop(32, padding=4)`` and ``RandomHorizontalFlip()`` to the batch tensor, so one crop offset
and one flip serve all 32 images of a batch, and the padding is 0 after normalisation (the mean colour).
fedlt crops and flips each image (padding black), as a per-image transform is meant to act.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from pydantic import Field
from torch import nn

from fedlt.client_method import FitResult
from fedlt.config import Config
from fedlt.data.dsa import siamese_dsa
from fedlt.errors import FedLTError
from fedlt.federation.compose import StrategyWrapper, global_model_metrics, with_classifier
from fedlt.federation.queries import QUERIES
from fedlt.federation.records import to_arrays, to_state
from fedlt.models.experts import require_single_network
from fedlt.registry import CLIENTS, STRATEGIES
from fedlt.streams import Stream, torch_generator
from fedlt.train import Augment, TensorData, prepare_batch
from strategies.ccvr import fit_classifier


# --------------------------------------------------------------------------- client side: class gradients
@QUERIES.register("class-grads")
def class_grads(cfg: Config, model: nn.Module, data: TensorData, config: dict, generator: torch.Generator,
                augment: Augment) -> FitResult:
    """For each class c the client holds: ∇_(W, b) CE(classifier(features(x)), c) on ``batch`` real images of c
    (backbone in eval mode; each draw with one Siamese DSA op when ``config["dsa"]``, else unaugmented, as the
    official ``compute_gradient``), averaged over ``repeats`` draws (CReFF step 1). The sums stay on the
    model's device; the reply moves them to the CPU."""
    batch, repeats = int(config.get("batch", 32)), int(config.get("repeats", 10))
    use_dsa = bool(config.get("dsa", True))
    clf = model.classifier
    if not isinstance(clf, nn.Linear):
        raise TypeError("class-grads needs an nn.Linear classifier (CReFF)")
    model.eval()
    C, device = data.num_classes, clf.weight.device
    gw = torch.zeros((C, *clf.weight.shape), dtype=torch.float64, device=device)
    gb = torch.zeros((C, C), dtype=torch.float64, device=device)
    has = torch.zeros(C, dtype=torch.float64)
    labels = data.labels.cpu()
    for c in range(C):
        idx = torch.nonzero(labels == c).flatten()
        if len(idx) == 0:
            continue
        has[c] = 1
        for _ in range(repeats):
            pick = idx[torch.randperm(len(idx), generator=generator)[:batch]]
            x, y = prepare_batch(data, pick, None, generator)
            if use_dsa:
                x = siamese_dsa(x, generator)
            with torch.no_grad():
                h = model.features(x).float()
            loss = F.cross_entropy(clf(h), y)
            w, b = torch.autograd.grad(loss, [clf.weight, clf.bias])
            gw[c] += w.double() / repeats
            gb[c] += b.double() / repeats
    return FitResult(state={}, metrics={"num-examples": len(data)},
                     extra_arrays={"grads": {"weight": gw, "bias": gb, "has": has}})


# --------------------------------------------------------------------------- server side: gradient matching
def average_class_grads(grads_w: list[np.ndarray], grads_b: list[np.ndarray], has: list[np.ndarray]
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per class, the uniform mean of the clients' gradients over the clients that hold the class.
    Inputs per client: (C, C, d), (C, C) and a (C,) 0/1 mask. Returns (g_w, g_b, present mask)."""
    gw, gb, h = np.stack(grads_w), np.stack(grads_b), np.stack(has).astype(np.float64)
    n = h.sum(0)
    safe = np.maximum(n, 1)
    return ((gw * h[:, :, None, None]).sum(0) / safe[:, None, None],
            (gb * h[:, :, None]).sum(0) / safe[:, None], n > 0)


def _distance_rows(g: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Σ_rows 1 − ⟨g, t⟩ / (‖g‖·‖t‖ + 10⁻⁶) (the official ``distance_wb`` of a 2-D gradient)."""
    return (1 - (g * t).sum(-1) / (g.norm(dim=-1) * t.norm(dim=-1) + 1e-6)).sum()


def gradient_distance(gw: torch.Tensor, gb: torch.Tensor, tw: torch.Tensor, tb: torch.Tensor) -> torch.Tensor:
    """D = Σ_rows d(gw_row, tw_row) + d(gb, tb) (the bias as a single row), d = the official ``distance_wb``."""
    return _distance_rows(gw, tw) + _distance_rows(gb[None], tb[None])


def match_features(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, target_w: torch.Tensor,
                   target_b: torch.Tensor, present: np.ndarray, steps: int, lr: float) -> torch.Tensor:
    """Optimise the federated features F (C, n, d) so that ∇_(W, b) CE(W·F_c + b, c) matches the clients'
    mean gradient of each present class: min_F Σ_c D(∇(F_c), g_c), SGD on F. Returns the new F."""
    feats = features.detach().clone().requires_grad_(True)
    W, b = weight.detach().clone().requires_grad_(True), bias.detach().clone().requires_grad_(True)
    opt = torch.optim.SGD([feats], lr=lr)
    classes = [int(c) for c in np.flatnonzero(present)]
    for _ in range(steps):
        loss = torch.zeros(())
        for c in classes:
            out = feats[c] @ W.T + b
            y = torch.full((feats.shape[1],), c, dtype=torch.long)
            gw, gb = torch.autograd.grad(F.cross_entropy(out, y), [W, b], create_graph=True)
            loss = loss + gradient_distance(gw, gb, target_w[c], target_b[c])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return feats.detach()


def fresh_linear(d: int, num_classes: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The state of a freshly initialised nn.Linear(d, C) (PyTorch's default init), seeded from ``generator``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2**31, (1,), generator=generator)))
        return {k: v.detach().clone() for k, v in nn.Linear(d, num_classes).state_dict().items()}


# --------------------------------------------------------------------------- the wrapper
@STRATEGIES.register("creff")
class CReFF(StrategyWrapper):
    class Options(StrategyWrapper.Options):
        num_features: int = Field(100, gt=0, description="federated features per class")
        match_steps: int = Field(100, gt=0, description="gradient-matching steps per round")
        match_lr: float = Field(0.1, gt=0, description="gradient-matching learning rate")
        crt_epochs: int = Field(300, gt=0, description="classifier re-training epochs on the federated features")
        crt_lr: float = Field(0.01, gt=0, description="classifier re-training learning rate")
        crt_batch: int = Field(32, gt=0, description="classifier re-training batch size")
        batch_real: int = Field(32, gt=0, description="real images per class for a client's class gradient")
        repeats: int = Field(10, gt=0, description="draws averaged into a client's class gradient")
        dsa: bool = Field(True, description="augment each class-gradient draw with one Siamese DSA op (official)")

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """CReFF re-trains one nn.Linear classifier (weight and bias): a multi-expert model or a cosine head is
        refused before round 1 (:meth:`run_round` still checks the state a client method's model adapts)."""
        super().check_config(cfg)
        require_single_network(cfg, "strategy creff re-trains the one nn.Linear classifier")
        if getattr(cfg.model, "classifier", "linear") != "linear":
            raise FedLTError(f"strategy creff re-trains an nn.Linear classifier, and model.classifier="
                             f"{cfg.model.classifier}: set model.classifier=linear")
        head = getattr(CLIENTS.get(cfg.client.name), "replaced_head", None) if cfg.client.name else None
        if head is not None:
            raise FedLTError(f"strategy creff re-trains an nn.Linear classifier (classifier.weight and "
                             f"classifier.bias), and client.name={cfg.client.name} replaces it by {head}: use a "
                             f"client method that keeps the model's linear classifier")

    def __init__(self, cfg: Config, num_classes: int) -> None:
        super().__init__(cfg, num_classes)
        self.features: torch.Tensor | None = None  # the federated features F (C, n, d)
        self.classifier: dict | None = None  # the re-trained classifier's state
        self.classifier_round = 0  # the round whose global weights it belongs to (0: none); every round re-trains

    def run_round(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                  grid: Grid) -> tuple[ArrayRecord | None, MetricRecord | None]:
        o, C = self.opts, self.num_classes
        state = to_state(arrays)
        if "classifier.weight" not in state or "classifier.bias" not in state:
            by = f"client.name={self.cfg.client.name} changes the model's head" if self.cfg.client.name not in (
                None, "fedavg") else "the model has none"
            raise FedLTError(f"strategy creff re-trains an nn.Linear classifier (classifier.weight and "
                             f"classifier.bias), and {by}: use a client method that keeps the model's "
                             f"linear classifier")
        if self.classifier is None:  # round 1: a fresh Linear head (the official ``temp_model``)
            self.classifier = fresh_linear(state["classifier.weight"].shape[1], C,
                                           torch_generator(self.cfg.seed, Stream.CREFF, 0, 1))
        state.update({f"classifier.{k}": v for k, v in self.classifier.items()})
        W, b = state["classifier.weight"].float(), state["classifier.bias"].float()
        replies = self.query(grid, self.cohort(server_round), to_arrays(state), "class-grads",
                             {"batch": o.batch_real, "repeats": o.repeats, "dsa": o.dsa}, server_round=server_round)
        new, metrics = self.base.run_round(server_round, arrays, config, grid)
        grads = [r.content["grads"] for r in replies]
        gw, gb, present = average_class_grads([g["weight"].numpy() for g in grads], [g["bias"].numpy() for g in grads],
                                              [g["has"].numpy() for g in grads])
        gen = torch_generator(self.cfg.seed, Stream.CREFF, server_round)
        if self.features is None:
            init = torch_generator(self.cfg.seed, Stream.CREFF, 0)
            self.features = torch.randn(C, o.num_features, W.shape[1], generator=init)
        self.features = match_features(self.features, W, b, torch.as_tensor(gw, dtype=torch.float32),
                                       torch.as_tensor(gb, dtype=torch.float32), present, o.match_steps, o.match_lr)
        fresh = nn.Linear(W.shape[1], C)
        fresh.load_state_dict(fresh_linear(W.shape[1], C, gen))
        feats = self.features.reshape(-1, W.shape[1])
        labels = torch.arange(C).repeat_interleave(self.features.shape[1])
        clf = fit_classifier(fresh, feats, labels, o.crt_epochs, o.crt_lr, o.crt_batch, gen)
        self.classifier = {k: v.detach().clone() for k, v in clf.state_dict().items()}
        if new is not None:
            self.classifier_round = server_round
        return new, metrics

    def eval_model(self, model: nn.Module) -> nn.Module:
        """The base's model with the re-trained classifier (it belongs to the latest weights: every round
        re-trains it, and the checkpoint keeps it with the weights of its round)."""
        return with_classifier(self.base.eval_model(model), self.classifier, self.classifier_round > 0)

    def summary_extras(self) -> dict:
        out = {**self.base.summary_extras()}
        if self.global_arrays is not None:
            out["creff_base_classifier"] = global_model_metrics(self, self.base.eval_model, self.base.transform_logits)
        return out

    def state_dict(self) -> dict:
        return {**self.base.state_dict(), "creff_features": self.features, "creff_classifier": self.classifier,
                "creff_classifier_round": self.classifier_round}

    def load_state_dict(self, state: dict) -> None:
        self.base.load_state_dict(state)
        self.features, self.classifier = state.get("creff_features"), state.get("creff_classifier")
        self.classifier_round = state.get("creff_classifier_round", 0)
