"""Batched inference: positive-class probabilities for a split, averaged over the TTA views (1, 6 or 8)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pcamx.data.device_loader import to_device
from pcamx.data.pcam import PCamSplit
from pcamx.data.transforms import check_tta_views, tta_views
from pcamx.evaluation.metrics import binary_metrics
from pcamx.runtime.hardware import autocast

# On a CPU, big forwards are slower per image than small ones (cache-bound attention and GEMMs):
# measured 2.2-2.5 vs 2.8-2.9 images/s for ViT-S/16 TTA on 2 cores (docs/benchmarks.md). Accelerators
# get the whole multi-view batch in one forward.
CPU_FORWARD_ROWS = 16


def view_count(eval_cfg: Mapping[str, Any], validation: bool = False) -> int:
    """The TTA views a test (or, with `validation`, a validation) pass uses: `eval.tta_views` when
    `eval.tta` (`eval.val_tta`) is on, else 1. `eval.tta=false` is the same as `eval.tta_views=1`."""
    views = check_tta_views(int(eval_cfg["tta_views"]))
    return views if eval_cfg["val_tta" if validation else "tta"] else 1


@torch.inference_mode()
def predict_batch(
    model: nn.Module, images: torch.Tensor, resolution: int, views: int = 1, precision: str = "fp32"
) -> torch.Tensor:
    """P(tumor) for a uint8 NHWC batch on the model's device: the mean of the softmax probabilities over
    `views` TTA views (1 = no TTA, 6 = the reference's set, 8 = the dihedral group), in one forward."""
    n = images.shape[0]
    x = tta_views(images, resolution, views)
    x = x.to(next(model.parameters()).dtype)
    rows = CPU_FORWARD_ROWS if images.device.type == "cpu" else len(x)
    with autocast(images.device, precision):
        logits = torch.cat([model(chunk).float() for chunk in x.split(rows)])
    probs = torch.softmax(logits, dim=-1)[:, 1]
    # Views are stacked view-major, so row v·n + i is view v of image i.
    return probs.view(views, n).mean(dim=0)


def predict(
    model: nn.Module,
    split: PCamSplit,
    device: torch.device,
    batch_size: int,
    resolution: int,
    views: int = 1,
    precision: str = "fp32",
    desc: str = "eval",
) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probs) for the whole split, in file order."""
    was_training = model.training
    model.eval()
    probs = []
    batches = to_device(split.batches(batch_size), device)
    for images, _ in tqdm(batches, total=split.num_batches(batch_size), desc=desc, disable=None, leave=False):
        probs.append(predict_batch(model, images, resolution, views, precision))
    # One host sync at the end instead of one per batch.
    model.train(was_training)
    return split.labels.numpy().copy(), torch.cat(probs).cpu().double().numpy()


def evaluate(model: nn.Module, split: PCamSplit, device: torch.device, cfg: Mapping[str, Any], precision: str,
             desc: str = "test") -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """(labels, probs, metrics) of a split with the test-time views of `eval`, under autocast at `precision`."""
    labels, probs = predict(model, split, device, cfg["data"]["eval_batch_size"], cfg["data"]["resolution"],
                            views=view_count(cfg["eval"]), precision=precision, desc=desc)
    return labels, probs, binary_metrics(labels, probs)
