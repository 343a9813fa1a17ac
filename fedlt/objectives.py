"""Training objectives whose structure is visible: a loss of one of the model's outputs, optionally plus
FedProx's proximal term.

An :class:`fedlt.train.Objective` is any ``objective(model, x, y) -> scalar``. The two here are such
objectives, and called on a model they compute exactly what the plain function they replace did:

- :class:`LossObjective`: L = loss(output, y), with ``output`` one of the model's outputs — ``model(x)``,
  ``model.expert_logits(x)``, ``model.expert_forward(x, m)`` or ``model.features(x)`` (with the weights of
  the heads the loss applies).
- :class:`ProximalObjective`: L = base(model, x, y) + ½μ·Σ_l ‖w_l − w⁰_l‖² over the trainable parameters,
  w⁰ the weights the client received (FedProx, Li et al., MLSys 2020).

What the structure is for: the fused engine (:mod:`fedlt.federation.fused`) trains a round's clients as one
stacked model. Where every client's objective is a :class:`LossObjective` of the same function — one
``functools.partial`` of one function whose tensor arguments (the client's counts, a prior) differ between
clients and whose other arguments are equal — :func:`loss_parts` splits it so that the group's losses are
one ``torch.func.vmap`` of that function over the clients, and the proximal term one subtraction and sum per
stacked parameter, instead of a kernel per op per client.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

OUTPUTS = ("forward", "expert_logits", "expert_forward", "features")
"""The model outputs a :class:`LossObjective` may take: ``model(x)``, ``model.expert_logits(x)`` (an (M, B, C)
stack), ``model.expert_forward(x, m)`` (expert m's logits) and ``model.features(x)`` (the backbone's features,
for a loss that applies heads of its own: their weights are ``LossObjective.params``)."""


def model_output(model: nn.Module, x: torch.Tensor, output: str, args: tuple = ()) -> torch.Tensor:
    """``model(x)`` for ``output="forward"``, else ``getattr(model, output)(x, *args)``."""
    return model(x) if output == "forward" else getattr(model, output)(x, *args)


@dataclass(frozen=True, eq=False)  # compared by identity: its loss may hold tensors
class LossObjective:
    """L = ``loss(output, y, *weights)``, ``output`` the model's output named by ``output`` (:data:`OUTPUTS`)
    with ``args`` (the expert index of ``expert_forward``), ``weights`` the model's parameters named by
    ``params`` (``model.get_parameter``; e.g. the heads a loss of the features applies)."""

    loss: Callable[..., torch.Tensor]
    output: str = "forward"
    args: tuple = ()
    params: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.output not in OUTPUTS:
            raise ValueError(f"LossObjective.output must be one of {OUTPUTS}, not {self.output!r}")

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        weights = [model.get_parameter(n) for n in self.params]
        return self.loss(model_output(model, x, self.output, self.args), y, *weights)


def proximal_term(model: nn.Module, anchor: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ_l ‖w_l − w⁰_l‖² over the trainable parameters (``requires_grad``); ``anchor`` in their order."""
    trainable = (p for p in model.parameters() if p.requires_grad)
    return sum(((p - g) ** 2).sum() for p, g in zip(trainable, anchor))


@dataclass(frozen=True, eq=False)  # compared by identity: it holds tensors
class ProximalObjective:
    """L = ``base(model, x, y)`` + ½·``mu``·:func:`proximal_term` (model, ``anchor``); ``anchor`` holds the
    trainable parameters as received, in ``model.parameters()`` order."""

    base: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
    mu: float
    anchor: tuple[torch.Tensor, ...]

    @classmethod
    def around(cls, model: nn.Module, base: Callable, mu: float) -> "ProximalObjective":
        """The proximal objective anchored at ``model``'s trainable parameters now (cloned)."""
        return cls(base, mu, tuple(p.detach().clone() for p in model.parameters() if p.requires_grad))

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.base(model, x, y) + 0.5 * self.mu * proximal_term(model, self.anchor)


_STATIC = (bool, int, float, str, type(None))


@dataclass(frozen=True)
class LossParts:
    """A loss split for ``vmap``: ``function(output, y, *weights, **static, **dict(zip(names, tensors)))``.

    Two clients' losses share one vmapped call where their :attr:`key` is equal (same function, same static
    arguments, tensors of the same names, shapes and dtypes); ``tensors`` are each client's own."""

    function: Callable
    static: tuple[tuple[str, object], ...]
    names: tuple[str, ...]
    tensors: tuple[torch.Tensor, ...]

    @property
    def key(self) -> tuple:
        return (self.function, self.static, self.names, tuple((t.shape, t.dtype) for t in self.tensors))

    def per_sample_call(self) -> Callable[..., torch.Tensor]:
        """``f(output, y, *tensors, *weights)``: the loss with its tensors positional (``vmap`` maps positional
        arguments only), then the weights of :attr:`LossObjective.params`."""
        static, names, function, n = dict(self.static), self.names, self.function, len(self.names)
        return lambda output, y, *rest: function(output, y, *rest[n:], **static, **dict(zip(names, rest[:n])))


def loss_parts(loss: Callable) -> LossParts | None:
    """``loss`` split into :class:`LossParts`, or None where it cannot be: a plain function (no closure) is
    its own function with no arguments; a ``functools.partial`` with keyword arguments only, each a tensor or a
    bool/int/float/str/None, is split into both. Anything else (a lambda or closure — its captured tensors
    are invisible — or a partial with positional or other arguments) is None: it runs one client at a time."""
    if isinstance(loss, partial):
        if loss.args or not callable(loss.func) or isinstance(loss.func, partial):
            return None
        tensors = {k: v for k, v in loss.keywords.items() if isinstance(v, torch.Tensor)}
        static = {k: v for k, v in loss.keywords.items() if k not in tensors}
        if not all(isinstance(v, _STATIC) for v in static.values()):
            return None
        return LossParts(loss.func, tuple(sorted(static.items())), tuple(tensors), tuple(tensors.values()))
    if inspect.isfunction(loss) and loss.__closure__ is None:
        return LossParts(loss, (), (), ())
    return None
