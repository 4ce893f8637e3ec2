"""Scoring patches with a loaded model: P(tumour) of a stream of uint8 batches, the CSV of what was scored, and
what a record of it says about the model (the data it was trained on, whether its thresholds fit these
settings). `pcamx.predict` (patches, regions) and `pcamx.wsi` (slides) share it."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pcamx.evaluation.evaluate import predict_batch
from pcamx.evaluation.operating_points import THRESHOLD_RULES
from pcamx.inference.inputs import Batch
from pcamx.inference.settings import InferenceSettings, LoadedModel
from pcamx.runtime import disk, run_files

SYNTHETIC_NOTE = "model trained on the synthetic stand-in, not PCam"


@dataclass
class Predictions:
    sources: list[str]
    indices: list[int]
    probs: np.ndarray


def as_patches(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 NHWC tiles of another size made `size`-px patches as a stored patch is (antialiased bilinear,
    rounded to uint8), on their device; tiles of that size are returned as they are."""
    if images.shape[1] == images.shape[2] == size:
        return images
    x = F.interpolate(images.permute(0, 3, 1, 2).float(), size=(size, size), mode="bilinear", align_corners=False,
                      antialias=True)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def scored(loaded: LoadedModel, stream: Iterable[Batch],
           patch: int | None = None) -> Iterator[tuple[Batch, torch.Tensor]]:
    """(batch, P(tumour) of its patches) for each batch of `stream`, as the loaded model's settings say;
    with `patch`, tiles are first made `patch`-px patches on the device (`as_patches`)."""
    s = loaded.settings
    for batch in stream:
        images = batch.images.to(loaded.device, non_blocking=True)
        if patch is not None:
            images = as_patches(images, patch)
        yield batch, predict_batch(loaded.model, images, s.resolution, s.tta_views, s.precision)


def predict_all(loaded: LoadedModel, stream: Iterable[Batch], total: int | None = None,
                desc: str = "predict") -> Predictions:
    """P(tumour) of every patch in `stream`, in order, as the loaded model's settings say."""
    sources: list[str] = []
    indices: list[int] = []
    probs = []
    with tqdm(total=total, desc=desc, unit="patch", disable=None, leave=False) as bar:
        for batch, p in scored(loaded, stream):
            probs.append(p)
            sources += batch.sources
            indices += batch.indices
            bar.update(len(batch.indices))
    return Predictions(sources, indices, finite(torch.cat(probs).cpu().double().numpy() if probs else np.empty(0)))


def finite(p: np.ndarray) -> np.ndarray:
    """`p`, checked: a model that predicts NaN/inf is not usable at these settings."""
    if not np.isfinite(p).all():
        raise RuntimeError(f"the model predicted NaN/inf for {int((~np.isfinite(p)).sum())} patches; the "
                           "checkpoint's weights are not usable at these settings (try --quant none --precision fp32)")
    return p


def write_csv(path: Path, preds: Predictions, threshold: float, extra: dict[str, Sequence[Any]] | None = None) -> Path:
    """source,index[,extra columns],prob,pred: one row per patch; pred = prob >= threshold."""
    extra = extra or {}
    lines = [",".join(["source", "index", *extra, "prob", "pred"])]
    columns = list(extra.values())
    for k, (source, index, p) in enumerate(zip(preds.sources, preds.indices, preds.probs, strict=True)):
        cells = [_csv_cell(source), str(index), *(str(c[k]) for c in columns), f"{p:.8f}", str(int(p >= threshold))]
        lines.append(",".join(cells))
    return disk.write_text(path, "\n".join(lines) + "\n")


def _csv_cell(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n') else text


def trained_on(loaded: LoadedModel) -> str | None:
    """The data the model's run reported (its metrics.json), when the run directory is at hand."""
    path = Path(loaded.source["path"])
    for run_dir in (path.parent, path):
        try:
            return json.loads((run_dir / run_files.METRICS).read_text()).get("data")
        except (OSError, ValueError, AttributeError):
            continue
    return None


def threshold_note(points: Mapping[str, Any] | None, settings: InferenceSettings, name: str = "stored") -> str | None:
    """A warning when operating points (the `name` threshold; "stored": all of them) were chosen on validation
    probabilities made with other settings than `settings`."""
    measured = (points or {}).get("measured_with")
    if name == "0.5" or (name != "stored" and name not in THRESHOLD_RULES) or not measured:
        return None
    chosen = InferenceSettings.from_dict(measured)
    if chosen == settings:
        return None
    return (f"the {name} threshold was chosen on validation predictions made with {chosen.to_dict()}, but these "
            f"are made with {settings.to_dict()}; pass the matching --tta-views / --quant / --precision "
            "for exactly the validated operating point")
