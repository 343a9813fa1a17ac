"""The one local-training loop of fedlt: client methods and centralized baselines all call :func:`train`.

Data sit on the training device as uint8 (:class:`TensorData`); each step draws a batch by index,
augments it in one batched call (random crop + flip) and normalises it. On CUDA the forward pass runs
under bf16 autocast with channels_last. What a method changes is its :data:`Objective` (the loss of a
batch) and its :data:`Sampler` (the order of indices in an epoch); the loop stays the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedlt.data.augment import Draws, apply_crop_flip, apply_cutout, crop_flip_draws, cutout_draws, normalize
from fedlt.device import host_to_device
from fedlt.errors import FedLTError


@dataclass
class TensorData:
    """Images (uint8, N×C×H×W) and labels on one device, with the normalisation to apply."""

    images: torch.Tensor
    labels: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    num_classes: int

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device) -> "TensorData":
        return TensorData(self.images.to(device), self.labels.to(device), self.mean.to(device),
                          self.std.to(device), self.num_classes)

    def subset(self, indices: np.ndarray | torch.Tensor) -> "TensorData":
        idx = torch.as_tensor(indices, dtype=torch.long, device=self.images.device)
        return TensorData(self.images[idx], self.labels[idx], self.mean, self.std, self.num_classes)

    @property
    def class_counts(self) -> torch.Tensor:
        return torch.bincount(self.labels.cpu(), minlength=self.num_classes)


@dataclass
class Augment:
    """Per-image random crop and horizontal flip, batched, of a batch normalised with ``mean``/``std``: the crop
    pads with black, (0 − mean)/std, as torchvision's ``RandomCrop(32, padding=4)`` on the raw image before
    ``Normalize`` (without ``mean``/``std``: with 0). Then, with ``cutout`` > 0, Cutout of that size filled
    with 0 *after* normalisation (the mean colour), as GBME's CIFAR-100 loader appends ``Cutout(16)`` to its
    normalised transform (:func:`fedlt.data.augment.cutout`)."""

    crop_padding: int = 4
    flip: bool = True
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None
    cutout: int = 0

    def black(self, x: torch.Tensor) -> torch.Tensor | None:
        """The value of a black pixel in the units of ``x``: (0 − mean)/std per channel, in x's dtype."""
        if self.mean is None or self.std is None:
            return None
        return (0.0 - self.mean.to(x.device, x.dtype)) / self.std.to(x.device, x.dtype)

    def draw(self, n: int, generator: torch.Generator, size: tuple[int, int]) -> Draws:
        """The random numbers of a call on ``n`` images of ``size`` (h, w) (:func:`~fedlt.data.augment.
        crop_flip_draws`, then :func:`~fedlt.data.augment.cutout_draws`): drawn from ``generator`` as the call
        draws them, to be applied later, e.g. to many clients' batches at once."""
        offsets, flips = crop_flip_draws(n, self.crop_padding, self.flip, generator)
        return offsets, flips, (cutout_draws(n, *size, generator) if self.cutout > 0 else None)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.apply(x, self.draw(len(x), generator, tuple(x.shape[2:])))

    def apply(self, x: torch.Tensor, draws: Draws) -> torch.Tensor:
        """Crop, flip and cut out ``x`` as ``draws`` (of :meth:`draw`) say."""
        offsets, flips, holes = draws
        if offsets is not None or flips is not None:
            x = apply_crop_flip(x, self.crop_padding, offsets, flips, fill=self.black(x))
        return x if holes is None else apply_cutout(x, self.cutout, holes)


class Objective(Protocol):
    """The loss of one batch: ``objective(model, x, y) -> scalar``. ``x`` is normalised and augmented."""

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` as float32, or as it is where it is float64: a loss computes in float32 at least (bfloat16 logits of
    autocast are upcast) and a float64 run stays float64 (the engines' equivalence tests compare at 1e-9)."""
    return x if x.dtype == torch.float64 else x.float()


def cross_entropy_objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """L = −log softmax(model(x))_y, averaged over the batch (in float32 at least: :func:`at_least_float32`)."""
    return F.cross_entropy(at_least_float32(model(x)), y)


Sampler = Callable[[torch.Tensor, torch.Generator, int], torch.Tensor]
"""``sampler(labels, generator, epoch) -> indices`` for one epoch (length: one pass over the data)."""


def instance_balanced_sampler(labels: torch.Tensor, generator: torch.Generator, epoch: int) -> torch.Tensor:
    """Every sample once per epoch, in a random order."""
    return torch.randperm(len(labels), generator=generator)


@dataclass
class OptimConfig:
    """SGD with momentum and weight decay; linear warm-up, then a step or cosine schedule."""

    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    batch_size: int = 128
    warmup_epochs: float = 0.0
    warmup_factor: float = 0.0  # f: warm-up epoch e runs at lr·(f + (1 − f)·(e + 1)/W)
    schedule: str = "constant"  # constant | step | cosine | cosine_epoch | cosine_epoch_end
    milestones: list[float] = field(default_factory=list)  # epochs, for "step"
    gamma: float = 0.1
    sam: str = "none"  # none | cc_sam: the objective made class-conditionally sharpness-aware (fedlt.sharpness)
    sam_flat_ratio: float = 0.3  # CC-SAM's weight λ of the perturbed loss
    sam_noise_ratio: float = 1e-6  # CC-SAM's noise ratio r

    def lr_at(self, epoch: float, total_epochs: float) -> float:
        """lr at fractional ``epoch`` of ``total_epochs`` (warm-up: epoch e < W runs at lr·(f + (1 − f)·(e + 1)/W),
        f = ``warmup_factor``; f = 0 is LDAM-DRW's lr·(e + 1)/W)."""
        if self.warmup_epochs > 0 and epoch < self.warmup_epochs:
            f = self.warmup_factor
            return self.lr * (f + (1 - f) * (math.floor(epoch) + 1) / math.ceil(self.warmup_epochs))
        if self.schedule == "step":
            return self.lr * self.gamma ** sum(epoch >= m for m in self.milestones)
        if self.schedule in ("cosine_epoch", "cosine_epoch_end"):  # the lr of the epoch's start (end), held
            e = math.floor(epoch) + (self.schedule == "cosine_epoch_end")
            return 0.5 * self.lr * (1 + math.cos(math.pi * min(e / max(total_epochs, 1e-12), 1.0)))
        if self.schedule == "cosine":
            span = max(total_epochs - self.warmup_epochs, 1e-12)
            return 0.5 * self.lr * (1 + math.cos(math.pi * min((epoch - self.warmup_epochs) / span, 1.0)))
        if self.schedule != "constant":
            raise ValueError(f"unknown lr schedule {self.schedule!r}")
        return self.lr


def make_optimizer(model: nn.Module, opt: OptimConfig, groups: list[dict] | None = None) -> torch.optim.SGD:
    """SGD over the trainable parameters of ``model``, or over ``groups`` (``{"params": [...],
    "lr_scale": f}``: :func:`train` gives such a group lr·f at every step)."""
    if groups is None:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in groups]
    return torch.optim.SGD(groups, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay,
                           nesterov=opt.nesterov and opt.momentum > 0)


class NonFiniteLoss(FedLTError):
    """The training loss or the weights became NaN or infinite: the run stops (its last checkpoint is kept)."""


@dataclass
class TrainResult:
    loss: float
    num_examples: int
    steps: int


def prepare_batch(data: TensorData, idx: torch.Tensor, augment: Augment | None,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather a batch by index, normalise, augment; channels_last on CUDA."""
    idx = host_to_device(idx, data.images.device)  # on a GPU: without waiting for the queued steps
    x = normalize(data.images[idx], data.mean, data.std)
    if augment is not None:
        x = augment(x, generator)
    if x.is_cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, data.labels[idx]


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Batches :func:`batch_schedule` trains in one pass over ``n`` samples: ⌊n/B⌋ + [n mod B ≥ 2] (a last batch
    of one sample is dropped for BatchNorm), at least 1."""
    return max(1, n // batch_size + (n % batch_size >= 2))


def epoch_steps(n: int, batch_size: int, epochs: float) -> int:
    """Steps of ``epochs`` passes over ``n`` samples, as :func:`batch_schedule` counts them:
    ⌊epochs · :func:`steps_per_epoch` + ½⌋, half a step rounded up (not Python's round-half-to-even, which gave
    2.5 epochs of one batch 2 steps); 0 for a fraction of an epoch below half a batch, or under 2 samples."""
    return math.floor(epochs * steps_per_epoch(n, batch_size) + 0.5) if n >= 2 else 0


def batch_schedule(data: TensorData, opt: OptimConfig, *, epochs: float | None, steps: int | None,
                   generator: torch.Generator, augment: Augment | None, sampler: Sampler = instance_balanced_sampler,
                   start_epoch: float = 0.0, total_epochs: float | None = None
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor, float]]:
    """(x, y, lr) of each step of ``epochs`` passes (or ``steps`` batches) over ``data``, drawn from ``generator``:
    the batches of :func:`batch_indices`, each gathered and augmented (:func:`prepare_batch`) before the next is
    drawn. :func:`train` draws its steps from here; the fused trainer (:mod:`fedlt.federation.fused`) draws the
    same numbers in the same order (:func:`batch_indices`, then :meth:`Augment.draw`)."""
    for idx, lr in batch_indices(data, opt, epochs=epochs, steps=steps, generator=generator, sampler=sampler,
                                 start_epoch=start_epoch, total_epochs=total_epochs):
        x, y = prepare_batch(data, idx, augment, generator)
        yield x, y, lr


def batch_indices(data: TensorData, opt: OptimConfig, *, epochs: float | None, steps: int | None,
                  generator: torch.Generator, sampler: Sampler = instance_balanced_sampler,
                  start_epoch: float = 0.0, total_epochs: float | None = None
                  ) -> Iterator[tuple[torch.Tensor, float]]:
    """(indices, lr) of each step of ``epochs`` passes (or ``steps`` batches) over ``data``: each epoch's order
    from ``sampler`` on ``generator``, batches of ``opt.batch_size`` (a batch of one sample is dropped for
    BatchNorm); lr at the global position ``start_epoch + progress`` of ``total_epochs``. An epoch that yields no
    batch of two samples ends the schedule (there is nothing to train). Lazy: the next epoch's order is drawn
    when its first batch is asked for, so a caller that draws from ``generator`` between batches (augmentation)
    interleaves with it in one fixed order."""
    n, bs = len(data), opt.batch_size
    per_epoch = steps_per_epoch(n, bs)
    total_steps = steps if steps is not None else epoch_steps(n, bs, epochs)
    total_epochs = total_epochs if total_epochs is not None else start_epoch + total_steps / per_epoch
    step, epoch = 0, 0
    labels = data.labels.cpu()  # once: on a GPU each copy to the host waits for the queued work
    while step < total_steps:
        order = sampler(labels, generator, int(start_epoch) + epoch)
        before = step
        for start in range(0, len(order), bs):
            if step >= total_steps:
                break
            idx = order[start:start + bs]
            if len(idx) < 2:
                continue
            yield idx, opt.lr_at(start_epoch + step / per_epoch, total_epochs)
            step += 1
        if step == before:
            return
        epoch += 1


def train(model: nn.Module, data: TensorData, objective: Objective = cross_entropy_objective, *,
          opt: OptimConfig, epochs: float | None = None, steps: int | None = None,
          generator: torch.Generator, augment: Augment | None = None,
          sampler: Sampler = instance_balanced_sampler, optimizer: torch.optim.Optimizer | None = None,
          start_epoch: float = 0.0, total_epochs: float | None = None) -> TrainResult:
    """Train ``model`` in place for ``epochs`` passes (or ``steps`` batches) over ``data``.

    With ``opt.sam = "cc_sam"`` the objective is made class-conditionally sharpness-aware in the classifier
    (:func:`fedlt.sharpness.cc_sam_objective`, class counts of ``data``), whatever the objective.

    The lr follows ``opt`` at the global position ``start_epoch + progress`` of ``total_epochs``,
    so a caller may split one schedule over several calls (a centralized run that checkpoints, or
    federated rounds that share a schedule). Batches of one sample are dropped (BatchNorm).

    Raises :class:`NonFiniteLoss` when the mean loss of the call or a trained weight is NaN or infinite: one
    check at the end, on the accumulated loss (a non-finite step makes the sum non-finite) and the weights
    (a last step that overflowed), so no step waits for the device.
    """
    if (epochs is None) == (steps is None):
        raise ValueError("give exactly one of epochs or steps")
    device = data.images.device
    model.to(device).train()
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    optimizer = optimizer or make_optimizer(model, opt)
    if opt.sam == "cc_sam":
        from fedlt.sharpness import cc_sam_objective

        objective = cc_sam_objective(objective, data.class_counts, opt.sam_flat_ratio, opt.sam_noise_ratio)
    elif opt.sam != "none":
        raise ValueError(f"unknown sharpness-aware option {opt.sam!r}")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)

    loss_sum, seen, step = torch.zeros((), device=device), 0, 0
    for x, y, lr in batch_schedule(data, opt, epochs=epochs, steps=steps, generator=generator, augment=augment,
                                   sampler=sampler, start_epoch=start_epoch, total_epochs=total_epochs):
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        with autocast:
            loss = objective(model, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * len(y)
        seen += len(y)
        step += 1
    params = [p.detach() for p in model.parameters() if p.requires_grad]
    finite = torch.stack([torch.isfinite(loss_sum)] + [torch.isfinite(p).all() for p in params]).all()
    loss = (loss_sum / max(seen, 1)).item()
    if not finite.item():
        what = f"the training loss became non-finite ({loss})" if not math.isfinite(loss) else \
            "the trained weights became non-finite"
        raise NonFiniteLoss(f"{what} within {step} steps: lower the learning rate or check the data and the loss")
    return TrainResult(loss=loss, num_examples=seen, steps=step)


@torch.no_grad()
def predict_logits(model: nn.Module, data: TensorData, batch_size: int = 1024) -> torch.Tensor:
    """Logits of ``model`` on every sample of ``data`` (no augmentation), as float32 on the CPU."""
    model.eval()
    device = data.images.device
    model.to(device)
    out = []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    for start in range(0, len(data), batch_size):
        x = normalize(data.images[start:start + batch_size], data.mean, data.std)
        with autocast:
            out.append(model(x).float().cpu())
    return torch.cat(out) if out else torch.empty(0, data.num_classes)
