"""Tests for counting.images."""

import pytest
import torch

from counting.images import augment_batch, bin_homographies


def random_batch(dtype: torch.dtype, n: int = 6, size: int = 32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)
    return batch if dtype == torch.uint8 else batch.to(dtype) / 255


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("policy", ["none", "flip", "bin"])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_augmentation_keeps_shape_dtype_and_is_seeded(policy, dtype):
    batch = random_batch(dtype)
    first = augment_batch(batch, policy, seeded(1))
    assert first.shape == batch.shape and first.dtype == dtype
    torch.testing.assert_close(augment_batch(batch, policy, seeded(1)), first)
    if policy != "none":
        assert not torch.equal(augment_batch(batch, policy, seeded(2)), first)


def test_flip_mirrors_some_images_and_leaves_the_others():
    batch = random_batch(torch.uint8, n=16)
    flipped = augment_batch(batch, "flip", seeded(0))
    mirrored = [torch.equal(out, image.flip(-1)) for out, image in zip(flipped, batch)]
    unchanged = [torch.equal(out, image) for out, image in zip(flipped, batch)]
    assert all(m or u for m, u in zip(mirrored, unchanged))
    assert any(mirrored) and any(unchanged)


def test_bin_policy_keeps_the_whole_bin_in_view():
    batch = torch.zeros(16, 3, 48, 48, dtype=torch.uint8)
    for rows in (slice(0, 6), slice(42, 48)):
        for cols in (slice(0, 6), slice(42, 48)):
            batch[:, :, rows, cols] = 255  # a white mark in every corner
    out = augment_batch(batch, "bin", seeded(0)).float()
    halves = (slice(0, 24), slice(24, 48))
    for quadrant in (out[:, :, rows, cols] for rows in halves for cols in halves):
        assert (quadrant.amax(dim=(1, 2, 3)) > 128).all()
    assert not torch.equal(out, batch.float())


def test_bin_homographies_map_every_input_corner_into_view():
    draws = torch.rand(500, 7, generator=seeded(3)) * 2 - 1
    corners = torch.tensor([[-1.0, 1.0, -1.0, 1.0], [-1.0, -1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    landed = torch.linalg.inv(bin_homographies(draws)) @ corners
    assert ((landed[:, :2] / landed[:, 2:]).abs() <= 1 + 1e-5).all()


def test_invalid_input_names_the_culprit():
    with pytest.raises(ValueError, match="'rotate'"):
        augment_batch(random_batch(torch.uint8), "rotate", seeded(0))
    with pytest.raises(ValueError, match="shape"):
        augment_batch(torch.zeros(3, 8, 8), "flip", seeded(0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_augmentation_runs_on_cuda_with_a_cpu_generator():
    batch = random_batch(torch.uint8).cuda()
    out = augment_batch(batch, "bin", seeded(0))
    assert out.device == batch.device and out.dtype == torch.uint8
    torch.testing.assert_close(out.cpu(), augment_batch(batch.cpu(), "bin", seeded(0)), atol=1, rtol=0)
