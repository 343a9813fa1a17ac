"""Typed options: the base classes every configurable part of fedlt declares its keys with.

A registered part (data set, model, strategy, client method, centralized method) owns one section of the
config and declares what that section holds as a pydantic model next to its code::

    @STRATEGIES.register("fedprox")
    class FedProx(FedLTStrategy):
        class Options(FedLTStrategy.Options):
            mu: float = Field(0.01, ge=0, description="proximal weight μ")

The section's ``name`` (``method`` for the centralized section) selects the part; the part's ``Options``
then validates the whole section: types, defaults, ranges and a one-line description per field. Unknown
keys are refused (:mod:`fedlt.config` says which part would take them). Code reads attributes
(``cfg.strategy.mu``), never strings.
"""

from __future__ import annotations

from types import UnionType
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError


class Options(BaseModel):
    """A validated, immutable group of config keys: unknown keys, NaN and infinity are refused, and so is a
    boolean given for a number (pydantic would read ``train.batch_size=true`` as 1)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, validate_default=True)

    def unused(self, cfg: Any, section: str) -> list[str]:
        """Warning lines for keys of this section (``section``, its dotted name) that ``cfg``'s run does not read
        although the config gives them a value other than their default: a Cutout size without AutoAugment, a
        decay factor without a step schedule, a round past the last. Said before any run
        (:func:`fedlt.simulate.unused_keys`), not refused: a base config's value swept against another is a usual
        comparison. A part whose keys depend on others overrides it, calling ``super().unused(cfg, section)``."""
        return []

    def unread(self, section: str, keys: tuple[str, ...], why: str) -> list[str]:
        """One line for those of ``keys`` set to another value than their default: ``{section}.k=v … {why}``."""
        fields = type(self).model_fields
        given = [f"{section}.{k}={getattr(self, k)}" for k in keys if getattr(self, k) != fields[k].default]
        if not given:
            return []
        return [f"{', '.join(given)} {'has' if len(given) == 1 else 'have'} no effect: {why}"]

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool) and info.field_name is not None:
            kinds = _scalar_kinds(cls.model_fields[info.field_name].annotation)
            if bool not in kinds and kinds & {int, float}:
                raise PydanticCustomError("int_type" if float not in kinds else "float_type", "not a number")
        return value


def _scalar_kinds(annotation: Any) -> set:
    """The plain types an annotation admits at its top level (``int | None`` -> {int, NoneType})."""
    if get_origin(annotation) in (Union, UnionType):
        return set().union(*(_scalar_kinds(a) for a in get_args(annotation)))
    return {annotation} if isinstance(annotation, type) else set()


class DataOptions(Options):
    """The ``data`` section: what every data set takes; a data set may add its own keys."""

    name: str = Field("fashion_mnist", description="registered data set (--list)")
    root: str | None = Field(None, description="folder of the data set (None: the data set's default place)")
    imbalance_factor: float = Field(100.0, ge=1, description="β = N_max / N_min of the long-tailed profile")
    profile: Literal["exp", "step", "none"] = Field(
        "exp", description="long-tail profile: exp, step, or none (use the training set as it is)")
    crop_padding: int = Field(4, ge=0, description="random-crop padding of the training augmentation (0: none)")
    flip: bool = Field(True, description="random horizontal flip in the training augmentation")
    cutout: int = Field(0, ge=0, description="Cutout size after crop/flip, the hole filled with 0 after "
                                             "normalisation (the mean colour), as GBME's CIFAR-100 loader; 0: none")
    mean: list[float] | None = Field(None, min_length=1, description="per-channel mean of the normalisation "
                                     "(None: the data set's; an official recipe's constants, e.g. LDAM-DRW's CIFAR "
                                     "[0.4914, 0.4822, 0.4465])")
    std: list[Annotated[float, Field(gt=0)]] | None = Field(
        None, min_length=1, description="per-channel std of the normalisation (None: the data set's; e.g. "
                                        "LDAM-DRW's CIFAR [0.2023, 0.1994, 0.2010])")

    @field_validator("root")
    @classmethod
    def _root_not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():  # `data.root=$ROOT` with ROOT unset read the default data
            raise ValueError("is empty (an unset shell variable?): give the data set's folder, or leave the key out "
                             "for its default place")
        return value

    def unused(self, cfg: Any, section: str) -> list[str]:
        out = super().unused(cfg, section)
        if self.profile == "none":
            out += self.unread(section, ("imbalance_factor",), f"{section}.profile=none uses the training set as it is")
        return out


class FileListOptions(DataOptions):
    """Image root + ``relative/path label`` file lists (ImageNet-LT, Places-LT, iNaturalist-2018 format)."""

    train_list: str = Field("train.txt", description="training file list, relative to data.root")
    test_list: str = Field("test.txt", description="test file list, relative to data.root")
    image_size: int | None = Field(None, gt=0, description="resize images to this size on decode (None: as stored)")
    cache: bool = Field(True, description="decode the images once into an on-disk uint8 cache that every process "
                                          "maps read-only (fedlt.data.image_cache); false: decode in each process")
    cache_dir: str | None = Field(None, description="folder of the image cache (None: $FEDLT_CACHE_DIR, else "
                                                    "$XDG_CACHE_HOME/fedlt/images, else ~/.cache/fedlt/images)")
    decode_device: Literal["cpu", "cuda"] = Field("cpu", description="where JPEGs are decoded (cuda: nvJPEG on the GPU)")


class ModelOptions(Options):
    """The ``model`` section: the model's name (None: the data set's default) and the builder's own keys."""

    name: str | None = Field(None, description="registered model (--list); None: the data set's default")


class HeadOptions(ModelOptions):
    """A model with one classifier head."""

    classifier: Literal["linear", "cosine"] = Field("linear", description="classifier head: linear or cosine")
    scale: float = Field(1.0, gt=0, description="scale s of a cosine head (z = s·cos)")

    def unused(self, cfg: Any, section: str) -> list[str]:
        """A scale given to linear heads, in a federated run (a centralized method may set the heads itself:
        LDAM's, the expert methods' cosine heads)."""
        out = super().unused(cfg, section)
        if self.classifier == "linear" and cfg.mode == "federated":
            out += self.unread(section, ("scale",), f"it scales cosine heads, and {section}.classifier=linear")
        return out


class StrategyOptions(Options):
    """The ``strategy`` section: the server strategy and its own keys."""

    name: str = Field("fedavg", description="registered server strategy (--list)")


class ClientOptions(Options):
    """The ``client`` section: the client method (None: the strategy's paired one) and its own keys."""

    name: str | None = Field(None, description="registered client method (--list); None: the strategy's own")


def whole_warmup(value: float) -> float:
    """A warm-up of whole epochs: :meth:`fedlt.train.OptimConfig.lr_at` runs epoch e < W at lr·(⌊e⌋+1)/⌈W⌉, so
    W = 0.5 would give no warm-up at all."""
    if value != int(value):
        raise ValueError("must be a whole number of epochs (the warm-up steps once per epoch, lr·(e+1)/W, as "
                         "LDAM-DRW's)")
    return value


WarmupEpochs = Annotated[float, AfterValidator(whole_warmup)]


class CentralizedOptions(Options):
    """The ``centralized`` section: the baseline method, its schedule, and the method's own keys."""

    method: str = Field("ce", description="registered centralized method (--list)")
    epochs: float = Field(10.0, gt=0, description="training epochs (stage 1 of a two-stage method)")
    lr: float | None = Field(None, gt=0, description="learning rate (None: train.lr)")
    batch_size: int | None = Field(None, ge=2, description="batch size, ≥ 2 (None: train.batch_size)")
    momentum: float | None = Field(None, ge=0, lt=1, description="SGD momentum in [0, 1) (None: train.momentum)")
    weight_decay: float | None = Field(None, ge=0, description="weight decay (None: train.weight_decay)")
    nesterov: bool | None = Field(None, description="Nesterov momentum (None: train.nesterov)")
    warmup_epochs: WarmupEpochs = Field(0.0, ge=0, description="linear lr warm-up epochs")
    warmup_factor: float = Field(0.0, ge=0, lt=1, description=(
        "f: warm-up epoch e runs at lr·(f + (1 − f)(e + 1)/W); 0: lr·(e + 1)/W (LDAM-DRW); 1/3 with the "
        "milestones one epoch early: WarmupMultiStepLR (warmup_factor 1/3) stepped before each epoch (TDE, NCL, "
        "CC-SAM)"))
    schedule: Literal["constant", "step", "cosine", "cosine_epoch", "cosine_epoch_end"] = Field(
        "cosine", description="lr schedule over the epochs (cosine_epoch: the cosine value at each epoch's start, "
                              "held for the epoch, as CosineAnnealingLR stepped after each epoch; "
                              "cosine_epoch_end: the value at its end, as CosineAnnealingLR stepped before each "
                              "epoch, the last epoch at lr 0)")
    milestones: list[Annotated[float, Field(gt=0)]] = Field(default_factory=list,
                                                            description="epochs at which a step schedule decays")
    gamma: float = Field(0.1, gt=0, le=1, description="decay factor of a step schedule, in (0, 1]")
    sampler: Literal["instance", "class_balanced", "sqrt", "progressive"] = Field(
        "instance", description="class-aware sampler of the training batches (fedlt/samplers.py)")
    autoaugment: bool = Field(False, description="add AutoAugment (CIFAR policy) + Cutout to crop/flip")
    cutout: int = Field(16, ge=0, description="Cutout size with autoaugment")
    augment_chunk: int = Field(1, gt=0, description="images sharing one AutoAugment sub-policy draw")
    pretrain: Literal["none", "rotation"] = Field(
        "none", description="self-supervised stage 0 before the method (rotation: SSP, fedlt/centralized/pretrain.py)")
    pretrain_epochs: int = Field(0, ge=0, description="epochs of the pretrain stage (> 0 with pretrain=rotation)")

    @field_validator("milestones")
    @classmethod
    def _step_has_milestones(cls, value: list[float], info: ValidationInfo) -> list[float]:
        return step_milestones(value, info.data.get("schedule"), "centralized.schedule")

    @field_validator("pretrain_epochs")
    @classmethod
    def _pretrain_has_epochs(cls, value: int, info: ValidationInfo) -> int:
        if info.data.get("pretrain", "none") != "none" and value == 0:
            raise ValueError("must be > 0 with centralized.pretrain=rotation")
        return value
    sam: Literal["none", "cc_sam"] = Field("none", description="cc_sam: class-conditional sharpness-aware "
                                           "classifier around the method's objective (fedlt/sharpness.py)")
    sam_flat_ratio: float = Field(0.3, ge=0, le=1, description="CC-SAM weight λ of the perturbed loss")
    sam_noise_ratio: float = Field(1e-6, ge=0, description="CC-SAM noise ratio r of the perturbation")

    # False where a method's Options give ``gamma`` another meaning (SBCL's class-term weight γ)
    gamma_is_decay: ClassVar[bool] = True

    def unused(self, cfg: Any, section: str) -> list[str]:
        out = super().unused(cfg, section)
        if self.schedule != "step" and self.gamma_is_decay:
            out += self.unread(section, ("gamma",), f"it decays a step schedule, and {section}.schedule="
                                                    f"{self.schedule}")
        if not self.warmup_epochs:
            out += self.unread(section, ("warmup_factor",), f"it shapes a warm-up, and {section}.warmup_epochs=0")
        elif self.warmup_epochs > self.epochs:
            out.append(f"{section}.warmup_epochs={self.warmup_epochs:g} > {section}.epochs={self.epochs:g}: the lr "
                       f"never reaches its full value within stage 1")
        if not self.autoaugment:
            out += self.unread(section, ("cutout", "augment_chunk"), f"{section}.autoaugment=false")
        if self.sam == "none":
            out += self.unread(section, ("sam_flat_ratio", "sam_noise_ratio"), f"{section}.sam=none")
        out += milestones_unused(f"{section}.milestones", self.milestones, f"{section}.schedule", self.schedule,
                                 f"{section}.epochs", self.epochs, "m epochs")
        if self.pretrain_epochs and self.pretrain == "none":
            out.append(f"{section}.pretrain_epochs={self.pretrain_epochs} has no effect with {section}.pretrain=none")
        return out


def step_milestones(value: list, schedule: str | None, schedule_key: str, unit: str = "epoch") -> list:
    """Milestones of a step schedule: at least one (a step schedule without any is a constant lr that says
    otherwise), none twice."""
    if schedule == "step" and not value:
        raise ValueError(f"must name at least one {unit} with {schedule_key}=step (without one the lr never decays)")
    repeated = sorted({m for m in value if value.count(m) > 1})
    if repeated:
        raise ValueError(f"names {unit} {repeated[0]:g} more than once (the lr would decay twice there): give each "
                         f"milestone once")
    return value


def milestones_unused(key: str, milestones: list, schedule_key: str, schedule: str, total_key: str,
                      total: float, after: str) -> list[str]:
    """The :meth:`Options.unused` line of a step schedule's milestones: given without a step schedule, or ≥ the
    run's length (a step schedule decays after milestone m, ``after``, so m ≥ the rounds / epochs never does)."""
    if milestones and schedule != "step":
        return [f"{key} {milestones} have no effect with {schedule_key}={schedule}"]
    late = [m for m in milestones if m >= total]
    if not late:
        return []
    return [f"{key} {late} ≥ {total_key}={total:g}: the lr decays after {after}, so never within the run"]


class Stage2Options(Options):
    """The optimizer of a centralized method's second stage (the classifier on the frozen backbone, or a
    student): each None or default key keeps stage 1's value or the method's own schedule.
    :func:`fedlt.centralized.run.stage2_optim` reads them."""

    stage2_batch_size: int | None = Field(None, ge=2, description="stage-2 batch size (None: stage 1's)")
    stage2_weight_decay: float | None = Field(None, ge=0, description="stage-2 weight decay (None: stage 1's)")
    stage2_warmup_epochs: WarmupEpochs = Field(0.0, ge=0, description="stage-2 linear lr warm-up epochs, "
                                               "lr·(e+1)/W")
    stage2_schedule: Literal["constant", "step", "cosine", "cosine_epoch", "cosine_epoch_end"] | None = Field(
        None, description="stage-2 lr schedule (None: the method's own: crt, lws cosine_epoch_end; cc_sam "
                          "constant; mislas cosine_epoch; others cosine)")
    stage2_milestones: list[Annotated[float, Field(ge=0)]] = Field(
        default_factory=list, description="stage-2 epochs (from 0) at which a step schedule decays")
    stage2_gamma: float = Field(0.1, gt=0, le=1, description="decay factor of a stage-2 step schedule, in (0, 1]")

    def unused(self, cfg: Any, section: str) -> list[str]:
        out = super().unused(cfg, section)
        if self.stage2_schedule != "step":
            schedule = self.stage2_schedule or "None (the method's own, not a step one)"
            out += self.unread(section, ("stage2_gamma",), f"it decays a stage-2 step schedule, and "
                                                           f"{section}.stage2_schedule={schedule}")
        stage2_epochs = getattr(self, "stage2_epochs", None)
        if stage2_epochs is not None and self.stage2_warmup_epochs > stage2_epochs:
            out.append(f"{section}.stage2_warmup_epochs={self.stage2_warmup_epochs:g} > {section}.stage2_epochs="
                       f"{stage2_epochs:g}: the stage-2 lr never reaches its full value")
        return out

    @field_validator("stage2_milestones")
    @classmethod
    def _stage2_step_has_milestones(cls, value: list[float], info: ValidationInfo) -> list[float]:
        return step_milestones(value, info.data.get("stage2_schedule"), "centralized.stage2_schedule")


def option_rows(options: type[Options], prefix: str) -> list[tuple[str, str, str, str]]:
    """(key, type, default, description) of every field of ``options``, keys prefixed by ``prefix``."""
    rows = []
    for key, field in options.model_fields.items():
        annotation = field.annotation
        if get_origin(annotation) is Literal:
            kind = "|".join(str(a) for a in get_args(annotation))
        elif get_origin(annotation) in (Union, UnionType) and any(get_origin(a) is Literal
                                                                   for a in get_args(annotation)):  # Literal | None
            kind = "|".join(str(v) for a in get_args(annotation) for v in (get_args(a) or ("None",)))
        else:
            kind = getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
        default: Any = field.default_factory() if field.default_factory is not None else field.default
        rows.append((f"{prefix}{key}", kind, repr(default), field.description or ""))
    return rows
