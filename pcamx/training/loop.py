"""The training loop: AdamW with per-group learning rates, linear warmup + cosine decay, gradient
clipping, label smoothing, bf16 autocast, periodic validation and checkpoint selection, resumable state,
a divergence guard, and a clean stop on SIGTERM/SIGINT. `train` reads top to bottom; healing after
compression (pcamx.training.heal) is one more caller of it, with a teacher and without checkpoints."""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pcamx.checkpoint import INFERENCE_KEY, OPERATING_POINTS_KEY, save_checkpoint
from pcamx.data.device_loader import to_device
from pcamx.data.pcam import PCamSplit
from pcamx.data.transforms import ColorJitter, preprocess
from pcamx.evaluation.evaluate import predict, view_count
from pcamx.evaluation.metrics import METRIC_ALIASES, binary_metrics, improves
from pcamx.evaluation.operating_points import operating_points, threshold_metrics, thresholds_of
from pcamx.inference.settings import InferenceSettings
from pcamx.model import PCamClassifier
from pcamx.runtime import interrupts, run_files, search
from pcamx.runtime.errors import UserError
from pcamx.runtime.hardware import autocast
from pcamx.runtime.interrupts import RunInterrupted
from pcamx.runtime.tracking import Tracker
from pcamx.training import resume
from pcamx.training.losses import distillation_loss, smoothed_ce_from_probs
from pcamx.training.methods import merge_lora, plain_state_dict
from pcamx.training.optim import build_optimizer, warmup_cosine

log = logging.getLogger("pcamx")
LOG_EVERY = 10  # steps between training-loss logs (.item() waits for the device: not every step)


@dataclass
class Session:
    """One call of `train`: how long, under which name, and what it keeps."""

    epochs: int
    name: str = "train"  # progress bar, logs and W&B prefix
    run_dir: Path | None = None  # best.pt / last.pt / resume.pt go here; None: nothing is written (healing)
    distill: Distillation | None = None  # a teacher to distill from (healing)
    start_val: dict[str, float] | None = None  # the starting weights' validation metrics: a candidate too
    step_offset: int = 0  # logged steps continue after an earlier session
    resume: dict[str, Any] | None = None  # a resume.pt's state already read (else train reads run_dir's)


@dataclass
class TrainResult:
    steps: int = 0
    best_step: int | None = None
    best_val: dict[str, float] = field(default_factory=dict)
    last_val: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0  # training time, earlier interrupted attempts included
    seconds_before: float = 0.0  # of which earlier attempts


@dataclass(frozen=True)
class Distillation:
    """loss += weight · T² · KL(softmax(teacher/T) ‖ softmax(student/T)) (Hinton et al.; T² keeps the
    gradients comparable across temperatures)."""

    teacher: nn.Module
    temperature: float
    weight: float

    def loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return distillation_loss(student_logits, teacher_logits, self.temperature)


class TrainingDiverged(UserError, RuntimeError):
    """A non-finite loss, gradient norm, weight or prediction: training stopped, nothing from then was saved."""

    reason = "diverged"


class ModelCollapsed(TrainingDiverged):
    """Validation found one constant probability for every patch: the model no longer tells them apart."""

    reason = "collapsed"


class RunPruned(UserError):
    """A search trial its pruner stopped early: not a failure (metrics.json says `status: pruned`)."""

    status = reason = "pruned"


COLLAPSE_SPREAD = 1e-9  # largest max − min of validation probabilities that counts as one constant


def validation_settings(cfg: Mapping[str, Any]) -> InferenceSettings:
    """How validation during training predicts: eval.val_tta's views, at train.precision, unquantized."""
    return InferenceSettings(cfg["data"]["resolution"], view_count(cfg["eval"], validation=True),
                             cfg["train"]["precision"])


def validate(model, split: PCamSplit, device, cfg: Mapping[str, Any], step: int | None = None) -> dict[str, float]:
    """Validation metrics, val_loss and the thresholds chosen on these predictions; part of training, so at
    `train.precision`. Non-finite predictions (finite weights too large for the forward) mean the training
    diverged."""
    how = validation_settings(cfg)
    labels, probs = predict(model, split, device, cfg["data"]["eval_batch_size"], how.resolution,
                            views=how.tta_views, precision=how.precision, desc="val")
    if not np.isfinite(probs).all():
        where = f" after step {step}" if step is not None else ""
        bad = int((~np.isfinite(probs)).sum())
        raise TrainingDiverged(f"training diverged: validation{where} predicted NaN/inf for {bad} of {len(probs)} "
                               "patches; nothing from this point on was saved. Lower the learning rate or clip "
                               "gradients (train.grad_clip), then start over.")
    if probs.max() - probs.min() <= COLLAPSE_SPREAD:
        where = f" after step {step}" if step is not None else ""
        raise ModelCollapsed(f"training collapsed: validation{where} predicted P(tumour) = {probs[0]:.6g} for every "
                             f"one of its {len(probs)} patches; nothing from this point on was saved. Lower the "
                             "learning rate (train.lr, method.lr_*), keep gradient clipping and warmup on "
                             "(train.grad_clip, train.warmup_steps), then start over (resume=false).")
    metrics = binary_metrics(labels, probs)
    metrics["val_loss"] = smoothed_ce_from_probs(labels, probs, cfg["train"]["label_smoothing"])
    return metrics | threshold_metrics(labels, probs)


def train_step(
    forward: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    resolution: int,
    augment: bool,
    generator: torch.Generator,
    precision: str,
    jitter: ColorJitter | None = None,
    label_smoothing: float = 0.0,
    grad_clip: float = 0.0,
    distill: Distillation | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """One optimizer step on a uint8 batch (moved to the device if it is not there yet): batched
    augmentation there, autocast forward, (distilled) loss, clip, step. Returns the detached loss,
    distillation term and gradient norm (before clipping), on the device (no host sync here)."""
    device = optimizer.param_groups[0]["params"][0].device
    images = images.to(device, non_blocking=True)
    labels = labels.to(device, non_blocking=True)
    x = preprocess(images, resolution, augment=augment, generator=generator, jitter=jitter)
    with autocast(device, precision):
        logits = forward(x)
    loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
    kd = None
    if distill is not None:
        with torch.no_grad(), autocast(device, precision):
            teacher_logits = distill.teacher(x)
        kd = distill.loss(logits.float(), teacher_logits.float())
        loss = loss + distill.weight * kd
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    # max_norm=inf measures without clipping: the norm is what the divergence check reads.
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or math.inf)
    optimizer.step()
    return loss.detach(), None if kd is None else kd.detach(), grad_norm.detach()


def checkpoint_payload(model: PCamClassifier, cfg: Mapping[str, Any], step: int, val: dict) -> dict:
    return {
        "model": plain_state_dict(model),
        "backbone_config": model.config.to_dict(),
        "model_name": cfg["model"]["name"],
        "method": cfg["method"]["name"],
        "method_config": dict(cfg["method"]),
        "train_precision": cfg["train"]["precision"],
        "step": step,
        "val_metrics": val,
        "select_metric": cfg["train"]["select_metric"],
        INFERENCE_KEY: InferenceSettings.from_run_config(cfg).to_dict(),
        # Chosen by this validation pass, so with its views and the training precision.
        OPERATING_POINTS_KEY: operating_points(thresholds_of(val), validation_settings(cfg).to_dict()),
    }


class FiniteWatch:
    """Checks each step's loss and gradient norm for NaN/inf, one step late: reading them waits only for
    the previous step, which has finished, so the device always has the current step queued."""

    def __init__(self, name: str):
        self.name = name
        self.pending: tuple[int, torch.Tensor, torch.Tensor, list[float]] | None = None
        self.last_finite: tuple[int, float] | None = None

    def push(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, lrs: list[float]) -> None:
        self.flush()
        self.pending = (step, loss, grad_norm, lrs)

    def flush(self) -> None:
        if self.pending is None:
            return
        step, loss, grad_norm, lrs = self.pending
        self.pending = None
        loss_value, norm_value = torch.stack([loss.float(), grad_norm.float()]).tolist()
        if math.isfinite(loss_value) and math.isfinite(norm_value):
            self.last_finite = (step, loss_value)
            return
        last = ("no step before it had a finite loss" if self.last_finite is None else
                f"the last finite loss was {self.last_finite[1]:.4g} at step {self.last_finite[0]}")
        raise TrainingDiverged(
            f"{self.name} diverged at step {step}: loss {loss_value}, gradient norm {norm_value}, learning rates "
            f"{', '.join(f'{lr:.3g}' for lr in lrs)}; {last}. Nothing from this step on was saved. Lower the "
            "learning rate (train.lr, method.lr_*) or clip gradients (train.grad_clip), then start over "
            "(resume=false or a new run directory)."
        )


def check_finite_weights(model: nn.Module, step: int) -> None:
    """Refuse to save or evaluate weights that are NaN or inf (one reduction per tensor, only then)."""
    finite = torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all()
    if not finite.item():
        raise TrainingDiverged(f"training diverged: the weights became non-finite after step {step}; nothing was "
                               "saved. Lower the learning rate or clip gradients (train.grad_clip), then start over "
                               "(resume=false).")


@dataclass
class _Loop:
    """What the loop carries from step to step, and what resume.pt saves of it."""

    optimizer: torch.optim.Optimizer
    aug_generator: torch.Generator
    result: TrainResult
    step: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    seconds_before: float = 0.0

    def state(self, model: nn.Module, started: float) -> dict[str, Any]:
        r = self.result
        return {"model": model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
                "aug_generator": self.aug_generator.get_state(), "best_state": self.best_state,
                "best_val": r.best_val, "best_step": r.best_step, "last_val": r.last_val, "history": r.history,
                "seconds": self.seconds_before + time.time() - started}

    def restore(self, model: nn.Module, state: dict[str, Any]) -> None:
        model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.aug_generator.set_state(state["aug_generator"])
        resume.set_rng_state(state["rng"])
        self.step, self.best_state, self.seconds_before = state["step"], state["best_state"], state["seconds"]
        r = self.result
        r.history, r.best_val, r.best_step, r.last_val = (state["history"], state["best_val"], state["best_step"],
                                                          state["last_val"])


def train(
    model: PCamClassifier,
    param_groups: list[dict],
    train_split: PCamSplit,
    val_split: PCamSplit,
    cfg: Mapping[str, Any],
    device: torch.device,
    tracker: Tracker,
    session: Session,
) -> TrainResult:
    """Train in place; on return the model holds the best validation weights (LoRA merged).

    One function on purpose (as nanoGPT's loop): a step reads top to bottom, from the learning rate to the
    checkpoint, with nothing hidden in callbacks. Stops with TrainingDiverged at a non-finite loss, gradient
    norm, weight or validation prediction, and with RunInterrupted after the current step when
    SIGTERM/SIGINT arrives (writing resume.pt first when the session keeps checkpoints).
    """
    tcfg, dcfg = cfg["train"], cfg["data"]
    select, tiebreak = METRIC_ALIASES.get(tcfg["select_metric"], tcfg["select_metric"]), tcfg["select_tiebreak"]
    steps_per_epoch = train_split.num_batches(dcfg["batch_size"], drop_last=True)
    if tcfg["max_train_batches"]:
        steps_per_epoch = min(steps_per_epoch, tcfg["max_train_batches"])
    if steps_per_epoch == 0:
        raise ValueError(f"the train split ({len(train_split)} patches) is smaller than one batch "
                         f"({dcfg['batch_size']})")
    total_steps = session.epochs * steps_per_epoch
    val_interval = max(1, round(tcfg["val_every"] * steps_per_epoch))
    jitter, settings = ColorJitter.from_config(dcfg["jitter"]), resume.fingerprint(cfg)
    keep = session.run_dir is not None

    optimizer = build_optimizer(param_groups, device, tcfg["lr"])
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    # Augmentation draws from its own generator, and the shuffle order of epoch e is a pure function of
    # (seed, e): a resumed run replays the order and skips the batches it trained on before.
    loop = _Loop(optimizer, torch.Generator().manual_seed(cfg["seed"]), TrainResult())
    if session.start_val is not None:
        loop.result.best_val, loop.result.best_step, loop.best_state = session.start_val, 0, plain_state_dict(model)
    model.to(device).train()
    forward = torch.compile(model) if cfg["hardware"]["compile"] else model
    state = session.resume or (resume.load_state(session.run_dir, cfg["resume"], settings) if keep else None)
    if state is not None:
        loop.restore(model, state)
        where = (f"from step {loop.step} of {total_steps} (epoch {loop.step // steps_per_epoch + 1} of "
                 f"{session.epochs})" if loop.step < total_steps else f"after its last step ({total_steps}): "
                 "training is done, evaluation follows")
        log.info("resumed %s in %s", where, session.run_dir / run_files.RESUME)
    log.info("%s: %d steps (%d epochs x %d), batch %d, %s", session.name, total_steps, session.epochs,
             steps_per_epoch, dcfg["batch_size"], tcfg["precision"])
    if session.distill is not None:
        session.distill.teacher.to(device).eval().requires_grad_(False)
    started, watch, kd_window = time.time(), FiniteWatch(session.name), []
    trial = search.current_trial() if keep else None
    bar = tqdm(total=total_steps, initial=loop.step, desc=session.name, disable=None)

    def save_resume_state() -> None:
        watch.flush()
        check_finite_weights(model, loop.step)
        resume.save_state(session.run_dir, loop.state(model, started), settings)

    with interrupts.deferred():
        for epoch in range(loop.step // steps_per_epoch, session.epochs):
            order = torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + epoch)
            batches = train_split.batches(dcfg["batch_size"], shuffle=True, generator=order, drop_last=True)
            first = loop.step - epoch * steps_per_epoch  # > 0 only when resuming mid-epoch
            for i, (images, labels) in enumerate(to_device(itertools.islice(batches, first, steps_per_epoch),
                                                           device), start=first):
                lr_scale = warmup_cosine(loop.step, tcfg["warmup_steps"], total_steps, tcfg["warmup_zero_start"])
                for group in optimizer.param_groups:
                    group["lr"] = group["initial_lr"] * lr_scale
                loss, kd, grad_norm = train_step(
                    forward, optimizer, images, labels, resolution=dcfg["resolution"], augment=dcfg["augment"],
                    generator=loop.aug_generator, precision=tcfg["precision"], jitter=jitter,
                    label_smoothing=tcfg["label_smoothing"], grad_clip=tcfg["grad_clip"], distill=session.distill)
                watch.push(loop.step, loss, grad_norm, [g["lr"] for g in optimizer.param_groups])
                if kd is not None:
                    kd_window.append(kd)
                loop.step += 1
                bar.update()
                if loop.step % LOG_EVERY == 0:
                    tracker.log({f"{session.name}/loss": loss.item(), f"{session.name}/lr_scale": lr_scale,
                                 "epoch": epoch}, step=session.step_offset + loop.step)

                end_of_epoch = i + 1 == steps_per_epoch
                if loop.step % val_interval == 0 or end_of_epoch:
                    watch.flush()
                    check_finite_weights(model, loop.step)
                    val = validate(model, val_split, device, cfg, loop.step)
                    model.train()
                    record = {"step": loop.step, "epoch": epoch, "train_loss": loss.item(), **val}
                    if kd_window:
                        record["kd_loss"], kd_window = torch.stack(kd_window).mean().item(), []
                    loop.result.history.append(record)
                    prefix = "val" if session.name == "train" else f"{session.name}_val"
                    tracker.log({f"{prefix}/{k}": v for k, v in val.items()}, step=session.step_offset + loop.step)
                    bar.set_postfix(loss=f"{loss.item():.3f}", **{select: f"{val[select]:.4f}"})
                    if improves(val, loop.result.best_val, select, tiebreak):
                        loop.result.best_val, loop.result.best_step = val, loop.step
                        payload = checkpoint_payload(model, cfg, loop.step, val)
                        loop.best_state = payload["model"]
                        if keep and tcfg["save_best"]:
                            save_checkpoint(payload, session.run_dir / run_files.BEST)
                    loop.result.last_val = val
                    if trial is not None:  # a search trial: its pruner weighs this validation against the others'
                        trial.report(val[select], len(loop.result.history) - 1)
                        if trial.should_prune():
                            raise RunPruned(f"stopped by the search's pruner after validation round "
                                            f"{len(loop.result.history)} ({select} {val[select]:.4f}): behind "
                                            "the other trials at this point")
                if keep and (end_of_epoch or (tcfg["checkpoint_every"] and loop.step % tcfg["checkpoint_every"] == 0)):
                    save_resume_state()
                if signum := interrupts.requested():
                    if keep:
                        save_resume_state()
                    bar.close()
                    raise RunInterrupted(signum, loop.step)
        watch.flush()
    bar.close()
    loop.result.steps, loop.result.seconds = loop.step, loop.seconds_before + time.time() - started
    loop.result.seconds_before = loop.seconds_before

    merge_lora(model)
    if keep and tcfg["save_last"] and loop.step:
        check_finite_weights(model, loop.step)
        last = checkpoint_payload(model, cfg, loop.step, loop.result.last_val)
        save_checkpoint(last, session.run_dir / run_files.LAST)
    if loop.best_state is not None:
        model.load_state_dict(loop.best_state)
    return loop.result
