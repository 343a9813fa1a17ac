"""Post-hoc logit calibration with a privately estimated global prior (METHODS.md §3.3), over any strategy:

    strategy.name=posthoc_calibration strategy.base=<any> [strategy.base_options={...}] [strategy.tau=1]

Before round 1 every client trains one CE epoch from θ0 and returns only its classifier weight; the server
estimates π̂ from the updates (GBME's estimator, fedlt/federation/prior.py). The base strategy trains as
usual; the global model then predicts argmax_c (z_c − τ·log π̂_c). summary.json reports π̂ against the true
π (L1, KL) and the test metrics without calibration, with π̂ and with the true π.
Do not use it over a prior-adjusted training loss (Balanced Softmax, GBME, FedLC): that corrects twice.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.serverapp import Grid
from pydantic import Field

from fedlt.experiment import experiment_for, model_for
from fedlt.federation.compose import StrategyWrapper
from fedlt.federation.prior import PriorEstimate, prior_report, run_prior_estimation
from fedlt.federation.records import load_into
from fedlt.metrics import GROUPS, evaluate_logits
from fedlt.registry import STRATEGIES
from fedlt.train import predict_logits


def calibrate(logits: torch.Tensor, prior: np.ndarray, tau: float = 1.0) -> torch.Tensor:
    """z − τ·log π."""
    return logits - tau * torch.log(torch.as_tensor(np.asarray(prior), dtype=logits.dtype))


class PosthocMixin:
    def wrap_init(self, opts: "PosthocCalibration.Options") -> None:
        self.posthoc_tau = opts.tau
        self.posthoc_prior: PriorEstimate | None = None

    def setup(self, grid: Grid, arrays: ArrayRecord) -> ArrayRecord:
        self.posthoc_prior, _ = run_prior_estimation(self, grid, arrays)
        return super().setup(grid, arrays)

    def transform_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return calibrate(super().transform_logits(logits), self.posthoc_prior.pi_hat, self.posthoc_tau)

    def summary_extras(self) -> dict:
        out = super().summary_extras()
        exp = experiment_for(self.cfg)
        report = prior_report(self.posthoc_prior, exp.train_counts)
        out.update(report)
        if self.global_arrays is not None:
            model = self.eval_model(load_into(model_for(self.cfg, exp), self.global_arrays))
            test = exp.tensor_data("test")
            raw = super().transform_logits(predict_logits(model, test, self.cfg.eval.batch_size))
            keys = ("accuracy", "balanced_accuracy", *GROUPS)
            for name, logits in (("uncalibrated", raw),
                                 ("estimated_prior", calibrate(raw, self.posthoc_prior.pi_hat, self.posthoc_tau)),
                                 ("true_prior", calibrate(raw, np.asarray(report["true_prior"]), self.posthoc_tau))):
                m = evaluate_logits(logits, test.labels, exp.train_counts)
                out[f"posthoc_{name}"] = {k: m[k] for k in keys}
            out["posthoc_gap"] = out["posthoc_true_prior"]["accuracy"] - out["posthoc_estimated_prior"]["accuracy"]
        return out

    def state_dict(self) -> dict:
        return {**super().state_dict(), "posthoc_prior": self.posthoc_prior.__dict__}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.posthoc_prior = PriorEstimate(**{k: np.asarray(v) for k, v in state["posthoc_prior"].items()})


@STRATEGIES.register("posthoc_calibration")
class PosthocCalibration(StrategyWrapper):
    mixin = PosthocMixin

    class Options(StrategyWrapper.Options):
        tau: float = Field(1.0, ge=0, description="calibration strength: predict argmax z − τ·log π̂")
