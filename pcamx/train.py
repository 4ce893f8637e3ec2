"""The training loop: AdamW with per-group learning rates, linear warmup + cosine decay, gradient
clipping, label smoothing, bf16 autocast on CUDA, periodic validation, best/last checkpoints."""

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

from pcamx import interrupts, resume
from pcamx.checkpoint import RESUME_FILE, save_checkpoint
from pcamx.data.device_loader import to_device
from pcamx.data.pcam import PCamSplit
from pcamx.data.transforms import ColorJitter, preprocess
from pcamx.evaluate import predict, view_count
from pcamx.hardware import autocast
from pcamx.interrupts import RunInterrupted
from pcamx.methods import merge_lora, plain_state_dict
from pcamx.metrics import METRIC_ALIASES, binary_metrics, improves
from pcamx.model import PCamClassifier
from pcamx.tracking import Tracker

log = logging.getLogger("pcamx")


@dataclass
class TrainResult:
    steps: int = 0
    best_step: int | None = None
    best_val: dict[str, float] = field(default_factory=dict)
    last_val: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def warmup_cosine(step: int, warmup: int, total: int, zero_start: bool = False) -> float:
    """LR multiplier: linear 0→1 over `warmup` steps, then cosine 1→0 at `total`.

    The warmup is (step + 1) / warmup, so no step is spent at lr 0; `zero_start` makes it step / warmup
    (step 0 at lr 0), as the reference protocol does."""
    if step < warmup:
        return (step if zero_start else step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def smoothed_ce_from_probs(labels: np.ndarray, probs: np.ndarray, smoothing: float) -> float:
    """The training objective (label-smoothed cross-entropy) evaluated from 2-class probabilities."""
    p = np.clip(np.stack([1 - probs, probs], axis=1), 1e-7, 1)
    logp = np.log(p)
    nll = -logp[np.arange(len(labels)), labels]
    return float(np.mean((1 - smoothing) * nll - smoothing * logp.mean(axis=1)))


class TrainingDiverged(RuntimeError):
    """A non-finite loss, gradient norm or weight: training stopped, and nothing from that step on was saved."""

    reason = "diverged"


def validate(model, split: PCamSplit, device, cfg: Mapping[str, Any], step: int | None = None) -> dict[str, float]:
    """Validation metrics and val_loss; part of training, so at `train.precision`. Non-finite predictions
    (finite weights too large for the forward) mean the training diverged."""
    labels, probs = predict(
        model, split, device, cfg["data"]["eval_batch_size"], cfg["data"]["resolution"],
        views=view_count(cfg["eval"], validation=True), precision=cfg["train"]["precision"], desc="val",
    )
    if not np.isfinite(probs).all():
        where = f" after step {step}" if step is not None else ""
        bad = int((~np.isfinite(probs)).sum())
        raise TrainingDiverged(f"training diverged: validation{where} predicted NaN/inf for {bad} of {len(probs)} "
                               "patches; nothing from this point on was saved. Lower the learning rate or clip "
                               "gradients (train.grad_clip), then start over.")
    metrics = binary_metrics(labels, probs)
    metrics["val_loss"] = smoothed_ce_from_probs(labels, probs, cfg["train"]["label_smoothing"])
    return metrics


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
    teacher: nn.Module | None = None,
    temperature: float = 1.0,
    kd_weight: float = 0.0,
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
    if teacher is not None:
        with torch.no_grad(), autocast(device, precision):
            teacher_logits = teacher(x)
        kd = distillation_loss(logits.float(), teacher_logits.float(), temperature)
        loss = loss + kd_weight * kd
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    # max_norm=inf measures without clipping: the norm is what the divergence check reads.
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or math.inf)
    optimizer.step()
    return loss.detach(), None if kd is None else kd.detach(), grad_norm.detach()


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(softmax(teacher/T) ‖ softmax(student/T)), batch mean (Hinton et al.; T² keeps gradients
    comparable across temperatures)."""
    t = temperature
    return F.kl_div(
        F.log_softmax(student_logits / t, dim=-1), F.log_softmax(teacher_logits / t, dim=-1),
        log_target=True, reduction="batchmean",
    ) * t * t


@torch.inference_mode()
def distillation_gap(student: nn.Module, teacher: nn.Module, split: PCamSplit, device, cfg: Mapping[str, Any]) -> float:
    """Mean distillation loss of `student` against `teacher` on a split (no augmentation, no TTA): how far
    compression moved the model, and how much healing brought it back."""
    student.eval(), teacher.eval()
    total, n = 0.0, 0
    for images, _ in to_device(split.batches(cfg["data"]["eval_batch_size"]), device):
        x = preprocess(images, cfg["data"]["resolution"])
        with autocast(device, cfg["train"]["precision"]):
            s_logits, t_logits = student(x), teacher(x)
        kd = distillation_loss(s_logits.float(), t_logits.float(), cfg["heal"]["temperature"])
        total, n = total + kd.item() * len(images), n + len(images)
    return total / max(n, 1)


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
    }


class FiniteWatch:
    """Checks each step's loss and gradient norm for NaN/inf, one step late: reading them waits only for
    the previous step, which has finished, so the device always has the current step queued."""

    def __init__(self, phase: str):
        self.phase = phase
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
            f"{self.phase} diverged at step {step}: loss {loss_value}, gradient norm {norm_value}, learning rates "
            f"{', '.join(f'{lr:.3g}' for lr in lrs)}; {last}. Nothing from this step on was saved. Lower the "
            "learning rate (train.lr, method.lr_*) or clip gradients (train.grad_clip), then start over "
            "(resume=false or a new run directory)."
        )


def check_finite_weights(model: nn.Module, step: int) -> None:
    """Refuse to save weights that are NaN or inf (one reduction per tensor, only when saving)."""
    finite = torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all()
    if not finite.item():
        raise TrainingDiverged(f"training diverged: the weights became non-finite after step {step}; nothing was "
                               "saved. Lower the learning rate or clip gradients (train.grad_clip), then start over "
                               "(resume=false).")


def train(
    model: PCamClassifier,
    param_groups: list[dict],
    train_split: PCamSplit,
    val_split: PCamSplit,
    cfg: Mapping[str, Any],
    device: torch.device,
    run_dir: Path,
    tracker: Tracker,
    *,
    epochs: int | None = None,
    teacher: nn.Module | None = None,
    phase: str = "train",
    baseline_val: dict[str, float] | None = None,
    step_offset: int = 0,
) -> TrainResult:
    """Train in place; on return the model holds the best validation weights (LoRA merged).

    With a `teacher` (healing after compression) the loss adds knowledge distillation,
    `heal.kd_weight · T² · KL(teacher_T ‖ student_T)`, and no best/last checkpoints are written: the
    healed model is saved as a compressed checkpoint by the caller. `baseline_val` (the starting
    weights' validation metrics) makes the starting point a candidate too: if no step beats it on
    `select_metric`, the model ends with its starting weights, so healing never makes validation worse.

    Stops with TrainingDiverged at a non-finite loss or gradient norm, and with RunInterrupted after the
    current step when SIGTERM/SIGINT arrives (training writes resume.pt first).
    """
    tcfg, dcfg = cfg["train"], cfg["data"]
    epochs = tcfg["epochs"] if epochs is None else epochs
    save = phase == "train"  # healing neither writes best/last nor resumes (the caller saves its result)
    select = METRIC_ALIASES.get(tcfg["select_metric"], tcfg["select_metric"])
    tiebreak = tcfg["select_tiebreak"]
    batch_size, resolution = dcfg["batch_size"], dcfg["resolution"]
    steps_per_epoch = train_split.num_batches(batch_size, drop_last=True)
    if tcfg["max_train_batches"]:
        steps_per_epoch = min(steps_per_epoch, tcfg["max_train_batches"])
    if steps_per_epoch == 0:
        raise ValueError(f"the train split ({len(train_split)} patches) is smaller than one batch ({batch_size})")
    total_steps = epochs * steps_per_epoch
    val_interval = max(1, round(tcfg["val_every"] * steps_per_epoch))
    checkpoint_every = tcfg.get("checkpoint_every") or 0
    precision = cfg["train"]["precision"]
    jitter = ColorJitter.from_config(dcfg["jitter"])
    settings = resume.fingerprint(cfg)

    optimizer = build_optimizer(param_groups, device, tcfg["lr"])
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    # Augmentation draws from its own generator; the shuffle order of epoch e is a pure function of
    # (seed, e). A resumed run can then replay the order and skip the batches it already trained on.
    aug_generator = torch.Generator().manual_seed(cfg["seed"])
    result = TrainResult()
    best_state = None
    if baseline_val is not None:
        result.best_val, result.best_step, best_state = baseline_val, 0, plain_state_dict(model)
    model.to(device).train()
    forward = torch.compile(model) if cfg["hardware"].get("compile") else model
    step, seconds_before = 0, 0.0
    if save:
        state = resume.load_state(run_dir, cfg.get("resume", "auto"), settings)
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            aug_generator.set_state(state["aug_generator"])
            resume.set_rng_state(state["rng"])
            step, best_state, result.history = state["step"], state["best_state"], state["history"]
            result.best_val, result.best_step = state["best_val"], state["best_step"]
            result.last_val, seconds_before = state["last_val"], state.get("seconds", 0.0)
            log.info("resumed from step %d of %d (epoch %d of %d) in %s", step, total_steps,
                     step // steps_per_epoch + 1, epochs, run_dir / RESUME_FILE)
    log.info("%s: %d steps (%d epochs x %d), batch %d, %s", phase, total_steps, epochs, steps_per_epoch, batch_size,
             precision)
    t0 = time.time()
    bar = tqdm(total=total_steps, initial=step, desc=phase, disable=None)
    if teacher is not None:
        teacher.to(device).eval().requires_grad_(False)
    kd_window: list[torch.Tensor] = []
    watch = FiniteWatch(phase)

    def save_resume_state() -> None:
        watch.flush()
        check_finite_weights(model, step)
        resume.save_state(run_dir, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
            "aug_generator": aug_generator.get_state(), "best_state": best_state, "best_val": result.best_val,
            "best_step": result.best_step, "last_val": result.last_val, "history": result.history,
            "seconds": seconds_before + time.time() - t0,
        }, settings)

    with interrupts.deferred():
        for epoch in range(step // steps_per_epoch, epochs):
            order = torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + epoch)
            batches = train_split.batches(batch_size, shuffle=True, generator=order, drop_last=True)
            first = step - epoch * steps_per_epoch  # > 0 only when resuming mid-epoch: trained before
            batches = itertools.islice(batches, first, steps_per_epoch)
            for i, (images, labels) in enumerate(to_device(batches, device), start=first):
                lr_scale = warmup_cosine(step, tcfg["warmup_steps"], total_steps, tcfg["warmup_zero_start"])
                for group in optimizer.param_groups:
                    group["lr"] = group["initial_lr"] * lr_scale
                loss, kd, grad_norm = train_step(
                    forward, optimizer, images, labels, resolution=resolution, augment=dcfg["augment"],
                    generator=aug_generator, precision=precision, jitter=jitter,
                    label_smoothing=tcfg["label_smoothing"], grad_clip=tcfg["grad_clip"], teacher=teacher,
                    temperature=cfg["heal"]["temperature"] if teacher is not None else 1.0,
                    kd_weight=cfg["heal"]["kd_weight"] if teacher is not None else 0.0,
                )
                watch.push(step, loss, grad_norm, [g["lr"] for g in optimizer.param_groups])
                if kd is not None:
                    kd_window.append(kd)
                step += 1
                bar.update()
                if step % LOG_EVERY == 0:  # .item() waits for the GPU: not every step
                    tracker.log({f"{phase}/loss": loss.item(), f"{phase}/lr_scale": lr_scale, "epoch": epoch},
                                step=step_offset + step)

                end_of_epoch = i + 1 == steps_per_epoch
                if step % val_interval == 0 or end_of_epoch:
                    watch.flush()
                    check_finite_weights(model, step)
                    val = validate(model, val_split, device, cfg, step)
                    model.train()
                    record = {"step": step, "epoch": epoch, "train_loss": loss.item(), **val}
                    if kd_window:
                        record["kd_loss"] = torch.stack(kd_window).mean().item()
                        kd_window = []
                    result.history.append(record)
                    val_prefix = "val" if phase == "train" else f"{phase}_val"
                    tracker.log({f"{val_prefix}/{k}": v for k, v in val.items()}, step=step_offset + step)
                    bar.set_postfix(loss=f"{loss.item():.3f}", **{select: f"{val[select]:.4f}"})
                    if improves(val, result.best_val, select, tiebreak):
                        result.best_val, result.best_step = val, step
                        payload = checkpoint_payload(model, cfg, step, val)
                        best_state = payload["model"]
                        if save and tcfg["save_best"]:
                            save_checkpoint(payload, run_dir / "best.pt")
                    result.last_val = val
                if save and (end_of_epoch or (checkpoint_every and step % checkpoint_every == 0)):
                    save_resume_state()
                if signum := interrupts.requested():
                    if save:
                        save_resume_state()
                    bar.close()
                    raise RunInterrupted(signum, step)
        watch.flush()
    bar.close()
    result.steps, result.seconds = step, seconds_before + time.time() - t0

    merge_lora(model)
    if save and tcfg["save_last"] and step:
        check_finite_weights(model, step)
        save_checkpoint(checkpoint_payload(model, cfg, step, result.last_val), run_dir / "last.pt")
    if best_state is not None:
        model.load_state_dict(best_state)
    return result


def build_optimizer(param_groups: list[dict], device: torch.device, lr: float) -> torch.optim.AdamW:
    """AdamW; the fused kernel on CUDA (one launch for all parameters instead of one per tensor)."""
    return torch.optim.AdamW(param_groups, lr=lr, fused=device.type == "cuda")


LOG_EVERY = 10  # steps between training-loss logs
