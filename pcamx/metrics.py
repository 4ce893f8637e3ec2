"""Binary classification metrics for PCam and the rule for picking the best checkpoint.

All metrics take the positive-class probability `p` (softmax[:, 1]) and labels in {0, 1}.
A label set with a single class is rejected with a ValueError rather than returning NaN:
AUROC/AUPRC/sensitivity-at-specificity are undefined there, and a NaN that silently reaches
checkpoint selection or metrics.json is harder to notice than a crash with a clear message.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

ECE_BINS = 15

# Probabilities are clipped to [NLL_EPS, 1 - NLL_EPS] before the log. 1e-7 is about float32
# resolution near 1 (probs come from a float32/bf16 softmax, which saturates to exactly 0/1),
# so a saturated wrong prediction costs -log(1e-7) ≈ 16.1 whatever dtype the caller passes.
# sklearn's log_loss clips at the dtype's eps (2.2e-16 for float64); the two agree exactly
# whenever every p lies in [1e-7, 1 - 1e-7].
NLL_EPS = 1e-7


def _validate(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels)
    p = np.asarray(probs)
    if y.ndim != 1 or p.ndim != 1:
        raise ValueError(f"labels and probs must be 1-D, got shapes {y.shape} and {p.shape}")
    if y.shape != p.shape:
        raise ValueError(f"labels and probs differ in length: {y.shape[0]} vs {p.shape[0]}")
    if y.size == 0:
        raise ValueError("no samples")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0 or 1, got values {np.unique(y)[:10].tolist()}")
    if not np.issubdtype(p.dtype, np.number) or np.issubdtype(p.dtype, np.complexfloating):
        raise ValueError(f"probs must be real numbers, got dtype {p.dtype}")
    p = p.astype(np.float64)
    if not np.isfinite(p).all():
        raise ValueError("probs contain NaN or inf")
    if p.min() < 0.0 or p.max() > 1.0:
        raise ValueError(f"probs must lie in [0, 1], got range [{p.min()}, {p.max()}]")
    y = y.astype(np.int64)
    if y.min() == y.max():
        raise ValueError(
            f"all {y.size} labels are {y[0]}: AUROC, AUPRC and sensitivity at 95% specificity "
            "are undefined for a single class (evaluate on a set that has both classes)"
        )
    return y, p


def sensitivity_at_specificity(labels: np.ndarray, probs: np.ndarray, specificity: float = 0.95) -> float:
    """Highest TPR over the ROC operating points (thresholds `p >= t`) with TNR >= `specificity`."""
    y, p = _validate(labels, probs)
    # drop_intermediate=False: the best admissible point can sit mid-way along a straight ROC
    # segment (e.g. tied scores), and sklearn would drop it as "intermediate".
    fpr, tpr, _ = roc_curve(y, p, drop_intermediate=False)
    # fpr = fp / n_neg is a rounded quotient; the slack keeps fp/n_neg == 1 - specificity admissible.
    admissible = fpr <= (1.0 - specificity) + 1e-12
    # The first ROC point is (0, 0) (threshold +inf), so `admissible` is never empty.
    return float(tpr[admissible].max())


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE of the predicted class's confidence over `n_bins` equal-width bins of [0, 1].

    pred = p >= 0.5, conf = max(p, 1 - p) ∈ [0.5, 1]. Bin edges are `np.linspace(0, 1, n_bins + 1)`
    and bins are left-open, (lo, hi]: a confidence lying exactly on an edge goes to the lower bin,
    conf = 1 goes to the last bin. With conf >= 0.5 the bins below 0.5 are always empty.
    ECE = Σ_b (n_b / N) · |acc_b − conf_b| = Σ_b |Σ_{i∈b} correct_i − Σ_{i∈b} conf_i| / N.
    """
    y, p = _validate(labels, probs)
    pred = (p >= 0.5).astype(np.int64)
    conf = np.where(pred == 1, p, 1.0 - p)
    correct = (pred == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # side="left" returns i with edges[i-1] < conf <= edges[i], i.e. bin i-1 of (lo, hi].
    bins = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    conf_sum = np.bincount(bins, weights=conf, minlength=n_bins)
    correct_sum = np.bincount(bins, weights=correct, minlength=n_bins)
    return float(np.abs(correct_sum - conf_sum).sum() / y.size)


def brier(labels: np.ndarray, probs: np.ndarray) -> float:
    y, p = _validate(labels, probs)
    return float(np.mean((p - y) ** 2))


def accuracy(labels: np.ndarray, probs: np.ndarray) -> float:
    """Accuracy of the decision p >= 0.5."""
    y, p = _validate(labels, probs)
    return float(np.mean((p >= 0.5) == (y == 1)))


def nll(labels: np.ndarray, probs: np.ndarray) -> float:
    """Binary cross-entropy with probabilities clipped to [NLL_EPS, 1 - NLL_EPS]."""
    y, p = _validate(labels, probs)
    pc = np.clip(p, NLL_EPS, 1.0 - NLL_EPS)
    return float(-np.mean(y * np.log(pc) + (1 - y) * np.log1p(-pc)))


@dataclass(frozen=True)
class Metric:
    """One test metric: its key in metrics.json, its column header in every table, which way is better
    (checkpoint selection), how to compute it from labels and P(class 1), and how many decimals to show."""

    name: str
    header: str
    direction: str  # "max" | "min"
    compute: Callable[[np.ndarray, np.ndarray], float]
    aliases: tuple[str, ...] = ()
    digits: int = 4

    def format(self, value: float) -> str:
        return f"{value:.{self.digits}f}"


# The registry: every metric pcamx reports, in table order. Adding one here adds it to metrics.json, the
# printed and sweep tables, W&B, and the checkpoint-selection choices.
METRICS: tuple[Metric, ...] = (
    Metric("auroc", "AUROC", "max", lambda y, p: float(roc_auc_score(*_validate(y, p)))),
    Metric("auprc", "AUPRC", "max", lambda y, p: float(average_precision_score(*_validate(y, p)))),
    Metric("sens_at_95spec", "Sens @95%Spec", "max", lambda y, p: sensitivity_at_specificity(y, p, 0.95),
           aliases=("sens95",)),
    Metric("ece", "ECE", "min", expected_calibration_error),
    Metric("brier", "Brier", "min", brier),
    Metric("acc", "Acc", "max", accuracy),
    Metric("nll", "NLL", "min", nll),
)
METRIC_NAMES: tuple[str, ...] = tuple(m.name for m in METRICS)
METRIC_ALIASES: dict[str, str] = {alias: m.name for m in METRICS for alias in m.aliases}
# The training objective measured on validation (by the trainer): a selection choice, not a test metric.
VAL_LOSS = "val_loss"
# Every name train.select_metric accepts → the direction in which it improves.
SELECT_METRICS: dict[str, str] = {
    **{m.name: m.direction for m in METRICS},
    **{alias: m.direction for m in METRICS for alias in m.aliases},
    VAL_LOSS: "min",
}


def binary_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Every registered metric from labels in {0,1} and P(class 1)."""
    y, p = _validate(labels, probs)
    return {m.name: m.compute(y, p) for m in METRICS}


def is_better(metric: str, new: float, best: float | None) -> bool:
    """Whether `new` strictly improves on `best` for `metric` (ties keep the earlier checkpoint).

    `best=None` (nothing selected yet) or NaN accepts any non-NaN `new`; a NaN `new` never wins.
    """
    if metric not in SELECT_METRICS:
        raise ValueError(f"unknown selection metric {metric!r}; choose one of {sorted(SELECT_METRICS)}")
    if math.isnan(new):
        return False
    if best is None or math.isnan(best):
        return True
    return new > best if SELECT_METRICS[metric] == "max" else new < best


def improves(new: Mapping[str, float], best: Mapping[str, float] | None, metric: str,
             tiebreak: str | None = None) -> bool:
    """Whether validation metrics `new` beat `best` on `metric` (an alias such as sens95 is accepted);
    on an exact tie, whether they beat it on `tiebreak` (e.g. the reference's "lower val NLL wins").
    Without a tiebreak, a tie keeps the earlier checkpoint."""
    key = METRIC_ALIASES.get(metric, metric)
    previous = (best or {}).get(key)
    if is_better(metric, new[key], previous):
        return True
    if tiebreak is None or previous is None or new[key] != previous:
        return False
    tie_key = METRIC_ALIASES.get(tiebreak, tiebreak)
    return is_better(tiebreak, new[tie_key], best[tie_key])
