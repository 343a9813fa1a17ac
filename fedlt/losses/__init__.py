"""Losses of the long-tail zoo.

Each module holds the pure formulas, ``f(logits, targets, <class statistics>)``, tested by hand in
tests/test_losses.py, and registers in ``fedlt.registry.LOSSES`` a *factory* with one signature
(:class:`~fedlt.losses.base.LossFactory`)::

    loss = LOSSES.get(name)(class_counts, **options)   # class_counts: (C,) tensor of training counts
    value = loss(logits, targets)                      # (B, C) logits, (B,) labels -> scalar

The options are the keywords of the factory, declared with types, ranges and defaults by the ``Options``
model it is registered with (``LOSSES.register("focal", make_focal_loss, options=FocalOptions)``;
``LOSSES.options(name)``). Centralized methods that are just a loss build their objective this way with the
pooled counts; the ``local_loss`` client does the same with each client's own counts.

Registered: ce, focal, reweight, cb, ldam, la, balanced_softmax, bal_bce, label_aware_smoothing, eql, seql.
Not registered, because they are not ``loss(logits, targets)``: the post-hoc logit adjustment (a test-time
logit transform), mixup (a batch transform of the inputs), and the multi-expert losses of BalPoE and MDCS
(they need each expert's logits, and MDCS two views per image); the centralized methods of those names use
the functions below directly.
"""

from fedlt.losses.balanced_bce import bal_bce_loss, sigmoid_bias_init, smoothed_one_hot
from fedlt.losses.base import Loss, LossFactory, loss_objective
from fedlt.losses.equalization import eql_bias_init, equalization_loss, softmax_equalization_loss
from fedlt.losses.experts import balpoe_loss, confident_kl, mdcs_loss
from fedlt.losses.ldam import ldam_loss, ldam_margins
from fedlt.losses.logit_adjusted import (
                                balanced_softmax_loss,
                                log_prior,
                                logit_adjusted_loss,
                                posthoc_adjust,
)
from fedlt.losses.mixup import (
                                label_aware_epsilons,
                                label_aware_smoothing_loss,
                                mixup_batch,
                                mixup_cross_entropy,
                                mixup_cutmix_batch,
)
from fedlt.losses.reweighting import (
                                class_balanced_loss,
                                class_weights,
                                cross_entropy_loss,
                                focal_loss,
                                reweighted_loss,
                                weighted_cross_entropy,
)
from fedlt.losses.tlc import dirichlet_kl_to_uniform, engaged, evidential_opinion, tlc_combine, tlc_loss

__all__ = ["Loss", "LossFactory", "bal_bce_loss", "balanced_softmax_loss", "balpoe_loss", "class_balanced_loss",
           "class_weights", "confident_kl", "cross_entropy_loss", "eql_bias_init", "equalization_loss", "focal_loss",
           "softmax_equalization_loss",
           "label_aware_epsilons",
           "label_aware_smoothing_loss", "ldam_loss", "ldam_margins", "log_prior", "logit_adjusted_loss",
           "loss_objective", "mdcs_loss", "mixup_batch", "mixup_cross_entropy", "mixup_cutmix_batch", "posthoc_adjust", "reweighted_loss",
           "sigmoid_bias_init", "smoothed_one_hot", "weighted_cross_entropy",
           "dirichlet_kl_to_uniform", "engaged", "evidential_opinion", "tlc_combine", "tlc_loss"]
