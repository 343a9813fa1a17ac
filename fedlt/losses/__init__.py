"""Losses of the long-tail zoo: pure functions of (logits, targets, class statistics), registered in ``LOSSES``."""

from fedlt.losses.balanced_bce import bal_bce_loss, sigmoid_bias_init, smoothed_one_hot
from fedlt.losses.experts import balpoe_loss, confident_kl, mdcs_loss
from fedlt.losses.ldam import ldam_loss, ldam_margins
from fedlt.losses.logit_adjusted import balanced_softmax_loss, log_prior, logit_adjusted_loss, posthoc_adjust
from fedlt.losses.mixup import (label_aware_epsilons, label_aware_smoothing_loss, mixup_batch,
                                mixup_cross_entropy)
from fedlt.losses.reweighting import (class_balanced_loss, class_weights, cross_entropy_loss, focal_loss,
                                      reweighted_loss, weighted_cross_entropy)

__all__ = ["bal_bce_loss", "balanced_softmax_loss", "balpoe_loss", "class_balanced_loss", "class_weights",
           "confident_kl", "cross_entropy_loss", "focal_loss", "label_aware_epsilons", "label_aware_smoothing_loss",
           "ldam_loss", "ldam_margins", "log_prior", "logit_adjusted_loss", "mdcs_loss", "mixup_batch",
           "mixup_cross_entropy", "posthoc_adjust", "reweighted_loss", "sigmoid_bias_init", "smoothed_one_hot",
           "weighted_cross_entropy"]
