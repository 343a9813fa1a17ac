"""Batched augmentation on the training device (one kernel per op for the whole batch, no per-image loop).

Images stay uint8 until the batch is drawn; these functions take a float batch (N, C, H, W).
"""

from __future__ import annotations

import torch


def random_crop_flip(x: torch.Tensor, padding: int, generator: torch.Generator | None = None,
                     flip: bool = True) -> torch.Tensor:
    """RandomCrop(H, padding) with zero padding, then a horizontal flip with probability ½, per image.

    Each image gets its own offset (dy, dx) ∈ [0, 2·padding]²: the padded batch is gathered with one
    index per output row and column.
    """
    n, _, h, w = x.shape
    dev = x.device
    if padding > 0:
        padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
        off = torch.randint(0, 2 * padding + 1, (2, n), generator=generator, device="cpu").to(dev)
        rows = (off[0][:, None] + torch.arange(h, device=dev)[None, :])  # (n, h)
        cols = (off[1][:, None] + torch.arange(w, device=dev)[None, :])  # (n, w)
        padded = padded.gather(2, rows[:, None, :, None].expand(n, x.shape[1], h, padded.shape[3]))
        x = padded.gather(3, cols[:, None, None, :].expand(n, x.shape[1], h, w))
    if flip:
        mask = (torch.rand(n, generator=generator, device="cpu") < 0.5).to(dev)
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x


def normalize(x_uint8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """uint8 (N, C, H, W) -> (x/255 − mean)/std in ``dtype``."""
    return ((x_uint8.to(dtype) / 255.0) - mean.to(dtype)[None, :, None, None]) / std.to(dtype)[None, :, None, None]
