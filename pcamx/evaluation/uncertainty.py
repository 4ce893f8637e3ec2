"""How sure a number is: bootstrap confidence intervals, paired differences, DeLong's test, temperature scaling.

* Percentile bootstrap, resampling within each class; whole slides when each test patch's slide is known (PCam's
  meta CSV): patches of one slide share staining, scanner and patient, so patch resampling is too narrow.
* A resample is a vector of counts; every metric is computed on all of them at once from one ranking
  (`Metric.weighted`), in chunks of draws so memory stays bounded.
* Paired: model and reference on the same resamples, an interval for their difference on the same patches.
* DeLong's test (Sun & Xu 2014, midranks) for two correlated AUROCs, treating patches as independent.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy.stats import rankdata

from pcamx.evaluation.metrics import METRICS, Ranked, Tally, binary_metrics, validate_predictions

LEVEL = 0.95
# Draws per chunk: (chunk, n) float64 weights, 128 × 32,768 × 8 B = 32 MB for the full PCam test split.
CHUNK = 128
# Counts as float32: exact for integers (and their running sums) up to 2^24; see metrics.Tally.
COUNTS = np.float32


# ---------------------------------------------------------------- resampling


def resample_counts(labels: np.ndarray, slides: np.ndarray | None, draws: int,
                    rng: np.random.Generator) -> np.ndarray:
    """(draws, n) counts: how often each patch is in each resample.

    Patch bootstrap: n_c patches drawn with replacement within each class c. Slide bootstrap: as many slides
    as there are, drawn with replacement, each bringing all its patches; a draw that happens to hold a single
    class (possible with few slides) is drawn again, since AUROC is undefined there."""
    y = np.asarray(labels)
    n = len(y)
    if slides is None:
        flat = []
        for c in (0, 1):
            members = np.flatnonzero(y == c)
            picks = members[rng.integers(0, len(members), size=(draws, len(members)))]
            flat.append((picks + n * np.arange(draws)[:, None]).ravel())
        return np.bincount(np.concatenate(flat), minlength=draws * n).reshape(draws, n).astype(COUNTS)
    _, slide_index = np.unique(np.asarray(slides), return_inverse=True)
    k = slide_index.max() + 1
    has = np.zeros((k, 2), dtype=bool)
    has[slide_index, y] = True
    out = np.empty((draws, n), dtype=COUNTS)
    filled = 0
    for _ in range(100):
        slide_counts = rng.multinomial(k, np.full(k, 1.0 / k), size=draws - filled).astype(COUNTS)
        ok = ((slide_counts @ has) > 0).all(axis=1)
        good = slide_counts[ok]
        out[filled:filled + len(good)] = good[:, slide_index]
        filled += len(good)
        if filled == draws:
            return out
    raise ValueError(f"slide bootstrap: almost no resample of the {k} slides holds both classes; "
                     "evaluate on a split with positive and negative patches on several slides")


def _percentile_interval(values: np.ndarray, level: float = LEVEL) -> list[float]:
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


def _draw_metrics(rankings: Sequence[Ranked], labels: np.ndarray, slides: np.ndarray | None, draws: int,
                  seed: int) -> list[dict[str, np.ndarray]]:
    """Every metric on `draws` resamples, for each ranking (one per model, all on the same resamples)."""
    rng = np.random.default_rng(seed)
    # Resample in the first ranking's order (no reordering of its weights); the others gather from it.
    first = rankings[0].order
    position = np.empty_like(first)
    position[first] = np.arange(len(first))
    y, groups = np.asarray(labels)[first], None if slides is None else np.asarray(slides)[first]
    values: list[dict[str, list[np.ndarray]]] = [{m.name: [] for m in METRICS} for _ in rankings]
    for start in range(0, draws, CHUNK):
        counts = resample_counts(y, groups, min(CHUNK, draws - start), rng)
        for i, (ranking, out) in enumerate(zip(rankings, values, strict=True)):
            tally = Tally(ranking, counts if i == 0 else counts[:, position[ranking.order]])
            for m in METRICS:
                out[m.name].append(m.weighted(tally))
    return [{k: np.concatenate(v) for k, v in out.items()} for out in values]


def check_slides(slides: np.ndarray | None, n: int) -> np.ndarray | None:
    if slides is not None and len(slides) != n:
        raise ValueError(f"{len(slides)} slide ids for {n} predictions; they must be one per patch")
    return slides


def _interval_block(values: dict[str, np.ndarray], slides: np.ndarray | None, draws: int) -> dict[str, Any]:
    out: dict[str, Any] = {"ci95": {k: _percentile_interval(v) for k, v in values.items()},
                           "ci_method": "patch" if slides is None else "slide", "bootstrap": int(draws)}
    if slides is not None:
        out["ci_slides"] = int(len(np.unique(slides)))
    return out


def confidence_intervals(labels: np.ndarray, probs: np.ndarray, slides: np.ndarray | None = None,
                         draws: int = 1000, seed: int = 0) -> dict[str, Any]:
    """metrics.json's `ci95` (metric → [lo, hi]), `ci_method` (slide | patch), `bootstrap` (draws) and, for
    the slide bootstrap, `ci_slides`. Nothing when `draws` is 0."""
    if draws <= 0:
        return {}
    y, p = validate_predictions(labels, probs)
    slides = check_slides(slides, len(y))
    (values,) = _draw_metrics([Ranked.of(y, p)], y, slides, draws, seed)
    return _interval_block(values, slides, draws)


def paired_comparison(labels: np.ndarray, probs: np.ndarray, reference_probs: np.ndarray,
                      slides: np.ndarray | None = None, draws: int = 1000,
                      seed: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the model's intervals as `confidence_intervals` gives them, the paired comparison): metric →
    {"diff": model − reference, "ci95": [lo, hi] of the paired bootstrap}, AUROC also with `p_delong`. Both
    come from the same resamples. Without draws: no intervals, only the differences and DeLong's p."""
    y, p = validate_predictions(labels, probs)
    _, q = validate_predictions(labels, reference_probs)
    slides = check_slides(slides, len(y))
    model, ref = binary_metrics(y, p), binary_metrics(y, q)
    paired: dict[str, Any] = {m.name: {"diff": model[m.name] - ref[m.name]} for m in METRICS}
    intervals: dict[str, Any] = {}
    if draws > 0:
        a, b = _draw_metrics([Ranked.of(y, p), Ranked.of(y, q)], y, slides, draws, seed)
        intervals = _interval_block(a, slides, draws)
        for m in METRICS:
            # Rounded: summation order can leave ±1e-16 between identical predictions, which must not read as
            # an interval that excludes 0.
            paired[m.name]["ci95"] = _percentile_interval(np.round(a[m.name] - b[m.name], 12))
    paired["auroc"]["p_delong"] = delong_test(y, p, q)
    return intervals, paired


def excludes_zero(interval: Sequence[float] | None) -> bool:
    """Whether a difference's interval says the difference is real (both ends on one side of 0)."""
    return bool(interval) and (interval[0] > 0 or interval[1] < 0)


# ---------------------------------------------------------------- DeLong


def delong_covariance(labels: np.ndarray, *scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(AUROC of each score vector, their DeLong covariance matrix), by midranks in O(n log n)."""
    y = np.asarray(labels)
    pos, neg = y == 1, y == 0
    m, n = int(pos.sum()), int(neg.sum())
    if m < 2 or n < 2:
        raise ValueError(f"DeLong's variance needs at least 2 patches of each class, got {m} positive, {n} negative")
    v10, v01, aucs = [], [], []
    for s in scores:
        s = np.asarray(s, dtype=np.float64)
        x, z = s[pos], s[neg]
        tx, tz, t_all = rankdata(x), rankdata(z), rankdata(np.concatenate([x, z]))
        aucs.append((t_all[:m].sum() - m * (m + 1) / 2) / (m * n))
        # V10_i: the share of negatives a positive outranks (ties ½); V01_j: the share of positives above a negative.
        v10.append((t_all[:m] - tx) / n)
        v01.append(1.0 - (t_all[m:] - tz) / m)
    s10 = np.atleast_2d(np.cov(np.array(v10)))
    s01 = np.atleast_2d(np.cov(np.array(v01)))
    return np.array(aucs), s10 / m + s01 / n


def delong_test(labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray) -> float:
    """Two-sided p-value of DeLong's test that two scores of the same patches have equal AUROC."""
    aucs, cov = delong_covariance(labels, scores_a, scores_b)
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    diff = aucs[0] - aucs[1]
    if var <= 0:
        # Identical rankings: no evidence of a difference (and none is possible).
        return 1.0 if diff == 0 else 0.0
    return float(math.erfc(abs(diff) / math.sqrt(2 * var)))


# ---------------------------------------------------------------- temperature scaling


def _logits(probs: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-7, 1 - 1e-7)
    return np.log(p) - np.log1p(-p)


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """P(class 1) with the logit log(p / (1 − p)) divided by `temperature` (T > 1 softens, T < 1 sharpens)."""
    return 1.0 / (1.0 + np.exp(-_logits(probs) / temperature))


# T is searched in (1/MAX_TEMPERATURE, MAX_TEMPERATURE): a model whose predictions carry no signal would
# otherwise drive T to infinity (every p to 0.5), which says nothing a reader can use.
MAX_TEMPERATURE = 100.0


def fit_temperature(labels: np.ndarray, probs: np.ndarray) -> float:
    """The T minimizing the NLL of `apply_temperature(probs, T)` on these (validation) predictions: LBFGS on
    log T = log(MAX_TEMPERATURE) · tanh(u), so T stays positive and bounded. The logit of a TTA-averaged
    probability is treated as the model's logit."""
    import torch

    y, p = validate_predictions(labels, probs)
    z = torch.as_tensor(_logits(p))
    t = torch.as_tensor(y, dtype=torch.float64)
    u = torch.zeros((), dtype=torch.float64, requires_grad=True)
    bound = math.log(MAX_TEMPERATURE)
    opt = torch.optim.LBFGS([u], lr=0.5, max_iter=100, tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z / (bound * torch.tanh(u)).exp(), t)
        loss.backward()
        return loss

    opt.step(closure)
    return float((bound * torch.tanh(u.detach())).exp())


# eval.calibrate: how test probabilities are recalibrated on the validation split (none: they are not).
CALIBRATIONS: dict[str, Callable[[np.ndarray, np.ndarray], float] | None] = {"none": None,
                                                                             "temperature": fit_temperature}
