"""Compressed checkpoints: weights plus the JSON description needed to rebuild the pruned shapes exactly.

A compressed model no longer matches its DINOv3 config (fewer blocks or heads, narrower MLPs, factorized
linears), so `architecture.json` records the shape each compression step (`chain.STEPS`) left, and
`load_compressed` has every step give a freshly built model that shape again, without recomputing any
scores, before loading `model.safetensors` strictly. A new kind of step is recorded and rebuilt through its
own `shape` / `reshape` (`units.Step`): nothing here changes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import DINOv3ViTConfig
from transformers.models.dinov3_vit.modeling_dinov3_vit import DINOv3ViTLayer

from pcamx.compress.chain import STEPS
from pcamx.model import PCamClassifier, build_classifier
from pcamx.runtime import disk, run_files
from pcamx.runtime.errors import UserError

SPEC_FORMAT = 2  # 1: per-layer head counts, MLP widths and ranks (read, converted to step shapes)
_METADATA = {"format": "pt"}


class CheckpointMismatchError(UserError, ValueError):
    """The weights in a compressed checkpoint do not fit the architecture it records."""


def architecture_spec(model: PCamClassifier) -> dict[str, Any]:
    """JSON-ready description of `model`'s (possibly compressed) architecture."""
    if not isinstance(model, PCamClassifier):
        raise TypeError(f"expected a PCamClassifier, got {type(model).__name__}")
    config = model.backbone.config
    return {
        "format": SPEC_FORMAT,
        "backbone_config": json.loads(config.to_json_string(use_diff=False)),
        "attn_implementation": getattr(config, "_attn_implementation", None) or "sdpa",
        "dtype": str(model.head.weight.dtype).removeprefix("torch."),
        "num_classes": model.head.out_features,
        "shapes": {name: step.shape(model) for name, step in STEPS.items()},
    }


def save_compressed(model: PCamClassifier, directory: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write `model.safetensors` and `architecture.json` (plus `extra` under "extra") into `directory`."""
    spec = architecture_spec(model)
    if extra is not None:
        spec["extra"] = extra
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}

    # Weights first, so a new directory never holds an architecture.json without its weights; the spec
    # records their sha256, checked on load.
    with disk.atomic_path(directory / run_files.WEIGHTS, disk.tensor_bytes(tensors)) as tmp:
        save_file(tensors, str(tmp), metadata=_METADATA)
        spec["weights_sha256"] = disk.sha256_file(tmp)
    disk.write_text(directory / run_files.ARCHITECTURE, json.dumps(spec, indent=2, sort_keys=True) + "\n")
    return directory



def update_extra(directory: str | os.PathLike, **entries: Any) -> Path:
    """Add `entries` to the "extra" of a compressed checkpoint's architecture.json (weights untouched)."""
    path = Path(directory) / run_files.ARCHITECTURE
    spec = _read_spec(path)
    spec["extra"] = {**(spec.get("extra") or {}), **entries}
    disk.write_text(path, json.dumps(spec, indent=2, sort_keys=True) + "\n")
    return path


def apply_shapes(model: PCamClassifier, shapes: dict[str, Any]) -> None:
    """Give a full-size `model` the recorded shape of every step (outer ones, such as blocks, first)."""
    unknown = sorted(set(shapes) - set(STEPS))
    if unknown:
        raise ValueError(f"unknown compression steps {unknown}; this pcamx knows {', '.join(STEPS)}")
    for name in sorted(shapes, key=lambda n: not STEPS[n].outer):
        STEPS[name].reshape(model, shapes[name])


def _v1_shapes(spec: dict[str, Any], model: PCamClassifier) -> dict[str, Any]:
    """A format-1 spec (per-layer head counts, MLP widths and low-rank linears) as step shapes."""
    blocks = spec.get("blocks")
    # Removing blocks renumbers the ones left from 0: the first len(blocks) names of the full model.
    layers = [name for name, m in model.named_modules() if isinstance(m, DINOv3ViTLayer)]
    layers = layers[:len(blocks or spec["layers"])]
    if len(layers) != len(spec["layers"]):
        raise ValueError(f"spec describes {len(spec['layers'])} layers, the config builds {len(layers)}")
    pairs = list(zip(layers, spec["layers"], strict=True))
    return {"heads": {f"{n}.attention": int(s["num_heads"]) for n, s in pairs},
            "mlp": {f"{n}.mlp": int(s["mlp_width"]) for n, s in pairs},
            "svd": {f"{n}.{path}": int(rank) for n, s in pairs for path, rank in s["low_rank"].items()},
            **({"blocks": {name: blocks for name, _ in STEPS["blocks"].groups(model)}} if blocks else {})}


def _read_spec(path: Path) -> dict[str, Any]:
    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    missing = [k for k in ("format", "backbone_config", "num_classes") if k not in spec]
    missing += [] if "shapes" in spec or "layers" in spec else ["shapes"]
    if missing:
        raise ValueError(f"{path} is missing {missing}; is it a pcamx compressed checkpoint?")
    if spec["format"] not in (1, SPEC_FORMAT):
        raise ValueError(f"{path} has spec format {spec['format']}; this pcamx reads formats 1 and {SPEC_FORMAT}")
    return spec


def load_compressed(directory: str | os.PathLike, device: str | torch.device = "cpu") -> PCamClassifier:
    """Rebuild the exact compressed PCamClassifier saved by `save_compressed` in `directory`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"compressed checkpoint directory not found: {directory}")
    spec_path, weights_path = directory / run_files.ARCHITECTURE, directory / run_files.WEIGHTS
    for path in (spec_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"compressed checkpoint is missing {path}")
    spec = _read_spec(spec_path)
    recorded = spec.get("weights_sha256")
    if recorded and disk.sha256_file(weights_path) != recorded:
        raise CheckpointMismatchError(
            f"{weights_path} is damaged: its sha256 differs from the one recorded in {spec_path} when it was saved"
        )

    model = build_classifier(DINOv3ViTConfig.from_dict(spec["backbone_config"]), int(spec["num_classes"]))
    try:
        apply_shapes(model, spec["shapes"] if spec["format"] == SPEC_FORMAT else _v1_shapes(spec, model))
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise CheckpointMismatchError(
            f"{spec_path} does not describe a buildable architecture: {err}"
        ) from err
    model.to(dtype=getattr(torch, spec.get("dtype", "float32")))

    try:
        state = load_file(str(weights_path), device="cpu")
    except Exception as err:  # safetensors' own error type; a damaged header or truncated file
        raise CheckpointMismatchError(f"{weights_path} could not be read: {err}") from err
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointMismatchError(
            f"weights in {weights_path} do not match the architecture in {spec_path}: {err}"
        ) from err
    return model.to(device).eval()
