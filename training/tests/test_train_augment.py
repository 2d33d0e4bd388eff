"""Batched Appendix C augmentations: shapes, ranges, each option off, per-image parity
with torchvision's functional ops, reproducibility."""


import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from histohub_training.simclr.augment import (JITTER_STRENGTHS, BatchAugment, adjust_brightness,
                            adjust_contrast, adjust_hue, adjust_saturation, blur_kernel_size,
                            gaussian_blur, jitter_strength)

OFF = dict(crop_min_area=None, rotate=False, hflip_p=0.0, vflip_p=0.0, jitter=None,
           blur_p=0.0)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randint(0, 256, (6, 3, 24, 24), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(0))


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_shapes_and_ranges(images, dtype):
    batch = images if dtype == torch.uint8 else images.float() / 255
    view1, view2 = BatchAugment(16, jitter="heavy", grayscale_p=0.5).two_views(batch, _gen())
    for view in (view1, view2):
        assert view.shape == (6, 3, 16, 16) and view.dtype == torch.float32
        assert view.min() >= 0 and view.max() <= 1
    assert not torch.equal(view1, view2)


def test_everything_off_is_the_identity(images):
    out = BatchAugment(24, **OFF)(images, _gen())
    torch.testing.assert_close(out, images.float() / 255, rtol=0, atol=0)


def test_rotations_are_exact_quarter_turns(images):
    out = BatchAugment(24, **{**OFF, "rotate": True})(images, _gen(3))
    reference = images.float() / 255
    turns = []
    for view, image in zip(out, reference):
        matches = [k for k in range(4) if torch.equal(view, torch.rot90(image, k, (1, 2)))]
        assert len(matches) == 1
        turns.extend(matches)
    assert len(set(turns)) > 1


@pytest.mark.parametrize("option, flip_dim", [("hflip_p", 2), ("vflip_p", 1)])
def test_flips(images, option, flip_dim):
    out = BatchAugment(24, **{**OFF, option: 1.0})(images, _gen())
    torch.testing.assert_close(out, torch.flip(images.float() / 255, (flip_dim + 1,)))


def test_cpu_and_gpu_geometry_paths_agree(images):
    augment = BatchAugment(24, **{**OFF, "rotate": True, "hflip_p": 0.5, "vflip_p": 0.5})
    params = augment.sample(6, 24, 24, _gen(5))
    cpu = augment._geometry_cpu(images, params).float() / 255
    grid = augment._geometry_grid(images, params)  # the path used on GPUs
    torch.testing.assert_close(cpu, grid, rtol=0, atol=1e-5)  # pixel centres: exact up to fp


def test_crop_areas_follow_the_configured_range():
    augment = BatchAugment(64, crop_min_area=0.01)
    boxes = augment.sample(4000, 64, 64, _gen())["boxes"].float()
    area = boxes[:, 2] * boxes[:, 3] / (64 * 64)
    assert area.min() >= 0.005 and area.max() <= 1.0
    assert area.min() < 0.03 and area.max() > 0.9  # the whole 1-100% range is used
    assert (boxes[:, 0] + boxes[:, 2] <= 64).all() and (boxes[:, 1] + boxes[:, 3] <= 64).all()


@pytest.mark.parametrize("ours, theirs, factor", [
    (adjust_brightness, TF.adjust_brightness, 1.7), (adjust_contrast, TF.adjust_contrast, 0.3),
    (adjust_saturation, TF.adjust_saturation, 1.6), (adjust_hue, TF.adjust_hue, 0.37),
    (adjust_hue, TF.adjust_hue, -0.2)])
def test_colour_ops_match_torchvision_per_image(images, ours, theirs, factor):
    x = images.float() / 255
    x[0, :, :5] = 0.5  # grey pixels: hue undefined
    factors = torch.linspace(factor * 0.5, factor, len(x))
    got = ours(x.clone(), factors)
    expected = torch.stack([theirs(x[i], factors[i].item()) for i in range(len(x))])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_blur_matches_torchvision_per_image(images):
    x = images.float() / 255
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0, 0.7])
    kernel = blur_kernel_size(24, 0.1 * 4)
    got = gaussian_blur(x, sigma, kernel)
    expected = torch.stack([TF.gaussian_blur(x[i], [kernel, kernel], [s.item()] * 2)
                            for i, s in enumerate(sigma)])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert blur_kernel_size(224, 0.1) == 23  # 10% of the side, odd


def test_jitter_and_blur_can_be_switched_off_independently(images):
    x = images.float() / 255
    only_jitter = BatchAugment(24, **{**OFF, "jitter": "medium", "jitter_p": 1.0})(images, _gen())
    assert not torch.allclose(only_jitter, x)
    only_blur = BatchAugment(24, **{**OFF, "blur_p": 1.0})(images, _gen())
    assert not torch.allclose(only_blur, x)
    # luminance is kept by blur, so per-image means barely move
    torch.testing.assert_close(only_blur.mean((1, 2, 3)), x.mean((1, 2, 3)), atol=0.02, rtol=0)


def test_same_seed_same_views(images):
    augment = BatchAugment(16)
    torch.testing.assert_close(augment(images, _gen(7)), augment(images, _gen(7)))


def test_jitter_strengths_and_bad_values():
    assert JITTER_STRENGTHS["light"] == (0.4, 0.4, 0.4, 0.2)
    assert JITTER_STRENGTHS["medium"] == (0.8, 0.8, 0.8, 0.2)
    assert JITTER_STRENGTHS["heavy"] == (0.8, 0.8, 0.8, 0.4)
    assert jitter_strength(None) is None and jitter_strength([0.1, 0, 0, 0.1]) == (0.1, 0, 0, 0.1)
    with pytest.raises(ValueError, match="light"):
        jitter_strength("extreme")
    with pytest.raises(ValueError, match="hue"):
        jitter_strength([0.1, 0.1, 0.1, 0.9])
    with pytest.raises(ValueError, match="probability"):
        BatchAugment(16, blur_p=1.5)
    with pytest.raises(ValueError, match="crop_min_area"):
        BatchAugment(16, crop_min_area=0.0)
