"""CC-SAM: class-conditional sharpness-aware minimisation of the classifier (Zhou et al., "Class-Conditional
Sharpness-Aware Minimization for Deep Long-Tailed Recognition", CVPR 2023; follows zzpustc/CC-SAM
``train_cifar.py`` ``train`` (stage 1), constants of ``configs/Cifar10.json``), as an option of the one trainer
(:func:`fedlt.train.train`, ``OptimConfig.sam = "cc_sam"``) around ANY objective that calls ``model(x)`` on its
batch (every loss objective; mixup, which calls the model on mixed images, is refused with a one-line error).

Per batch, with h = model.features(x) and θ the classifier's parameters (P numbers in all):

1. L = objective(head_θ(h), y); for every class c in the batch, g_c = ∇_θ objective(head_θ(h_c), y_c) (the
   batch's samples of class c; the official code: the mean CE of those samples).
2. Per parameter tensor p of θ: ρ_c = r · √‖θ‖ / √‖g_{c,p}‖ / √2 / (n_c − 1)^{1/4} / P^{1/4} and
   ε_{c,p} = ρ_c · g_{c,p}/‖g_{c,p}‖ · √P, with ‖θ‖ the norm of all classifier parameters together (+1e-12),
   n_c the class's TRAINING count, r = ``noise_ratio`` (1e-6 in the official CIFAR configs).
3. L_flat = Σ_c (B_c/B) · objective(head_{θ+ε_c}(h_c), y_c) (the official mean over the batch of the per-sample
   perturbed CE); the loss is (1 − λ)·L + λ·L_flat, λ = ``flat_ratio`` (0.3).

The perturbation is a constant (no gradient through g_c), as in the official ``torch.autograd.grad``.
Not copied: (a) the official code perturbs ``param.data`` in place and restores it before ``backward``, so its
gradient through the features uses the unperturbed weights; here the perturbed head is a functional call, so the
whole gradient of L_flat is taken at θ + ε_c (the SAM gradient; the two differ by O(ε)). (b) A class with one
training sample makes the official (n_c − 1)^{1/4} zero (an infinite ρ); here n_c − 1 is clamped at 1.
The official stage 2 (classifier re-training with feature-space noise, ``train_sample``) is not part of this option:
``centralized.method=cc_sam`` (:mod:`fedlt.centralized.ccsam`) runs this option as stage 1, then that stage 2.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.func import functional_call

from fedlt.errors import FedLTError

if TYPE_CHECKING:
    from fedlt.train import Objective

CC_SAM_FLAT_RATIO = 0.3  # configs/Cifar10.json "flat_ratio"
CC_SAM_NOISE_RATIO = 1e-6  # configs/Cifar10.json "noise_ratio"


class _HeadOn(nn.Module):
    """What an objective sees as the model: ``view(x) = head_params(features of x)``, the features computed once
    per batch. An objective that calls the model on anything but the batch it was given (mixup's mixed images)
    is refused: its features would not be those of its input."""

    def __init__(self, head: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor,
                 features: torch.Tensor) -> None:
        super().__init__()
        self.head, self.params, self.x, self.h = head, params, x, features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x is not self.x:
            raise FedLTError("sam=cc_sam needs an objective that calls model(x) on its own batch x (this one "
                             "transforms the batch first, e.g. mixup)")
        return functional_call(self.head, self.params, (self.h,))


def cc_sam_perturbation(class_grads: list[torch.Tensor], params: list[torch.Tensor], class_count: float,
                        noise_ratio: float) -> list[torch.Tensor]:
    """ε_c for each parameter tensor (step 2 of the module docstring)."""
    num_params = sum(p.numel() for p in params)
    theta_norm = torch.norm(torch.stack([p.detach().norm(2) for p in params]), 2) + 1e-12
    shrink = math.sqrt(2) * math.sqrt(math.sqrt(max(class_count - 1, 1))) * math.sqrt(math.sqrt(num_params))
    out = []
    for g in class_grads:
        g_norm = torch.norm(g)
        rho = noise_ratio * torch.sqrt(theta_norm) / torch.sqrt(g_norm) / shrink
        out.append(rho * g / g_norm * math.sqrt(num_params))
    return out


def cc_sam_objective(objective: "Objective", class_counts: torch.Tensor, flat_ratio: float = CC_SAM_FLAT_RATIO,
                     noise_ratio: float = CC_SAM_NOISE_RATIO) -> "Objective":
    """``objective`` made class-conditionally sharpness-aware in the classifier (the module docstring)."""
    counts = torch.as_tensor(class_counts, dtype=torch.float64)

    def sam_objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        head = getattr(model, "classifier", None)
        if not isinstance(head, nn.Module) or not isinstance(getattr(model, "features", None), nn.Module):
            raise FedLTError("sam=cc_sam needs a model with one features module and one classifier head "
                             f"(got {type(model).__name__})")
        h = model.features(x)
        names = [n for n, p in head.named_parameters() if p.requires_grad]
        params = dict(head.named_parameters())
        trainable = [params[n] for n in names]
        loss = objective(_HeadOn(head, params, x, h), x, y)
        flat = loss.new_zeros(())
        for c in torch.unique(y).tolist():
            idx = y == c
            xc = x[idx]
            class_loss = objective(_HeadOn(head, params, xc, h[idx]), xc, y[idx])
            grads = torch.autograd.grad(class_loss, trainable, retain_graph=True)
            noise = cc_sam_perturbation(list(grads), trainable, float(counts[c]), noise_ratio)
            perturbed = {**params, **{n: p + e.detach() for n, p, e in zip(names, trainable, noise)}}
            flat = flat + idx.sum() / len(y) * objective(_HeadOn(head, perturbed, xc, h[idx]), xc, y[idx])
        return (1 - flat_ratio) * loss + flat_ratio * flat

    return sam_objective
