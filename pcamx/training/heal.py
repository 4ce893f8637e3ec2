"""Healing after compression: fine-tune the compressed model with distillation from the uncompressed one.

The loss is CE + heal.kd_weight · T² · KL(teacher_T ‖ student_T), the learning rates are the method's times
heal.lr_scale, and the unhealed weights are a candidate too: if no step beats them on train.select_metric,
the model keeps them, so healing never makes validation worse. Nothing is written: the caller saves the
healed model as its compressed checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from pcamx.data.device_loader import to_device
from pcamx.data.pcam import PCamSplit
from pcamx.data.transforms import preprocess
from pcamx.evaluation.evaluate import evaluate
from pcamx.runtime.hardware import autocast
from pcamx.runtime.tracking import Tracker
from pcamx.training.loop import Distillation, Session, train, validate
from pcamx.training.losses import distillation_loss
from pcamx.training.methods import apply_method


@torch.inference_mode()
def distillation_gap(student: nn.Module, teacher: nn.Module, split: PCamSplit, device: torch.device,
                     cfg: Mapping[str, Any]) -> float:
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


def heal(model: nn.Module, teacher: nn.Module, train_split: PCamSplit, val_split: PCamSplit, test_split: PCamSplit,
         cfg: Mapping[str, Any], device: torch.device, tracker: Tracker, trained_with: str,
         step_offset: int = 0) -> dict[str, Any]:
    """Heal `model` in place for prune.heal_epochs; returns metrics.json's `before_heal` and `heal` parts."""
    method = cfg["method"]
    if trained_with != method["name"]:
        raise ValueError(f"the checkpoint was trained with method={trained_with}, but healing would train it with "
                         f"method={method['name']}; add method={trained_with} (healing uses the method's "
                         "parameters and learning rates)")
    unhealed_val = validate(model, val_split, device, cfg)
    before = {**evaluate(model, test_split, device, cfg, cfg["eval"]["precision"], desc="test (unhealed)")[2],
              "val": unhealed_val, "val_kd": distillation_gap(model, teacher, val_split, device, cfg)}
    groups = apply_method(model, method, cfg["train"]["lr"], cfg["train"]["weight_decay"],
                          cfg["train"]["decay_all_params"])
    for group in groups:  # healing nudges a trained model: every group's lr, scaled down
        group["lr"] *= cfg["heal"]["lr_scale"]
    distill = Distillation(teacher, cfg["heal"]["temperature"], cfg["heal"]["kd_weight"])
    session = Session(cfg["prune"]["heal_epochs"], name="heal", distill=distill, start_val=unhealed_val,
                      step_offset=step_offset)
    healed = train(model, groups, train_split, val_split, cfg, device, tracker, session)
    model.to(device).eval()
    return {"before_heal": before,
            "heal": {"epochs": session.epochs, "best_step": healed.best_step, "val": healed.best_val,
                     "val_kd": distillation_gap(model, teacher, val_split, device, cfg), "history": healed.history}}
