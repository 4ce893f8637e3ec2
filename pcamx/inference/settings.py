"""A saved model ready to use outside a run: the checkpoint's weights, how the run fed and ran it (resolution,
TTA views, precision, quantization) and the operating points chosen on its validation split.

Every checkpoint pcamx writes records both (`inference` and `operating_points`: `.pt` payload keys, and the
`extra` of a compressed checkpoint's architecture.json). A checkpoint written before they were recorded takes
its settings from the run's resolved_config.yaml beside it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from pcamx.checkpoint import INFERENCE_KEY, OPERATING_POINTS_KEY, CheckpointError, load_checkpoint
from pcamx.compress.quant import QUANT_MODES, quantize
from pcamx.data.transforms import check_tta_views
from pcamx.model import PCamClassifier
from pcamx.runtime import run_files
from pcamx.runtime.hardware import check_precision


@dataclass(frozen=True)
class InferenceSettings:
    """How a model turns uint8 patches into P(tumor): the input resolution (patches are resized to it as in
    training), the TTA views averaged, the autocast precision of an unquantized model, the quantization, and the
    µm per pixel of the patches it was trained on (what pcamx.wsi reads slides at; None: not recorded)."""

    resolution: int
    tta_views: int
    precision: str = "fp32"
    quant: str = "none"
    mpp: float | None = None

    def __post_init__(self) -> None:
        if self.resolution < 1:
            raise ValueError(f"resolution must be a positive number of pixels, got {self.resolution}")
        check_tta_views(self.tta_views)
        check_precision(self.precision, "precision")
        if self.quant not in QUANT_MODES:
            raise ValueError(f"quantization must be one of {', '.join(QUANT_MODES)}, got {self.quant!r}")

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> InferenceSettings:
        """The settings a run's test evaluation used (its resolved config). A quantized model runs in its own
        dtype, so its precision is fp32 (no autocast on top)."""
        from pcamx.evaluation.evaluate import view_count

        quant = str(config["quant"]["mode"])
        precision = "fp32" if quant != "none" else str(config["eval"]["precision"])
        return cls(int(config["data"]["resolution"]), view_count(config["eval"]), precision, quant,
                   config["data"].get("mpp"))

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> InferenceSettings:
        return cls(int(record["resolution"]), int(record["tta_views"]), str(record.get("precision", "fp32")),
                   str(record.get("quant", "none")), record.get("mpp"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def override(self, **changes: Any) -> InferenceSettings:
        """These settings with every change that is not None."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


@dataclass
class LoadedModel:
    """A classifier on its device (quantized as its settings say) and what travels with it."""

    model: PCamClassifier
    settings: InferenceSettings
    operating_points: dict[str, Any] | None  # see pcamx.evaluation.operating_points.operating_points
    source: dict[str, Any]  # where it came from (load_checkpoint's description)
    device: torch.device


def stored_settings(source: Mapping[str, Any]) -> tuple[InferenceSettings, dict[str, Any] | None]:
    """(inference settings, operating points) that a loaded checkpoint carries (`load_checkpoint`'s
    description of it), or, for one written before they were recorded, its run's resolved_config.yaml."""
    points = source.get(OPERATING_POINTS_KEY)
    if source.get(INFERENCE_KEY):
        return InferenceSettings.from_dict(source[INFERENCE_KEY]), points
    path = Path(source["path"])
    run_config = path.parent / run_files.RESOLVED_CONFIG
    if not run_config.is_file():
        raise CheckpointError(
            f"{path} does not record the resolution and TTA views it was trained and tested with, and no "
            f"{run_files.RESOLVED_CONFIG} lies beside it in {run_config.parent}; copy the run's "
            f"{run_files.RESOLVED_CONFIG} there, or give the settings yourself (--resolution, --tta-views)"
        )
    try:
        config = yaml.safe_load(run_config.read_text())
        return InferenceSettings.from_run_config(config), points
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError) as err:
        raise CheckpointError(f"{run_config} could not be read as a pcamx run config ({type(err).__name__}: "
                              f"{err})") from None


def settings_with(source: Mapping[str, Any], **overrides: Any) -> tuple[InferenceSettings, dict[str, Any] | None]:
    """A loaded checkpoint's (settings, operating points), with `overrides` (resolution, tta_views, precision,
    quant; None keeps the stored value) on top. A checkpoint that records no settings needs at least
    resolution and tta_views."""
    try:
        stored, points = stored_settings(source)
    except CheckpointError:
        if overrides.get("resolution") is None or overrides.get("tta_views") is None:
            raise
        stored, points = InferenceSettings(overrides["resolution"], overrides["tta_views"]), None
    settings = stored.override(**overrides)
    if settings.quant != "none" and settings.precision != "fp32":
        settings = replace(settings, precision="fp32")  # a quantized model runs in its own dtype
    return settings, points


def load_for_inference(checkpoint: str | Path, device: torch.device | str = "cpu",
                       **overrides: Any) -> LoadedModel:
    """The checkpoint's classifier in eval mode on `device`, quantized as its settings (with `overrides`,
    see `settings_with`) say. The checkpoint is read once."""
    device = torch.device(device)
    model, source = load_checkpoint(checkpoint, {})
    settings, points = settings_with(source, **overrides)
    return LoadedModel(quantize(model.eval(), settings.quant, device), settings, points, source, device)
