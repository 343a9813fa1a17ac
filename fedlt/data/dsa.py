"""Differentiable Siamese Augmentation (DSA; Zhao & Bilen, "Dataset Condensation with Differentiable Siamese
Augmentation", ICML 2021), in the form CReFF's class-gradient query uses it (shangxinyi/CReFF-FL
``Dataset/param_aug.py``, strategy ``color_crop_cutout_flip_scale_rotate``, ``aug_mode='S'``, Siamese).

One call draws ONE family uniformly from {color, crop, cutout, flip, scale, rotate} and ONE parameter set
for it, shared by every image of the batch (Siamese: the official code overwrites each per-image draw with
the first image's). The official parameters (``ParamDiffAug``):

- color: x ← x + (b − ½)·1.0; x ← (x − mean_ch)·(2.0·s) + mean_ch (mean over channels, per pixel);
  x ← (x − mean_img)·(c + 0.5) + mean_img (mean over the image), b, s, c ~ U(0, 1);
- crop: shift (tx, ty) ∈ {−4..4}² (ratio 0.125 of 32, rounded); out[i, j] = x₁[clamp(i + tx + 1, 0, H + 1),
  clamp(j + ty + 1, 0, W + 1)] with x₁ = x zero-padded by one pixel;
- cutout: a 16×16 square (ratio ½) centred at (ox − 8, oy − 8) + its size, ox, oy ∈ {0..32}, clipped, set to 0;
- flip: horizontal flip with probability ½;
- scale: affine grid diag(sx, sy), sx, sy ~ U(1/1.2, 1.2), bilinear grid_sample with zero padding;
- rotate: affine grid of the rotation θ ~ U(−15°, 15°), bilinear grid_sample with zero padding.

The official seed is the wall clock (``time.time()``), so its draws cannot be replayed; fedlt draws from the
caller's generator. The ops apply to normalised images, as in the official query. Not copied: ``aug_mode='M'``
(every family in turn), which CReFF does not use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

FAMILIES = ("color", "crop", "cutout", "flip", "scale", "rotate")


@dataclass(frozen=True)
class DSAParams:
    """The official ``ParamDiffAug`` values."""

    prob_flip: float = 0.5
    ratio_scale: float = 1.2
    ratio_rotate: float = 15.0
    ratio_crop_pad: float = 0.125
    ratio_cutout: float = 0.5
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5


def color(x: torch.Tensor, b: float, s: float, c: float, p: DSAParams = DSAParams()) -> torch.Tensor:
    """Brightness, saturation, contrast with uniform draws b, s, c ∈ [0, 1)."""
    x = x + (b - 0.5) * p.brightness
    m = x.mean(dim=1, keepdim=True)
    x = (x - m) * (s * p.saturation) + m
    m = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - m) * (c + p.contrast) + m


def crop(x: torch.Tensor, tx: int, ty: int) -> torch.Tensor:
    """Translate by (tx, ty) rows/columns, filling with the one-pixel zero border (the official gather)."""
    h, w = x.shape[2], x.shape[3]
    rows = torch.clamp(torch.arange(h, device=x.device) + tx + 1, 0, h + 1)
    cols = torch.clamp(torch.arange(w, device=x.device) + ty + 1, 0, w + 1)
    return F.pad(x, [1, 1, 1, 1])[:, :, rows][:, :, :, cols]


def cutout(x: torch.Tensor, ox: int, oy: int, p: DSAParams = DSAParams()) -> torch.Tensor:
    """Zero the (clipped) square of side ratio_cutout·H whose top-left corner is (ox − size//2, oy − size//2)."""
    h, w = x.shape[2], x.shape[3]
    sh, sw = int(h * p.ratio_cutout + 0.5), int(w * p.ratio_cutout + 0.5)
    rows = torch.clamp(torch.arange(sh, device=x.device) + ox - sh // 2, 0, h - 1)
    cols = torch.clamp(torch.arange(sw, device=x.device) + oy - sw // 2, 0, w - 1)
    mask = torch.ones(h, w, dtype=x.dtype, device=x.device)
    mask[rows[:, None], cols[None, :]] = 0
    return x * mask


def affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """grid_sample of x on the affine grid of one 2×3 matrix (bilinear, zero padding, align_corners=False)."""
    grid = F.affine_grid(theta.to(x.dtype).expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid.to(x.device), align_corners=False)


def scale_theta(sx: float, sy: float) -> torch.Tensor:
    return torch.tensor([[sx, 0.0, 0.0], [0.0, sy, 0.0]])


def rotate_theta(angle: float) -> torch.Tensor:
    return torch.tensor([[math.cos(angle), math.sin(-angle), 0.0], [math.sin(angle), math.cos(angle), 0.0]])


def siamese_dsa(x: torch.Tensor, generator: torch.Generator, families: tuple[str, ...] = FAMILIES,
                p: DSAParams = DSAParams()) -> torch.Tensor:
    """One DSA draw ('S' mode, Siamese): a family uniformly from ``families``, one parameter set for the batch."""
    def u() -> float:
        return float(torch.rand((), generator=generator))

    family = families[int(torch.randint(len(families), (), generator=generator))]
    h, w = x.shape[2], x.shape[3]
    if family == "color":
        return color(x, u(), u(), u(), p)
    if family == "crop":
        sx, sy = int(h * p.ratio_crop_pad + 0.5), int(w * p.ratio_crop_pad + 0.5)
        tx = int(torch.randint(-sx, sx + 1, (), generator=generator))
        ty = int(torch.randint(-sy, sy + 1, (), generator=generator))
        return crop(x, tx, ty)
    if family == "cutout":
        size = int(h * p.ratio_cutout + 0.5), int(w * p.ratio_cutout + 0.5)
        ox = int(torch.randint(0, h + (1 - size[0] % 2), (), generator=generator))
        oy = int(torch.randint(0, w + (1 - size[1] % 2), (), generator=generator))
        return cutout(x, ox, oy, p)
    if family == "flip":
        return x.flip(3) if u() < p.prob_flip else x
    if family == "scale":
        r = p.ratio_scale
        return affine(x, scale_theta(u() * (r - 1 / r) + 1 / r, u() * (r - 1 / r) + 1 / r))
    if family == "rotate":
        return affine(x, rotate_theta((u() - 0.5) * 2 * p.ratio_rotate / 180 * math.pi))
    raise ValueError(f"unknown DSA family {family!r}; known: {', '.join(FAMILIES)}")
