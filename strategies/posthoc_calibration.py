"""Post-hoc logit calibration with a privately estimated global prior, over any strategy:

    strategy.name=posthoc_calibration strategy.base=<any> [strategy.base_options={...}] [strategy.tau=1]

Before round 1 the server estimates π̂ with ``strategy.prior`` (:mod:`strategies.global_prior`): by default
every client trains one CE epoch from θ0 and returns only its classifier weight and the server estimates π̂ from
the updates (GBME's estimator, Zeng et al., ICCV 2023: strategies/gbme/prior.py); ``dpa``, ``dp_counts``,
``dp_counts_agm`` and ``oracle`` are the other choices. The base
strategy trains as usual; the global model then predicts argmax_c (z_c − τ·log π̂_c) (post-hoc logit
adjustment, Menon et al., ICLR 2021). summary.json reports π̂ against the true
π (L1, KL) and the test metrics without calibration, with π̂ and with the true π.
Do not use it over a prior-adjusted training loss (Balanced Softmax, GBME, FedLC): that corrects twice.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.serverapp import Grid
from pydantic import Field

from fedlt.config import Config
from fedlt.experiment import experiment_for, model_for
from fedlt.federation.compose import StrategyWrapper
from fedlt.federation.records import load_into
from fedlt.metrics import GROUPS, evaluate_logits
from fedlt.registry import STRATEGIES
from fedlt.train import predict_logits
from strategies.gbme.prior import PriorEstimate, prior_report
from strategies.global_prior import GlobalPriorOptions, estimate_global_prior


def calibrate(logits: torch.Tensor, prior: np.ndarray, tau: float = 1.0) -> torch.Tensor:
    """z − τ·log π."""
    return logits - tau * torch.log(torch.as_tensor(np.asarray(prior), dtype=logits.dtype))


@STRATEGIES.register("posthoc_calibration")
class PosthocCalibration(StrategyWrapper):
    class Options(StrategyWrapper.Options, GlobalPriorOptions):
        tau: float = Field(1.0, ge=0, description="calibration strength: predict argmax z − τ·log π̂")

    def __init__(self, cfg: Config, num_classes: int) -> None:
        super().__init__(cfg, num_classes)
        self.prior: PriorEstimate | None = None
        self.prior_extras: dict = {}

    def setup(self, grid: Grid, arrays: ArrayRecord) -> ArrayRecord:
        self.prior, self.prior_extras = estimate_global_prior(self, grid, arrays, self.opts.prior)
        return self.base.setup(grid, arrays)

    def transform_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return calibrate(self.base.transform_logits(logits), self.prior.pi_hat, self.opts.tau)

    def summary_extras(self) -> dict:
        out = self.base.summary_extras()
        exp = experiment_for(self.cfg)
        report = prior_report(self.prior, exp.train_counts)
        out.update(report, prior_estimator=self.opts.prior, **self.prior_extras)
        if self.global_arrays is not None:
            model = self.eval_model(load_into(model_for(self.cfg, exp), self.global_arrays))
            test = exp.tensor_data("test")
            raw = self.base.transform_logits(predict_logits(model, test, self.cfg.eval.batch_size))
            keys = ("accuracy", "balanced_accuracy", *GROUPS)
            tau = self.opts.tau
            for name, logits in (("uncalibrated", raw),
                                 ("estimated_prior", calibrate(raw, self.prior.pi_hat, tau)),
                                 ("true_prior", calibrate(raw, np.asarray(report["true_prior"]), tau))):
                m = evaluate_logits(logits, test.labels, exp.train_counts)
                out[f"posthoc_{name}"] = {k: m[k] for k in keys}
            out["posthoc_gap"] = out["posthoc_true_prior"]["accuracy"] - out["posthoc_estimated_prior"]["accuracy"]
        return out

    def state_dict(self) -> dict:
        return {**self.base.state_dict(), "posthoc_prior": self.prior.state_dict(),
                "posthoc_prior_extras": self.prior_extras}

    def load_state_dict(self, state: dict) -> None:
        self.base.load_state_dict(state)
        self.prior = PriorEstimate.from_state(state["posthoc_prior"])
        self.prior_extras = state.get("posthoc_prior_extras", {})
