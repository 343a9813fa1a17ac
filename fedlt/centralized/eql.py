"""EQL centrally: the equalization loss (:mod:`fedlt.losses.equalization`) on a sigmoid-initialised linear head
(``eql``), and its softmax form (``seql``)."""

from __future__ import annotations

from typing import Any

from pydantic import Field
from torch import nn

from fedlt.centralized.base import CentralizedMethod
from fedlt.experiment import Experiment, model_for
from fedlt.losses.equalization import EQL_LAMBDA, EQL_PRIOR_PROB, SEQL_GAMMA, SEQL_LAMBDA, eql_bias_init
from fedlt.options import CentralizedOptions
from fedlt.registry import CENTRALIZED
from fedlt.streams import Stream, seeded_rng, torch_generator


@CENTRALIZED.register("eql")
class EQL(CentralizedMethod):
    """Equalization loss (Tan et al., CVPR 2020; tztztztztz/eql.detectron2 ``projects/EQL/eql/fast_rcnn.py``):
    per-class sigmoid BCE without the negative terms of the classes with n_c/N < λ; predict argmax z.

    The linear head starts as the official ``EQLFastRCNNOutputLayers.cls_score``: weight ~ N(0, 0.01²), bias
    −log((1 − p)/p) with p = ``prior_prob`` (0.001), so every sigmoid starts at p.
    """

    class Options(CentralizedOptions):
        lam: float = Field(EQL_LAMBDA, ge=0, le=1, description="tail threshold λ on n_c/N (official LVIS 1.77e-3)")
        prior_prob: float = Field(EQL_PRIOR_PROB, gt=0, lt=1, description="initial sigmoid probability p of "
                                  "the head (bias −log((1−p)/p))")

    loss = "eql"

    def build_model(self, exp: Experiment) -> nn.Module:
        model = model_for(self.cfg, exp)
        head = getattr(model, "classifier", None)
        if isinstance(head, nn.Linear):
            nn.init.normal_(head.weight, std=0.01, generator=torch_generator(self.cfg.seed, Stream.INIT, 1))
            if head.bias is not None:
                nn.init.constant_(head.bias, eql_bias_init(self.opts.prior_prob))
        return model

    def loss_options(self, epoch: int) -> dict[str, Any]:
        return {"lam": self.opts.lam}


@CENTRALIZED.register("seql")
class SoftmaxEQL(CentralizedMethod):
    """Softmax equalization loss (Tan et al., CVPR 2020, its image-classification form; see
    :func:`fedlt.losses.equalization.softmax_equalization_loss`) on the plain linear head: a tail class
    (n_c/N < λ) leaves the softmax denominator of a sample of another class with probability γ. The β draws
    of epoch e come from a generator seeded by (seed, method stream, e), so a resumed run draws the same."""

    class Options(CentralizedOptions):
        lam: float = Field(SEQL_LAMBDA, ge=0, le=1, description="tail threshold λ on n_c/N (BagofTricks-LT 5e-3)")
        drop_prob: float = Field(SEQL_GAMMA, ge=0, le=1, description="the paper's γ: probability that a tail "
                                 "negative leaves the softmax denominator (BagofTricks-LT 0.9)")

    loss = "seql"

    def loss_options(self, epoch: int) -> dict[str, Any]:
        seed = int(seeded_rng(self.cfg.seed, Stream.CENTRAL, Stream.METHOD, epoch).integers(2**62))
        return {"lam": self.opts.lam, "drop_prob": self.opts.drop_prob, "seed": seed}
