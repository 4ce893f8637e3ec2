"""Batched on-device image ops. Inputs are uint8 NHWC batches straight from the loader.

The float pipeline matches the Hugging Face DINOv3 image processor (rescale to [0, 1] → bilinear resize
→ ImageNet normalization) so that a pretrained backbone sees what it saw in pretraining, but runs on
whole batches on the model's device instead of per sample on the CPU. The colour jitter is torchvision's
`ColorJitter` (the same four ops, factor ranges and random op order), applied per image to a batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NUM_DIHEDRAL = 8

# Test-time augmentation view sets, as indices into `dihedral`. 6 is the reference protocol's set:
# identity, horizontal flip, vertical flip, rot90, rot180, rot270 (no transpose / anti-transpose).
TTA_VIEWS: dict[int, tuple[int, ...]] = {1: (0,), 6: (0, 4, 5, 1, 2, 3), 8: tuple(range(NUM_DIHEDRAL))}

# torchvision's luma weights (rgb_to_grayscale), used by contrast and saturation.
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """Element k of the dihedral group D4 on the last two dims of an (..., H, W) batch.

    0 identity, 1-3 rotations by 90/180/270°, 4 horizontal flip, 5 vertical flip, 6 transpose,
    7 anti-transpose.
    """
    if k < 4:
        return torch.rot90(x, k, dims=(-2, -1))
    if k == 4:
        return torch.flip(x, dims=(-1,))
    if k == 5:
        return torch.flip(x, dims=(-2,))
    if k == 6:
        return x.transpose(-2, -1)
    if k == 7:
        return torch.rot90(x, 2, dims=(-2, -1)).transpose(-2, -1)
    raise ValueError(f"dihedral index must be in 0..7, got {k}")


def check_tta_views(views: int) -> int:
    if views not in TTA_VIEWS:
        raise ValueError(f"eval.tta_views must be one of {sorted(TTA_VIEWS)}, got {views!r}")
    return views


def dihedral_views(x: torch.Tensor, views: int = NUM_DIHEDRAL) -> torch.Tensor:
    """The TTA views of an NCHW batch, stacked view-major: (V·N, C, H, W), view v at [v·N:(v+1)·N]."""
    return torch.cat([dihedral(x, k) for k in TTA_VIEWS[check_tta_views(views)]])


def random_dihedral(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image of an NCHW batch gets its own random D4 element (8 masked ops, not N)."""
    # Indices are drawn and grouped on the host, so no step here waits for the device.
    ks = torch.randint(0, NUM_DIHEDRAL, (x.shape[0],), generator=generator)
    out = torch.empty_like(x)
    for k in range(NUM_DIHEDRAL):
        idx = (ks == k).nonzero().squeeze(1)
        if len(idx):
            idx = idx.to(x.device, non_blocking=True)
            out.index_copy_(0, idx, dihedral(x.index_select(0, idx), k))
    return out


# ---------------------------------------------------------------- colour jitter
# Each op takes a float NCHW batch in [0, 1] and per-image factors of shape (N, 1, 1, 1), and follows
# torchvision.transforms.v2.functional.adjust_* for float images: blend, then clamp to [0, 1].


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (x * factor + other * (1.0 - factor)).clamp_(0.0, 1.0)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(dim=1)
    return (r * GRAY_WEIGHTS[0] + g * GRAY_WEIGHTS[1] + b * GRAY_WEIGHTS[2]).unsqueeze(1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (x * factor).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the image's grey-level mean (a scalar per image)."""
    return _blend(x, _grayscale(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, _grayscale(x), factor)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    # torchvision's formulation (after Pillow), vectorised over the batch.
    r, g, _ = x.unbind(dim=1)
    minc, maxc = torch.aminmax(x, dim=1)
    eqc = maxc == minc
    ones = torch.ones_like(maxc)
    span = maxc - minc
    s = span / torch.where(eqc, ones, maxc)
    divisor = torch.where(eqc, ones, span).unsqueeze(1)
    rc, gc, bc = ((maxc.unsqueeze(1) - x) / divisor).unbind(dim=1)
    max_is_r = maxc == r
    max_is_g = (maxc == g) & ~max_is_r
    max_is_b = ~max_is_r & ~max_is_g
    h = (bc - gc) * max_is_r + (2.0 + rc - bc) * max_is_g + (4.0 + gc - rc) * max_is_b
    h = (h / 6.0 + 1.0).fmod(1.0)
    return torch.stack((h, s, maxc), dim=1)


_HSV_SELECT = ((0, 2, 1, 1, 3, 0), (3, 0, 0, 2, 1, 1), (1, 1, 3, 0, 0, 2))  # sector → (v, p, q, t) per channel


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(dim=1)
    h6 = h * 6
    i = torch.floor(h6)
    f = h6 - i
    i = i.to(torch.int64).remainder(6)
    q = ((1.0 - s * f) * v).clamp(0.0, 1.0)
    t = ((1.0 - s + s * f) * v).clamp(0.0, 1.0)
    p = ((1.0 - s) * v).clamp(0.0, 1.0)
    vpqt = torch.stack((v, p, q, t), dim=1)
    select = torch.tensor(_HSV_SELECT, device=x.device)[:, i].movedim(0, 1)  # (N, 3, H, W)
    return vpqt.gather(1, select)


def adjust_hue(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by `factor` ∈ [-0.5, 0.5] of a full turn (through HSV, as torchvision does)."""
    hsv = _rgb_to_hsv(x)
    h = (hsv[:, :1] + factor).remainder(1.0)
    return _hsv_to_rgb(torch.cat([h, hsv[:, 1:]], dim=1))


_ADJUST = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


@dataclass(frozen=True)
class ColorJitter:
    """torchvision's `ColorJitter(brightness, contrast, saturation, hue)`, per image of a batch.

    Factors are uniform in [max(0, 1 − s), 1 + s] for brightness/contrast/saturation and in [−hue, hue]
    for hue; each image applies the four ops in its own random order. A strength of 0 skips the op."""

    brightness: float
    contrast: float
    saturation: float
    hue: float

    def __post_init__(self) -> None:
        for name in JITTER_OPS[:3]:
            if getattr(self, name) < 0:
                raise ValueError(f"data.jitter.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.hue <= 0.5:
            raise ValueError(f"data.jitter.hue must lie in [0, 0.5], got {self.hue}")

    @classmethod
    def from_config(cls, jitter_cfg: Mapping[str, Any] | None) -> ColorJitter | None:
        """From `data.jitter`; None (no jitter) when the node is null."""
        if jitter_cfg is None:
            return None
        return cls(**{name: float(jitter_cfg[name]) for name in JITTER_OPS})

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(factors (N, 4) in JITTER_OPS order, order (N, 4): a random permutation of 0..3 per image)."""
        u = torch.rand(n, len(JITTER_OPS), generator=generator, dtype=torch.float64)
        lows = torch.tensor([max(0.0, 1 - self.brightness), max(0.0, 1 - self.contrast),
                             max(0.0, 1 - self.saturation), -self.hue], dtype=torch.float64)
        highs = torch.tensor([1 + self.brightness, 1 + self.contrast, 1 + self.saturation, self.hue],
                             dtype=torch.float64)
        factors = (lows + u * (highs - lows)).float()
        order = torch.rand(n, len(JITTER_OPS), generator=generator).argsort(dim=1)
        return factors, order

    @property
    def active(self) -> tuple[bool, ...]:
        return tuple(getattr(self, name) > 0 for name in JITTER_OPS)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Jitter a float NCHW batch in [0, 1]; factors and order are drawn on the host."""
        factors, order = self.sample(x.shape[0], generator)
        return apply_color_jitter(x, factors, order, self.active)


def apply_color_jitter(
    x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor, active: tuple[bool, ...] = (True,) * 4
) -> torch.Tensor:
    """Apply the jitter ops to each image of `x` with its own factors (N, 4) and op order (N, 4).

    Position by position, each op runs once on the images that have it at that position, so every
    image goes through each op exactly once (4 op calls per position, not N). `factors` and `order`
    live on the host; only the selected indices and factors are sent to the device."""
    out = x
    for position in range(order.shape[1]):
        for op, (adjust, on) in enumerate(zip(_ADJUST, active, strict=True)):
            if not on:
                continue
            idx = (order[:, position] == op).nonzero().squeeze(1)
            if not len(idx):
                continue
            factor = factors[idx, op].view(-1, 1, 1, 1).to(x.device, x.dtype, non_blocking=True)
            idx = idx.to(x.device, non_blocking=True)
            out = out.index_copy(0, idx, adjust(out.index_select(0, idx), factor))
    return out


# ---------------------------------------------------------------- resize, normalize, assemble


def to_float(x_uint8_nhwc: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 NHWC → float NCHW in [0, 1]."""
    return x_uint8_nhwc.permute(0, 3, 1, 2).to(dtype) / 255.0


def resize_normalize(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """Bilinear resize (half-pixel centers, like the HF processor) and ImageNet normalization."""
    if x.shape[-1] != resolution or x.shape[-2] != resolution:
        # The HF processor antialiases; that only changes anything when shrinking (< 4e-6 when enlarging
        # PCam's 96 px to 224) and costs 2.7x on a CPU, so enlarging skips it.
        shrink = resolution < max(x.shape[-2:])
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=shrink)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def preprocess(
    images: torch.Tensor,
    resolution: int,
    augment: bool = False,
    generator: torch.Generator | None = None,
    jitter: ColorJitter | None = None,
) -> torch.Tensor:
    """The whole training/eval input transform for a uint8 NHWC batch already on its device.

    augment: a random dihedral element per image, then `jitter` (if given), as the reference's
    flips + rot90 + ColorJitter."""
    x = to_float(images)
    if augment:
        # Dihedral moves and jitter act on the 96 px patch, before the (larger) resize: ~5x fewer pixels.
        x = random_dihedral(x, generator)
        if jitter is not None:
            x = jitter(x, generator)
    return resize_normalize(x, resolution)


def tta_views(images: torch.Tensor, resolution: int, views: int = NUM_DIHEDRAL) -> torch.Tensor:
    """The TTA views of a uint8 NHWC batch, preprocessed for the model: (views·N, 3, R, R)."""
    return resize_normalize(dihedral_views(to_float(images), views), resolution)
