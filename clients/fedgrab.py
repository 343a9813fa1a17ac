"""Fed-GraB client: the Self-adjusting Gradient Balancer (SGB) (Xiao et al., "Fed-GraB: Federated Long-tailed
Learning with Self-Adjusting Gradient Balancer", NeurIPS 2023), following the official code
ZackZikaiXiao/FedGraB: ``util/losses.py`` (``PIDLOSS``, ``PID``, ``random_unit``) and
``util/update_baseline.py`` (``update_weights_pid``).

Per batch of N samples with logits z and one-hot targets y (C classes):

1. every open class controller takes one incremental ("PID_DELTA") step on the accumulated gradient imbalance
   d_c = P_c − Q_c (set point 0): e ← (−d_c, e_0, e_1);
   u_c ← clip(u_c + K_p(e_0 − e_1) + K_i e_0 + K_d(e_0 − 2e_1 + e_2), ±100), K_p, K_i, K_d = 10, 0.01, 0.1;
   a closed controller gives u_c = 0 and keeps its state;
2. weights w⁺_c = f(u_c), w⁻_c = f(−u_c), f(x) = (10/9) / (1/9 + e^{−x/2}) (f(0) = 1);
   W_ic = w⁺_c y_ic + w⁻_c (1 − y_ic);
3. random release (the release's gradient hook): over the controlled classes in index order, class c is released
   with probability 0.1^{j/(T−1)}, j the number released so far, T the number of controlled classes; a
   released class has W_ic = 1 and no part in (5);
4. loss Σ_ic W_ic · BCE(z_ic, y_ic) / N (W held fixed): its gradient in z is W_ic (σ(z_ic) − y_ic) / N, the
   release's BCE gradient multiplied by W in its hook;
5. P_c += Σ_i |g_ic| y_ic, Q_c += Σ_i |g_ic| (1 − y_ic) with g that weighted gradient.

P, Q and the controllers persist over the client's whole training (the release keeps one PIDLOSS per client
for the run). fedlt's ClientApp is stateless, so the server keeps each client's SGB state between its rounds
and sends it back (``sgb-*`` config keys; a deployment would keep it on the client). The server says which
classes are controlled (``sgb-open``): the tail classes of its prior (:mod:`strategies.fedgrab`).

Official defects not copied: ``PID.LimitMax`` assigns to its argument and so never clamps u (here |u| ≤ 100,
the intended bound); the release's optimizer holds only the backbone's parameters, so its classifier never
leaves its initialisation (here the whole model trains); the release's random release divides by zero with one
controlled class (here that class is released with probability 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from fedlt.client_method import ClientMethod
from fedlt.registry import CLIENTS
from fedlt.train import Augment, Objective, TensorData

KP, KI, KD, MAX_OUT = 10.0, 0.01, 0.1, 100.0  # util/losses.py PID.__init__


def sgb_map(x: torch.Tensor) -> torch.Tensor:
    """f(x) = (10/9) / (1/9 + exp(−x/2)) (``PIDLOSS.map_func``)."""
    return (10 / 9) / ((1 / 9) + torch.exp(-0.5 * x))


@dataclass
class SGBState:
    """One client's balancer: P (pos), Q (neg), controller outputs u and errors e (C, 3) as float64 tensors."""

    pos: torch.Tensor
    neg: torch.Tensor
    out: torch.Tensor
    err: torch.Tensor

    @classmethod
    def zeros(cls, num_classes: int) -> "SGBState":
        z = torch.zeros(num_classes, dtype=torch.float64)
        return cls(z.clone(), z.clone(), z.clone(), torch.zeros(num_classes, 3, dtype=torch.float64))

    @classmethod
    def from_config(cls, config: dict, num_classes: int) -> "SGBState":
        if "sgb-pos" not in config:
            return cls.zeros(num_classes)
        t = {k: torch.tensor(list(config[f"sgb-{k}"]), dtype=torch.float64) for k in ("pos", "neg", "out", "err")}
        return cls(t["pos"], t["neg"], t["out"], t["err"].reshape(num_classes, 3))

    def metrics(self) -> dict[str, list[float]]:
        return {f"sgb-{k}": getattr(self, k).flatten().tolist() for k in ("pos", "neg", "out", "err")}


def pid_step(state: SGBState, open_mask: torch.Tensor, kp: float = KP, ki: float = KI, kd: float = KD,
             max_out: float = MAX_OUT) -> torch.Tensor:
    """Step 1 for every class at once (in place on the open classes); returns u (0 for a closed class)."""
    e = state.err
    new = torch.stack([-(state.pos - state.neg), e[:, 0], e[:, 1]], dim=1)
    delta = kp * (new[:, 0] - new[:, 1]) + ki * new[:, 0] + kd * (new[:, 0] - 2 * new[:, 1] + new[:, 2])
    out = torch.clamp(state.out + delta, -max_out, max_out)
    state.err = torch.where(open_mask[:, None], new, e)
    state.out = torch.where(open_mask, out, state.out)
    return torch.where(open_mask, state.out, torch.zeros_like(state.out))


def random_release(open_mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Step 3: the released classes (a bool mask), drawn from ``generator``."""
    controlled = torch.nonzero(open_mask).flatten().tolist()
    t = len(controlled)
    released = torch.zeros_like(open_mask)
    j = 0
    for c in controlled:
        p = 1.0 if t == 1 else 0.1 ** (j / (t - 1.0))
        if p == 1 or (p > 0 and float(torch.rand((), generator=generator, dtype=torch.float64)) < p):
            released[c] = True
            j += 1
    return released


def sgb_weights(u: torch.Tensor, target: torch.Tensor, released: torch.Tensor) -> torch.Tensor:
    """Steps 2-3: W (N, C) from the controller outputs u (C,), one-hot targets and the released classes."""
    w = sgb_map(u)[None] * target + sgb_map(-u)[None] * (1 - target)
    return torch.where(released[None], torch.ones_like(w), w)


def sgb_loss_and_grad(logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 4: the loss and its gradient in the logits, W (σ(z) − y) / N (detached)."""
    target = F.one_hot(y, logits.shape[1]).to(logits.dtype)
    n = logits.shape[0]
    w = weight.to(logits.dtype)
    loss = (w * F.binary_cross_entropy_with_logits(logits, target, reduction="none")).sum() / n
    grad = (w * (torch.sigmoid(logits.detach()) - target) / n)
    return loss, grad


def accumulate(state: SGBState, grad: torch.Tensor, target: torch.Tensor, released: torch.Tensor) -> None:
    """Step 5: P_c += Σ_i |g_ic| y_ic, Q_c += Σ_i |g_ic| (1 − y_ic), released classes left out."""
    g = torch.where(released[None], torch.zeros_like(grad), grad.abs()).double()
    t = target.double()
    state.pos += (g * t).sum(0).cpu()
    state.neg += (g * (1 - t)).sum(0).cpu()


@dataclass(eq=False)
class SGBObjective:
    """One client's loss for a round: steps 1-5 on each batch, its balancer ``state`` updated in place (its own
    object per client, so the fused engine can train a round's clients together)."""

    state: SGBState
    open_mask: torch.Tensor
    release_generator: torch.Generator | None  # None: no random release

    def __call__(self, m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = m(x).float()
        c = logits.shape[1]
        u = pid_step(self.state, self.open_mask)
        target = F.one_hot(y, c).to(torch.float64).cpu()
        if self.release_generator is None:
            released = torch.zeros(c, dtype=torch.bool)
        else:
            released = random_release(self.open_mask, self.release_generator)
        weight = sgb_weights(u, target, released).to(logits.device)
        loss, grad = sgb_loss_and_grad(logits, y, weight)
        accumulate(self.state, grad, target, released)
        return loss


@CLIENTS.register("fedgrab")
class FedGraBClient(ClientMethod):
    class Options(ClientMethod.Options):
        random_release: bool = Field(True, description="the release's random release of controlled classes")

    release_seed: int = 0

    def prepare(self, model: nn.Module, data: TensorData, config: dict, generator: torch.Generator,
                augment: Augment) -> None:
        """The release draws come from their own generator, seeded from the client's (seed, round, partition)
        one before its first batch."""
        self.release_seed = int(torch.randint(0, 2**62, (1,), generator=generator))

    def objective(self, model: nn.Module, data: TensorData, config: dict) -> Objective:
        c = data.num_classes
        open_mask = torch.tensor([bool(v) for v in config.get("sgb-open", [1] * c)])
        release = torch.Generator().manual_seed(self.release_seed) if self.opts.random_release else None
        return SGBObjective(SGBState.from_config(config, c), open_mask, release)

    def round_metrics(self, objective: Objective) -> dict[str, float | int | list]:
        """The balancer's state after the round (``sgb-*``): the server sends it back next time."""
        assert isinstance(objective, SGBObjective)
        return objective.state.metrics()


def class_mask(classes: list[int] | np.ndarray, num_classes: int) -> list[int]:
    """A 0/1 list with 1 at ``classes``."""
    mask = [0] * num_classes
    for c in classes:
        mask[int(c)] = 1
    return mask
