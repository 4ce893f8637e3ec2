"""One run, top to bottom: prepare → model → train → compress (+ heal) → quantize → evaluate → calibrate → report.

Each stage is a function that reads its own config node and returns its part of metrics.json; `_run` is
the list of stages. `run` owns the run directory and turns failures and interrupts into metrics.json.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import signal
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from pcamx.checkpoint import INFERENCE_KEY, load_checkpoint, record_operating_points
from pcamx.compress.budget import compress_to_budget
from pcamx.compress.chain import PrunePlan, plan_from_config, run_plan
from pcamx.compress.quant import EvalPrecision, check_quantization, quantize
from pcamx.compress.spec import save_compressed
from pcamx.config import check_ranges
from pcamx.data import Data, load_data
from pcamx.data.transforms import ColorJitter, preprocess
from pcamx.evaluation.evaluate import evaluate, view_count
from pcamx.evaluation.footprint import cost, footprint, memory_mb, speed
from pcamx.evaluation.metrics import METRIC_NAMES, binary_metrics
from pcamx.evaluation.operating_points import choose_thresholds, operating_points, rates_at
from pcamx.evaluation.uncertainty import apply_temperature, confidence_intervals, fit_temperature, paired_comparison
from pcamx.inference.settings import InferenceSettings
from pcamx.model import build_model
from pcamx.report.format import format_table, percent_change
from pcamx.report.run_outputs import plot_reliability, plot_roc, write_predictions
from pcamx.runtime import disk, interrupts, run_files
from pcamx.runtime.errors import ConfigError, UserError, one_line
from pcamx.runtime.errors import report as report_error
from pcamx.runtime.hardware import check_precision, effective_precisions, resolve_device, seed_everything, setup_threads
from pcamx.runtime.interrupts import RunInterrupted
from pcamx.runtime.locks import RunDirBusy, claim_run_dir, resolve_run_dir, restore_hydra_files, snapshot_hydra_files
from pcamx.runtime.tracking import Tracker, hydra_names
from pcamx.training.heal import heal
from pcamx.training.loop import Session, train
from pcamx.training.methods import apply_method
from pcamx.training.resume import ResumeMismatchError, fingerprint, load_state

log = logging.getLogger("pcamx")


@dataclass
class Run:
    """What every stage shares. `cfg` is the typed config; `config` the same resolved into plain values (what
    resolved_config.yaml holds and the training code reads)."""

    cfg: DictConfig
    config: dict[str, Any]
    device: torch.device
    run_dir: Path
    data: Data
    tracker: Tracker
    resume: dict[str, Any] | None = None  # the state of an interrupted training in run_dir, to continue from
    seconds_before: float = 0.0  # what earlier, interrupted attempts of this run spent training


@dataclass
class Origin:
    """Where the model comes from: trained here, or a checkpoint (whose method labels the results)."""

    method: str
    method_config: dict[str, Any] | None
    train_precision: str | None
    checkpoint: dict[str, Any] | None = None


# ---------------------------------------------------------------- the run


def run(cfg: DictConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Execute one configured run; returns what it wrote to metrics.json.

    The run owns its directory for its whole life (a lock; a second run there fails at once, before
    writing anything). A refusal (a setting out of range or impossible here, a resume.pt written with other
    training settings) changes nothing in a directory that holds an earlier run, .hydra/ included. A failure
    writes metrics.json (status "failed" with the error and its `reason`) before re-raising, so sweeps can report
    it; a SIGTERM/SIGINT writes status "interrupted" and raises RunInterrupted."""
    run_dir = resolve_run_dir(run_dir)
    lock = claim_run_dir(run_dir)
    hydra_files = snapshot_hydra_files(run_dir / run_files.HYDRA_DIR)
    earlier = any((run_dir / name).exists() for name in (run_files.METRICS, run_files.RESUME))
    try:
        for stale in disk.remove_stale_temps(run_dir):
            log.info("removed %s, left by a write that was killed", stale)
        with interrupts.handling():
            return _run(cfg, run_dir)
    except RunInterrupted as err:
        resumable = (run_dir / run_files.RESUME).is_file()
        disk.write_json(run_dir / run_files.METRICS, {
            "status": "interrupted", "signal": signal.Signals(err.signum).name, "step": err.step,
            "resume": "rerun the same command (resume=auto) to continue from resume.pt" if resumable else
                      "no training progress to keep: rerunning starts over",
            "run_dir": str(run_dir),
        })
        raise
    except (ConfigError, ResumeMismatchError) as err:
        if earlier:  # the directory's earlier run stays as it was; Hydra rewrote .hydra/ before this run began
            hydra_files = getattr(err, "hydra_files", None) or hydra_files
        else:
            _write_failure(run_dir, err)
        raise
    except Exception as err:
        _write_failure(run_dir, err)
        raise
    finally:
        restore_hydra_files(run_dir / run_files.HYDRA_DIR, hydra_files)
        lock.release()


def _write_failure(run_dir: Path, err: Exception) -> None:
    disk.write_json(run_dir / run_files.METRICS, {
        "status": getattr(err, "status", "failed"), "reason": getattr(err, "reason", "error"),
        "error": f"{type(err).__name__}: {err}",
        "traceback": traceback.format_exc(), "run_dir": str(run_dir),
    })


def _run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    started = time.time()
    run = prepare(cfg, run_dir)
    model, origin = model_stage(run)
    trained = train_stage(run, model, origin)
    # The uncompressed f32 model: the reference of a compressed/quantized row, and the healing teacher.
    reference = copy.deepcopy(model) if run.cfg.prune.method != "none" or run.cfg.quant.mode != "none" else None
    model, compressed = compress_stage(run, model, reference, origin, trained["train_steps"])
    model, figures = quantize_stage(run, model)
    labels, probs, evaluated = evaluate_stage(run, model, reference, figures)
    # The final model on valid exactly as on test: what thresholds and the temperature are chosen on, never test.
    val_labels, val_probs, _ = evaluate(model, run.data.valid, run.device, run.config,
                                        InferenceSettings.from_run_config(run.cfg).precision, desc="valid (final)")
    operating = operating_stage(run, origin, labels, probs, val_labels, val_probs)
    calibrated, calibration = calibrate_stage(run, labels, probs, val_labels, val_probs)
    # Earlier, interrupted attempts count too: total_seconds is never below train_seconds.
    total = time.time() - started + run.seconds_before
    metrics = {"status": "ok", **evaluated, **operating, **calibration, **describe(run, origin, len(labels)),
               **trained, **compressed, "val_final": binary_metrics(val_labels, val_probs),
               "total_seconds": round(total, 2), "run_dir": str(run_dir)}
    report_stage(run, labels, probs, calibrated, metrics)
    return metrics


# ---------------------------------------------------------------- stages


def prepare(cfg: DictConfig, run_dir: Path) -> Run:
    """Device and effective precisions and every setting checked, and an earlier training's resume.pt checked
    against them, before anything is written or read; then the resolved config on disk, seeds and threads, the
    data and the tracker."""
    with config_errors():
        device = resolve_device(cfg.hardware.device)
        cfg = effective_precisions(cfg, device)
        validate_config(cfg, device)
    config = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True, enum_to_str=True)
    state = None if cfg.checkpoint else load_state(run_dir, cfg.resume, fingerprint(config))
    disk.write_text(run_dir / run_files.RESOLVED_CONFIG, OmegaConf.to_yaml(config))
    seed_everything(cfg.seed)
    setup_threads(cfg.hardware)
    data = load_data(cfg.data)
    log.info("data: %s train=%d valid=%d test=%d", data.source, len(data.train), len(data.valid), len(data.test))
    return Run(cfg, config, device, run_dir, data, Tracker(cfg.wandb, config, run_dir, **hydra_names()), state)


def model_stage(run: Run) -> tuple[torch.nn.Module, Origin]:
    """A fresh backbone + head, or a saved model (checkpoint=...), which skips training."""
    cfg = run.cfg
    if not cfg.checkpoint:
        return build_model(cfg.model), Origin(cfg.method.name, run.config["method"], cfg.train.precision)
    model, source = load_checkpoint(cfg.checkpoint, cfg.model)
    return model, Origin(source.get("method") or cfg.method.name, source.get("method_config"),
                         source.get("train_precision"), checkpoint=source)


def train_stage(run: Run, model: torch.nn.Module, origin: Origin) -> dict[str, Any]:
    cfg = run.cfg
    if origin.checkpoint is not None:
        val = origin.checkpoint.get("val_metrics") or {}
        model.to(run.device).eval()
        return {"val": val, "best_step": None, "train_steps": 0, "train_seconds": 0.0}
    groups = apply_method(model, cfg.method, cfg.train.lr, cfg.train.weight_decay, cfg.train.decay_all_params)
    result = train(model, groups, run.data.train, run.data.valid, run.config, run.device, run.tracker,
                   Session(cfg.train.epochs, run_dir=run.run_dir, resume=run.resume))
    model.to(run.device).eval()
    run.seconds_before = result.seconds_before
    return {"val": result.best_val, "best_step": result.best_step, "train_steps": result.steps,
            "train_seconds": round(result.seconds, 2)}


def compress_stage(run: Run, model: torch.nn.Module, reference: torch.nn.Module | None, origin: Origin,
                   trained_steps: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Compress (to the τ given, or to the budget), heal if asked, save the compressed checkpoint."""
    cfg = run.cfg
    if cfg.prune.method == "none":
        return model, {"prune": {"method": "none"}}
    p = plan_from_config(cfg.prune)
    calibration = calibration_batches(run, p)
    described = {"method": str(cfg.prune.method), **p.describe()}
    if p.budget is None:
        report = run_plan(model, p, calibration)
    else:
        model, report, found = compress_to_budget(model, p, lambda m: cost(m, cfg.data.resolution), calibration)
        described |= found
    out: dict[str, Any] = {"prune": described, "compression": report}
    if cfg.prune.heal_epochs > 0:
        out |= heal(model, reference, run.data.train, run.data.valid, run.data.test, run.config, run.device,
                    run.tracker, origin.method, step_offset=trained_steps)
    save_compressed(model, run.run_dir / run_files.COMPRESSED,
                    extra={"model_name": cfg.model.name, "method": origin.method,
                           "method_config": origin.method_config, "prune": out["prune"],
                           INFERENCE_KEY: InferenceSettings.from_run_config(run.config).to_dict()})
    return model, out


def calibration_batches(run: Run, p: PrunePlan) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """The first `prune.calib_batches` training batches (seeded shuffle, no augmentation), preprocessed on
    the device: what data-aware criteria and block scores are computed on."""
    if not p.needs_calibration:
        return None
    cfg = run.cfg
    generator = torch.Generator().manual_seed(cfg.seed)
    batches = []
    for images, labels in run.data.train.batches(cfg.data.batch_size, shuffle=True, generator=generator):
        batches.append((preprocess(images.to(run.device), cfg.data.resolution), labels.to(run.device)))
        if len(batches) == p.calib_batches:
            break
    return batches


def quantize_stage(run: Run, model: torch.nn.Module) -> tuple[torch.nn.Module, dict[str, float]]:
    """The (compressed) model's footprint, then quantized; memory is the quantized model's."""
    figures = footprint(model, run.cfg.data.resolution)
    model = quantize(model, run.cfg.quant.mode, run.device)
    return model, {**figures, "memory_mb": round(memory_mb(model), 4)}


def evaluate_stage(run: Run, model: torch.nn.Module, reference: torch.nn.Module | None,
                   figures: dict[str, float]) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Test metrics with their 95% intervals, footprint and speed; for a compressed/quantized model also its
    uncompressed f32 reference on the same patches, the change against it and the paired comparison."""
    cfg = run.cfg
    # A quantized model runs in its own dtype, an unquantized one at eval.precision: InferenceSettings says it once.
    precision = InferenceSettings.from_run_config(cfg).precision
    labels, probs, test = evaluate(model, run.data.test, run.device, run.config, precision)
    slides, draws = run.data.test.slides, cfg.eval.bootstrap
    out: dict[str, Any] = {**test, **figures, **speed(model, cfg, run.device, precision)}
    if reference is None:
        return labels, probs, out | confidence_intervals(labels, probs, slides, draws, cfg.seed)
    # Without pruning the reference has exactly the model's figures: no second ptflops count.
    ref_figures = {**figures, "memory_mb": round(memory_mb(reference), 4)} if cfg.prune.method == "none" \
        else footprint(reference, cfg.data.resolution)
    _, ref_probs, ref_test = evaluate(reference, run.data.test, run.device, run.config, "fp32",
                                      desc="test (reference)")
    ref = {**ref_test, **ref_figures, **speed(reference, cfg, run.device, "fp32"), "eval_precision": "fp32"}
    ref["change_pct"] = {k: round(pct, 3) for k, v in ref.items()
                         if (pct := percent_change(out.get(k), v)) is not None}
    intervals, ref["paired"] = paired_comparison(labels, probs, ref_probs, slides, draws, cfg.seed)
    return labels, probs, out | intervals | {"reference": ref}


def operating_stage(run: Run, origin: Origin, labels: np.ndarray, probs: np.ndarray, val_labels: np.ndarray,
                    val_probs: np.ndarray) -> dict[str, Any]:
    """Thresholds chosen on validation (0.5, Youden's J, 95% specificity), the test sensitivity and
    specificity at the validation-chosen 95%-specificity threshold, and the thresholds written into the
    checkpoint that holds this run's final model, so that `pcamx.predict` applies them."""
    thresholds = choose_thresholds(val_labels, val_probs)
    points = operating_points(thresholds, InferenceSettings.from_run_config(run.config).to_dict(), len(val_labels))
    at = rates_at(labels, probs, thresholds["val95spec"])
    log.info("thresholds chosen on %d validation patches: %s; test at val95spec: sensitivity %.4f, "
             "specificity %.4f", len(val_labels), {k: round(v, 4) for k, v in thresholds.items()},
             at["sensitivity"], at["specificity"])
    final = final_checkpoint(run, origin)
    if final is not None:
        record_operating_points(final, points)
    return {"operating_points": points, "sens_at_val95spec_threshold": at["sensitivity"],
            "spec_at_val95spec_threshold": at["specificity"]}


def final_checkpoint(run: Run, origin: Origin) -> Path | None:
    """The checkpoint this run wrote that holds the model it evaluated: its compressed model, else the
    best.pt it trained (its best-validation weights). None for a checkpoint=... run without compression,
    whose source is left untouched."""
    if run.cfg.prune.method != "none":
        return run.run_dir / run_files.COMPRESSED
    best = run.run_dir / run_files.BEST
    return best if origin.checkpoint is None and best.is_file() else None


def calibrate_stage(run: Run, labels: np.ndarray, probs: np.ndarray, val_labels: np.ndarray,
                    val_probs: np.ndarray) -> tuple[np.ndarray | None, dict[str, Any]]:
    """eval.calibrate=temperature: one temperature fitted on the validation predictions (never on test); the
    test ECE/NLL/Brier before and after. Returns (calibrated test probs, its part of metrics.json)."""
    cfg = run.cfg
    if cfg.eval.calibrate == "none":
        return None, {}
    temperature = fit_temperature(val_labels, val_probs)
    calibrated = apply_temperature(probs, temperature)
    keys = ("ece", "nll", "brier")
    before, after = binary_metrics(labels, probs), binary_metrics(labels, calibrated)
    log.info("temperature %.4f (fitted on %d validation patches): test ECE %.4f → %.4f", temperature,
             len(val_labels), before["ece"], after["ece"])
    return calibrated, {"calibration": {
        "method": "temperature", "temperature": round(temperature, 6), "fitted_on": "valid",
        "n_fit": int(len(val_labels)), "before": {k: before[k] for k in keys}, "after": {k: after[k] for k in keys},
    }}


def describe(run: Run, origin: Origin, n_test: int) -> dict[str, Any]:
    """How the row was measured and what it is."""
    cfg = run.cfg
    views = view_count(cfg.eval)
    return {"n_test": int(n_test), "tta": views > 1, "tta_views": views, "resolution": int(cfg.data.resolution),
            "eval_precision": EvalPrecision.of(cfg.quant.mode, run.device, cfg.eval.precision),
            "train_precision": origin.train_precision, "data": run.data.source, "method": origin.method,
            "method_config": origin.method_config, "model": cfg.model.name, "quant": cfg.quant.mode,
            "device": str(run.device), "checkpoint": origin.checkpoint}


def report_stage(run: Run, labels: np.ndarray, probs: np.ndarray, calibrated: np.ndarray | None,
                 metrics: dict[str, Any]) -> None:
    """predictions.csv, roc.png, calibration.png, metrics.json, W&B; then the resumable state is no longer
    needed."""
    source, method = run.data.source, metrics["method"]
    title = f"{method} on {source}" + (" (synthetic stand-in, not PCam)" if source != "pcam" else "")
    write_predictions(run.run_dir / run_files.PREDICTIONS, labels, probs, calibrated)
    roc = plot_roc(run.run_dir / run_files.ROC, labels, probs, title)
    reliability = plot_reliability(run.run_dir / run_files.CALIBRATION, [(method, labels, probs)] + (
        [(f"{method}, T={metrics['calibration']['temperature']:.3g}", labels, calibrated)]
        if calibrated is not None else []), title)
    disk.write_json(run.run_dir / run_files.METRICS, metrics)
    run.tracker.summary({f"test/{k}": metrics[k] for k in METRIC_NAMES} | {"data": source})
    run.tracker.log_image("test/roc", roc)
    run.tracker.log_image("test/calibration", reliability)
    run.tracker.finish()
    (run.run_dir / run_files.RESUME).unlink(missing_ok=True)
    print(f"\n{title} — results in {run.run_dir}\n{format_table(metrics)}")


# ---------------------------------------------------------------- helpers


def run_job(cfg: DictConfig) -> dict[str, Any] | None:
    """What `run.py` calls. A known error (a refusal, a damaged file, missing data, a diverged training) prints
    one `error: …` line and exits with status 2; anything else keeps its traceback. In a sweep a failed job is
    recorded (metrics.json) and logged instead of raised: Hydra's sweeper would otherwise abort before the
    summary callback writes the table, and that callback exits non-zero for failed runs, so the command's
    status still says so. An interrupted run prints one line and exits with 128 + the signal number (a requeue
    signal goes on to submitit)."""
    from pcamx.report.callback import sweep_reports_failures

    try:
        return run(cfg)
    except RunInterrupted as err:
        where = f" after step {err.step}" if err.step is not None else ""
        print(f"pcamx: stopped by {signal.Signals(err.signum).name}{where}; rerun the same command to continue",
              file=sys.stderr, flush=True)
        interrupts.forward(err.signum)
        raise SystemExit(err.exit_code) from None
    except Exception as err:
        in_sweep = sweep_reports_failures()
        if in_sweep and not isinstance(err, RunDirBusy):
            log.error("job failed, the sweep summary reports it: %s", one_line(err), exc_info=not isinstance(
                err, UserError))
            return None
        if isinstance(err, UserError) and not in_sweep:
            raise SystemExit(report_error(err)) from None
        raise


def validate_config(cfg: DictConfig, device: torch.device) -> None:
    """Reject impossible settings before any data is read or any step is trained: every value in its range
    (the schema's), then what depends on several keys or on this machine."""
    check_ranges(cfg)
    if str(cfg.resume).lower() not in ("auto", "true", "false"):
        raise ValueError(f"resume must be auto, true or false, got {cfg.resume!r}")
    for key in ("train", "eval"):
        check_precision(cfg[key].precision, f"{key}.precision", device)
    ColorJitter.from_config(cfg.data.jitter)
    plan_from_config(cfg.prune)
    check_quantization(cfg.quant.mode, device)


@contextlib.contextmanager
def config_errors() -> Iterator[None]:
    """What goes wrong while the settings are checked is a setting's fault: a ConfigError (printed as one line)."""
    try:
        yield
    except UserError:
        raise
    except (ValueError, RuntimeError) as err:
        raise ConfigError(str(err)) from err
