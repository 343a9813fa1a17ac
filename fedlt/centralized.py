"""Centralized baselines: the same trainer, model, test set and metrics on the pooled long-tailed data.

A centralized method (registered in ``CENTRALIZED``) is a :class:`CentralizedMethod`: it builds its model,
and gives an objective, a sampler, an augmentation and an optional post-hoc logit transform, all from the
training class counts. Its ``Options`` model declares its ``centralized.<key>`` config keys. Every method
accepts ``centralized.sampler`` (instance | class_balanced | sqrt | progressive, see :mod:`fedlt.samplers`).

Two-stage methods (:class:`DecoupledMethod`: cRT, τ-norm, LWS, MiSLAS) train stage 1 for
``centralized.epochs``, then freeze the backbone (:class:`FrozenFeatures`), change the classifier and train
it for ``centralized.stage2_epochs`` with its own optimizer (cosine lr from ``stage2_lr``). The run stays
resumable across the switch: checkpoints record the stage.
"""

from __future__ import annotations

import copy
import time
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator
from torch import nn

from fedlt.data.augment import strong_augment
from fedlt.config import Config
from fedlt.device import environment, resolve_device
from fedlt.errors import FedLTError
from fedlt.evaluation import due, evaluate_model, metrics_row, progress_line
from fedlt.experiment import STREAM_CENTRAL, Experiment, augment_for, experiment_for, model_for, torch_generator
from fedlt.losses import (bal_bce_loss, balpoe_loss, class_weights, cross_entropy_loss, focal_loss,
                          label_aware_epsilons, label_aware_smoothing_loss, ldam_loss, ldam_margins, log_prior,
                          logit_adjusted_loss, mdcs_loss, mixup_batch, posthoc_adjust, sigmoid_bias_init,
                          weighted_cross_entropy)
from fedlt.models.base import NormedLinear
from fedlt.options import CentralizedOptions
from fedlt.registry import CENTRALIZED, MODELS
from fedlt.rundir import RunDir
from fedlt.samplers import make_sampler
from fedlt.train import (Augment, Objective, OptimConfig, Sampler, TensorData, cross_entropy_objective,
                         make_optimizer, train)

STREAM_METHOD = 7  # the method's own random stream (mixup, classifier re-initialisation)


class StrongView:
    """Crop/flip, then AutoAugment (CIFAR policy, one sub-policy per ``chunk`` images) + Cutout(``cutout``)."""

    def __init__(self, weak: Augment, mean: torch.Tensor, std: torch.Tensor, cutout: int, chunk: int) -> None:
        self.weak, self.mean, self.std, self.cutout, self.chunk = weak, mean, std, cutout, chunk

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return strong_augment(self.weak(x, generator), self.mean, self.std, generator, self.cutout, self.chunk)


class CentralizedMethod:
    """Cross-entropy with instance-balanced sampling (the reference every long-tail method is measured against)."""

    Options = CentralizedOptions  # a method with keys of its own subclasses this (``class Options(...)``)
    two_stage = False

    def __init__(self, cfg: Config, train_counts: np.ndarray) -> None:
        self.cfg = cfg
        self.train_counts = train_counts
        self.opt = cfg.centralized
        self.epochs = float(cfg.centralized.epochs)
        self.num_classes = len(train_counts)
        self.log_pi = log_prior(torch.as_tensor(train_counts))
        self.rng = np.random.default_rng([cfg.seed, STREAM_CENTRAL, STREAM_METHOD])

    # --- stage 1 ---
    def build_model(self, exp: Experiment) -> nn.Module:
        return model_for(self.cfg, exp)

    def objective(self, epoch: int) -> Objective:
        return cross_entropy_objective

    def sampler(self) -> Sampler:
        return make_sampler(self.opt.sampler, self.epochs)

    def augment(self, data: TensorData) -> Augment:
        """Crop/flip; with ``autoaugment`` (the long recipes) + AutoAugment + Cutout(``cutout``) per image."""
        weak = augment_for(self.cfg)
        if not self.opt.autoaugment:
            return weak
        return StrongView(weak, data.mean, data.std, self.opt.cutout, self.opt.augment_chunk)

    def transform_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    # --- second stage (DecoupledMethod) ---
    def stage2_epochs(self) -> int:
        return 0

    def start_stage2(self, model: nn.Module) -> None:
        """Change ``model`` for stage 2 (structure first, deterministic; then weights)."""

    def stage2_objective(self, epoch: int) -> Objective:
        return cross_entropy_objective

    def stage2_sampler(self) -> Sampler:
        return make_sampler("instance")

    # --- resumable state beyond the model ---
    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        if "rng" in state:
            self.rng.bit_generator.state = state["rng"]


CENTRALIZED.register("ce", CentralizedMethod)


def _loss_objective(loss_fn) -> Objective:
    def objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss_fn(model(x), y)
    return objective


@CENTRALIZED.register("focal")
class Focal(CentralizedMethod):
    """Focal loss (1 − p_y)^γ·CE (Lin et al., ICCV 2017), γ = 1."""

    class Options(CentralizedOptions):
        focal_gamma: float = Field(1.0, ge=0, description="focusing parameter γ (``gamma`` is the lr decay)")

    def objective(self, epoch: int) -> Objective:
        return _loss_objective(lambda z, y: focal_loss(z, y, self.opt.focal_gamma))


@CENTRALIZED.register("reweight")
class Reweight(CentralizedMethod):
    """Inverse-frequency re-weighted CE (w_c ∝ 1/n_c, Σ w = C, PyTorch weighted mean)."""

    def weights(self) -> torch.Tensor:
        return class_weights(self.train_counts)

    def objective(self, epoch: int) -> Objective:
        w = self.weights()
        return _loss_objective(lambda z, y: weighted_cross_entropy(z, y, w))


@CENTRALIZED.register("cb")
class ClassBalanced(Reweight):
    """Class-Balanced CE (Cui et al., CVPR 2019): w_c ∝ (1 − β)/(1 − β^{n_c}), β = 0.9999."""

    class Options(CentralizedOptions):
        beta: float = Field(0.9999, ge=0, lt=1, description="β of the effective number (1 − β^n)/(1 − β)")

    def weights(self) -> torch.Tensor:
        return class_weights(self.train_counts, self.opt.beta)


@CENTRALIZED.register("ldam_drw")
class LDAMDRW(CentralizedMethod):
    """LDAM + deferred re-weighting (Cao et al., NeurIPS 2019) on a cosine classifier (scale 1, s in the loss).

    DRW: unweighted until epoch round(drw_fraction·epochs) (160 of 200 → 0.8), then class-balanced weights
    with β = 0.9999. Test logits are s·cos (argmax unchanged; loss and ECE on the trained scale).
    """

    class Options(CentralizedOptions):
        max_margin: float = Field(0.5, gt=0, description="largest margin Δ (the rarest class)")
        s: float = Field(30.0, gt=0, description="logit scale s")
        drw_fraction: float = Field(0.8, ge=0, le=1, description="fraction of the epochs before re-weighting")
        beta: float = Field(0.9999, ge=0, lt=1, description="β of the class-balanced DRW weights")

    def build_model(self, exp: Experiment) -> nn.Module:
        return model_for(self.cfg, exp, classifier="cosine", scale=1.0)

    def drw_epoch(self) -> int:
        return int(round(self.opt.drw_fraction * self.epochs))

    def objective(self, epoch: int) -> Objective:
        margins = ldam_margins(self.train_counts, self.opt.max_margin)
        w = class_weights(self.train_counts, self.opt.beta) if epoch >= self.drw_epoch() else None
        return _loss_objective(lambda z, y: ldam_loss(z, y, margins, self.opt.s, w))

    def transform_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return self.opt.s * logits


@CENTRALIZED.register("la")
class LogitAdjusted(CentralizedMethod):
    """Logit-adjusted loss CE(z + τ·log π, y) (Menon et al., ICLR 2021), τ = 1; predict argmax z."""

    class Options(CentralizedOptions):
        tau: float = Field(1.0, ge=0, description="adjustment strength τ")

    def objective(self, epoch: int) -> Objective:
        return _loss_objective(lambda z, y: logit_adjusted_loss(z, y, self.log_pi, self.opt.tau))


@CENTRALIZED.register("balanced_softmax")
class BalancedSoftmax(CentralizedMethod):
    """Balanced Softmax CE(z + log π, y) (Ren et al., NeurIPS 2020)."""

    def objective(self, epoch: int) -> Objective:
        return _loss_objective(lambda z, y: logit_adjusted_loss(z, y, self.log_pi, 1.0))


@CENTRALIZED.register("bal_bce")
class BalBCE(CentralizedMethod):
    """Bal-BCE (LiVT, CVPR 2023): C·mean BCE(z + log(π/(1−π)), smoothed one-hot), ε = 0.1; linear bias
    initialised to −log(C − 1)."""

    class Options(CentralizedOptions):
        smoothing: float = Field(0.1, ge=0, lt=1, description="label smoothing ε of the BCE targets")

    def build_model(self, exp: Experiment) -> nn.Module:
        model = model_for(self.cfg, exp)
        head = getattr(model, "classifier", None)
        if isinstance(head, nn.Linear) and head.bias is not None:
            nn.init.constant_(head.bias, sigmoid_bias_init(self.num_classes))
        return model

    def objective(self, epoch: int) -> Objective:
        return _loss_objective(lambda z, y: bal_bce_loss(z, y, self.train_counts, self.opt.smoothing))


@CENTRALIZED.register("posthoc_la")
class PosthocLA(CentralizedMethod):
    """Plain CE training, then post-hoc logit adjustment at test: argmax (z − τ·log π), τ = 1."""

    class Options(CentralizedOptions):
        tau: float = Field(1.0, ge=0, description="adjustment strength τ")

    def transform_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return posthoc_adjust(logits, self.log_pi, self.opt.tau)


def _mixup_objective(method: CentralizedMethod, alpha: float, loss_fn, experts: bool = False) -> Objective:
    """λ·loss(out, y_a) + (1 − λ)·loss(out, y_b) with out = model(x̃) (or ``model.expert_logits(x̃)``),
    x̃ = λ·x + (1 − λ)·x[perm], λ ~ Beta(α, α) from the method's rng (α = 0: no mixup)."""
    def objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        xm, ya, yb, lam = mixup_batch(x, y, alpha, method.rng)
        out = model.expert_logits(xm) if experts else model(xm)
        return loss_fn(out, ya) if lam == 1.0 else lam * loss_fn(out, ya) + (1 - lam) * loss_fn(out, yb)
    return objective


@CENTRALIZED.register("mixup")
class Mixup(CentralizedMethod):
    """Mixup (Zhang et al., ICLR 2018): CE on x̃ = λx + (1−λ)x', λ ~ Beta(α, α), α = 1 (MiSLAS CIFAR)."""

    class Options(CentralizedOptions):
        mixup_alpha: float = Field(1.0, ge=0, description="λ ~ Beta(α, α); 0: no mixup")

    def objective(self, epoch: int) -> Objective:
        return _mixup_objective(self, self.opt.mixup_alpha, cross_entropy_loss)


# ---------------------------------------------------------------------------------------------------------
# Decoupled second stages


class FrozenFeatures(nn.Module):
    """A backbone frozen for stage 2: no gradients; BatchNorm statistics frozen (eval mode) unless
    ``shift_bn`` (MiSLAS), in which case they keep following the stage-2 batches."""

    def __init__(self, inner: nn.Module, shift_bn: bool = False) -> None:
        super().__init__()
        self.inner = inner
        self.shift_bn = shift_bn
        for p in inner.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> "FrozenFeatures":
        super().train(mode)
        self.inner.train(mode and self.shift_bn)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.inner(x)


class LWSClassifier(nn.Module):
    """Learnable weight scaling (Kang et al.): z_c = f_c·(w_c^T h + b_c), f initialised to 1."""

    def __init__(self, inner: nn.Module, num_classes: int, train_inner: bool = False) -> None:
        super().__init__()
        self.inner = inner
        self.scales = nn.Parameter(torch.ones(num_classes))
        for p in inner.parameters():
            p.requires_grad_(train_inner)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.scales * self.inner(h)


def tau_normalized_weight(weight: torch.Tensor, tau: float) -> torch.Tensor:
    """τ-norm (Kang et al., ICLR 2020): w_c ← w_c / ‖w_c‖^τ for each row c of a (C, d) weight."""
    return weight / weight.norm(dim=1, keepdim=True).pow(tau)


class TauNormLinear(nn.Module):
    """z = h·(W / ‖w_c‖^τ)^T, without the bias (as in classifier-balancing's τ-norm evaluation)."""

    def __init__(self, inner: nn.Linear, tau: float) -> None:
        super().__init__()
        self.inner = inner
        self.tau = tau
        for p in inner.parameters():
            p.requires_grad_(False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h @ tau_normalized_weight(self.inner.weight, self.tau).t()


class DecoupledMethod(CentralizedMethod):
    """Stage 1 (the parent's objective) for ``epochs``, then a classifier stage on the frozen backbone."""

    class Options(CentralizedOptions):
        stage2_epochs: int = Field(10, ge=0, description="classifier epochs on the frozen backbone")
        stage2_lr: float | None = Field(None, gt=0, description="stage-2 learning rate (None: stage 1's)")
        stage2_sampler: Literal["instance", "class_balanced", "sqrt", "progressive"] = Field(
            "class_balanced", description="sampler of stage 2")

    two_stage = True
    shift_bn = False

    def stage2_epochs(self) -> int:
        return self.opt.stage2_epochs

    def stage2_sampler(self) -> Sampler:
        return make_sampler(self.opt.stage2_sampler, self.stage2_epochs())

    def start_stage2(self, model: nn.Module) -> None:
        if not isinstance(getattr(model, "features", None), nn.Module) or isinstance(model.features, FrozenFeatures):
            raise FedLTError(f"{type(self).__name__} needs a model with a features module and a classifier")
        model.features = FrozenFeatures(model.features, self.shift_bn)
        model.classifier = self.stage2_classifier(model.classifier)

    def stage2_classifier(self, head: nn.Module) -> nn.Module:
        raise NotImplementedError


@CENTRALIZED.register("crt")
class CRT(DecoupledMethod):
    """Classifier re-training (Kang et al.): re-initialise the classifier, train it with CB sampling."""

    def stage2_classifier(self, head: nn.Module) -> nn.Module:
        new = copy.deepcopy(head)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.rng.integers(2**31)))
            if isinstance(new, nn.Linear):
                new.reset_parameters()
            elif isinstance(new, NormedLinear):
                new.weight.data.copy_(NormedLinear(*new.weight.shape, new.scale).weight.data)
            else:
                raise FedLTError(f"crt cannot re-initialise a {type(new).__name__} classifier")
        return new


@CENTRALIZED.register("tau_norm")
class TauNorm(DecoupledMethod):
    """τ-norm (Kang et al.): no training; w_c ← w_c/‖w_c‖^τ with a fixed τ = 1 (no validation split)."""

    class Options(CentralizedOptions):
        tau: float = Field(1.0, ge=0, description="normalisation power τ (fixed: no validation split)")

    def stage2_epochs(self) -> int:
        return 0

    def stage2_classifier(self, head: nn.Module) -> nn.Module:
        if not isinstance(head, nn.Linear):
            raise FedLTError("tau_norm needs a linear classifier (on a cosine classifier it changes nothing)")
        return TauNormLinear(head, self.opt.tau)


@CENTRALIZED.register("lws")
class LWS(DecoupledMethod):
    """Learnable weight scaling (Kang et al.): keep W and b, learn one scale per class with CB sampling."""

    class Options(DecoupledMethod.Options):
        stage2_epochs: int = Field(5, ge=0, description="scale-learning epochs on the frozen backbone")

    def stage2_classifier(self, head: nn.Module) -> nn.Module:
        return LWSClassifier(head, self.num_classes)


@CENTRALIZED.register("mislas")
class MiSLAS(DecoupledMethod):
    """MiSLAS (Zhong et al., CVPR 2021): mixup stage 1; stage 2 retrains the classifier plus an LWS scale
    with CB sampling and label-aware smoothing (ε_head 0.4, ε_tail 0.1), BN statistics shifted (kept in
    train mode) on the frozen backbone."""

    class Options(DecoupledMethod.Options):
        mixup_alpha: float = Field(1.0, ge=0, description="stage-1 mixup α")
        eps_head: float = Field(0.4, ge=0, lt=1, description="label smoothing of the largest class")
        eps_tail: float = Field(0.1, ge=0, lt=1, description="label smoothing of the smallest class")

    shift_bn = True

    def objective(self, epoch: int) -> Objective:
        return _mixup_objective(self, self.opt.mixup_alpha, cross_entropy_loss)

    def stage2_classifier(self, head: nn.Module) -> nn.Module:
        return LWSClassifier(head, self.num_classes, train_inner=True)

    def stage2_objective(self, epoch: int) -> Objective:
        eps = label_aware_epsilons(self.train_counts, self.opt.eps_head, self.opt.eps_tail)
        return _loss_objective(lambda z, y: label_aware_smoothing_loss(z, y, eps))


# ---------------------------------------------------------------------------------------------------------
# Multi-expert methods


class ExpertMethod(CentralizedMethod):
    """A method on :class:`~fedlt.models.experts.MultiExpertModel`: ``model.name`` (or the data set's default)
    with ``_experts`` appended, cosine classifiers with scale ``expert_scale``; test = mean of raw logits."""

    class Options(CentralizedOptions):
        expert_scale: float = Field(30.0, gt=0, description="scale s of the experts' cosine heads")

    def num_experts(self) -> int:
        raise NotImplementedError

    def build_model(self, exp: Experiment) -> nn.Module:
        name = self.cfg.model.name
        if not name.endswith("_experts"):
            name += "_experts"
        if name not in MODELS:
            raise FedLTError(f"{self.cfg.centralized.method} needs a multi-expert model; {name!r} is not registered")
        return model_for(self.cfg, exp, name, classifier="cosine", scale=self.opt.expert_scale,
                         num_experts=self.num_experts())


@CENTRALIZED.register("balpoe")
class BalPoE(ExpertMethod):
    """Balanced product of experts (Sanchez Aimar et al., CVPR 2023): (1/M)·Σ_k CE(z_k + τ_k·log π, y),
    τ = (0, 1, 2); optional mixup (the paper uses α = 0.4–0.8; 0 here by default)."""

    class Options(ExpertMethod.Options):
        taus: list[float] = Field([0.0, 1.0, 2.0], min_length=1, description="each expert's τ_k")
        mixup_alpha: float = Field(0.0, ge=0, description="mixup α (0: no mixup)")

    def num_experts(self) -> int:
        return len(self.opt.taus)

    def objective(self, epoch: int) -> Objective:
        taus = self.opt.taus
        return _mixup_objective(self, self.opt.mixup_alpha, lambda z, y: balpoe_loss(z, y, self.log_pi, taus), True)


class TwoViews(StrongView):
    """Stack [weak; strong] views of a batch (2B rows): weak = crop/flip, strong = crop/flip + AutoAugment + Cutout."""

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return torch.cat([self.weak(x, generator), super().__call__(x, generator)])


@CENTRALIZED.register("mdcs")
class MDCS(ExpertMethod):
    """MDCS (Zhao et al., ICCV 2023): diversity loss with λ = (−0.5, 1, 2.5) plus consistency
    self-distillation (weak teacher → strong student, confident instances), weight
    0.6·min(epoch/(ramp_fraction·epochs), 1) (20 of 400 epochs → 0.05; 20 of 200 → 0.1)."""

    class Options(ExpertMethod.Options):
        lambdas: list[float] = Field([-0.5, 1.0, 2.5], min_length=1, description="each expert's λ_k")
        kl_weight: float = Field(0.6, ge=0, description="weight of the consistency KL term")
        ramp_fraction: float = Field(0.1, ge=0, le=1, description="fraction of the epochs over which the KL ramps up")

        @field_validator("autoaugment")
        @classmethod
        def _views_fixed(cls, value: bool) -> bool:
            if value:
                raise ValueError("mdcs always trains on a weak and a strong view; autoaugment is not an option here")
            return value

    def num_experts(self) -> int:
        return len(self.opt.lambdas)

    def augment(self, data: TensorData) -> Augment:
        return TwoViews(augment_for(self.cfg), data.mean, data.std, self.opt.cutout, self.opt.augment_chunk)

    def kl_weight(self, epoch: int) -> float:
        ramp = self.opt.ramp_fraction * self.epochs
        return self.opt.kl_weight * (min(epoch / ramp, 1.0) if ramp > 0 else 1.0)

    def objective(self, epoch: int) -> Objective:
        w, lambdas = self.kl_weight(epoch), self.opt.lambdas

        def objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            z = model.expert_logits(x)
            return mdcs_loss(z[:, :len(y)], z[:, len(y):], y, self.log_pi, lambdas, w)
        return objective


# ---------------------------------------------------------------------------------------------------------
# The run


def centralized_optim(cfg: Config) -> OptimConfig:
    c, t = cfg.centralized, cfg.train

    def pick(key: str) -> Any:
        value = getattr(c, key)
        return value if value is not None else getattr(t, key)

    return OptimConfig(lr=pick("lr"), momentum=pick("momentum"), weight_decay=pick("weight_decay"),
                       nesterov=pick("nesterov"), batch_size=pick("batch_size"), warmup_epochs=c.warmup_epochs,
                       schedule=c.schedule, milestones=list(c.milestones), gamma=c.gamma)


def stage2_optim(cfg: Config, method: CentralizedMethod) -> OptimConfig:
    """Stage 2: stage 1's SGD settings, lr ``stage2_lr`` (default: stage 1's lr), cosine, no warm-up."""
    base = centralized_optim(cfg)
    lr = getattr(method.opt, "stage2_lr", None)
    return OptimConfig(lr=base.lr if lr is None else float(lr), momentum=base.momentum,
                       weight_decay=base.weight_decay, nesterov=base.nesterov, batch_size=base.batch_size,
                       schedule="cosine")


def run_centralized(cfg: Config, run: RunDir) -> dict:
    """Train ``centralized.method`` on the pooled long-tailed set, epoch by epoch, resumable; return the summary."""
    exp = experiment_for(cfg)
    device = resolve_device(cfg.device)
    method: CentralizedMethod = CENTRALIZED.get(cfg.centralized.method)(cfg, exp.train_counts)
    model: nn.Module = method.build_model(exp).to(device)
    opt, opt2 = centralized_optim(cfg), stage2_optim(cfg, method)
    optimizer = make_optimizer(model, opt)
    data: TensorData = exp.tensor_data("train", device=device)
    test = exp.tensor_data("test", device=device)
    epochs = cfg.centralized.epochs
    gen = torch_generator(cfg.seed, STREAM_CENTRAL)
    name = cfg.centralized.method
    augment = method.augment(data)
    stage1, stage2 = int(np.ceil(epochs)), method.stage2_epochs()

    def begin_stage2() -> torch.optim.Optimizer:
        method.start_stage2(model)
        model.to(device)
        return make_optimizer(model, opt2) if stage2 > 0 else optimizer

    ckpt = run.load_checkpoint() if run.same_config(cfg) else None
    stage = 1
    if ckpt is None:
        run.reset()
        run.write_config(cfg)
        run.write_env(environment(device))
        run.write_partition(exp.train_counts[None, :], exp.train_counts, exp.test.class_counts, "pooled")
        start, elapsed = 0, 0.0
    else:
        stage = ckpt.get("stage", 1)
        if stage == 2:
            optimizer = begin_stage2()
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        gen.set_state(ckpt["generator"])
        method.load_state_dict(ckpt.get("method", {}))
        start, elapsed = ckpt["epoch"], ckpt["elapsed"]
        run.truncate_metrics("epoch", start)
        print(f"[centralized {name}] resuming after epoch {start}", flush=True)

    total = stage1 + stage2
    for epoch in range(start, total):
        t0 = time.time()
        if epoch >= stage1 and stage == 1:
            optimizer, stage = begin_stage2(), 2
        if stage == 1:
            result = train(model, data, method.objective(epoch), opt=opt, epochs=min(1.0, epochs - epoch),
                           generator=gen, augment=augment, sampler=method.sampler(), optimizer=optimizer,
                           start_epoch=epoch, total_epochs=epochs)
        else:
            result = train(model, data, method.stage2_objective(epoch - stage1), opt=opt2, epochs=1.0,
                           generator=gen, augment=augment_for(cfg), sampler=method.stage2_sampler(),
                           optimizer=optimizer, start_epoch=epoch - stage1, total_epochs=stage2)
        m = None
        if due(epoch + 1, total, cfg.eval.every):
            m = evaluate_model(model, test, exp.train_counts, cfg.eval.batch_size, method.transform_logits)
        seconds = time.time() - t0
        elapsed += seconds
        run.append_metrics({"epoch": epoch + 1, "stage": stage, **(metrics_row(m) if m else {}),
                            "train_loss": result.loss, "seconds": seconds})
        print(progress_line(f"[centralized {name}] epoch {epoch + 1}/{total}", m, seconds, result.loss), flush=True)
        run.save_checkpoint({"epoch": epoch + 1, "stage": stage, "model": model.state_dict(),
                             "optimizer": optimizer.state_dict(), "generator": gen.get_state(),
                             "method": method.state_dict(), "elapsed": elapsed})
    if method.two_stage and stage == 1:  # a second stage without training (τ-norm)
        begin_stage2()

    final = evaluate_model(model, test, exp.train_counts, cfg.eval.batch_size, method.transform_logits,
                           with_bins=True)
    summary = {"mode": "centralized", "method": name, "seed": cfg.seed, "epochs": epochs,
               "stage2_epochs": stage2, "wall_clock_seconds": elapsed,
               "train_class_counts": exp.train_counts.tolist(), **final}
    run.write_summary(summary)
    return summary
