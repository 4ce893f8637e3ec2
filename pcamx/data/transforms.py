"""Batched on-device image ops. Inputs are uint8 NHWC batches straight from the loader.

The float pipeline matches the Hugging Face DINOv3 image processor (rescale to [0, 1] → bilinear resize
→ ImageNet normalization) so that a pretrained backbone sees what it saw in pretraining, but runs on
whole batches on the model's device instead of per sample on the CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NUM_DIHEDRAL = 8


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


def dihedral_views(x: torch.Tensor) -> torch.Tensor:
    """All 8 views of an NCHW batch, stacked view-major: (8·N, C, H, W), view v at [v·N:(v+1)·N]."""
    return torch.cat([dihedral(x, k) for k in range(NUM_DIHEDRAL)])


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


def color_jitter(
    x: torch.Tensor,
    brightness: float = 0.1,
    contrast: float = 0.1,
    saturation: float = 0.1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Light per-image brightness/contrast/saturation jitter of a float NCHW batch in [0, 1]."""
    n = x.shape[0]

    def factors(strength: float) -> torch.Tensor:
        f = 1 + (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1) * strength
        return f.to(device=x.device, dtype=x.dtype)

    x = x * factors(brightness)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * factors(contrast) + mean
    gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    x = (x - gray) * factors(saturation) + gray
    return x.clamp(0, 1)


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
) -> torch.Tensor:
    """The whole training/eval input transform for a uint8 NHWC batch already on its device."""
    x = to_float(images)
    if augment:
        # Dihedral moves and jitter act on the 96 px patch, before the (larger) resize: ~5x fewer pixels.
        x = random_dihedral(x, generator)
        x = color_jitter(x, generator=generator)
    return resize_normalize(x, resolution)


def tta_views(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """The 8 dihedral views of a uint8 NHWC batch, preprocessed for the model: (8·N, 3, R, R)."""
    return resize_normalize(dihedral_views(to_float(images)), resolution)
