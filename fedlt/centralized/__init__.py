"""Centralized baselines: the same trainer, model, test set and metrics on the pooled long-tailed data.

A centralized method (registered in ``CENTRALIZED``) is a :class:`CentralizedMethod` (:mod:`.base`): it builds
its model, and gives an objective, a sampler, an augmentation and an optional post-hoc logit transform, all
from the training class counts. Its ``Options`` model declares its ``centralized.<key>`` config keys. Every
method accepts ``centralized.sampler`` (instance | class_balanced | sqrt | progressive, see :mod:`fedlt.samplers`).

- :mod:`.methods`: single-stage methods, each one loss of :mod:`fedlt.losses` (ce, focal, reweight, cb,
  ldam_drw, la, balanced_softmax, bal_bce, posthoc_la, mixup);
- :mod:`.decoupled`: two-stage methods on a frozen backbone (crt, tau_norm, lws, mislas);
- :mod:`.experts`: multi-expert methods (balpoe, mdcs); :mod:`.shike`: SHIKE (depth-fused experts, DKT);
  :mod:`.ncl`: NCL (nested collaborative learning);
- :mod:`.lfme`: LFME (group experts, then a student by self-paced distillation and curriculum);
- :mod:`.glmc`: GLMC (mixture consistency + cumulative re-weighted soft labels);
- :mod:`.sbcl`: SBCL (subclass-balancing contrastive stage 1, LDAM-DRW linear stage 2);
- :mod:`.pretrain`: SSP's rotation-prediction stage 0 before any method (``centralized.pretrain=rotation``);
- :mod:`.ccsam`: CC-SAM (class-conditional SAM stage 1, classifier re-training with feature noise);
- :mod:`.eql`, :mod:`.area`, :mod:`.tde`: the equalization loss (sigmoid eql, softmax seql), effective-area re-weighting, causal-norm + TDE;
- :mod:`.tlc`: TLC (evidential experts, Dempster-Shafer combination, uncertainty metrics);
- :mod:`.run`: the epoch loop :func:`run_centralized`.
"""

from fedlt.centralized import (  # noqa: F401  (register the methods)
    area,
    ccsam,
    decoupled,
    eql,
    experts,
    glmc,
    lfme,
    methods,
    ncl,
    sbcl,
    shike,
    tde,
    tlc,
)
from fedlt.centralized.base import CentralizedMethod, StrongView
from fedlt.centralized.decoupled import FrozenFeatures, LWSClassifier, TauNormLinear, tau_normalized_weight
from fedlt.centralized.experts import TwoViews
from fedlt.centralized.run import run_centralized

__all__ = ["CentralizedMethod", "FrozenFeatures", "LWSClassifier", "StrongView", "TauNormLinear", "TwoViews",
           "run_centralized", "tau_normalized_weight"]
