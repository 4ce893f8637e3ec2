"""The training objective and the distillation term, as tensors (training) and from probabilities (the
validation loss the trainer reports)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pcamx.evaluation.metrics import NLL_EPS


def smoothed_ce_from_probs(labels: np.ndarray, probs: np.ndarray, smoothing: float) -> float:
    """The training objective (label-smoothed cross-entropy) evaluated from 2-class probabilities."""
    p = np.clip(np.stack([1 - probs, probs], axis=1), NLL_EPS, 1)
    logp = np.log(p)
    nll = -logp[np.arange(len(labels)), labels]
    return float(np.mean((1 - smoothing) * nll - smoothing * logp.mean(axis=1)))


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(softmax(teacher/T) ‖ softmax(student/T)), batch mean."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, dim=-1), F.log_softmax(teacher_logits / t, dim=-1),
                    log_target=True, reduction="batchmean") * t * t
