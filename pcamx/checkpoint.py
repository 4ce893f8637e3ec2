"""Checkpoints: verified save/read of `.pt` files, and `checkpoint=PATH` (a run directory, a .pt file, or a
compressed dir) as the start of a run.

Every `.pt` pcamx writes (best.pt, last.pt, resume.pt) carries the sha256 of its content (`sha256`: every
tensor's dtype, shape and bytes and every other value, in a fixed order), checked when it is read; a
compressed checkpoint records its weights' sha256 in architecture.json. A damaged file therefore fails with
a `CheckpointError` that names it, instead of loading plausible wrong weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import DINOv3ViTConfig

from pcamx.compress.spec import load_compressed, update_extra
from pcamx.model import PCamClassifier, build_classifier
from pcamx.runtime import disk, run_files
from pcamx.runtime.errors import UserError

log = logging.getLogger("pcamx")
DIGEST_KEY = "sha256"
# What travels with every model pcamx saves (`.pt` payload keys; a compressed checkpoint's architecture.json
# "extra"): its pcamx.inference.settings.InferenceSettings and the operating points chosen on validation.
INFERENCE_KEY = "inference"
OPERATING_POINTS_KEY = "operating_points"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_UNSUPPORTED = re.compile(r"(?:unsupported|Unsupported global:) GLOBAL ([\w.]+)")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, damaged, unreadable, or was made for another model."""


def _plain(err: BaseException) -> str:
    """An exception's message without terminal colour codes (torch's weights-only errors carry some)."""
    return _ANSI.sub("", f"{type(err).__name__}: {err}").strip()


def _feed(digest: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, np.ndarray):
        digest.update(f"N{obj.dtype}{obj.shape}".encode())
        digest.update(np.ascontiguousarray(obj).tobytes())
    elif isinstance(obj, Mapping):
        digest.update(b"{")
        for key in sorted(obj, key=str):
            digest.update(repr(key).encode())
            _feed(digest, obj[key])
        digest.update(b"}")
    elif isinstance(obj, list | tuple):
        digest.update(b"[")
        for item in obj:
            _feed(digest, item)
        digest.update(b"]")
    else:
        digest.update(repr(obj).encode())


def content_digest(payload: Mapping[str, Any]) -> str:
    """sha256 of a checkpoint's content (its `sha256` entry left out)."""
    digest = hashlib.sha256()
    _feed(digest, {k: v for k, v in payload.items() if k != DIGEST_KEY})
    return digest.hexdigest()


def save_checkpoint(payload: Mapping[str, Any], path: str | Path) -> Path:
    """Write `payload` atomically with its content digest."""
    return disk.torch_save({**payload, DIGEST_KEY: content_digest(payload)}, path)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a `.pt` written by `save_checkpoint` and check its digest; CheckpointError when it cannot be
    read or does not match. One without a digest (written before pcamx recorded them) loads unverified."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except pickle.UnpicklingError as err:
        found = _UNSUPPORTED.search(str(err))
        if found is None:  # torch's message for garbage suggests weights_only=False: never the way out here
            raise CheckpointError(f"{path} could not be read: it is damaged or is not a pcamx checkpoint. Use "
                                  "another checkpoint of the run (best.pt / last.pt / compressed/) or train "
                                  "again") from None
        raise CheckpointError(
            f"{path} holds Python objects other than tensors and plain values ({found.group(1)}), which pcamx "
            "never loads (loading them can run code): "
            "it was not written by this version of pcamx, or it was altered. Use a checkpoint pcamx wrote; for a "
            "resume.pt, start over with resume=false or a new hydra.run.dir") from None
    except Exception as err:
        raise CheckpointError(f"{path} could not be read ({_plain(err)}); the file is damaged or is not a "
                              "pcamx checkpoint") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path} does not hold a pcamx checkpoint (found a {type(payload).__name__})")
    recorded = payload.pop(DIGEST_KEY, None)
    if recorded is None:
        log.warning("%s has no content digest (written by an older pcamx): loaded without verification", path)
    elif content_digest(payload) != recorded:
        raise CheckpointError(f"{path} is damaged: its content no longer matches the sha256 recorded when it was "
                              "saved. Use another checkpoint of the run (best.pt / last.pt) or train again.")
    return payload


def record_operating_points(source: str | Path, points: Mapping[str, Any]) -> None:
    """Store a model's operating points in its checkpoint (a `.pt` file or a compressed directory), replacing
    those it held; the weights are untouched and the write is atomic."""
    source = Path(source)
    if source.is_dir():
        update_extra(source, **{OPERATING_POINTS_KEY: dict(points)})
        return
    payload = read_checkpoint(source)
    payload[OPERATING_POINTS_KEY] = dict(points)
    save_checkpoint(payload, source)


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
        if path.name == run_files.RESUME:
            raise CheckpointError(
                f"{path} is the resumable state of an unfinished training run, not a model to start from. "
                "To continue that run, rerun its command with hydra.run.dir set to its directory; to start "
                "from its weights, use its best.pt or last.pt once it has finished."
            )
        return path
    for candidate in (path, path / run_files.COMPRESSED):
        if (candidate / run_files.ARCHITECTURE).is_file():
            return candidate
    for name in run_files.TRAIN_CHECKPOINTS:
        if (path / name).is_file():
            return path / name
    raise CheckpointError(
        f"{path} holds no checkpoint: expected {' or '.join(run_files.TRAIN_CHECKPOINTS)} or "
        f"{run_files.COMPRESSED}/{run_files.ARCHITECTURE} (was the run trained with train.save_best=false?)"
    )


def _check_model(saved_name: str | None, model_cfg: Mapping[str, Any], where: Path) -> None:
    wanted = model_cfg.get("name")
    if saved_name and wanted and saved_name != wanted:
        raise CheckpointError(
            f"{where} holds a model={saved_name} checkpoint but this run is configured with model={wanted}; "
            f"add model={saved_name} to the command (or drop the model override)"
        )


def _load_compressed(source: Path, model_cfg: Mapping[str, Any]) -> tuple[PCamClassifier, dict[str, Any]]:
    try:
        extra = json.loads((source / run_files.ARCHITECTURE).read_text()).get("extra") or {}
    except (OSError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{source / run_files.ARCHITECTURE} could not be read ({_plain(err)}); the compressed "
                              "checkpoint is damaged") from None
    _check_model(extra.get("model_name"), model_cfg, source)
    try:
        model = load_compressed(source)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"compressed checkpoint {source}: {_plain(err)}") from None
    return model, {"path": str(source), "kind": "compressed", **extra}


def load_checkpoint(path: str | Path, model_cfg: Mapping[str, Any]) -> tuple[PCamClassifier, dict[str, Any]]:
    """The saved classifier (LoRA already merged, compressed architecture rebuilt exactly) and a
    description of where it came from, for metrics.json."""
    source = resolve_checkpoint(path)
    if source.is_dir():
        return _load_compressed(source, model_cfg)
    payload = read_checkpoint(source)
    if "model" not in payload or "backbone_config" not in payload:
        raise CheckpointError(f"{source} is not a pcamx training checkpoint (no model / backbone_config)")
    _check_model(payload.get("model_name"), model_cfg, source)
    model = build_classifier(DINOv3ViTConfig.from_dict(payload["backbone_config"]))
    try:
        model.load_state_dict(payload["model"], strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"weights in {source} do not fit its own architecture: {err}") from err
    info = {k: payload.get(k) for k in ("model_name", "method", "method_config", "train_precision", "step",
                                        "val_metrics", INFERENCE_KEY, OPERATING_POINTS_KEY)}
    return model.eval(), {"path": str(source), "kind": "train", **info}
