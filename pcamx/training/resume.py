"""The resumable training state, `resume.pt` in the run directory: model, optimizer, RNG states, step, best
so far, history, training seconds, and a fingerprint of every setting that changes what training computes.

A rerun in the same directory (a Slurm requeue, or the same command again) continues from it only when the
fingerprint matches; otherwise it refuses and lists the settings that differ, since continuing would mix
two trainings and label the result with the second one's settings.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pcamx.checkpoint import read_checkpoint, save_checkpoint
from pcamx.runtime import run_files
from pcamx.runtime.errors import ConfigError, UserError

log = logging.getLogger("pcamx")

# Settings that do not change what training computes: where things go and what is logged, and what happens
# after training (test evaluation, compression, quantization, healing, which is never resumed).
NOT_TRAINING = ("wandb", "resume", "checkpoint", "data.root", "data.mpp", "prune", "quant", "heal", "eval.tta",
                "eval.precision", "eval.measure_speed", "eval.speed_warmup", "eval.speed_iters", "train.save_best",
                "train.save_last", "train.checkpoint_every", "hardware.num_threads", "hardware.precision")


class ResumeMismatchError(UserError, ValueError):
    """resume.pt was written by a run with other training settings."""


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, Mapping):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: list(node) if isinstance(node, tuple) else node}


def fingerprint(config: Mapping[str, Any]) -> dict[str, Any]:
    """The training-relevant settings of a resolved config, as dotted key → value.
    (`hardware.precision` only sets train.precision's default: the effective train.precision is in here.)"""
    flat = _flatten(config)
    skip = set(NOT_TRAINING)
    if not flat.get("eval.val_tta"):
        skip.add("eval.tta_views")  # then it only affects the test evaluation
    return {k: v for k, v in flat.items() if not any(k == s or k.startswith(f"{s}.") for s in skip)}


def differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    missing = object()
    return [f"{key}: {saved.get(key, '(not set)')!r} in {run_files.RESUME} → {now.get(key, '(not set)')!r} now"
            for key in sorted(set(saved) | set(now)) if saved.get(key, missing) != now.get(key, missing)]


def get_rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain values: resume.pt loads with torch's weights_only, which never
    unpickles code (a numpy array or a class in it would need the full unpickler)."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": {"version": version, "words": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["words"].tolist()), py["gauss"]))
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(run_dir: Path, state: Mapping[str, Any], settings: Mapping[str, Any]) -> Path:
    """Write resume.pt (verified on load) with the RNG states, the settings fingerprint and this run's .hydra/
    files (Hydra rewrites them before a rerun starts: a refused rerun puts these back)."""
    hydra = {p.name: p.read_text() for p in sorted((run_dir / run_files.HYDRA_DIR).glob("*.yaml"))}
    return save_checkpoint({**state, "rng": get_rng_state(), "fingerprint": dict(settings), "hydra_files": hydra},
                           run_dir / run_files.RESUME)


def load_state(run_dir: Path, resume: str | bool, settings: Mapping[str, Any]) -> dict[str, Any] | None:
    """The interrupted run's state in `run_dir`, if this run should continue it.

    resume=auto (default) continues whenever the run directory holds resume.pt — which happens only when a
    directory is reused: a Slurm job requeued after preemption or timeout, or a run started again with the
    same hydra.run.dir. resume=true insists on it; resume=false starts over. Either way a resume.pt made with
    other training settings is refused (ResumeMismatchError), naming the settings that differ."""
    path = run_dir / run_files.RESUME
    if resume is False or resume == "false":
        return None
    if not path.is_file():
        if resume is True or resume == "true":
            raise ConfigError(f"resume=true but {path} does not exist; point hydra.run.dir at the interrupted "
                              "run's directory, or use resume=auto")
        return None
    state = read_checkpoint(path)
    saved = state.get("fingerprint")
    diff = ["(resume.pt has no settings fingerprint: it was written by an older pcamx)"] if saved is None else \
        differences(saved, settings)
    if diff:
        err = ResumeMismatchError(
            f"{path} was written by a run with other training settings:\n  " + "\n  ".join(diff) + "\n"
            "Continuing it would mix two trainings. Either rerun with the original settings to continue it, "
            "start over in this directory with resume=false, or give this run a new directory (hydra.run.dir=...)."
        )
        err.hydra_files = {run_dir / run_files.HYDRA_DIR / name: text.encode()
                           for name, text in (state.get("hydra_files") or {}).items()}
        raise err
    return state
