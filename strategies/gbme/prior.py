"""GBME's private estimate of the global class prior from classifier updates, its client grouping and its
expert cohorts (Zeng et al., "Global Balanced Experts for Federated Long-Tailed Learning", ICCV 2023, Sec. 3;
official code Spinozaaa/Federated-Long-tailed-Learning, fedml_api/clsimb_fedavg/fedavg_api.py).

Every client trains one local epoch of plain cross-entropy from the initial model θ0 (query ``prior-epoch``)
and returns only its classifier weight W_k in (d, C) layout (multi-expert models: mean over experts). The
server computes ΔW_k = W_k − W0, s_kc = Σ_d ΔW_k[d, c] (≤ 0 -> 1e-5), p̂_k = s_k / Σ_c s_kc,
n̂_k = round(p̂_k·n_k), N̂_c = max(5, Σ_k n̂_kc) and π̂ = N̂ / Σ_c N̂_c. The official release sums the experts'
classifier weights in place into θ0's while it estimates; nothing here changes its inputs. ``posthoc_calibration`` uses the same estimator.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.serverapp import Grid
from torch import nn

from fedlt.client_method import FitResult
from fedlt.config import Config
from fedlt.experiment import experiment_for, model_for
from fedlt.federation.queries import QUERIES
from fedlt.federation.records import load_into
from fedlt.federation.strategy import FedLTStrategy, round_lr
from fedlt.models.base import NormedLinear
from fedlt.train import Augment, OptimConfig, TensorData, cross_entropy_objective, train

SCORE_FLOOR = 1e-5
COUNT_FLOOR = 5


def classifier_weight_dc(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> np.ndarray:
    """The classifier weight as a (d, C) float64 copy: ``nn.Linear`` stores (C, d), ``NormedLinear`` (d, C).
    A model with several ``classifier`` modules (experts) gives their mean."""
    state = model.state_dict() if state is None else state
    mats = []
    for name, module in model.named_modules():
        if name == "classifier" or name.endswith(".classifier"):
            w = state[f"{name}.weight"].detach().cpu().double().numpy().copy()
            if isinstance(module, nn.Linear):
                w = w.T
            elif not isinstance(module, NormedLinear):
                raise TypeError(f"unknown classifier type {type(module).__name__} at {name!r}")
            mats.append(w)
    if not mats:
        raise TypeError(f"{type(model).__name__} has no module named 'classifier'")
    return np.mean(np.stack(mats), axis=0)


@dataclass
class PriorEstimate:
    p_hat: np.ndarray  # (K, C) estimated label distribution of each client
    n_hat: np.ndarray  # (K, C) estimated counts
    counts: np.ndarray  # (C,) N̂_c
    pi_hat: np.ndarray  # (C,)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The arrays as float64 tensors (a checkpoint holds tensors, read back with ``weights_only=True``)."""
        return {k: torch.from_numpy(np.array(v, dtype=np.float64)) for k, v in self.__dict__.items()}

    @classmethod
    def from_state(cls, state: dict) -> "PriorEstimate":
        """The estimate saved by :meth:`state_dict` (tensors, or the arrays of an older checkpoint)."""
        return cls(**{k: np.asarray(v.numpy() if isinstance(v, torch.Tensor) else v, dtype=np.float64)
                      for k, v in state.items()})


def class_scores(delta_w: np.ndarray) -> np.ndarray:
    """s_c = Σ_d ΔW[d, c], with s_c ≤ 0 replaced by 1e-5."""
    s = np.asarray(delta_w, dtype=np.float64).sum(axis=0)
    return np.where(s <= 0, SCORE_FLOOR, s)


def estimate_prior(w0: np.ndarray, client_weights: list[np.ndarray], client_sizes: list[int]) -> PriorEstimate:
    """π̂ from the initial (d, C) classifier weight ``w0``, each client's weight after one CE epoch and n_k."""
    w0 = np.array(w0, dtype=np.float64, copy=True)
    p_hat, n_hat = [], []
    for w, n in zip(client_weights, client_sizes):
        s = class_scores(np.asarray(w, dtype=np.float64) - w0)
        p = s / s.sum()
        p_hat.append(p)
        n_hat.append(np.round(p * n))
    p_hat, n_hat = np.stack(p_hat), np.stack(n_hat)
    counts = np.maximum(COUNT_FLOOR, n_hat.sum(axis=0))
    return PriorEstimate(p_hat, n_hat, counts, counts / counts.sum())


def group_clients(p_hat: np.ndarray, counts: np.ndarray, num_groups: int, rule: str = "official"
                  ) -> tuple[list[list[int]], np.ndarray]:
    """score_k = Σ_c N̂_c·p̂_kc; clients sorted by score (descending, ties by id) cut into ``num_groups``
    contiguous groups (group 0 head-heavy). ``rule="official"``: group i is sorted[⌊K·i/E⌋ : ⌊K·(i+1)/E⌋]
    (``specifical_exp`` in fedavg_api.py; the extra clients go to the later, tail groups);
    ``"array_split"``: ``np.array_split`` (the extra clients go to the first groups). Returns (groups, scores)."""
    scores = np.asarray(p_hat, dtype=np.float64) @ np.asarray(counts, dtype=np.float64)
    order = sorted(range(len(scores)), key=lambda k: (-scores[k], k))
    k = len(order)
    if rule == "official":
        return [order[int(k * i / num_groups):int(k * (i + 1) / num_groups)] for i in range(num_groups)], scores
    if rule == "array_split":
        return [g.tolist() for g in np.array_split(np.asarray(order, dtype=np.int64), num_groups)], scores
    raise ValueError(f"unknown grouping rule {rule!r}; known: official, array_split")


def prior_error(pi: np.ndarray, pi_hat: np.ndarray) -> dict[str, float]:
    """L1 = Σ_c |π̂_c − π_c| and KL(π‖π̂) = Σ_c π_c log(π_c / π̂_c) (terms with π_c = 0 are 0)."""
    pi, pi_hat = np.asarray(pi, dtype=np.float64), np.asarray(pi_hat, dtype=np.float64)
    pi, pi_hat = pi / pi.sum(), pi_hat / pi_hat.sum()
    mask = pi > 0
    return {"l1": float(np.abs(pi_hat - pi).sum()),
            "kl": float((pi[mask] * np.log(pi[mask] / pi_hat[mask])).sum())}


def sample_expert_cohort(rng: np.random.Generator, group: list[int], num_clients: int, size: int,
                         group_fraction: float) -> list[int]:
    """GBME's cohort of an expert, sized as the release's ``fedavg_api.py`` (the expert loop of ``train``) sizes
    it, with S = ``size`` and β = ``group_fraction``:

    - S·β ≥ |group|: the whole group and int(S·β) − |group| other clients (int(S·β) in all: the release adds
      no S·(1 − β) share here; CIFAR-10's 5 per round, β = 0.8, groups of 3 or 4: 4 clients);
    - else int(S·β) clients of the group and int(S·(1 − β)) others, in floating point as the release computes
      them (S = 20, β = 0.8: 16 + int(3.99…) = 3, so 19 clients).

    At least one client (a group member). Not copied: the release draws the others from all K, so a group
    client can be drawn twice; here they come from the clients not yet chosen, all distinct. Sorted."""
    group = np.asarray(group, dtype=np.int64)
    if size * group_fraction >= len(group):
        chosen, others = group.tolist(), int(size * group_fraction) - len(group)
    else:
        n_group = max(1, int(size * group_fraction))
        chosen, others = rng.choice(group, size=n_group, replace=False).tolist(), int(size * (1 - group_fraction))
    rest = np.asarray([k for k in range(num_clients) if k not in set(chosen)], dtype=np.int64)
    chosen += rng.choice(rest, size=min(others, len(rest)), replace=False).tolist()
    return sorted(int(k) for k in chosen)


# --------------------------------------------------------------------------- the query round
@QUERIES.register("prior-epoch")
def prior_epoch(cfg: Config, model: nn.Module, data: TensorData, config: dict, generator: torch.Generator,
                augment: Augment) -> FitResult:
    """A client's answer: one local epoch of plain CE from the received weights at lr ``config['lr']``;
    returns the classifier weight in (d, C) layout only (no other weights leave the client)."""
    t = cfg.train
    opt = OptimConfig(lr=float(config.get("lr", t.lr)), momentum=t.momentum, weight_decay=t.weight_decay,
                      nesterov=t.nesterov, batch_size=t.batch_size)
    result = train(model, data, cross_entropy_objective, opt=opt, epochs=1.0, generator=generator, augment=augment)
    return FitResult(state={}, metrics={"num-examples": len(data), "train_loss": result.loss},
                     extra_arrays={"classifier": {"weight": classifier_weight_dc(model)}})


def run_prior_estimation(strategy: FedLTStrategy, grid: Grid, arrays: ArrayRecord) -> tuple[PriorEstimate, list[int]]:
    """Ask every client (all K) for one CE epoch from ``arrays`` (θ0) at round 1's lr and estimate π̂ from
    their classifier weights. ``arrays`` is only read. Returns the estimate and the partition ids that answered."""
    exp = experiment_for(strategy.cfg)
    model = load_into(model_for(strategy.cfg, exp), arrays)
    w0 = classifier_weight_dc(model)
    replies = strategy.query(grid, list(range(strategy.num_clients)), arrays, "prior-epoch",
                             {"lr": round_lr(strategy.cfg, 1)})
    weights = [r.content["classifier"]["weight"].numpy() for r in replies]
    sizes = [int(r.content["metrics"]["num-examples"]) for r in replies]
    pids = [int(r.content["metrics"]["partition-id"]) for r in replies]
    return estimate_prior(w0, weights, sizes), pids


def prior_report(estimate: PriorEstimate, true_counts: np.ndarray) -> dict:
    """What a run reports about its estimate: π̂, N̂, the true π, L1 and KL(π‖π̂)."""
    pi = np.asarray(true_counts, dtype=np.float64) / np.sum(true_counts)
    err = prior_error(pi, estimate.pi_hat)
    return {"pi_hat": estimate.pi_hat.tolist(), "estimated_counts": estimate.counts.tolist(),
            "true_prior": pi.tolist(), "prior_l1": err["l1"], "prior_kl": err["kl"]}
