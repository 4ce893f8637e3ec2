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
from functools import cached_property

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

ECE_BINS = 15

# Probabilities are clipped to [NLL_EPS, 1 - NLL_EPS] before the log. 1e-7 is about float32
# resolution near 1 (probs come from a float32/bf16 softmax, which saturates to exactly 0/1),
# so a saturated wrong prediction costs -log(1e-7) ≈ 16.1 whatever dtype the caller passes.
# sklearn's log_loss clips at the dtype's eps (2.2e-16 for float64); the two agree exactly
# whenever every p lies in [1e-7, 1 - 1e-7].
NLL_EPS = 1e-7


def validate_predictions(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels as int64, P(class 1) as float64), or a ValueError that says what is wrong with them."""
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
    y, p = validate_predictions(labels, probs)
    # drop_intermediate=False: the best admissible point can sit mid-way along a straight ROC
    # segment (e.g. tied scores), and sklearn would drop it as "intermediate".
    fpr, tpr, _ = roc_curve(y, p, drop_intermediate=False)
    # fpr = fp / n_neg is a rounded quotient; the slack keeps fp/n_neg == 1 - specificity admissible.
    admissible = fpr <= (1.0 - specificity) + 1e-12
    # The first ROC point is (0, 0) (threshold +inf), so `admissible` is never empty.
    return float(tpr[admissible].max())


def reliability_bins(labels: np.ndarray, probs: np.ndarray,
                     n_bins: int = ECE_BINS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(count, Σ confidence, Σ correct) in each of `n_bins` equal-width confidence bins of [0, 1].

    pred = p >= 0.5, conf = max(p, 1 - p) ∈ [0.5, 1]. Bin edges are `np.linspace(0, 1, n_bins + 1)`
    and bins are left-open, (lo, hi]: a confidence lying exactly on an edge goes to the lower bin,
    conf = 1 goes to the last bin. With conf >= 0.5 the bins below 0.5 are always empty."""
    y, p = validate_predictions(labels, probs)
    pred = (p >= 0.5).astype(np.int64)
    conf = np.where(pred == 1, p, 1.0 - p)
    correct = (pred == y).astype(np.float64)
    bins = confidence_bin(conf, n_bins)
    return (np.bincount(bins, minlength=n_bins), np.bincount(bins, weights=conf, minlength=n_bins),
            np.bincount(bins, weights=correct, minlength=n_bins))


def confidence_bin(conf: np.ndarray, n_bins: int = ECE_BINS) -> np.ndarray:
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # side="left" returns i with edges[i-1] < conf <= edges[i], i.e. bin i-1 of (lo, hi].
    return np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE of the predicted class's confidence over `n_bins` equal-width bins (`reliability_bins`):
    ECE = Σ_b (n_b / N) · |acc_b − conf_b| = Σ_b |Σ_{i∈b} correct_i − Σ_{i∈b} conf_i| / N."""
    counts, conf_sum, correct_sum = reliability_bins(labels, probs, n_bins)
    return float(np.abs(correct_sum - conf_sum).sum() / counts.sum())


def brier(labels: np.ndarray, probs: np.ndarray) -> float:
    y, p = validate_predictions(labels, probs)
    return float(np.mean((p - y) ** 2))


def accuracy(labels: np.ndarray, probs: np.ndarray) -> float:
    """Accuracy of the decision p >= 0.5."""
    y, p = validate_predictions(labels, probs)
    return float(np.mean((p >= 0.5) == (y == 1)))


def nll(labels: np.ndarray, probs: np.ndarray) -> float:
    """Binary cross-entropy with probabilities clipped to [NLL_EPS, 1 - NLL_EPS]."""
    y, p = validate_predictions(labels, probs)
    pc = np.clip(p, NLL_EPS, 1.0 - NLL_EPS)
    return float(-np.mean(y * np.log(pc) + (1 - y) * np.log1p(-pc)))


# ---------------------------------------------------------------- the same metrics, many weightings at once
#
# The bootstrap (pcamx/uncertainty.py) needs every metric on ~1000 resamples. A resample is a vector of
# counts (how often each prediction was drawn), so each metric below takes a (draws, n) weight matrix (a Tally) and
# returns one value per draw, from one ranking of the scores: no Python loop over draws. With weights that
# are all 1 each equals its sklearn-based twin above; with integer counts it equals that twin on the
# repeated samples (tests/test_uncertainty.py checks both).


@dataclass(frozen=True)
class Ranked:
    """Predictions sorted by descending P(class 1); `starts` opens each group of tied scores."""

    y: np.ndarray  # float64 0/1, in ranked order
    p: np.ndarray
    order: np.ndarray  # ranked position → original index
    starts: np.ndarray

    @classmethod
    def of(cls, labels: np.ndarray, probs: np.ndarray) -> Ranked:
        y, p = validate_predictions(labels, probs)
        order = np.argsort(-p, kind="stable")
        ps = p[order]
        starts = np.flatnonzero(np.r_[True, ps[1:] != ps[:-1]])
        return cls(y[order].astype(np.float64), ps, order, starts)

    @cached_property
    def decision(self) -> tuple[np.ndarray, np.ndarray]:
        """(confidence of the predicted class, whether the prediction p >= 0.5 is correct)."""
        pred = self.p >= 0.5
        return np.where(pred, self.p, 1.0 - self.p), (pred == (self.y == 1)).astype(np.float64)


class Tally:
    """A (draws, n) weight matrix over ranked predictions and the sums every weighted metric shares.

    Bootstrap counts come as float32 (less memory traffic): integer counts and their running sums stay exact
    up to 2^24, the ranking sums are taken in float64, and weighted means use the counts in float64."""

    def __init__(self, ranked: Ranked, w: np.ndarray):
        self.r, self.w = ranked, w

    def per_sample(self, values: np.ndarray) -> np.ndarray:
        return values.astype(self.w.dtype, copy=False)

    @cached_property
    def w64(self) -> np.ndarray:
        return self.w.astype(np.float64, copy=False)

    @cached_property
    def total(self) -> np.ndarray:
        return self.w.sum(axis=1, dtype=np.float64)

    @cached_property
    def groups(self) -> tuple[np.ndarray, np.ndarray]:
        """Weight of positives and of negatives at each distinct score, highest first: (d, G) each."""
        pos = self.w * self.per_sample(self.r.y)
        neg = self.w - pos
        if len(self.r.starts) < len(self.r.y):  # tied scores: one threshold per group
            pos, neg = np.add.reduceat(pos, self.r.starts, axis=1), np.add.reduceat(neg, self.r.starts, axis=1)
        return pos, neg

    @cached_property
    def cumulative(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(true positives, false positives) at each distinct threshold, from the highest score down, and the
        class totals, per draw: (d, G), (d, G), (d, 1), (d, 1)."""
        pos, neg = self.groups
        tps, fps = np.cumsum(pos, axis=1), np.cumsum(neg, axis=1)
        return tps, fps, tps[:, -1:].astype(np.float64), fps[:, -1:].astype(np.float64)

    def mean(self, per_sample: np.ndarray) -> np.ndarray:
        return _safe_div(self.w64 @ per_sample, self.total)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros(np.broadcast(a, b).shape), where=b != 0)


def weighted_auroc(t: Tally) -> np.ndarray:
    """P(score of a positive > score of a negative) + ½ P(tie), each pair weighted by the product of weights:
    Σ_g pos_g · (negatives below g + ½ neg_g) = Σ_g pos_g · (N − fps_g + ½ neg_g), fps_g counting group g."""
    pos, neg = t.groups
    _, fps, n_pos, n_neg = t.cumulative
    wins = (n_pos * n_neg)[:, 0] - (pos * fps).sum(axis=1, dtype=np.float64)
    if len(t.r.starts) < len(t.r.y):
        wins += 0.5 * (pos * neg).sum(axis=1, dtype=np.float64)
    return _safe_div(wins, (n_pos * n_neg)[:, 0])


def weighted_auprc(t: Tally) -> np.ndarray:
    """Average precision as sklearn defines it: Σ_k (recall_k − recall_{k−1}) · precision_k over thresholds."""
    tps, fps, n_pos, _ = t.cumulative
    precision = _safe_div(tps, tps + fps)
    recall_step = np.diff(tps, axis=1, prepend=0.0)
    return _safe_div((recall_step * precision).sum(axis=1, dtype=np.float64), n_pos[:, 0])


def weighted_sensitivity(t: Tally, specificity: float = 0.95) -> np.ndarray:
    tps, fps, n_pos, n_neg = t.cumulative
    # TPR only grows as the threshold falls, so the answer is the TPR at the last admissible threshold;
    # (0, 0) is always admissible, hence the floor of 0.
    admissible = fps <= ((1.0 - specificity) + 1e-12) * n_neg
    last = admissible.sum(axis=1) - 1
    rows = np.arange(len(tps))
    return np.where(last >= 0, _safe_div(tps[rows, np.maximum(last, 0)].astype(np.float64), n_pos[:, 0]), 0.0)


def weighted_ece(t: Tally, n_bins: int = ECE_BINS) -> np.ndarray:
    conf, correct = t.r.decision
    bins = confidence_bin(conf, n_bins)
    onehot = np.zeros((len(conf), n_bins))
    onehot[np.arange(len(conf)), bins] = correct - conf
    return _safe_div(np.abs(t.w64 @ onehot).sum(axis=1), t.total)


def weighted_brier(t: Tally) -> np.ndarray:
    return t.mean((t.r.p - t.r.y) ** 2)


def weighted_accuracy(t: Tally) -> np.ndarray:
    return t.mean(t.r.decision[1])


def weighted_nll(t: Tally) -> np.ndarray:
    pc = np.clip(t.r.p, NLL_EPS, 1.0 - NLL_EPS)
    return t.mean(-(t.r.y * np.log(pc) + (1 - t.r.y) * np.log1p(-pc)))


# ---------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Metric:
    """One test metric: its key in metrics.json, its column header in every table, which way is better
    (checkpoint selection), how to compute it from labels and P(class 1), the same over a matrix of
    resampling weights (confidence intervals), and how many decimals to show."""

    name: str
    header: str
    direction: str  # "max" | "min"
    compute: Callable[[np.ndarray, np.ndarray], float]
    weighted: Callable[[Tally], np.ndarray]
    aliases: tuple[str, ...] = ()
    digits: int = 4

    def format(self, value: float) -> str:
        return f"{value:.{self.digits}f}"


# The registry: every metric pcamx reports, in table order. Adding one here adds it to metrics.json, its
# confidence interval and paired test, the printed and sweep tables, W&B, and the checkpoint-selection choices.
METRICS: tuple[Metric, ...] = (
    Metric("auroc", "AUROC", "max", lambda y, p: float(roc_auc_score(*validate_predictions(y, p))), weighted_auroc),
    Metric("auprc", "AUPRC", "max", lambda y, p: float(average_precision_score(*validate_predictions(y, p))),
           weighted_auprc),
    Metric("sens_at_95spec", "Sens @95%Spec", "max", lambda y, p: sensitivity_at_specificity(y, p, 0.95),
           lambda t: weighted_sensitivity(t, 0.95), aliases=("sens95",)),
    Metric("ece", "ECE", "min", expected_calibration_error, weighted_ece),
    Metric("brier", "Brier", "min", brier, weighted_brier),
    Metric("acc", "Acc", "max", accuracy, weighted_accuracy),
    Metric("nll", "NLL", "min", nll, weighted_nll),
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
    y, p = validate_predictions(labels, probs)
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
