"""Batched image augmentation with tensor operations only, on CPU or GPU.

Policies:
- "none": the batch unchanged.
- "flip": a random horizontal flip per image.
- "bin": flip, small rotation, translation and perspective, zoomed out just enough that the whole input stays
  in view (uncovered borders take the image's mean colour), then brightness, contrast and saturation jitter.

uint8 batches are treated as 0..255 and float batches as 0..1 (values are clamped to that range after colour
jitter); the result has the input's dtype and device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

POLICIES = ("none", "flip", "bin")
MAX_ROTATION_DEGREES = 8.0
MAX_TRANSLATION = 0.04  # fraction of the half-width
MAX_PERSPECTIVE = 0.06  # projective coefficients in normalised coordinates
MAX_EXTRA_ZOOM_OUT = 0.08  # beyond the zoom-out that keeps the whole input in view
COLOUR_JITTER = 0.2  # brightness, contrast and saturation factors in [1 - j, 1 + j]
_LUMA = (0.299, 0.587, 0.114)


def augment_batch(batch: torch.Tensor, policy: str, generator: torch.Generator) -> torch.Tensor:
    """Augment an (N, C, H, W) batch with `policy`; the same generator state gives the same result."""
    if policy not in POLICIES:
        raise ValueError(f"unknown augmentation policy {policy!r}; choose one of: {', '.join(POLICIES)}")
    if batch.dim() != 4:
        raise ValueError(f"augment_batch expects an (N, C, H, W) batch; got shape {tuple(batch.shape)}")
    if policy == "none" or not len(batch):
        return batch
    if policy == "flip":
        flip = _uniform(generator, (len(batch),), batch.device) < 0.5
        return torch.where(flip.view(-1, 1, 1, 1), batch.flip(-1), batch)
    if batch.shape[1] != 3:
        raise ValueError(f"policy 'bin' expects RGB batches (3 channels); got {batch.shape[1]}")
    draws = _uniform(generator, (len(batch), 10), batch.device) * 2 - 1  # every random number, in [-1, 1]
    peak = 255.0 if batch.dtype == torch.uint8 else 1.0
    images = _warp(batch.float(), bin_homographies(draws[:, :7]))
    images = _jitter_colour(images, 1 + COLOUR_JITTER * draws[:, 7:], peak)
    if batch.dtype == torch.uint8:
        images = images.round()
    return images.to(batch.dtype)


def _uniform(generator: torch.Generator, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Uniform [0, 1) numbers drawn on the generator's device, moved to `device`."""
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def bin_homographies(draws: torch.Tensor) -> torch.Tensor:
    """(N, 3, 3) maps from output to input normalised coordinates, from (N, 7) draws in [-1, 1].

    Draws: rotation, flip (negative = flip), x/y translation, x/y perspective, extra zoom-out. The map is scaled
    so that the four input corners land inside the output: the whole input stays in view.
    """
    n, device = len(draws), draws.device
    angle = draws[:, 0] * math.radians(MAX_ROTATION_DEGREES)
    flip = torch.where(draws[:, 1] < 0, -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    base = torch.zeros(n, 3, 3, device=device)
    base[:, 0, 0], base[:, 0, 1], base[:, 0, 2] = cos * flip, -sin, draws[:, 2] * MAX_TRANSLATION
    base[:, 1, 0], base[:, 1, 1], base[:, 1, 2] = sin * flip, cos, draws[:, 3] * MAX_TRANSLATION
    base[:, 2, 0], base[:, 2, 1], base[:, 2, 2] = draws[:, 4] * MAX_PERSPECTIVE, draws[:, 5] * MAX_PERSPECTIVE, 1
    corners = torch.tensor([[-1.0, 1.0, -1.0, 1.0], [-1.0, -1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]], device=device)
    landed = torch.linalg.inv(base) @ corners
    reach = (landed[:, :2] / landed[:, 2:]).abs().amax(dim=(1, 2))
    zoom = reach * (1 + (draws[:, 6] + 1) / 2 * MAX_EXTRA_ZOOM_OUT)
    scale = torch.diag_embed(torch.stack([zoom, zoom, torch.ones_like(zoom)], dim=1))
    return base @ scale


def _warp(images: torch.Tensor, homographies: torch.Tensor) -> torch.Tensor:
    """Resample float images through per-image homographies; uncovered pixels take the image's mean colour."""
    n, _, height, width = images.shape
    xs = (torch.arange(width, device=images.device) + 0.5) / width * 2 - 1
    ys = (torch.arange(height, device=images.device) + 0.5) / height * 2 - 1
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    points = torch.stack([grid_x, grid_y, torch.ones_like(grid_x)], dim=-1)  # (H, W, 3)
    mapped = torch.einsum("nij,hwj->nhwi", homographies, points)
    grid = mapped[..., :2] / mapped[..., 2:]
    coverage = torch.ones(n, 1, height, width, device=images.device)
    sampled = F.grid_sample(torch.cat([images, coverage], dim=1), grid, mode="bilinear", padding_mode="zeros",
                            align_corners=False)
    fill = images.mean(dim=(2, 3), keepdim=True)
    return sampled[:, :-1] + (1 - sampled[:, -1:]) * fill


def _jitter_colour(images: torch.Tensor, factors: torch.Tensor, peak: float) -> torch.Tensor:
    """Scale brightness, contrast and saturation by per-image factors (N, 3), then clamp to [0, peak]."""
    brightness, contrast, saturation = (factors[:, i].view(-1, 1, 1, 1) for i in range(3))
    luma = torch.tensor(_LUMA, device=images.device).view(1, 3, 1, 1)
    images = images * brightness
    mean_grey = (images * luma).sum(dim=1, keepdim=True).mean(dim=(2, 3), keepdim=True)
    images = (images - mean_grey) * contrast + mean_grey
    grey = (images * luma).sum(dim=1, keepdim=True)
    images = (images - grey) * saturation + grey
    return images.clamp(0, peak)
