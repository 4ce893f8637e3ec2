"""One run, top to bottom: data → model → train → [compress → quantize] → evaluate → report.

Each stage reads its own config node; `run` only wires them together.
"""

from __future__ import annotations

import logging
import random
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from pcamx import io
from pcamx.data.pcam import PCamSplit
from pcamx.data.synthetic import ensure_synthetic, is_synthetic
from pcamx.evaluate import predict
from pcamx.footprint import count_params, gflops, memory_mb
from pcamx.hardware import resolve_device, setup_threads
from pcamx.methods import apply_method
from pcamx.metrics import binary_metrics
from pcamx.model import build_model
from pcamx.report.run_files import plot_roc, write_predictions
from pcamx.tracking import Tracker
from pcamx.train import TrainResult, train

log = logging.getLogger("pcamx")
METRIC_KEYS = ("auroc", "auprc", "sens_at_95spec", "ece", "brier", "acc", "nll")


@dataclass
class Data:
    train: PCamSplit
    valid: PCamSplit
    test: PCamSplit
    source: str  # "pcam" or "synthetic": written into every output


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_data(dcfg: DictConfig) -> Data:
    root = Path(dcfg.root).expanduser()
    if dcfg.name == "synthetic":
        sizes = {"train": dcfg.n_train, "valid": dcfg.n_valid, "test": dcfg.n_test}
        ensure_synthetic(root, sizes, seed=dcfg.seed)
    limits = {"train": dcfg.limit_train, "valid": dcfg.limit_val, "test": dcfg.limit_test}
    # The marker file, not the config, decides: generated data is never reported as PCam.
    source = "synthetic" if is_synthetic(root) else "pcam"
    splits = {
        name: PCamSplit.load(root, name, limit=limits[name], in_memory=dcfg.in_memory, source=source)
        for name in ("train", "valid", "test")
    }
    return Data(**splits, source=source)


def resolve_run_dir(run_dir: str | Path | None) -> Path:
    if run_dir is None:
        from hydra.core.hydra_config import HydraConfig

        run_dir = HydraConfig.get().runtime.output_dir
    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def footprint(model: torch.nn.Module, resolution: int) -> dict[str, float]:
    return {
        "params": count_params(model),
        "gflops": round(gflops(model, resolution), 4),
        "memory_mb": round(memory_mb(model), 4),
    }


def format_table(metrics: dict[str, Any]) -> str:
    keys = [*METRIC_KEYS, "params", "gflops", "memory_mb", "n_test", "tta", "data"]
    rows = ["| metric | value |", "| --- | --- |"]
    for k in keys:
        v = metrics.get(k)
        rows.append(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |")
    return "\n".join(rows)


def run(cfg: DictConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Execute one configured run; returns what it wrote to metrics.json. A failure still writes
    metrics.json (status "failed" with the error) before re-raising, so sweeps can report it."""
    run_dir = resolve_run_dir(run_dir)
    try:
        return _run(cfg, run_dir)
    except Exception as err:
        io.write_json(run_dir / "metrics.json", {
            "status": "failed",
            "error": f"{type(err).__name__}: {err}",
            "traceback": traceback.format_exc(),
            "run_dir": str(run_dir),
        })
        raise


def run_job(cfg: DictConfig) -> dict[str, Any] | None:
    """What `run.py` calls. In a sweep a failed job is recorded (metrics.json) and logged instead of
    raised: Hydra's sweeper would otherwise abort before the summary callback writes the table, and
    that callback exits non-zero for failed runs, so the command's status still says so."""
    from pcamx.report.callback import sweep_reports_failures

    try:
        return run(cfg)
    except Exception:
        if not sweep_reports_failures():
            raise
        log.exception("job failed; the sweep summary reports it")
        return None


def _run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    started = time.time()
    config = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    io.write_text(run_dir / "resolved_config.yaml", OmegaConf.to_yaml(config))
    seed_everything(cfg.seed)
    setup_threads(cfg.hardware)
    device = resolve_device(cfg.hardware.device)

    # data
    data = load_data(cfg.data)
    log.info("data: %s train=%d valid=%d test=%d", data.source, len(data.train), len(data.valid), len(data.test))

    # model
    model = build_model(cfg.model)
    tracker = Tracker(cfg.wandb, config, run_dir)

    # train
    result = TrainResult()
    if cfg.train.epochs > 0:
        groups = apply_method(model, cfg.method, cfg.train.lr, cfg.train.weight_decay)
        result = train(model, groups, data.train, data.valid, config, device, run_dir, tracker)
    model.to(device).eval()

    # evaluate
    labels, probs = predict(
        model, data.test, device, cfg.data.eval_batch_size, cfg.data.resolution,
        tta=cfg.eval.tta, precision=cfg.hardware.precision, desc="test",
    )
    metrics: dict[str, Any] = {"status": "ok", **binary_metrics(labels, probs)}
    metrics.update(footprint(model, cfg.data.resolution))
    metrics.update({
        "n_test": int(len(labels)),
        "tta": bool(cfg.eval.tta),
        "data": data.source,
        "method": cfg.method.name,
        "model": cfg.model.name,
        "device": str(device),
        "val": result.best_val,
        "best_step": result.best_step,
        "train_steps": result.steps,
        "train_seconds": round(result.seconds, 2),
        "total_seconds": round(time.time() - started, 2),
        "run_dir": str(run_dir),
    })

    # report
    write_predictions(run_dir / "predictions.csv", labels, probs)
    title = f"{cfg.method.name} on {data.source}" + (" (synthetic stand-in, not PCam)" if data.source != "pcam" else "")
    roc = plot_roc(run_dir / "roc.png", labels, probs, title)
    io.write_json(run_dir / "metrics.json", metrics)
    tracker.summary({f"test/{k}": metrics[k] for k in METRIC_KEYS} | {"data": data.source})
    tracker.log_image("test/roc", roc)
    tracker.finish()
    print(f"\n{title} — results in {run_dir}\n{format_table(metrics)}")
    return metrics
