"""FedROD client (Chen & Chao, "On Bridging Generic and Personalized Federated Learning for Image
Classification", ICLR 2022): two predictors on one body f.

- the generic head g (aggregated with the body) is trained with the Balanced Softmax loss on the client's own
  counts n_{k,c}: L_BSM = −log softmax(g(f(x)) + log n_k)_y (a class the client lacks has log 0 = −∞ and
  drops out of the softmax);
- the personal head p_k (kept on the client, never aggregated) is trained on the detached features and the
  detached generic logits: L_p = −log softmax(g(f(x))⁽ᵈᵉᵗᵃᶜʰ⁾ + p_k(f(x)⁽ᵈᵉᵗᵃᶜʰ⁾))_y;
- the personalised prediction is g(f(x)) + p_k(f(x)).

The official repository (hongyouc/Fed-RoD) holds a README only; the arithmetic follows PFLlib's
``system/flcore/clients/clientrod.py`` (TsingZ0/PFLlib: BSM step on body + generic head, then a CE step of the
personal head on ``out_g.detach() + pred(rep.detach())``, the personal head a copy of the initial generic
head). One SGD over {body, g, p} on L_BSM + L_p is the same update as PFLlib's two optimizers (the two losses
reach disjoint parameters and SGD acts per parameter), at fedlt's ``train`` settings (momentum, weight decay):
p_k is attached to the model for the round (:meth:`FedRODClient.attach_local`, as ``model.personal``), so
the shared loop of :meth:`~fedlt.client_method.ClientMethod.fit` trains it, and under
``federation.engine=fused`` the round's clients train stacked, each with its own p_k (with linear heads, the
default, the group's losses in one call: :func:`fedrod_objective`).
FedLoGe's ``baselines/fedrod_aggre.py`` (ZackZikaiXiao/FedLoGe) trains g with plain CE and p on the features
alone, and aggregates g by its own class-norm rule; those departures from the paper are not copied.

The personal head lives on the server between rounds (strategies/fedrod.py keeps it in its checkpointed
state): it arrives in ``config["records"]["fedrod-personal"]`` and leaves in the reply's extra records.
"""

from __future__ import annotations

import copy
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from fedlt.client_method import ClientMethod
from fedlt.config import Config
from fedlt.errors import FedLTError
from fedlt.losses import balanced_softmax_loss
from fedlt.models.experts import require_single_network
from fedlt.objectives import LossObjective
from fedlt.registry import CLIENTS
from fedlt.train import Objective, TensorData

PERSONAL = "fedrod-personal"


def rod_loss(g: torch.Tensor, personal: torch.Tensor, y: torch.Tensor, log_n: torch.Tensor) -> torch.Tensor:
    """L_BSM(g) + CE(g.detach() + personal, y) from the generic logits g and the personal head's logits of the
    detached features: Balanced Softmax CE(g + log n, y) (Ren et al., NeurIPS 2020; n the client's class
    counts, log 0 = −∞) reaches body and g, the second term p alone."""
    return balanced_softmax_loss(g, y, log_n) + F.cross_entropy(g.detach().float() + personal.float(), y)


def fedrod_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, log_n: torch.Tensor) -> torch.Tensor:
    """:func:`rod_loss` of g(f(x)) and p(f(x).detach()), p = ``model.personal`` (attached by
    :meth:`FedRODClient.attach_local`)."""
    z = model.features(x)
    return rod_loss(model.classifier(z), model.personal(z.detach()), y, log_n)


LINEAR_HEADS = ("classifier.weight", "classifier.bias", "personal.weight", "personal.bias")


def fedrod_linear_heads_loss(z: torch.Tensor, y: torch.Tensor, g_weight: torch.Tensor, g_bias: torch.Tensor,
                             p_weight: torch.Tensor, p_bias: torch.Tensor, *, log_n: torch.Tensor) -> torch.Tensor:
    """:func:`fedrod_loss` of linear heads g and p from the features z and their weights (``LINEAR_HEADS``), so
    that the fused engine computes it for a round's clients in one vmapped call."""
    return rod_loss(F.linear(z, g_weight, g_bias), F.linear(z.detach(), p_weight, p_bias), y, log_n)


def fedrod_objective(model: nn.Module, counts: torch.Tensor) -> Objective:
    """The local objective of ``model`` with its personal head attached, log n of the client's ``counts`` taken
    once: :func:`fedrod_linear_heads_loss` of ``model.features(x)`` where both heads are ``nn.Linear`` (the
    default classifier), else :func:`fedrod_loss`."""
    log_n = torch.log(counts.float())
    if type(model.classifier) is nn.Linear and type(model.personal) is nn.Linear:
        return LossObjective(partial(fedrod_linear_heads_loss, log_n=log_n), output="features", params=LINEAR_HEADS)
    return partial(fedrod_loss, log_n=log_n)


class PersonalisedModel(nn.Module):
    """FedROD's personalised prediction g(f(x)) + p_k(f(x))."""

    def __init__(self, model: nn.Module, personal: nn.Module) -> None:
        super().__init__()
        self.model, self.personal = model, personal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.model.features(x)
        return self.model.classifier(z) + self.personal(z)


@CLIENTS.register("fedrod")
class FedRODClient(ClientMethod):
    strategy = "fedrod"

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        require_single_network(cfg, "client method fedrod adds a personal head beside the one classifier")

    def personal_head(self, model: nn.Module, config: dict) -> nn.Module:
        """p_k from the message's records; where the server sent none, a copy of the received generic head."""
        head = copy.deepcopy(model.classifier)
        state = (config.get("records") or {}).get(PERSONAL)
        if state is not None:
            own = head.state_dict()
            head.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
        return head

    def attach_local(self, model: nn.Module, data: TensorData, config: dict) -> None:
        """p_k trains beside the model this round, as ``model.personal`` (its weights in the trained state as
        ``personal.*``)."""
        model.personal = self.personal_head(model, config)

    def objective(self, model: nn.Module, data: TensorData, config: dict) -> Objective:
        """:func:`fedrod_objective` on the client's counts; p_k is attached first (:meth:`attach_local`)."""
        if not isinstance(getattr(model, "personal", None), nn.Module):
            raise FedLTError("client method fedrod trains its personal head with the model: attach_local comes "
                             "before objective")
        return fedrod_objective(model, data.class_counts.to(data.images.device))

    def detach_local(self, model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """p_k leaves the model and the state; it is sent apart, under ``fedrod-personal`` (the strategy keeps it)."""
        if isinstance(getattr(model, "personal", None), nn.Module):
            del model.personal
        personal = {k.removeprefix("personal."): state.pop(k) for k in list(state) if k.startswith("personal.")}
        return {PERSONAL: {k: v.detach().cpu() for k, v in personal.items()}} if personal else {}

    def personalise(self, model: nn.Module, data: TensorData, config: dict) -> nn.Module:
        return PersonalisedModel(model, self.personal_head(model, config))
