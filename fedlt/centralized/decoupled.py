"""Two-stage (decoupled) centralized methods: cRT, τ-norm, LWS (Kang et al., "Decoupling Representation and
Classifier for Long-Tailed Recognition", ICLR 2020; facebookresearch/classifier-balancing) and MiSLAS
(Zhong et al., "Improving Calibration for Long-Tailed Recognition", CVPR 2021; dvlab-research/MiSLAS).

Stage 1 trains the whole model for ``centralized.epochs``; then the backbone is frozen
(:class:`FrozenFeatures`), the classifier changed, and trained for ``centralized.stage2_epochs`` with its own
optimizer (lr ``stage2_lr`` on the method's schedule; batch size, weight decay, warm-up and schedule of stage 2
are the ``stage2_*`` keys of :class:`~fedlt.options.Stage2Options`). The run stays resumable across the switch:
checkpoints record the stage.

cRT and LWS follow classifier-balancing's stage 2 (``run_networks.py`` ``train``, ``config/*/cls_crt.yaml``,
``cls_lws.yaml``): every network is put in train mode each epoch, the frozen backbone too (``fix: true`` only
turns its gradients off), so its BatchNorm statistics follow the class-balanced batches and the test uses
them (``shift_bn``, on by default); ``CosineAnnealingLR(T_max=E, eta_min=0)`` is stepped before each epoch, so
epoch e = 0, …, E − 1 runs at lr·½(1 + cos(π(e + 1)/E)) and the last one at lr 0 (schedule
``cosine_epoch_end``); batches come from the class-aware sampler (:func:`fedlt.samplers.class_aware_order`,
``num_samples_cls: 4``). Not copied: the official keeps the epoch whose validation accuracy is best (fedlt has no
validation split and reports the last), and τ-norm's search of τ on that split (τ is fixed).
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from fedlt.centralized.base import CentralizedMethod
from fedlt.centralized.methods import mixup_objective
from fedlt.config import Config
from fedlt.errors import FedLTError
from fedlt.losses import cross_entropy_loss, loss_objective
from fedlt.models.base import NormedLinear
from fedlt.models.experts import require_single_network
from fedlt.options import CentralizedOptions, Stage2Options
from fedlt.registry import CENTRALIZED, LOSSES
from fedlt.samplers import make_sampler
from fedlt.train import Objective, Sampler


class FrozenFeatures(nn.Module):
    """A backbone frozen for stage 2: no gradients; BatchNorm statistics frozen (eval mode) unless
    ``shift_bn`` (classifier-balancing's cRT/LWS, MiSLAS's option), in which case they keep following the
    stage-2 batches."""

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

    class Options(CentralizedOptions, Stage2Options):
        stage2_epochs: int = Field(10, ge=0, description="classifier epochs on the frozen backbone")
        stage2_lr: float | None = Field(None, gt=0, description="stage-2 learning rate (None: stage 1's)")
        stage2_sampler: Literal["instance", "class_balanced", "sqrt", "progressive"] = Field(
            "class_balanced", description="sampler of stage 2")

    two_stage = True
    shift_bn = False  # the backbone's BatchNorm in train mode in stage 2 (a method's ``shift_bn`` option wins)
    samples_per_class = 4  # a class_balanced stage 2's consecutive samples of one class (num_samples_cls)

    def __init__(self, cfg: Config, train_counts) -> None:
        super().__init__(cfg, train_counts)
        self.shift_bn = getattr(self.opts, "shift_bn", type(self).shift_bn)

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        super().check_config(cfg)  # stage 2 needs the backbone (model.features) apart from the one classifier
        require_single_network(cfg, f"centralized.method={cfg.centralized.method} freezes the backbone and changes "
                                    f"its one classifier in stage 2")

    def stage2_epochs(self) -> int:
        return self.opts.stage2_epochs

    def stage2_sampler(self) -> Sampler:
        return make_sampler(self.opts.stage2_sampler, self.stage2_epochs(), self.samples_per_class)

    def start_stage2(self, model: nn.Module) -> None:
        if not isinstance(getattr(model, "features", None), nn.Module) or isinstance(model.features, FrozenFeatures):
            raise FedLTError(f"{type(self).__name__} needs a model with a features module and a classifier")
        model.features = FrozenFeatures(model.features, self.shift_bn)
        model.classifier = self.stage2_classifier(model.classifier)

    def stage2_classifier(self, head: nn.Module) -> nn.Module:
        raise NotImplementedError


class ClassifierBalancing(DecoupledMethod):
    """Stage 2 as classifier-balancing trains it (see the module docstring): the backbone's BatchNorm in train
    mode, the cosine stepped before each epoch."""

    class Options(DecoupledMethod.Options):
        shift_bn: bool = Field(True, description="stage 2: backbone BatchNorm in train mode, its statistics "
                                                 "following the class-balanced batches (official: on)")

    default_stage2_schedule = "cosine_epoch_end"


@CENTRALIZED.register("crt")
class CRT(ClassifierBalancing):
    """Classifier re-training (Kang et al.): re-initialise the classifier, train it with CB sampling."""

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        super().check_config(cfg)
        if cfg.centralized.stage2_epochs == 0:
            raise FedLTError("centralized.method=crt re-initialises the classifier for stage 2: "
                             "centralized.stage2_epochs=0 would report an untrained classifier; give at least 1")

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

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        super().check_config(cfg)
        if getattr(cfg.model, "classifier", "linear") != "linear":
            raise FedLTError(f"centralized.method=tau_norm needs a linear classifier (on a cosine classifier it "
                             f"changes nothing), got model.classifier={cfg.model.classifier}: set "
                             f"model.classifier=linear")

    def stage2_epochs(self) -> int:
        return 0

    def stage2_classifier(self, head: nn.Module) -> nn.Module:
        if not isinstance(head, nn.Linear):
            raise FedLTError("tau_norm needs a linear classifier (on a cosine classifier it changes nothing)")
        return TauNormLinear(head, self.opts.tau)


@CENTRALIZED.register("lws")
class LWS(ClassifierBalancing):
    """Learnable weight scaling (Kang et al.): keep W and b, learn one scale per class with CB sampling."""

    class Options(ClassifierBalancing.Options):
        stage2_epochs: int = Field(5, ge=0, description="scale-learning epochs on the frozen backbone")

    def stage2_classifier(self, head: nn.Module) -> nn.Module:
        return LWSClassifier(head, self.num_classes)


@CENTRALIZED.register("mislas")
class MiSLAS(DecoupledMethod):
    """MiSLAS (Zhong et al., CVPR 2021; dvlab-research/MiSLAS ``train_stage1.py``, ``train_stage2.py``,
    ``methods.py``, ``config/cifar*/``): mixup (α = 1) stage 1; stage 2 retrains the stage-1 classifier plus
    an LWS scale f (initialised to 1) with class-balanced sampling and label-aware smoothing ε_c (ε_head for
    the largest class, ε_tail for the smallest).

    Stage 2 as in ``train_stage2.py``: two SGD parameter groups, the classifier at lr·``lr_factor`` and the
    scale f at the full lr, both following the per-epoch cosine lr·½(1 + cos(π·e/E)) (e = 0, …, E − 1, held
    within the epoch); the frozen backbone's BatchNorm is in train mode (statistics shifted to the balanced
    batches) only with ``shift_bn``. The official stage 1 (``cos: False``) warms up over 5 epochs and decays
    the lr ×0.1 at epoch 160 and ×0.01 at 180 (``milestones: [160, 180], gamma: 0.1`` in fedlt's configs). Not
    copied: the official keeps the epoch with the best test accuracy (of each stage); fedlt reports the last.

    The defaults are the official CIFAR-100-LT IF 100 values (ε 0.4/0.1, shift-BN on, lr_factor 0.2); the
    official values per data set and IF (configs/centralized/mislas/):
    CIFAR-10-LT IF 100/50/10: ε_head 0.3/0.2/0.1, ε_tail 0, no shift-BN, lr_factor 0.5/0.2/0.2;
    CIFAR-100-LT IF 100/50/10: ε 0.4/0.1, 0.3/0.0, 0.2/0.0, shift-BN, lr_factor 0.2/0.1/0.1.
    """

    class Options(DecoupledMethod.Options):
        mixup_alpha: float = Field(1.0, ge=0, description="stage-1 mixup α")
        eps_head: float = Field(0.4, ge=0, lt=1, description="label smoothing of the largest class")
        eps_tail: float = Field(0.1, ge=0, lt=1, description="label smoothing of the smallest class")
        shift_bn: bool = Field(True, description="stage 2: backbone BatchNorm in train mode (statistics shift)")
        lr_factor: float = Field(0.2, gt=0, description="stage 2: the classifier's lr is lr·lr_factor "
                                                        "(the LWS scale gets the full lr)")

    default_stage2_schedule = "cosine_epoch"

    def objective(self, epoch: int) -> Objective:
        return mixup_objective(self, self.opts.mixup_alpha, cross_entropy_loss)

    def stage2_classifier(self, head: nn.Module) -> nn.Module:
        return LWSClassifier(head, self.num_classes, train_inner=True)

    def stage2_param_groups(self, model: nn.Module) -> list[dict]:
        head = model.classifier
        return [{"params": list(head.inner.parameters()), "lr_scale": self.opts.lr_factor},
                {"params": [head.scales], "lr_scale": 1.0}]

    def stage2_objective(self, epoch: int) -> Objective:
        loss = LOSSES.get("label_aware_smoothing")(self.class_counts, eps_head=self.opts.eps_head,
                                                   eps_tail=self.opts.eps_tail)
        return loss_objective(loss)
