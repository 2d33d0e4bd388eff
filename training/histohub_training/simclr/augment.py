"""The augmentations of the paper's Appendix C, batched on tensors (CPU or GPU).

Per image, in SimCLR's order: a random resized crop of 1-100% of the area, a rotation by
0/90/180/270 degrees (25% each), horizontal and vertical flips (p = 0.5 each), colour
jitter (brightness, contrast, saturation, hue in a random order; applied with probability
``jitter_p``), optional grayscale, and Gaussian blur (p = 0.5, sigma ~ U[0.1, 2], kernel 10%
of the side). Every option can be switched off.

Crop, rotation and flips are one affine sampling grid per image and a single
``grid_sample`` for the batch (with the full crop, rotations and flips are exact pixel
permutations). Colour jitter and blur take per-image parameters as tensors, so one call
augments a whole ``(B, 3, H, W)`` batch. Random numbers come from a CPU
``torch.Generator``, so a seed gives the same views on any device and any worker count.

Colour jitter strengths (Appendix C): light (0.4, 0.4, 0.4, 0.2), medium (0.8, 0.8, 0.8,
0.2), heavy: the paper prints three numbers, "(0.8, 0.8, 0.4)"; we read heavy as
(0.8, 0.8, 0.8, 0.4), i.e. medium with twice the hue change, since brightness, contrast and
saturation are already 0.8 in medium and hue is the only property left to strengthen.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

JITTER_STRENGTHS = {
    "light": (0.4, 0.4, 0.4, 0.2),
    "medium": (0.8, 0.8, 0.8, 0.2),
    "heavy": (0.8, 0.8, 0.8, 0.4),
}
_GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
_PERMUTATIONS = list(itertools.permutations(range(4)))


def jitter_strength(jitter: str | Sequence[float] | None) -> tuple[float, ...] | None:
    """``"light" | "medium" | "heavy" | (b, c, s, h) | None`` -> (b, c, s, h) or None."""
    if jitter is None or jitter is False or jitter == "none":
        return None
    if isinstance(jitter, str):
        if jitter not in JITTER_STRENGTHS:
            raise ValueError(f"jitter={jitter!r}: choose {sorted(JITTER_STRENGTHS)}, four "
                             "numbers (brightness, contrast, saturation, hue) or null")
        return JITTER_STRENGTHS[jitter]
    values = tuple(float(v) for v in jitter)
    if len(values) != 4 or min(values) < 0 or values[3] > 0.5:
        raise ValueError(f"jitter={jitter!r}: four non-negative numbers, hue at most 0.5")
    return values


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) float -> (B, 1, H, W) luma."""
    r, g, b = x.unbind(1)
    return (_GRAY[0] * r + _GRAY[1] * g + _GRAY[2] * b).unsqueeze(1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Per-image brightness: (B, 3, H, W) in [0, 1], factor (B,)."""
    return (x * factor.view(-1, 1, 1, 1)).clamp_(0, 1)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend each image with its mean luma (as torchvision's adjust_contrast)."""
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * mean).clamp_(0, 1)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend each image with its grayscale version (as torchvision's adjust_saturation)."""
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * grayscale(x)).clamp_(0, 1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate each image's hue by ``shift`` (B,) turns in [-0.5, 0.5]; S and V are kept.

    The HSV round trip in closed form: with M = max, C = max - min and the hue h in
    sextants, channel n of (R, G, B) becomes M - C clamp(min(k, 4 - k), 0, 1),
    k = (n' + h) mod 6 for n' = 5, 3, 1 (equal to torchvision's adjust_hue).
    """
    maxc = x.amax(dim=1)
    chroma = maxc - x.amin(dim=1)
    r, g, b = x.unbind(1)
    sextant = torch.where(r == maxc, g - b,
                          torch.where(g == maxc, (b - r).add_(chroma, alpha=2),
                                      (r - g).add_(chroma, alpha=4)))
    sextant.div_(chroma.clamp_min(1e-12)).add_(6.0 * shift.view(-1, 1, 1))
    offsets = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    # min(k, 4 - k) = 2 - |k - 2|; everything in place on one (B, 3, H, W) buffer
    weight = sextant.unsqueeze(1) + offsets
    weight.remainder_(6.0).sub_(2.0).abs_().neg_().add_(2.0).clamp_(0, 1)
    return weight.mul_(chroma.unsqueeze(1)).neg_().add_(maxc.unsqueeze(1))


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Per-image Gaussian blur with reflect padding: (B, C, H, W), sigma (B,)."""
    batch, channels, height, width = x.shape
    half = (kernel_size - 1) / 2
    grid = torch.linspace(-half, half, kernel_size, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (grid.view(1, -1) / sigma.view(-1, 1)) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)
    pad = kernel_size // 2
    flat = x.reshape(1, batch * channels, height, width)
    flat = F.pad(flat, (pad, pad, pad, pad), mode="reflect")
    flat = F.conv2d(flat, kernel.view(-1, 1, 1, kernel_size), groups=batch * channels)
    flat = F.conv2d(flat, kernel.view(-1, 1, kernel_size, 1), groups=batch * channels)
    return flat.view(batch, channels, height, width)


def blur_kernel_size(side: int, fraction: float) -> int:
    """An odd kernel of about ``fraction`` of the side (torchvision needs odd sizes)."""
    return max(3, int(round(fraction * side)) // 2 * 2 + 1)


class BatchAugment:
    """Random views of a batch: uint8 or float (B, 3, H, W) -> float (B, 3, S, S) in [0, 1].

    ``size``: output side S. Options switch each augmentation off with 0 / False / None.
    Call with a ``torch.Generator`` (CPU) for reproducible views. ``chunk``: on the CPU the
    colour steps run on a few images at a time, which keeps them in cache (2-3x faster).
    """

    def __init__(self, size: int, *, crop_min_area: float | None = 0.01,
                 crop_ratio: tuple[float, float] = (3 / 4, 4 / 3), rotate: bool = True,
                 hflip_p: float = 0.5, vflip_p: float = 0.5,
                 jitter: str | Sequence[float] | None = "medium", jitter_p: float = 0.8,
                 grayscale_p: float = 0.0, blur_p: float = 0.5,
                 blur_sigma: tuple[float, float] = (0.1, 2.0),
                 blur_kernel_fraction: float = 0.1, chunk: int = 4) -> None:
        if crop_min_area is not None and not 0 < crop_min_area <= 1:
            raise ValueError(f"crop_min_area={crop_min_area}: a fraction in (0, 1], or None")
        for name, p in (("hflip_p", hflip_p), ("vflip_p", vflip_p), ("jitter_p", jitter_p),
                        ("grayscale_p", grayscale_p), ("blur_p", blur_p)):
            if not 0 <= p <= 1:
                raise ValueError(f"{name}={p}: a probability in [0, 1]")
        if not 0 < blur_sigma[0] <= blur_sigma[1]:
            raise ValueError(f"blur_sigma={blur_sigma}: 0 < low <= high")
        self.size = size
        self.crop_min_area = crop_min_area
        self.log_ratio = (math.log(crop_ratio[0]), math.log(crop_ratio[1]))
        self.rotate = rotate
        self.hflip_p, self.vflip_p = hflip_p, vflip_p
        self.jitter = jitter_strength(jitter)
        self.jitter_p = jitter_p if self.jitter else 0.0
        self.grayscale_p = grayscale_p
        self.blur_p = blur_p
        self.blur_sigma = blur_sigma
        self.blur_kernel = blur_kernel_size(size, blur_kernel_fraction)
        self.chunk = chunk

    @classmethod
    def from_config(cls, config, size: int) -> BatchAugment:
        """From a :class:`~simclr.config.AugmentConfig`."""
        return cls(size, crop_min_area=config.crop_min_area or None, rotate=config.rotate,
                   hflip_p=config.hflip_p, vflip_p=config.vflip_p, jitter=config.jitter,
                   jitter_p=config.jitter_p, grayscale_p=config.grayscale_p,
                   blur_p=config.blur_p, blur_sigma=tuple(config.blur_sigma),
                   blur_kernel_fraction=config.blur_kernel_fraction)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"Expected (B, 3, H, W) images, got {tuple(images.shape)}")
        n, _, height, width = images.shape
        params = self.sample(n, height, width, generator)
        if images.device.type == "cpu":
            views = self._geometry_cpu(images, params)
        else:
            views = self._geometry_grid(images, params)
        return self._colour(views, params)

    def two_views(self, images: torch.Tensor, generator: torch.Generator | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Two independent views of the same batch (SimCLR's positive pairs)."""
        return self(images, generator), self(images, generator)

    # -- random parameters (always drawn on the CPU) ---------------------------------------

    def sample(self, n: int, height: int, width: int, generator=None) -> dict[str, torch.Tensor]:
        """Per-image parameters: crop boxes, turns, flips, jitter, grayscale, blur."""
        def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
            return torch.rand(*shape, generator=generator) * (high - low) + low

        b, c, s, h = self.jitter or (0.0, 0.0, 0.0, 0.0)
        return {
            "boxes": self._crop_boxes(n, height, width, generator),
            "turns": (torch.randint(0, 4, (n,), generator=generator) if self.rotate
                      else torch.zeros(n, dtype=torch.long)),
            "hflip": torch.rand(n, generator=generator) < self.hflip_p,
            "vflip": torch.rand(n, generator=generator) < self.vflip_p,
            "jitter": torch.rand(n, generator=generator) < self.jitter_p,
            "factors": torch.stack([uniform(max(0.0, 1 - b), 1 + b, n),
                                    uniform(max(0.0, 1 - c), 1 + c, n),
                                    uniform(max(0.0, 1 - s), 1 + s, n),
                                    uniform(-h, h, n)], dim=1),
            "order": torch.argsort(torch.rand(n, 4, generator=generator), dim=1),
            "gray": torch.rand(n, generator=generator) < self.grayscale_p,
            "blur": torch.rand(n, generator=generator) < self.blur_p,
            "sigma": uniform(*self.blur_sigma, n),
        }

    def _crop_boxes(self, n: int, height: int, width: int, generator) -> torch.Tensor:
        """(n, 4) integer crops (left, top, w, h): torchvision's RandomResizedCrop sampling."""
        boxes = torch.tensor([[0, 0, width, height]]).repeat(n, 1)
        if self.crop_min_area is None:
            return boxes
        tries = 10
        area = (torch.rand(n, tries, generator=generator) * (1 - self.crop_min_area)
                + self.crop_min_area) * height * width
        log_ratio = (torch.rand(n, tries, generator=generator)
                     * (self.log_ratio[1] - self.log_ratio[0]) + self.log_ratio[0])
        w = torch.sqrt(area * torch.exp(log_ratio)).round().long()
        h = torch.sqrt(area / torch.exp(log_ratio)).round().long()
        fits = (w > 0) & (h > 0) & (w <= width) & (h <= height)
        first = fits.int().argmax(1)  # the first attempt that fits, as torchvision takes
        rows = torch.arange(n)
        cw, ch = w[rows, first], h[rows, first]
        pos = torch.rand(n, 2, generator=generator)
        left = (pos[:, 0] * (width - cw + 1)).long().clamp(max=width - cw)
        top = (pos[:, 1] * (height - ch + 1)).long().clamp(max=height - ch)
        crops = torch.stack([left, top, cw, ch], dim=1)
        return torch.where(fits.any(1).view(-1, 1), crops, boxes)  # else: the whole image

    # -- geometry: crop + resize, rotation, flips ------------------------------------------

    def _geometry_cpu(self, images: torch.Tensor, params: dict) -> torch.Tensor:
        """Per image: slice the crop, resize (uint8 fast path, antialiased), rot90, flip."""
        out = []
        for i, (left, top, w, h) in enumerate(params["boxes"].tolist()):
            view = images[i:i + 1, :, top:top + h, left:left + w]
            if (h, w) != (self.size, self.size):
                view = F.interpolate(view if view.dtype == torch.uint8 else view.float(),
                                     size=(self.size, self.size), mode="bilinear",
                                     antialias=True, align_corners=False)
            turns = int(params["turns"][i])
            if turns:
                view = torch.rot90(view, turns, dims=(2, 3))
            flips = [d for d, on in ((3, params["hflip"][i]), (2, params["vflip"][i])) if on]
            if flips:
                view = torch.flip(view, flips)
            out.append(view)
        return torch.cat(out)

    def _geometry_grid(self, images: torch.Tensor, params: dict) -> torch.Tensor:
        """One affine grid per image and a single ``grid_sample`` (fast on GPUs).

        Output (u, v) in [-1, 1]^2 maps to the input's normalised coordinates
        centre + diag(w/W, h/H) @ rotation(turns) @ diag(flip_x, flip_y) @ (u, v).
        """
        n, _, height, width = images.shape
        x = images.float().div_(255) if images.dtype == torch.uint8 else images.float()
        boxes = params["boxes"].float()
        turns = params["turns"]
        cos = torch.tensor([1.0, 0.0, -1.0, 0.0])[turns]
        sin = torch.tensor([0.0, 1.0, 0.0, -1.0])[turns]  # torch.rot90 direction
        fx = 1.0 - 2.0 * params["hflip"].float()
        fy = 1.0 - 2.0 * params["vflip"].float()
        sx, sy = boxes[:, 2] / width, boxes[:, 3] / height
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 1] = sx * cos * fx, -sx * sin * fy
        theta[:, 1, 0], theta[:, 1, 1] = sy * sin * fx, sy * cos * fy
        theta[:, 0, 2] = (2 * boxes[:, 0] + boxes[:, 2]) / width - 1
        theta[:, 1, 2] = (2 * boxes[:, 1] + boxes[:, 3]) / height - 1
        grid = F.affine_grid(theta.to(x.device), [n, 3, self.size, self.size],
                             align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border",
                             align_corners=False)

    # -- colour: jitter (random order per image), grayscale, blur --------------------------

    def _colour(self, views: torch.Tensor, params: dict) -> torch.Tensor:
        """Float (B, 3, S, S) in [0, 1]; images sharing a jitter order are done together."""
        n = views.shape[0]
        out = torch.empty(views.shape, dtype=torch.float32, device=views.device)
        codes = params["order"] @ torch.tensor([64, 16, 4, 1])
        codes[~params["jitter"]] = -1
        chunk = self.chunk if views.device.type == "cpu" else n
        for code in torch.unique(codes).tolist():
            rows = torch.nonzero(codes == code).flatten()
            for part in rows.split(chunk):
                index = part.to(views.device)
                x = views.index_select(0, index)
                x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
                if code >= 0:
                    x = self._jitter(x, params["factors"][part].to(x.device),
                                     params["order"][part[0]].tolist())
                x = self._grayscale(x, params["gray"][part])
                x = self._blur(x, params["blur"][part], params["sigma"][part])
                out.index_copy_(0, index, x)
        return out

    def _jitter(self, x: torch.Tensor, factors: torch.Tensor, order: list[int]) -> torch.Tensor:
        for op in order:
            if self.jitter[op] > 0:
                x = _JITTER_OPS[op](x, factors[:, op])
        return x

    def _grayscale(self, x: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        if not chosen.any():
            return x
        chosen = chosen.to(x.device).view(-1, 1, 1, 1)
        return torch.where(chosen, grayscale(x).expand_as(x), x)

    def _blur(self, x: torch.Tensor, chosen: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if not chosen.any():
            return x
        rows = torch.nonzero(chosen).flatten()
        index = rows.to(x.device)
        blurred = gaussian_blur(x.index_select(0, index), sigma[rows].to(x.device, x.dtype),
                                self.blur_kernel)
        return x.index_copy(0, index, blurred.clamp_(0, 1))
