"""FedLoGe client (Xiao et al., "FedLoGe: Joint Local and Generic Federated Learning under Long-tailed Data",
ICLR 2024; official code ZackZikaiXiao/FedLoGe).

The model's classifier is replaced (:meth:`FedLoGeClient.adapt_model`) by :class:`FedLoGeHead`:

- SSE-C, a fixed sparse ETF ``W_s`` (C × d) and a fixed bias (``nn.Linear``'s initial one, never trained, as
  the official ``g_head``): :func:`sparse_etf` zeroes a random fraction β = 0.6 of a simplex ETF's entries,
  then Adam (lr 10⁻⁴, 10,000 steps, gradients masked to the kept entries) on
  Σ_c (‖m_c‖ − 0.1)² − mean_c arccos(clamp(max_{j≠c} cos(m_c, m_j), ±0.99999))
  (``util/etf_methods.py``, ``ETF_Classifier.gen_sparse_ETF``; ``fedloge.py``, ``cls_switch = "SSE-C"``);
- ``aux``: the global auxiliary head g_aux (``nn.Linear``), aggregated by FedAvg;
- per client, a local head l_k (``nn.Linear``, never aggregated; the server keeps it and sends it back).

Local training (``util/update_baseline.py``, ``update_weights_gaux``): per batch, CE(SSE-C(h), y) trains the
backbone, CE(g_aux(h.detach()), y) the global head and CE(l_k(h.detach()), y) the local head (one SGD over
the sum: the three losses touch disjoint parameters, as the official three optimizers).

Global model (GHA, readme step 2.2 and ``util/update_baseline.py``, ``globaltest_calibra``):
w_c ← 1.7·w_c/‖w_c‖ on g_aux's rows, bias unchanged (strategies/fedloge.py). Personalised model (LHA) as
the release's ``realignment.py`` computes it: ``update_weights_norm_init`` (with ``epoch = 0``: no training)
rescales g_aux's rows by the local head's, W_aux ← diag(‖l_{k,c}‖)·W_aux, then ``localtest`` evaluates
l_k(h) + g_aux(h), i.e. logits = W_l h + b_l + (diag(‖l_{k,c}‖)·W_aux) h + b_aux (``client.lha=realignment``).
The readme's step 2.1 writes another form, the local head's weights replaced by the rescaled W_aux:
(diag(‖l_{k,c}‖)·W_aux) h + b_l + W_aux h + b_aux (``client.lha=readme``). Classes the client holds no
training sample of are masked out. The official masks the classes absent from the client's *test* set (its
``class_distribution``), reading test labels; fedlt masks by the client's training counts instead
(``client.mask_absent``). The per-round ``localtest`` of ``fedloge.py`` (the logs' "local average test acc")
evaluates l_k(h) + g_aux(h) without the rescaling.
"""

from __future__ import annotations

import copy
from functools import lru_cache, partial
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from clients.fedetf import simplex_etf
from fedlt.client_method import ClientMethod, classifier_of
from fedlt.config import Config
from fedlt.errors import FedLTError
from fedlt.models.experts import require_single_network
from fedlt.objectives import LossObjective
from fedlt.registry import CLIENTS
from fedlt.streams import Stream, seeded_rng
from fedlt.train import Objective, TensorData


def sparse_etf(etf: torch.Tensor, zero: np.ndarray, steps: int, lr: float = 1e-4,
               target_norm: float = 0.1) -> torch.Tensor:
    """The official SSE-C optimisation of a (d × C) ETF with the flat indices ``zero`` set to 0: Adam on
    Σ_c (‖m_c‖ − t)² − mean_c arccos(clamp(max_{j≠c} cos(m_c, m_j), −0.99999, 0.99999)), the gradient
    multiplied by the non-zero mask (the zeroed entries stay 0). Returns the (d × C) matrix."""
    m = etf.detach().clone().float().flatten()
    m[torch.as_tensor(zero, dtype=torch.long)] = 0
    m = m.reshape(etf.shape).requires_grad_(True)
    mask = (m != 0).float()
    opt = torch.optim.Adam([m], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        norms = torch.norm(m, p=2, dim=0)
        norm_loss = torch.sum((norms - target_norm) ** 2)
        cos = (m / norms).t() @ (m / norms)
        cos = cos - torch.diag(torch.diagonal(cos)) - torch.eye(cos.shape[0])  # diagonal -1, as fill_(-1)
        angle_loss = -torch.acos(cos.max(dim=1)[0].clamp(-0.99999, 0.99999)).mean()
        (norm_loss + angle_loss).backward()
        m.grad *= mask
        opt.step()
    return m.detach()


@lru_cache(maxsize=8)
def _sse_c(feature_dim: int, num_classes: int, sparsity: float, steps: int, seed: int) -> torch.Tensor:
    """SSE-C (d × C) of one seed, computed once per process (every client and the server build the same)."""
    rng = seeded_rng(seed)
    etf = simplex_etf(torch.from_numpy(rng.random((feature_dim, num_classes))))
    zero = rng.choice(feature_dim * num_classes, int(sparsity * feature_dim * num_classes), replace=False)
    return sparse_etf(etf, zero, steps)


def lha_logits(h: torch.Tensor, aux: nn.Linear, local: nn.Linear, absent: torch.Tensor | None = None,
               form: str = "realignment") -> torch.Tensor:
    """LHA with S = diag(‖l_c‖)·W_aux: ``realignment`` (the release's realignment.py) l(h) + S h + b_aux;
    ``readme`` (its step 2.1) S h + b_l + W_aux h + b_aux. ``absent`` (C bools) classes set to −inf."""
    scaled = aux.weight * torch.norm(local.weight, p=2, dim=1).unsqueeze(1)
    if form == "realignment":
        z = local(h) + F.linear(h, scaled, aux.bias)
    elif form == "readme":
        z = F.linear(h, scaled, local.bias) + aux(h)
    else:
        raise ValueError(f"unknown LHA form {form!r}")
    return z if absent is None else z.masked_fill(absent.to(z.device), float("-inf"))


def gha_weight(weight: torch.Tensor, scale: float = 1.7) -> torch.Tensor:
    """GHA: each row w_c → scale·w_c/‖w_c‖ (the official 1.7)."""
    return weight * (scale / torch.norm(weight, dim=1)).view(-1, 1)


class FedLoGeHead(nn.Module):
    """SSE-C (fixed, not sent) and the auxiliary global head; ``local`` is attached only while a client trains
    or evaluates its own model. ``forward`` is SSE-C's output (the backbone's training logits)."""

    def __init__(self, feature_dim: int, num_classes: int, sse: torch.Tensor) -> None:
        super().__init__()
        bias = nn.Linear(feature_dim, num_classes).bias.detach()  # the official g_head's untrained bias
        self.register_buffer("sse_weight", sse.t().contiguous().to(bias.dtype, copy=True), persistent=False)
        self.register_buffer("sse_bias", bias.clone(), persistent=False)
        self.aux = nn.Linear(feature_dim, num_classes)
        self.local: nn.Linear | None = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.sse_weight, self.sse_bias)


class HeadModel(nn.Module):
    """``head(features(x))`` for a head function of the features (GHA, LHA)."""

    def __init__(self, features: nn.Module, head) -> None:
        super().__init__()
        self.features = features
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


LOSS_WEIGHTS = ("classifier.aux.weight", "classifier.aux.bias", "classifier.local.weight", "classifier.local.bias")


def fedloge_heads_loss(h: torch.Tensor, y: torch.Tensor, aux_weight: torch.Tensor, aux_bias: torch.Tensor,
                       local_weight: torch.Tensor, local_bias: torch.Tensor, *, sse_weight: torch.Tensor,
                       sse_bias: torch.Tensor) -> torch.Tensor:
    """CE(SSE-C(h), y) + CE(g_aux(h.detach()), y) + CE(l_k(h.detach()), y) from the features h and the heads'
    weights (``LOSS_WEIGHTS``), so that the fused engine computes it for a round's clients in one vmapped call."""
    hd = h.detach()
    return (F.cross_entropy(F.linear(h, sse_weight, sse_bias).float(), y)
            + F.cross_entropy(F.linear(hd, aux_weight, aux_bias).float(), y)
            + F.cross_entropy(F.linear(hd, local_weight, local_bias).float(), y))


def fedloge_objective(head: FedLoGeHead) -> LossObjective:
    """The local objective of a model whose classifier is ``head`` (with l_k attached):
    :func:`fedloge_heads_loss` of ``model.features(x)``, SSE-C fixed, the heads' weights the model's own."""
    return LossObjective(partial(fedloge_heads_loss, sse_weight=head.sse_weight, sse_bias=head.sse_bias),
                         output="features", params=LOSS_WEIGHTS)


def _head(model: nn.Module) -> FedLoGeHead:
    return classifier_of(model, FedLoGeHead, "fedloge")


@CLIENTS.register("fedloge")
class FedLoGeClient(ClientMethod):
    strategy = "fedloge"
    replaced_head = "its fixed sparse ETF classifier (SSE-C) beside a linear auxiliary head"

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        require_single_network(cfg, "client method fedloge replaces the classifier by its sparse ETF")

    class Options(ClientMethod.Options):
        sparsity: float = Field(0.6, ge=0, lt=1, description="SSE-C: fraction β of the ETF's entries set to 0")
        sse_steps: int = Field(10000, ge=0, description="SSE-C: Adam steps (lr 1e-4) of the official optimisation")
        mask_absent: bool = Field(True, description="LHA: mask the classes the client has no training sample of")
        lha: Literal["realignment", "readme"] = Field(
            "realignment", description="LHA's form: the release's realignment.py, l_k(h) + rescaled g_aux(h), or "
                                       "the readme's step 2.1, rescaled W_aux with b_l + g_aux(h)")

    @classmethod
    def adapt_model(cls, model: nn.Module, cfg: Config, num_classes: int) -> nn.Module:
        if not hasattr(model, "feature_dim"):
            raise FedLTError(f"client method fedloge needs a model with one classifier head, not {cfg.model.name}")
        if model.feature_dim < num_classes:
            raise FedLTError(f"client method fedloge needs a feature width ≥ the number of classes ({num_classes}), "
                             f"model {cfg.model.name} has {model.feature_dim}")
        seed = int(torch.randint(2**31 - 1, (1,)))  # from the seeded initialisation stream
        sse = _sse_c(model.feature_dim, num_classes, cfg.client.sparsity, cfg.client.sse_steps, seed)
        model.classifier = FedLoGeHead(model.feature_dim, num_classes, sse)
        return model

    def local_head(self, model: nn.Module, config: dict) -> nn.Linear:
        """The client's l_k: as the server sent it (``l-head-weight``/``l-head-bias``), or, before the client's
        first round, ``nn.Linear``'s initialisation from the seed and the partition id."""
        head = _head(model)
        d, c = head.aux.in_features, head.aux.out_features
        pid = int(config.get("partition-id", 0))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seeded_rng(self.cfg.seed, Stream.INIT, 1, pid).integers(2**31)))
            local = nn.Linear(d, c)
        if "l-head-weight" in config:
            with torch.no_grad():
                local.weight.copy_(torch.as_tensor(list(config["l-head-weight"])).view(c, d))
                local.bias.copy_(torch.as_tensor(list(config["l-head-bias"])))
        return local.to(head.aux.weight.device, head.aux.weight.dtype)

    def objective(self, model: nn.Module, data: TensorData, config: dict) -> Objective:
        """:func:`fedloge_objective`; l_k is attached first (:meth:`attach_local`, called by ``fit``)."""
        head = _head(model)
        if head.local is None:
            raise FedLTError("client method fedloge trains its local head l_k with the model: attach_local "
                             "comes before objective")
        return fedloge_objective(head)

    def attach_local(self, model: nn.Module, data: TensorData, config: dict) -> None:
        """l_k trains beside the model this round (its weights are in the trained state as classifier.local.*)."""
        _head(model).local = self.local_head(model, config)

    def detach_local(self, model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """l_k leaves the model and the state; it is sent apart, as ``l-head`` (the strategy keeps it)."""
        _head(model).local = None
        local = {k.removeprefix("classifier.local."): state.pop(k) for k in list(state)
                 if k.startswith("classifier.local.")}
        return {"l-head": {k: v.detach().cpu() for k, v in local.items()}} if local else {}

    def personalise(self, model: nn.Module, data: TensorData, config: dict) -> nn.Module:
        """LHA: the global backbone and g_aux with the client's l_k (no further training, as the official)."""
        head = _head(model)
        local = self.local_head(model, config)
        aux = copy.deepcopy(head.aux)
        absent = (data.class_counts == 0) if self.opts.mask_absent else None
        return HeadModel(model.features, lambda h: lha_logits(h, aux, local, absent, self.opts.lha)).eval()
