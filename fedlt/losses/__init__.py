"""Losses of the long-tail zoo: pure functions of (logits, targets, class statistics)."""

from fedlt.losses.logit_adjusted import balanced_softmax_loss, log_prior, logit_adjusted_loss

__all__ = ["balanced_softmax_loss", "log_prior", "logit_adjusted_loss"]
