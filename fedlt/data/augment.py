"""Batched augmentation on the training device (one kernel per op for the whole batch, no per-image loop).

Images stay uint8 until the batch is drawn; these functions take a float batch (N, C, H, W).
"""

from __future__ import annotations

import torch

from fedlt.device import host_to_device

Draws = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]
"""The random numbers of :class:`fedlt.train.Augment` for a batch: crop offsets (2, n) and flip flags (n,)
(:func:`crop_flip_draws`, :func:`apply_crop_flip`), then Cutout's hole centres (2, n) (:func:`cutout_draws`,
:func:`apply_cutout`), each None where that part is off."""


def random_crop_flip(x: torch.Tensor, padding: int, generator: torch.Generator | None = None,
                     flip: bool = True, fill: torch.Tensor | None = None) -> torch.Tensor:
    """RandomCrop(H, padding) with constant padding ``fill`` (one value per channel, in the units of ``x``;
    default 0), then a horizontal flip with probability ½, per image.

    torchvision's ``RandomCrop(32, padding=4)`` pads the raw image with black (pixel 0) before ``Normalize``; on a
    normalised batch that is ``fill`` = (0 − mean)/std (:class:`fedlt.train.Augment` passes it). Each image gets
    its own offset (dy, dx) ∈ [0, 2·padding]²: the padded batch is gathered with one index per output row and
    column. The random numbers are :func:`crop_flip_draws`, applied by :func:`apply_crop_flip`.
    """
    offsets, flips = crop_flip_draws(len(x), padding, flip, generator)
    return apply_crop_flip(x, padding, offsets, flips, fill)


def crop_flip_draws(n: int, padding: int, flip: bool, generator: torch.Generator | None = None
                    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The random numbers of :func:`random_crop_flip` for ``n`` images, on the CPU, in its order: crop offsets
    (2, n) in [0, 2·padding] (None without padding), then flip flags (n,) (None without flip). Drawn apart from
    the images so that the fused engine draws each client's numbers from the client's own generator and applies
    them to the whole cohort's batch in one call (concatenated along the image dimension)."""
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator, device="cpu") if padding > 0 else None
    flips = (torch.rand(n, generator=generator, device="cpu") < 0.5) if flip else None
    return offsets, flips


def apply_crop_flip(x: torch.Tensor, padding: int, offsets: torch.Tensor | None, flips: torch.Tensor | None,
                    fill: torch.Tensor | None = None) -> torch.Tensor:
    """Crop image i of ``x`` at ``offsets[:, i]`` of its padded copy (padding with ``fill``) and flip it where
    ``flips[i]``; the draws of :func:`crop_flip_draws` (None: no crop, no flip)."""
    n, c, h, w = x.shape
    dev = x.device
    if offsets is not None:
        if fill is None:
            padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
        else:
            padded = fill.to(dev, x.dtype)[None, :, None, None].expand(n, c, h + 2 * padding, w + 2 * padding).clone()
            padded[:, :, padding:padding + h, padding:padding + w] = x
        off = host_to_device(offsets, dev)
        rows = (off[0][:, None] + torch.arange(h, device=dev)[None, :])  # (n, h)
        cols = (off[1][:, None] + torch.arange(w, device=dev)[None, :])  # (n, w)
        padded = padded.gather(2, rows[:, None, :, None].expand(n, c, h, padded.shape[3]))
        x = padded.gather(3, cols[:, None, None, :].expand(n, c, h, w))
    if flips is not None:
        x = torch.where(host_to_device(flips, dev)[:, None, None, None], x.flip(3), x)
    return x


def normalize(x_uint8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
              dtype: torch.dtype | None = None) -> torch.Tensor:
    """uint8 (N, C, H, W) -> (x/255 − mean)/std in ``dtype`` (default: torch's default dtype, float32 unless a
    caller set float64 for an exactness check)."""
    dtype = dtype or torch.get_default_dtype()
    x = x_uint8.to(dtype, copy=True)  # one new tensor, the arithmetic in place: a large batch allocates once
    return x.div_(255.0).sub_(mean.to(dtype)[None, :, None, None]).div_(std.to(dtype)[None, :, None, None])


def cutout(x: torch.Tensor, size: int, generator: torch.Generator | None = None,
           fill: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Cutout (DeVries & Taylor, 2017), per image: the square [y − ⌊size/2⌋, y + ⌊size/2⌋) × [x − ⌊size/2⌋,
    x + ⌊size/2⌋) around a uniform pixel (y, x) set to ``fill`` (one value per channel, in the units of ``x``;
    default 0), clipped at the border: the official ``Cutout`` (uoguelph-mlrg/Cutout, copied by the long-tail
    releases), whose hole is size − 1 wide for an odd size. Draws :func:`cutout_draws`, applies
    :func:`apply_cutout`."""
    if size <= 0:
        return x
    n, _, h, w = x.shape
    return apply_cutout(x, size, cutout_draws(n, h, w, generator), fill)


def cutout_draws(n: int, h: int, w: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Cutout's hole centres for ``n`` images of h×w, on the CPU: (2, n) rows then columns, each uniform."""
    cy = torch.randint(0, h, (n,), generator=generator, device="cpu")
    cx = torch.randint(0, w, (n,), generator=generator, device="cpu")
    return torch.stack([cy, cx])


def apply_cutout(x: torch.Tensor, size: int, centres: torch.Tensor, fill: torch.Tensor | float = 0.0
                 ) -> torch.Tensor:
    """Fill image i's square of side ``size`` around ``centres[:, i]`` (:func:`cutout`'s square) with ``fill``."""
    n, _, h, w = x.shape
    dev = x.device
    cy, cx = host_to_device(centres, dev)
    ys, xs = torch.arange(h, device=dev), torch.arange(w, device=dev)
    in_y = (ys[None, :] >= (cy - size // 2)[:, None]) & (ys[None, :] < (cy + size // 2)[:, None])
    in_x = (xs[None, :] >= (cx - size // 2)[:, None]) & (xs[None, :] < (cx + size // 2)[:, None])
    hole = in_y[:, :, None] & in_x[:, None, :]  # (n, h, w)
    return torch.where(hole[:, None], torch.as_tensor(fill, dtype=x.dtype, device=dev), x)


AUTOAUGMENT_FILL = 128 / 255  # DeepVoltaire's CIFAR10Policy fillcolor (128, 128, 128), on [0, 1] images


def auto_augment(x01: torch.Tensor, generator: torch.Generator | None = None, chunk: int = 1,
                 policy: str = "cifar10") -> torch.Tensor:
    """AutoAugment (Cubuk et al., CVPR 2019) on a float batch in [0, 1], with its own random policy per chunk.

    Pixels that shear, translate or rotate bring in are grey 128/255, as the ``CIFAR10Policy(fillcolor=(128,
    128, 128))`` (DeepVoltaire's) of the long-tail recipes fedlt follows (BalPoE, MDCS, NCL, SHIKE, CC-SAM);
    torchvision's default fill is black. Their PIL shear and translate resample bicubic, torchvision's tensor
    ops nearest (not copied: bicubic is not available for tensors).

    torchvision's ``v2.AutoAugment`` draws ONE sub-policy (and one magnitude sign, one probability draw)
    per call, i.e. per batch. Here the batch is cut into chunks of ``chunk`` images and each chunk is one
    call, so ``chunk=1`` (the default) gives every image its own sub-policy exactly like the per-sample
    reference pipelines; larger chunks trade that independence for fewer kernel launches. torchvision uses
    the global torch RNG, so each call runs inside ``fork_rng`` seeded from ``generator`` (reproducible, and
    the caller's global RNG is left untouched).
    """
    from torchvision.transforms import v2

    aa = v2.AutoAugment(v2.AutoAugmentPolicy(policy), fill=AUTOAUGMENT_FILL)
    seeds = torch.randint(0, 2**62, (max(1, -(-len(x01) // chunk)),), generator=generator, device="cpu")
    out = []
    with torch.random.fork_rng(devices=[]):
        for i, start in enumerate(range(0, len(x01), chunk)):
            torch.manual_seed(int(seeds[i]))
            out.append(aa(x01[start:start + chunk]))
    return torch.cat(out) if out else x01


def strong_augment(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None,
                   cutout_size: int = 16, chunk: int = 1) -> torch.Tensor:
    """The strong view of the long recipes: AutoAugment (CIFAR policy) + Cutout on a normalised batch.

    ``x`` is normalised (and usually already cropped/flipped); it is mapped back to [0, 1] for AutoAugment,
    normalised again, then Cutout(``cutout_size``) is applied with a black hole: the official pipelines
    (NCL ``cui_cifar.py``, SHIKE ``cifarTrain.py``, MDCS ``cifar_data_loaders.py``, CC-SAM ``Cifar.py``) run
    ``ToTensor → Cutout → Normalize``, so the hole is pixel 0, not the mean colour that Cutout after
    normalisation (DeVries' own code) gives.
    """
    m = mean.to(x.device, x.dtype)[None, :, None, None]
    s = std.to(x.device, x.dtype)[None, :, None, None]
    x01 = (x * s + m).clamp(0, 1)
    x = (auto_augment(x01, generator, chunk) - m) / s
    return cutout(x, cutout_size, generator, fill=(-m / s).view(1, -1, 1, 1))


def random_rotation(x: torch.Tensor, degrees: float, generator: torch.Generator | None = None,
                    fill: torch.Tensor | None = None) -> torch.Tensor:
    """RandomRotation(``degrees``) per image: angle ~ U(−degrees, degrees), counter-clockwise about the image
    centre, nearest-neighbour sampling, same size (torchvision's ``RandomRotation`` defaults).

    The sampling grid is the one of torchvision's tensor ``rotate`` (pixel centres, inverse rotation
    [[cos, −sin], [sin, cos]] scaled to grid_sample's [−1, 1], ``align_corners=False``), built for the
    whole batch at once. Pixels rotated in from outside get ``fill`` (one value per channel, in the units of
    ``x``; default 0).
    """
    n, _, h, w = x.shape
    if degrees <= 0 or n == 0:
        return x
    dev = x.device
    angle = (torch.rand(n, generator=generator, device="cpu") * 2 - 1) * degrees
    rad = torch.deg2rad(angle.double())
    cos, sin = torch.cos(rad).float(), torch.sin(rad).float()
    theta = torch.stack([torch.stack([cos, -sin, torch.zeros(n)], 1), torch.stack([sin, cos, torch.zeros(n)], 1)], 1)
    theta = theta.transpose(1, 2) / torch.tensor([0.5 * w, 0.5 * h])  # (n, 3, 2)
    base = torch.empty(h, w, 3)
    base[..., 0] = torch.linspace(-w * 0.5 + 0.5, w * 0.5 - 0.5, w)
    base[..., 1] = torch.linspace(-h * 0.5 + 0.5, h * 0.5 - 0.5, h)[:, None]
    base[..., 2] = 1.0
    grid = (base.view(1, h * w, 3).expand(n, h * w, 3).bmm(theta)).view(n, h, w, 2).to(dev, x.dtype)
    out = torch.nn.functional.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    if fill is not None:
        inside = torch.nn.functional.grid_sample(torch.ones(n, 1, h, w, device=dev, dtype=x.dtype), grid,
                                                 mode="nearest", padding_mode="zeros", align_corners=False)
        out = torch.where(inside < 0.5, fill.to(dev, x.dtype)[None, :, None, None], out)
    return out


def simclr_augment(x01: torch.Tensor, generator: torch.Generator | None = None, chunk: int = 1) -> torch.Tensor:
    """The SimCLR/MoCo-v2 view of CIFAR-size images (the ``augmentation_sim_cifar`` of Bazinga699/NCL
    ``lib/dataset/cui_cifar.py``) on a float batch in [0, 1]: RandomResizedCrop(H×W, scale 0.2–1), horizontal
    flip, ColorJitter(0.4, 0.4, 0.4, 0.1) with probability 0.8, grayscale with probability 0.2, Gaussian blur
    σ ~ U(0.1, 2) with probability 0.5 (kernel 13 = 2·⌈3·2⌉ + 1; the official PIL blur takes σ as its radius).

    One torchvision draw per chunk of ``chunk`` images (1: every image its own, as the per-sample reference
    pipeline), inside ``fork_rng`` seeded from ``generator`` like :func:`auto_augment`.
    """
    from torchvision.transforms import v2

    view = v2.Compose([v2.RandomResizedCrop(tuple(x01.shape[2:]), scale=(0.2, 1.0), antialias=True),
                       v2.RandomHorizontalFlip(),
                       v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                       v2.RandomGrayscale(p=0.2),
                       v2.RandomApply([v2.GaussianBlur(13, sigma=(0.1, 2.0))], p=0.5)])
    seeds = torch.randint(0, 2**62, (max(1, -(-len(x01) // chunk)),), generator=generator, device="cpu")
    out = []
    with torch.random.fork_rng(devices=[]):
        for i, start in enumerate(range(0, len(x01), chunk)):
            torch.manual_seed(int(seeds[i]))
            out.append(view(x01[start:start + chunk]))
    return torch.cat(out) if out else x01
