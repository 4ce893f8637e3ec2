"""One run, top to bottom: data → model → train → [compress → quantize] → evaluate → report.

Each stage reads its own config node; `run` only wires them together.
"""

from __future__ import annotations

import copy
import logging
import random
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from pcamx import interrupts, io
from pcamx.checkpoint import COMPRESSED_DIR, RESUME_FILE, load_checkpoint
from pcamx.compress.chain import compress, plan
from pcamx.compress.spec import save_compressed
from pcamx.data.pcam import PCamSplit
from pcamx.data.synthetic import ensure_synthetic, is_synthetic
from pcamx.data.transforms import ColorJitter
from pcamx.evaluate import predict, view_count
from pcamx.footprint import count_params, gflops, latency_ms, memory_mb, throughput_ips
from pcamx.hardware import autocast, check_precision, resolve_device, resolve_precision, setup_threads
from pcamx.interrupts import RunInterrupted
from pcamx.locks import RunDirBusy, claim_run_dir
from pcamx.methods import apply_method
from pcamx.metrics import SELECT_METRICS, binary_metrics
from pcamx.model import build_model
from pcamx.quant import check_quantization, eval_precision_label, quantize
from pcamx.report.run_files import plot_roc, write_predictions
from pcamx.tracking import Tracker
from pcamx.train import TrainResult, distillation_gap, train, validate

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
    # Streaming reads valid and test through once up front: a damaged file fails now, not after training.
    splits = {
        name: PCamSplit.load(root, name, limit=limits[name], in_memory=dcfg.in_memory, source=source,
                             verify=name != "train")
        for name in ("train", "valid", "test")
    }
    return Data(**splits, source=source)


def wandb_names() -> dict[str, str]:
    """In a sweep: W&B group = the sweep directory, run name = the job's overrides."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return {}
    hydra_cfg = HydraConfig.get()
    name = hydra_cfg.job.override_dirname or hydra_cfg.job.name
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return {"name": name}
    sweep = Path(hydra_cfg.sweep.dir)
    return {"name": name, "group": f"{sweep.parent.name}/{sweep.name}"}


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
        "gflops": round(gflops(model, resolution, device=next(model.parameters()).device), 4),
        "memory_mb": round(memory_mb(model), 4),
    }


def format_table(metrics: dict[str, Any]) -> str:
    keys = [*METRIC_KEYS, "params", "gflops", "memory_mb", "latency_ms_b1", "throughput_ips", "n_test", "tta_views",
            "resolution", "train_precision", "eval_precision", "data"]
    rows = ["| metric | value |", "| --- | --- |"]
    for k in keys:
        v = metrics.get(k)
        rows.append(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |")
    return "\n".join(rows)


def run(cfg: DictConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Execute one configured run; returns what it wrote to metrics.json.

    The run owns its directory for its whole life (a lock; a second run there fails at once, before
    writing anything). A failure still writes metrics.json (status "failed" with the error, and `reason:
    diverged` for a diverged training) before re-raising, so sweeps can report it; a SIGTERM/SIGINT writes
    status "interrupted" and raises RunInterrupted."""
    run_dir = resolve_run_dir(run_dir)
    lock = claim_run_dir(run_dir)
    hydra_files = _snapshot(run_dir / ".hydra")
    try:
        for stale in io.remove_stale_temps(run_dir):
            log.info("removed %s, left by a write that was killed", stale)
        with interrupts.handling():
            return _run(cfg, run_dir)
    except RunInterrupted as err:
        resumable = (run_dir / RESUME_FILE).is_file()
        io.write_json(run_dir / "metrics.json", {
            "status": "interrupted", "signal": signal.Signals(err.signum).name, "step": err.step,
            "resume": "rerun the same command (resume=auto) to continue from resume.pt" if resumable else
                      "no training progress to keep: rerunning starts over",
            "run_dir": str(run_dir),
        })
        raise
    except Exception as err:
        io.write_json(run_dir / "metrics.json", {
            "status": "failed",
            "reason": getattr(err, "reason", "error"),
            "error": f"{type(err).__name__}: {err}",
            "traceback": traceback.format_exc(),
            "run_dir": str(run_dir),
        })
        raise
    finally:
        _restore(run_dir / ".hydra", hydra_files)
        lock.release()


def _snapshot(directory: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in directory.glob("*.yaml")} if directory.is_dir() else {}


def _restore(directory: Path, files: dict[Path, bytes]) -> None:
    """Put back this run's .hydra/ files if a run refused entry meanwhile overwrote them (Hydra writes them
    before the refused run reaches its lock)."""
    for path, content in files.items():
        if not path.is_file() or path.read_bytes() != content:
            io.write_text(path, content.decode())


def run_job(cfg: DictConfig) -> dict[str, Any] | None:
    """What `run.py` calls. In a sweep a failed job is recorded (metrics.json) and logged instead of
    raised: Hydra's sweeper would otherwise abort before the summary callback writes the table, and
    that callback exits non-zero for failed runs, so the command's status still says so. An interrupted
    run prints one line and exits with 128 + the signal number (a requeue signal goes on to submitit)."""
    from pcamx.report.callback import sweep_reports_failures

    try:
        return run(cfg)
    except RunInterrupted as err:
        where = f" after step {err.step}" if err.step is not None else ""
        print(f"pcamx: stopped by {signal.Signals(err.signum).name}{where}; rerun the same command to continue",
              file=sys.stderr, flush=True)
        interrupts.forward(err.signum)
        raise SystemExit(err.exit_code) from None
    except RunDirBusy:
        raise
    except Exception:
        if not sweep_reports_failures():
            raise
        log.exception("job failed; the sweep summary reports it")
        return None


def effective_precisions(cfg: DictConfig, device: torch.device) -> DictConfig:
    """A copy of `cfg` whose train.precision / eval.precision say what will actually run on `device`
    (hardware=auto turns bf16 into fp32 off CUDA); a precision the device cannot run is an error."""
    cfg = copy.deepcopy(cfg)
    for key in ("train", "eval"):
        asked = cfg[key].precision
        cfg[key].precision = resolve_precision(asked, f"{key}.precision", device, cfg.hardware.device)
        if cfg[key].precision != asked:
            log.info("%s.precision: %s asked, %s on %s (hardware=auto uses bf16 on CUDA only)",
                     key, asked, cfg[key].precision, device)
    return cfg


def validate_config(cfg: DictConfig, device: torch.device) -> None:
    """Reject impossible settings before any data is read or any step is trained."""
    for key in ("select_metric", "select_tiebreak"):
        select = cfg.train[key]
        if select not in SELECT_METRICS and not (key == "select_tiebreak" and select is None):
            raise ValueError(f"train.{key} must be one of {sorted(SELECT_METRICS)}, got {select!r}")
    for key in ("train", "eval"):
        check_precision(cfg[key].precision, f"{key}.precision", device)
    view_count(cfg.eval)
    ColorJitter.from_config(cfg.data.jitter)
    compression_plan(cfg.prune)
    check_quantization(cfg.quant.mode, device)
    if cfg.prune.heal_epochs < 0:
        raise ValueError(f"prune.heal_epochs must be >= 0, got {cfg.prune.heal_epochs}")


def compression_plan(pcfg: DictConfig) -> tuple[dict[str, float], tuple[str, ...]]:
    return plan(pcfg.method, pcfg.tau, pcfg.tau_heads, pcfg.tau_mlp, pcfg.tau_svd, pcfg.order, pcfg.svd_targets)


def evaluate_test(
    model: torch.nn.Module, data: Data, cfg: DictConfig, device: torch.device, precision: str, desc: str = "test",
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Test predictions and metrics with `eval.tta_views` views, under autocast at `precision`."""
    labels, probs = predict(
        model, data.test, device, cfg.data.eval_batch_size, cfg.data.resolution,
        views=view_count(cfg.eval), precision=precision, desc=desc,
    )
    return labels, probs, binary_metrics(labels, probs)


def speed(model: torch.nn.Module, cfg: DictConfig, device: torch.device, precision: str) -> dict[str, float]:
    """Latency at batch 1 and throughput at the eval batch size, model forward only, after warm-up."""
    if not cfg.eval.measure_speed:
        return {}
    res, warmup, iters = cfg.data.resolution, cfg.eval.speed_warmup, cfg.eval.speed_iters
    with autocast(device, precision):
        return {
            "latency_ms_b1": round(latency_ms(model, torch.randn(1, 3, res, res, device=device), warmup, iters), 4),
            "throughput_ips": round(throughput_ips(
                model, torch.randn(cfg.data.eval_batch_size, 3, res, res, device=device), warmup, iters), 2),
        }


def relative_change(new: dict[str, Any], ref: dict[str, Any]) -> dict[str, float]:
    """Percent change of every shared number, e.g. params 20.08M vs 21.60M → -7.0."""
    return {
        k: round(100 * (new[k] - ref[k]) / ref[k], 3)
        for k in ref
        if isinstance(ref.get(k), int | float) and isinstance(new.get(k), int | float) and ref[k]
    }


def compress_stage(
    model: torch.nn.Module,
    reference: torch.nn.Module | None,
    data: Data,
    cfg: DictConfig,
    config: dict,
    device: torch.device,
    run_dir: Path,
    tracker: Tracker,
    method_name: str,
    method_config: dict[str, Any] | None,
    trained_steps: int = 0,
) -> dict[str, Any]:
    """Compress in place, heal if asked, save the compressed checkpoint; returns the metrics.json parts."""
    if cfg.prune.method == "none":
        return {}
    p = cfg.prune
    taus, targets = compression_plan(p)
    extra: dict[str, Any] = {
        "prune": {"method": p.method, **{f"tau_{k}": v for k, v in taus.items()}, "svd_targets": list(targets)},
        "compression": compress(model, p.method, p.tau, p.tau_heads, p.tau_mlp, p.tau_svd, p.order, p.svd_targets),
    }
    if p.heal_epochs > 0:
        if method_name != cfg.method.name:
            raise ValueError(
                f"the checkpoint was trained with method={method_name}, but healing would train it with "
                f"method={cfg.method.name}; add method={method_name} (healing uses the method's parameters and lrs)"
            )
        unhealed_val = validate(model, data.valid, device, config)
        extra["before_heal"] = {
            **evaluate_test(model, data, cfg, device, cfg.eval.precision, desc="test (unhealed)")[2],
            "val": unhealed_val,
            "val_kd": distillation_gap(model, reference, data.valid, device, config),
        }
        groups = apply_method(model, cfg.method, cfg.train.lr, cfg.train.weight_decay, cfg.train.decay_all_params)
        for group in groups:  # healing nudges a trained model: every group's lr, scaled down
            group["lr"] *= cfg.heal.lr_scale
        healed = train(model, groups, data.train, data.valid, config, device, run_dir, tracker,
                       epochs=p.heal_epochs, teacher=reference, phase="heal", baseline_val=unhealed_val,
                       step_offset=trained_steps)
        extra["heal"] = {
            "epochs": p.heal_epochs, "best_step": healed.best_step, "val": healed.best_val,
            "val_kd": distillation_gap(model, reference, data.valid, device, config), "history": healed.history,
        }
        model.to(device).eval()
    save_compressed(model, run_dir / COMPRESSED_DIR,
                    extra={"model_name": cfg.model.name, "method": method_name, "method_config": method_config,
                           "prune": extra["prune"]})
    return extra


def _run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    started = time.time()
    device = resolve_device(cfg.hardware.device)
    cfg = effective_precisions(cfg, device)
    config = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True, enum_to_str=True)
    io.write_text(run_dir / "resolved_config.yaml", OmegaConf.to_yaml(config))
    seed_everything(cfg.seed)
    setup_threads(cfg.hardware)
    validate_config(cfg, device)

    # data
    data = load_data(cfg.data)
    log.info("data: %s train=%d valid=%d test=%d", data.source, len(data.train), len(data.valid), len(data.test))

    # model: a fresh backbone + head, or a saved one (checkpoint=...), which skips training
    started_from = None
    if cfg.checkpoint:
        model, started_from = load_checkpoint(cfg.checkpoint, cfg.model)
    else:
        model = build_model(cfg.model)
    # A checkpoint's results are labelled with the method that trained it, not the config default.
    if started_from is None:
        method_name, method_config = cfg.method.name, config["method"]
        train_precision = cfg.train.precision if cfg.train.epochs > 0 else None
    else:
        method_name = started_from.get("method") or cfg.method.name
        method_config, train_precision = started_from.get("method_config"), started_from.get("train_precision")
    tracker = Tracker(cfg.wandb, config, run_dir, **wandb_names())

    # train
    result = TrainResult()
    if started_from is None and cfg.train.epochs > 0:
        groups = apply_method(model, cfg.method, cfg.train.lr, cfg.train.weight_decay, cfg.train.decay_all_params)
        result = train(model, groups, data.train, data.valid, config, device, run_dir, tracker)
    model.to(device).eval()

    # compress (+ heal); the uncompressed f32 model is kept as reference and distillation teacher
    reference = copy.deepcopy(model) if cfg.prune.method != "none" or cfg.quant.mode != "none" else None
    extra = compress_stage(model, reference, data, cfg, config, device, run_dir, tracker, method_name, method_config,
                           result.steps)
    figures = footprint(model, cfg.data.resolution)
    # Without pruning the reference has exactly these figures: don't run ptflops on it again.
    reference_figures = dict(figures) if cfg.prune.method == "none" else None

    # quantize
    model = quantize(model, cfg.quant.mode, device)
    figures["memory_mb"] = round(memory_mb(model), 4)

    # evaluate. An unquantized model runs at eval.precision; a quantized one in its own dtype (no autocast
    # on top). The reference is the uncompressed model in plain f32, so bf16/int8 rows show what
    # quantization changes.
    precision = "fp32" if cfg.quant.mode != "none" else cfg.eval.precision
    labels, probs, test = evaluate_test(model, data, cfg, device, precision)
    metrics: dict[str, Any] = {"status": "ok", **test, **figures, **speed(model, cfg, device, precision)}
    if reference is not None:
        ref = {**evaluate_test(reference, data, cfg, device, "fp32", desc="test (reference)")[2],
               **(reference_figures or footprint(reference, cfg.data.resolution)),
               **speed(reference, cfg, device, "fp32"), "eval_precision": "fp32"}
        metrics["reference"] = {**ref, "change_pct": relative_change(metrics, ref)}
    views = view_count(cfg.eval)
    metrics.update({
        "n_test": int(len(labels)),
        "tta": views > 1,
        "tta_views": views,
        "resolution": int(cfg.data.resolution),
        "eval_precision": eval_precision_label(cfg.quant.mode, device, cfg.eval.precision),
        "train_precision": train_precision,
        "data": data.source,
        "method": method_name,
        "method_config": method_config,
        "model": cfg.model.name,
        "quant": cfg.quant.mode,
        "prune": extra.pop("prune", {"method": "none"}),
        "device": str(device),
        "checkpoint": started_from,
        "val": result.best_val if started_from is None else (started_from.get("val_metrics") or {}),
        "best_step": result.best_step,
        "train_steps": result.steps,
        "train_seconds": round(result.seconds, 2),
        **extra,
        "total_seconds": round(time.time() - started, 2),
        "run_dir": str(run_dir),
    })

    # report
    write_predictions(run_dir / "predictions.csv", labels, probs)
    title = f"{method_name} on {data.source}" + (" (synthetic stand-in, not PCam)" if data.source != "pcam" else "")
    roc = plot_roc(run_dir / "roc.png", labels, probs, title)
    io.write_json(run_dir / "metrics.json", metrics)
    tracker.summary({f"test/{k}": metrics[k] for k in METRIC_KEYS} | {"data": data.source})
    tracker.log_image("test/roc", roc)
    tracker.finish()
    # The run is complete: the resumable state (model + optimizer) is no longer needed.
    (run_dir / RESUME_FILE).unlink(missing_ok=True)
    print(f"\n{title} — results in {run_dir}\n{format_table(metrics)}")
    return metrics
