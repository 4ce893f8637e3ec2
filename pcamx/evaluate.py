"""Batched inference: positive-class probabilities for a split, optionally averaged over 8 dihedral views."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pcamx.data.pcam import PCamSplit
from pcamx.data.transforms import NUM_DIHEDRAL, preprocess, tta_views
from pcamx.hardware import autocast

# On a CPU, big forwards are slower per image than small ones (cache-bound attention and GEMMs):
# measured 2.2-2.5 vs 2.8-2.9 images/s for ViT-S/16 TTA on 2 cores (docs/benchmarks.md). Accelerators
# get the whole 8-view batch in one forward.
CPU_FORWARD_ROWS = 16


@torch.inference_mode()
def predict_batch(
    model: nn.Module, images: torch.Tensor, resolution: int, tta: bool, precision: str = "fp32"
) -> torch.Tensor:
    """P(tumor) for a uint8 NHWC batch on the model's device; TTA runs all 8 views in one forward."""
    n = images.shape[0]
    x = tta_views(images, resolution) if tta else preprocess(images, resolution)
    x = x.to(next(model.parameters()).dtype)
    rows = CPU_FORWARD_ROWS if images.device.type == "cpu" else len(x)
    with autocast(images.device, precision):
        logits = torch.cat([model(chunk).float() for chunk in x.split(rows)])
    probs = torch.softmax(logits, dim=-1)[:, 1]
    if tta:
        # Views are stacked view-major, so row v·n + i is view v of image i.
        probs = probs.view(NUM_DIHEDRAL, n).mean(dim=0)
    return probs


def predict(
    model: nn.Module,
    split: PCamSplit,
    device: torch.device,
    batch_size: int,
    resolution: int,
    tta: bool = True,
    precision: str = "fp32",
    desc: str = "eval",
) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probs) for the whole split, in file order."""
    was_training = model.training
    model.eval()
    probs = []
    for images, _ in tqdm(split.batches(batch_size), total=split.num_batches(batch_size), desc=desc,
                          disable=None, leave=False):
        images = images.to(device, non_blocking=True)
        probs.append(predict_batch(model, images, resolution, tta, precision).cpu())
    model.train(was_training)
    return split.labels.numpy().copy(), torch.cat(probs).double().numpy()
