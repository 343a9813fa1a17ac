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
reach disjoint parameters and SGD acts per parameter), at fedlt's ``train`` settings (momentum, weight decay).
FedLoGe's ``baselines/fedrod_aggre.py`` (ZackZikaiXiao/FedLoGe) trains g with plain CE and p on the features
alone, and aggregates g by its own class-norm rule; those departures from the paper are not copied.

The personal head lives on the server between rounds (strategies/fedrod.py keeps it in its checkpointed
state): it arrives in ``config["records"]["fedrod-personal"]`` and leaves in the reply's extra records.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from fedlt.client_method import ClientMethod, FitResult
from fedlt.config import Config
from fedlt.models.experts import require_single_network
from fedlt.registry import CLIENTS
from fedlt.train import Augment, TensorData, instance_balanced_sampler, train

PERSONAL = "fedrod-personal"


def balanced_softmax_loss(logits: torch.Tensor, y: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """L_BSM = CE(z + log n, y) (Ren et al., NeurIPS 2020), n the client's class counts (log 0 = −∞)."""
    return F.cross_entropy(logits.float() + torch.log(counts.float()), y)


class RodPair(nn.Module):
    """The global model (body + generic head) and the client's personal head, trained together."""

    def __init__(self, model: nn.Module, personal: nn.Module) -> None:
        super().__init__()
        self.model, self.personal = model, personal


def fedrod_loss(pair: RodPair, x: torch.Tensor, y: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """L_BSM(g(f(x))) + CE(g(f(x)).detach() + p(f(x).detach())): the first reaches body and g, the second p."""
    z = pair.model.features(x)
    g = pair.model.classifier(z)
    personal = F.cross_entropy(g.detach().float() + pair.personal(z.detach()).float(), y)
    return balanced_softmax_loss(g, y, counts) + personal


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

    def fit(self, model: nn.Module, data: TensorData, config: dict, generator: torch.Generator,
            augment: Augment) -> FitResult:
        pair = RodPair(model, self.personal_head(model, config))
        counts = data.class_counts.to(data.images.device)
        t = self.cfg.train
        result = train(pair, data, lambda m, x, y: fedrod_loss(m, x, y, counts), opt=self.optim(config),
                       generator=generator, augment=augment, epochs=None if t.local_steps else t.local_epochs,
                       steps=t.local_steps, sampler=instance_balanced_sampler)
        return FitResult(state={k: v.detach().cpu() for k, v in model.state_dict().items()},
                         metrics={"train_loss": result.loss, "num-examples": len(data), "steps": result.steps,
                                  "train-images": result.num_examples},
                         extra_arrays={PERSONAL: {k: v.detach().cpu() for k, v in pair.personal.state_dict().items()}})

    def personalise(self, model: nn.Module, data: TensorData, config: dict) -> nn.Module:
        return PersonalisedModel(model, self.personal_head(model, config))
