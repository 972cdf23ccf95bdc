"""Image decoding, square resizing and normalisation shared by training and inference.

This module depends on torch and torchvision only: the model package copies it into `code/` so that the
endpoint preprocesses requests exactly as training did.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_image, decode_jpeg, encode_jpeg

warnings.filterwarnings("ignore", message=".*image decoding and encoding capabilities of TorchVision.*")


class ImageDecodeError(ValueError):
    """Raised when bytes cannot be decoded as an image; the message names the culprit."""


def _as_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def decode_rgb(data: bytes, name: str = "image") -> torch.Tensor:
    """Decode JPEG/PNG/WebP bytes to a uint8 RGB tensor of shape (3, H, W)."""
    if not data:
        raise ImageDecodeError(f"{name}: empty image body")
    try:
        return decode_image(_as_tensor(data), mode=ImageReadMode.RGB)
    except RuntimeError as error:
        message = re.split(r"\.cpp:\d+,\s*", str(error).splitlines()[0])[-1]
        reason = message.split(". ")[0].rstrip(".")
        raise ImageDecodeError(f"{name}: not a readable image ({reason})") from None


def decode_jpeg_batch(jpegs: Sequence[bytes], device: str | torch.device = "cpu") -> torch.Tensor:
    """Decode same-sized RGB JPEGs in one call and stack them to a uint8 (N, 3, H, W) tensor."""
    tensors = [_as_tensor(data) for data in jpegs]
    images = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
    return torch.stack(images)


def resize_square(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize uint8 images (C, H, W) or (N, C, H, W) to size x size with antialiased bilinear filtering."""
    single = images.dim() == 3
    batch = images.unsqueeze(0) if single else images
    if batch.shape[-2:] != (size, size):
        resized = F.interpolate(batch.float(), size=(size, size), mode="bilinear", antialias=True,
                                align_corners=False)
        batch = resized.round_().clamp_(0, 255).to(torch.uint8)
    return batch[0] if single else batch


def encode_jpeg_bytes(image: torch.Tensor, quality: int = 90) -> bytes:
    """Encode a uint8 (3, H, W) tensor to JPEG bytes."""
    return encode_jpeg(image.contiguous(), quality=quality).numpy().tobytes()


def normalize(batch: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Scale a uint8 (N, 3, H, W) batch to float and standardise it per channel."""
    mean_t = torch.tensor(mean, device=batch.device, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
    std_t = torch.tensor(std, device=batch.device, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
    return batch.to(torch.float32, copy=True).sub_(mean_t).div_(std_t)
