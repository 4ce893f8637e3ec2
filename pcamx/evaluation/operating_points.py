"""Operating points: the probability thresholds a model's decisions use, chosen on the validation split.

A patch is called tumour when P(tumour) >= threshold (as `metrics.accuracy` and sklearn's ROC do). Three
rules, each a function of validation labels and probabilities only:
  0.5        the plain argmax decision.
  youden     maximises Youden's J = sensitivity + specificity − 1 over the validation ROC.
  val95spec  the lowest threshold that keeps validation specificity >= 95%: the most sensitive point at
             95% specificity, chosen without looking at test (unlike the Sens@95%Spec metric, whose
             threshold is chosen on the very patches it is measured on).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from sklearn.metrics import roc_curve

from pcamx.evaluation.metrics import validate_predictions

VAL_SPECIFICITY = 0.95


def _finite(threshold: float, probs: np.ndarray) -> float:
    """sklearn's first ROC threshold is +inf (nothing called positive); JSON has no inf, and the smallest
    float above every probability makes the same decisions."""
    return float(threshold) if math.isfinite(threshold) else float(np.nextafter(probs.max(), np.inf))


def youden_threshold(labels: np.ndarray, probs: np.ndarray) -> float:
    """The threshold of highest sensitivity + specificity (the highest such threshold on a tie)."""
    y, p = validate_predictions(labels, probs)
    fpr, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)
    return _finite(thresholds[int(np.argmax(tpr - fpr))], p)


def specificity_threshold(labels: np.ndarray, probs: np.ndarray, specificity: float = VAL_SPECIFICITY) -> float:
    """The lowest threshold whose specificity is still >= `specificity`."""
    y, p = validate_predictions(labels, probs)
    fpr, _, thresholds = roc_curve(y, p, drop_intermediate=False)
    # The same slack as metrics.sensitivity_at_specificity, so the two agree on the same patches.
    admissible = np.flatnonzero(fpr <= (1.0 - specificity) + 1e-12)
    return _finite(thresholds[admissible[-1]], p)


# Name → rule, in the order tables show them. `predict --threshold NAME` picks one of these.
THRESHOLD_RULES: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "0.5": lambda y, p: 0.5,
    "youden": youden_threshold,
    "val95spec": specificity_threshold,
}


def choose_thresholds(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Every rule's threshold on (validation) labels and probabilities."""
    y, p = validate_predictions(labels, probs)
    return {name: rule(y, p) for name, rule in THRESHOLD_RULES.items()}


def operating_points(thresholds: Mapping[str, float], measured_with: Mapping[str, Any], n: int | None = None,
                     split: str = "valid") -> dict[str, Any]:
    """What a checkpoint and metrics.json store: the thresholds, the split (and patch count) they were chosen
    on, and the inference settings (resolution, TTA views, precision, quantization) of those probabilities."""
    return {"thresholds": dict(thresholds), "split": split, **({"n": int(n)} if n is not None else {}),
            "measured_with": dict(measured_with)}


# Validation metrics carry the chosen thresholds as flat numbers (logged beside AUROC, kept in each
# checkpoint's val_metrics); the fixed 0.5 is left out.
VAL_METRIC_PREFIX = "threshold_"


def threshold_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """{"threshold_youden": t, "threshold_val95spec": t}: the chosen thresholds, as validation metrics."""
    return {VAL_METRIC_PREFIX + name: t for name, t in choose_thresholds(labels, probs).items() if name != "0.5"}


def thresholds_of(val_metrics: Mapping[str, float]) -> dict[str, float]:
    """The thresholds recorded among validation metrics (by `threshold_metrics`), 0.5 included."""
    return {name: 0.5 if name == "0.5" else float(val_metrics[VAL_METRIC_PREFIX + name])
            for name in THRESHOLD_RULES if name == "0.5" or VAL_METRIC_PREFIX + name in val_metrics}


def rates_at(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, float]:
    """Sensitivity and specificity of the decision p >= threshold."""
    y, p = validate_predictions(labels, probs)
    called = p >= threshold
    return {"threshold": float(threshold), "sensitivity": float(called[y == 1].mean()),
            "specificity": float((~called[y == 0]).mean())}


def resolve_threshold(choice: str | float, points: Mapping[str, Any] | None, where: str = "the checkpoint") -> float:
    """A threshold from a rule name (looked up in stored operating points) or a number in [0, 1]."""
    if isinstance(choice, str) and choice not in THRESHOLD_RULES:
        try:
            choice = float(choice)
        except ValueError:
            raise ValueError(f"threshold must be one of {', '.join(THRESHOLD_RULES)} or a number in [0, 1], got "
                             f"{choice!r}") from None
    if not isinstance(choice, str):
        if not 0.0 <= choice <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1], got {choice}")
        return float(choice)
    if choice == "0.5":
        return 0.5
    stored = (points or {}).get("thresholds") or {}
    if choice not in stored:
        raise ValueError(f"{where} stores no {choice!r} threshold (it was written before pcamx recorded "
                         "operating points, or by an unfinished run); pass --threshold 0.5 or a number")
    return float(stored[choice])
