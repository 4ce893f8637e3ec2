"""Start a run from a saved model: `checkpoint=PATH` (a run directory, a .pt file, or a compressed dir)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import DINOv3ViTConfig, DINOv3ViTModel

from pcamx.compress.spec import ARCHITECTURE_FILE, load_compressed
from pcamx.model import PCamClassifier

COMPRESSED_DIR = "compressed"
TRAIN_CHECKPOINTS = ("best.pt", "last.pt")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or was made for another model."""


def resolve_checkpoint(path: str | Path) -> Path:
    """The file or compressed directory that `path` stands for. A run directory prefers its compressed
    model (the end product of that run), then best.pt, then last.pt."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(
            f"checkpoint {path} does not exist; pass a run directory (outputs/<date>/<time>), "
            "its best.pt / last.pt, or its compressed/ directory"
        )
    if path.is_file():
        return path
    for candidate in (path, path / COMPRESSED_DIR):
        if (candidate / ARCHITECTURE_FILE).is_file():
            return candidate
    for name in TRAIN_CHECKPOINTS:
        if (path / name).is_file():
            return path / name
    raise CheckpointError(
        f"{path} holds no checkpoint: expected {' or '.join(TRAIN_CHECKPOINTS)} or "
        f"{COMPRESSED_DIR}/{ARCHITECTURE_FILE} (was the run trained with train.save_best=false?)"
    )


def _check_model(saved_name: str | None, model_cfg: Mapping[str, Any], where: Path) -> None:
    wanted = model_cfg.get("name")
    if saved_name and wanted and saved_name != wanted:
        raise CheckpointError(
            f"{where} holds a model={saved_name} checkpoint but this run is configured with model={wanted}; "
            f"add model={saved_name} to the command (or drop the model override)"
        )


def load_checkpoint(path: str | Path, model_cfg: Mapping[str, Any]) -> tuple[PCamClassifier, dict[str, Any]]:
    """The saved classifier (LoRA already merged, compressed architecture rebuilt exactly) and a
    description of where it came from, for metrics.json."""
    source = resolve_checkpoint(path)
    if source.is_dir():
        extra = json.loads((source / ARCHITECTURE_FILE).read_text()).get("extra") or {}
        _check_model(extra.get("model_name"), model_cfg, source)
        model = load_compressed(source)
        return model, {"path": str(source), "kind": "compressed", **extra}

    try:
        payload = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"could not read checkpoint {source}: {err}") from err
    if not isinstance(payload, dict) or "model" not in payload or "backbone_config" not in payload:
        raise CheckpointError(f"{source} is not a pcamx training checkpoint (no model / backbone_config)")
    _check_model(payload.get("model_name"), model_cfg, source)
    config = DINOv3ViTConfig.from_dict(payload["backbone_config"])
    backbone = DINOv3ViTModel(config)
    backbone.config._attn_implementation = "sdpa"
    model = PCamClassifier(backbone, config.hidden_size)
    try:
        model.load_state_dict(payload["model"], strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"weights in {source} do not fit its own architecture: {err}") from err
    info = {k: payload.get(k)
            for k in ("model_name", "method", "method_config", "train_precision", "step", "val_metrics")}
    return model.eval(), {"path": str(source), "kind": "train", **info}
