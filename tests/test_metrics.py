import math

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    brier_score_loss,
    log_loss,
    roc_auc_score,
)

from pcamx.evaluation.metrics import (
    METRIC_ALIASES,
    METRIC_NAMES,
    NLL_EPS,
    SELECT_METRICS,
    Ranked,
    Tally,
    _safe_div,
    accuracy,
    binary_metrics,
    expected_calibration_error,
    improves,
    is_better,
    sensitivity_at_specificity,
    weighted_ece,
    weighted_sensitivity,
)


@pytest.fixture
def random_scores() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 2000)
    logits = rng.normal(size=y.size) + 1.5 * (2 * y - 1)
    p = 1.0 / (1.0 + np.exp(-logits))
    # Rounding creates tied scores, which exercise sklearn's tie handling in every metric.
    p[:500] = np.round(p[:500], 2)
    return y, p


def test_keys(random_scores):
    assert tuple(binary_metrics(*random_scores)) == METRIC_NAMES


def test_matches_sklearn(random_scores):
    y, p = random_scores
    m = binary_metrics(y, p)
    assert m["auroc"] == pytest.approx(roc_auc_score(y, p), rel=1e-12)
    assert m["auprc"] == pytest.approx(average_precision_score(y, p), rel=1e-12)
    assert m["nll"] == pytest.approx(log_loss(y, p), rel=1e-9)
    assert m["brier"] == pytest.approx(brier_score_loss(y, p), rel=1e-9)
    assert m["acc"] == pytest.approx(accuracy_score(y, p >= 0.5), rel=1e-12)
    assert all(isinstance(v, float) for v in m.values())


def test_accepts_float32_probs_and_bool_labels(random_scores):
    y, p = random_scores
    m64 = binary_metrics(y, p)
    m32 = binary_metrics(y.astype(bool), p.astype(np.float32))
    for k in METRIC_NAMES:
        assert m32[k] == pytest.approx(m64[k], abs=1e-5), k


def _naive_ece(y: np.ndarray, p: np.ndarray, n_bins: int = 15) -> float:
    # Independent per-sample loop, bins (lo, hi] over [0, 1].
    edges = np.linspace(0, 1, n_bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        members = [(pi, yi) for pi, yi in zip(p, y, strict=True) if lo < max(pi, 1 - pi) <= hi]
        if members:
            conf = np.mean([max(pi, 1 - pi) for pi, _ in members])
            acc = np.mean([int(pi >= 0.5) == yi for pi, yi in members])
            total += len(members) / len(y) * abs(acc - conf)
    return total


def test_ece_matches_naive_loop(random_scores):
    y, p = random_scores
    assert expected_calibration_error(y, p) == pytest.approx(_naive_ece(y, p), abs=1e-12)


def test_ece_hand_computed():
    # 15 bins of width 1/15; conf = max(p, 1-p), pred = p >= 0.5.
    #   p     y  pred  conf  bin (lo, hi]        correct
    #   0.90  1  1     0.90  (13/15, 14/15]      yes
    #   0.78  0  1     0.78  (11/15, 12/15]      no
    #   0.30  0  0     0.70  (10/15, 11/15]      yes
    #   0.55  1  1     0.55  ( 8/15,  9/15]      yes
    #   0.95  1  1     0.95  (14/15, 1]          yes
    #   0.10  1  0     0.90  (13/15, 14/15]      no
    # bin 13: n=2, acc 0.5, conf 0.90 → |gap| 0.40, weight 2/6
    # others (n=1): |0-0.78| = 0.78, |1-0.70| = 0.30, |1-0.55| = 0.45, |1-0.95| = 0.05
    # ECE = (2·0.40 + 0.78 + 0.30 + 0.45 + 0.05) / 6 = 2.38 / 6
    y = np.array([1, 0, 0, 1, 1, 1])
    p = np.array([0.90, 0.78, 0.30, 0.55, 0.95, 0.10])
    assert expected_calibration_error(y, p) == pytest.approx(2.38 / 6, abs=1e-12)
    assert binary_metrics(y, p)["ece"] == pytest.approx(2.38 / 6, abs=1e-12)


def test_ece_edges():
    # p = 0.5 → pred 1, conf 0.5 (bin (7/15, 8/15]); p in {0, 1} → conf 1 (last bin).
    assert expected_calibration_error(np.array([1, 0]), np.array([0.5, 0.5])) == pytest.approx(0.0)
    assert expected_calibration_error(np.array([1, 0]), np.array([1.0, 0.0])) == 0.0
    # A confidence exactly on an interior edge belongs to the lower bin (lo, hi]: the edge sample
    # (correct) shares bin 11 with conf 0.79 (wrong) → |0.5 - mean conf|; separate bins would give
    # (|1 - edge| + |0 - 0.79|) / 2 ≈ 0.495.
    # p = 0.5 exactly predicts class 1: with 0.52 (class 1, right) in the same bin, the 0.5 (class 0) is wrong
    # → |1 − 1.02| / 2; predicting class 0 there would give |2 − 1.02| / 2.
    assert expected_calibration_error(np.array([0, 1]), np.array([0.5, 0.52])) == pytest.approx(0.01)
    assert accuracy(np.array([0, 1]), np.array([0.5, 0.52])) == 0.5
    edge = np.linspace(0, 1, 16)[12]
    ece = expected_calibration_error(np.array([1, 0]), np.array([edge, 0.79]))
    assert ece == pytest.approx(abs(0.5 - (edge + 0.79) / 2), abs=1e-12)


def test_sens_at_95spec_hand_computed():
    # 20 negatives: one at 0.9, one at 0.6, 18 at 0.1 → spec >= 0.95 allows at most 1 false positive,
    # so the threshold can go down to 0.65 (FP = the 0.9 negative) but not to 0.6 (FP = 2).
    # 6 positives: 0.95, 0.85, 0.7, 0.65 are >= 0.65; 0.5, 0.3 are not → sensitivity 4/6.
    neg = [0.9, 0.6] + [0.1] * 18
    pos = [0.95, 0.85, 0.7, 0.65, 0.5, 0.3]
    y = np.array([0] * len(neg) + [1] * len(pos))
    p = np.array(neg + pos)
    assert sensitivity_at_specificity(y, p) == pytest.approx(4 / 6)
    assert binary_metrics(y, p)["sens_at_95spec"] == pytest.approx(4 / 6)


def test_sens_at_95spec_keeps_collinear_roc_points():
    # Tie groups of (1 pos, 1 neg) put ROC points on a straight diagonal: (0,0), (.05,.05), (.1,.1).
    # The admissible point (.05, .05) is "intermediate" and roc_curve's default drop_intermediate
    # would remove it, giving 0 instead of 1/20.
    y = np.array([1, 0, 1, 0] + [1] * 18 + [0] * 18)
    p = np.array([0.9, 0.9, 0.8, 0.8] + [0.3] * 18 + [0.1] * 18)
    assert sensitivity_at_specificity(y, p) == pytest.approx(1 / 20)
    # Four such groups: (0,0), (.025,.05), (.05,.1), (.075,.15), (.1,.2) lie on one line, and roc_curve's
    # drop_intermediate keeps only the ends — the best admissible point (.05, .1) would be lost.
    y = np.array([1, 0] * 4 + [1] * 16 + [0] * 36)
    p = np.array([0.9, 0.9, 0.8, 0.8, 0.7, 0.7, 0.6, 0.6] + [0.3] * 16 + [0.1] * 36)
    assert sensitivity_at_specificity(y, p) == pytest.approx(0.1)


def test_perfect_classifier():
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.0, 0.1, 0.2, 0.8, 0.9, 1.0])
    m = binary_metrics(y, p)
    assert m["auroc"] == 1.0 and m["auprc"] == 1.0
    assert m["sens_at_95spec"] == 1.0 and m["acc"] == 1.0
    assert m["brier"] == pytest.approx((0.01 + 0.04) * 2 / 6)


def test_inverted_classifier():
    y = np.array([0, 0, 0, 1, 1, 1])
    p = 1.0 - np.array([0.0, 0.1, 0.2, 0.8, 0.9, 1.0])
    m = binary_metrics(y, p)
    assert m["auroc"] == 0.0
    assert m["sens_at_95spec"] == 0.0
    assert m["acc"] == 0.0
    assert m["ece"] == pytest.approx(np.mean([1.0, 0.9, 0.8, 0.8, 0.9, 1.0]))


def test_nll_clips_saturated_probs():
    # A confidently wrong p = 0 for a positive costs -log(NLL_EPS), not inf.
    m = binary_metrics(np.array([1, 0]), np.array([0.0, 0.0]))
    assert m["nll"] == pytest.approx(-math.log(NLL_EPS) / 2)


@pytest.mark.parametrize(
    ("labels", "probs", "match"),
    [
        ([0, 1, 1], [0.1, 0.9], "length"),
        ([0, 2], [0.1, 0.9], "0 or 1"),
        ([0, -1], [0.1, 0.9], "0 or 1"),
        ([0, 1], [0.1, 1.1], r"\[0, 1\]"),
        ([0, 1], [-0.1, 0.5], r"\[0, 1\]"),
        ([0, 1], [0.1, float("nan")], "NaN"),
        ([0, 1], [0.1, float("inf")], "NaN or inf"),
        ([], [], "no samples"),
        ([[0, 1]], [[0.1, 0.9]], "1-D"),
        ([[0, 1]], [0.1, 0.9], "1-D"),  # one 2-D input is enough to refuse
        ([0, 1], [[0.1, 0.9]], "1-D"),
        ([1, 1, 1], [0.1, 0.5, 0.9], "single class"),
        ([0, 0], [0.1, 0.5], "single class"),
    ],
)
def test_bad_inputs(labels, probs, match):
    with pytest.raises(ValueError, match=match):
        binary_metrics(np.array(labels), np.array(probs, dtype=float))


def test_select_metrics_directions():
    assert {k for k, v in SELECT_METRICS.items() if v == "max"} == {
        "auroc",
        "auprc",
        "acc",
        "sens95",
        "sens_at_95spec",
    }
    assert {k for k, v in SELECT_METRICS.items() if v == "min"} == {"val_loss", "nll", "brier", "ece"}
    # Every selectable metric other than the trainer's val_loss is produced by binary_metrics.
    for name in set(SELECT_METRICS) - {"val_loss"}:
        assert METRIC_ALIASES.get(name, name) in METRIC_NAMES


def test_is_better():
    assert is_better("auroc", 0.9, None)
    assert is_better("auroc", 0.91, 0.9)
    assert not is_better("auroc", 0.89, 0.9)
    assert not is_better("auroc", 0.9, 0.9)  # ties keep the earlier checkpoint
    assert is_better("val_loss", 0.2, 0.3)
    assert not is_better("ece", 0.05, 0.04)
    assert is_better("sens95", 0.8, 0.7)
    assert not is_better("auroc", float("nan"), None)
    assert not is_better("nll", float("nan"), 0.3)
    assert is_better("nll", 0.3, float("nan"))
    with pytest.raises(ValueError, match="unknown selection metric"):
        is_better("f1", 0.5, None)


def test_improves_breaks_exact_ties_only_with_a_tiebreak():
    best = {"auroc": 0.9, "nll": 0.30, "sens_at_95spec": 0.5}
    tie_lower_nll = {"auroc": 0.9, "nll": 0.25, "sens_at_95spec": 0.5}
    tie_higher_nll = {"auroc": 0.9, "nll": 0.35, "sens_at_95spec": 0.5}
    assert not improves(tie_lower_nll, best, "auroc")  # no tiebreak: the earlier checkpoint stays
    assert improves(tie_lower_nll, best, "auroc", "nll")
    assert not improves(tie_higher_nll, best, "auroc", "nll")
    # The tiebreak never overrides the main metric, in either direction.
    assert not improves({"auroc": 0.8999, "nll": 0.01}, best, "auroc", "nll")
    assert improves({"auroc": 0.9001, "nll": 0.99}, best, "auroc", "nll")
    assert improves(best, {}, "auroc", "nll") and improves(best, None, "auroc")
    # Aliases work for both; a "min" main metric ties too.
    assert improves({**best, "auroc": 0.95}, best, "sens95", "auroc")
    assert improves({"nll": 0.30, "auroc": 0.91}, {"nll": 0.30, "auroc": 0.90}, "nll", "auroc")
    assert improves({**best, "sens_at_95spec": 0.6}, best, "auroc", "sens95")  # an alias as the tiebreak
    assert not improves(best, best, "auroc", "nll")  # tied on both: a "min" tiebreak keeps the earlier one


# ---------------------------------------------------------------- cases that tell bin counts and thresholds apart


def test_ece_neighbouring_bins_with_opposite_gaps():
    # Two samples in neighbouring 15-bins whose gaps have opposite signs: with 15 bins they count
    # separately, with 10 bins they share (0.8, 0.9] and their gaps cancel in part.
    #   p=0.82 y=1: correct, conf 0.82 ∈ (12/15, 13/15]  → gap acc−conf = +0.18
    #   p=0.88 y=0: wrong,   conf 0.88 ∈ (13/15, 14/15]  → gap −0.88
    # 15 bins: (0.18 + 0.88) / 2 = 0.53;  10 bins: |0.5 − 0.85| = 0.35.
    y, p = np.array([1, 0]), np.array([0.82, 0.88])
    assert expected_calibration_error(y, p) == pytest.approx(0.53, abs=1e-12)
    assert expected_calibration_error(y, p, n_bins=10) == pytest.approx(0.35, abs=1e-12)


@pytest.fixture
def miscalibrated() -> tuple[np.ndarray, np.ndarray]:
    """Over- and underconfident in alternate 15-bins: gaps of both signs side by side, which 10 bins would
    partly cancel."""
    rng = np.random.default_rng(1)
    p = rng.random(4000)
    conf = np.maximum(p, 1 - p)
    sign = np.where(np.floor(conf * 15) % 2 == 0, 1.0, -1.0)
    correct = rng.random(p.size) < np.clip(conf + 0.2 * sign, 0, 1)
    y = np.where(correct, (p >= 0.5).astype(int), (p < 0.5).astype(int))
    return y, p


def test_ece_on_a_fixture_miscalibrated_both_ways_matches_the_naive_loop_and_depends_on_the_bins(miscalibrated):
    y, p = miscalibrated
    assert expected_calibration_error(y, p) == pytest.approx(_naive_ece(y, p, 15), abs=1e-12)
    assert _naive_ece(y, p, 15) - _naive_ece(y, p, 10) > 0.03  # the bin count matters here
    assert binary_metrics(y, p)["ece"] == pytest.approx(_naive_ece(y, p, 15), abs=1e-12)


def _sens_spec_case() -> tuple[np.ndarray, np.ndarray]:
    # 100 negatives: 1 at 0.95, 9 at 0.85, 5 at 0.75, 85 at 0.1. 10 positives as listed.
    neg = [0.95] + [0.85] * 9 + [0.75] * 5 + [0.1] * 85
    pos = [0.99, 0.96, 0.9, 0.88, 0.86, 0.8, 0.7, 0.6, 0.4, 0.2]
    return np.array([0] * len(neg) + [1] * len(pos)), np.array(neg + pos)


@pytest.mark.parametrize("specificity,expected", [
    # ≤ 1 false positive: threshold just above 0.85 → positives 0.99 … 0.86 = 5 of 10.
    (0.99, 0.5),
    # ≤ 5: the 9 negatives at 0.85 come in together, so still at most 1 → 0.5.
    (0.95, 0.5),
    # ≤ 10 false positives (fpr 10/100 = 0.1, which must count as ≤ 1 − 0.90 despite float rounding):
    # threshold down to 0.76 → positives ≥ 0.8 = 6 of 10.
    (0.90, 0.6),
])
def test_sensitivity_at_other_specificities_on_hand_counted_roc_points(specificity, expected):
    y, p = _sens_spec_case()
    assert sensitivity_at_specificity(y, p, specificity) == pytest.approx(expected)


def test_nll_clipping_constant_is_pinned():
    # −ln(1e-7) = 16.11809565…: a saturated wrong prediction costs exactly that, whatever the dtype.
    m = binary_metrics(np.array([1, 0]), np.array([0.0, 0.5]))
    assert m["nll"] == pytest.approx((16.11809565095832 + math.log(2)) / 2, rel=1e-12)


def _unit_tally(y: np.ndarray, p: np.ndarray) -> Tally:
    ranked = Ranked.of(y, p)
    return Tally(ranked, np.ones((1, len(y))))


@pytest.mark.parametrize("specificity,expected", [(0.99, 0.5), (0.95, 0.5), (0.90, 0.6)])
def test_weighted_sensitivity_at_other_specificities_on_hand_counted_roc_points(specificity, expected):
    t = _unit_tally(*_sens_spec_case())
    assert weighted_sensitivity(t, specificity)[0] == pytest.approx(expected)
    assert weighted_sensitivity(t)[0] == pytest.approx(0.5)  # 95% unless asked


def test_weighted_ece_uses_the_asked_bin_count(miscalibrated):
    y, p = miscalibrated
    t = _unit_tally(y, p)
    assert weighted_ece(t, 10)[0] == pytest.approx(_naive_ece(y, p, 10), abs=1e-12)
    assert weighted_ece(t)[0] == pytest.approx(_naive_ece(y, p, 15), abs=1e-12)


def test_a_confidence_on_a_bin_edge_belongs_to_the_lower_bin():
    # 4 bins (0, .25], (.25, .5], (.5, .75], (.75, 1]: confidence 0.75 (right) sits alone in the third,
    # 0.9 (wrong) in the fourth: (|1 − 0.75| + |0 − 0.9|) / 2; one bin for both would give |0.5 − 0.825|.
    y, p = np.array([1, 0]), np.array([0.75, 0.9])
    assert expected_calibration_error(y, p, n_bins=4) == pytest.approx((0.25 + 0.9) / 2, abs=1e-12)
    assert weighted_ece(_unit_tally(y, p), 4)[0] == pytest.approx((0.25 + 0.9) / 2, abs=1e-12)


def test_safe_div_is_zero_where_the_divisor_is_and_broadcasts():
    np.full(64, 7.0).sum()  # leave non-zero bytes in memory that a fresh, unfilled array could reuse
    assert _safe_div(np.array([1.0, 2.0, 3.0]), np.array([0.0, 4.0, 0.0])).tolist() == [0.0, 0.5, 0.0]
    out = _safe_div(np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([2.0, 0.0]))
    assert out.tolist() == [[0.5, 0.0], [1.5, 0.0]]
    assert _safe_div(np.array([2.0]), np.array([[1.0], [0.0]])).tolist() == [[2.0], [0.0]]


@pytest.mark.parametrize("probs", [np.array([0.2 + 0j, 0.7 + 0j]), np.array(["0.2", "0.7"]), np.array([None, 0.7])])
def test_probabilities_that_are_not_real_numbers_are_refused(probs):
    with pytest.raises(ValueError, match="probs must be real numbers"):
        binary_metrics(np.array([0, 1]), probs)
