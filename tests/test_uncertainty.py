"""Intervals, paired tests and temperature scaling against independent truth: sklearn on repeated samples,
a slow O(m·n) DeLong, the closed-form AUROC of two normals, and a grid search for the temperature."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest

from pcamx.evaluation.metrics import METRICS, Ranked, Tally, binary_metrics, nll
from pcamx.evaluation.uncertainty import (
    _draw_metrics,
    apply_temperature,
    confidence_intervals,
    delong_covariance,
    delong_test,
    excludes_zero,
    fit_temperature,
    paired_comparison,
    resample_counts,
)


def scores(n: int, separation: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Balanced labels; a positive's score ~ N(separation, 1), a negative's ~ N(0, 1), squashed into (0, 1)."""
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1], n // 2)
    z = rng.standard_normal(n) + separation * y
    return y, 1.0 / (1.0 + np.exp(-z))


# ---------------------------------------------------------------- weighted metrics


@pytest.mark.parametrize("ties", [False, True])
def test_weighted_metrics_equal_sklearn_on_the_repeated_samples(ties: bool) -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 400)
    p = rng.random(400)
    p = np.round(p, 1) if ties else p  # ties across and within classes exercise the tie groups
    ranked = Ranked.of(y, p)
    counts = rng.integers(0, 4, size=(3, 400)).astype(float)
    weights = np.vstack([np.ones(400), counts])
    values = {m.name: m.weighted(Tally(ranked, weights[:, ranked.order])) for m in METRICS}
    for row, w in enumerate(weights):
        idx = np.repeat(np.arange(400), w.astype(int))
        truth = binary_metrics(y[idx], p[idx])
        for name, got in values.items():
            assert got[row] == pytest.approx(truth[name], abs=1e-12), (name, row)


def test_patch_resampling_keeps_the_class_counts_and_slide_resampling_moves_whole_slides() -> None:
    y = np.array([0] * 30 + [1] * 10)
    counts = resample_counts(y, None, 50, np.random.default_rng(0))
    assert (counts[:, y == 0].sum(axis=1) == 30).all() and (counts[:, y == 1].sum(axis=1) == 10).all()
    slides = np.repeat(np.arange(8), 5)
    y = np.tile([0, 0, 1, 0, 1], 8)
    counts = resample_counts(y, slides, 50, np.random.default_rng(0))
    per_slide = counts.reshape(50, 8, 5)
    # Every patch of a slide is drawn as often as the slide; 8 slides drawn per resample.
    assert (per_slide == per_slide[:, :, :1]).all()
    assert (per_slide[:, :, 0].sum(axis=1) == 8).all()


# ---------------------------------------------------------------- intervals


def test_95_percent_intervals_cover_the_true_auroc_at_about_the_nominal_rate() -> None:
    separation = 1.0
    true_auroc = NormalDist().cdf(separation / math.sqrt(2))  # P(N(d,1) > N(0,1))
    covered = 0
    for rep in range(100):
        y, p = scores(300, separation, seed=rep)
        lo, hi = confidence_intervals(y, p, draws=400, seed=rep)["ci95"]["auroc"]
        covered += lo <= true_auroc <= hi
    assert 90 <= covered <= 100


def test_every_metric_gets_an_interval_around_its_value_and_the_draws_are_seeded() -> None:
    y, p = scores(400, 1.5, seed=0)
    out = confidence_intervals(y, p, draws=300, seed=7)
    assert out["ci_method"] == "patch" and out["bootstrap"] == 300 and "ci_slides" not in out
    values = binary_metrics(y, p)
    for m in METRICS:
        lo, hi = out["ci95"][m.name]
        assert lo < hi and lo <= values[m.name] <= hi, m.name
    assert confidence_intervals(y, p, draws=300, seed=7) == out
    assert confidence_intervals(y, p, draws=300, seed=8) != out
    assert confidence_intervals(y, p, draws=0) == {}


def test_slide_resampling_widens_the_interval_when_a_slides_patches_are_copies() -> None:
    # 40 slides of 10 identical patches: 40 independent observations, not 400.
    y0, p0 = scores(40, 1.0, seed=3)
    y, p, slides = np.repeat(y0, 10), np.repeat(p0, 10), np.repeat(np.arange(40), 10)
    patch = confidence_intervals(y, p, draws=500, seed=0)
    slide = confidence_intervals(y, p, slides, draws=500, seed=0)
    assert slide["ci_method"] == "slide" and slide["ci_slides"] == 40
    width = {k: v["ci95"]["auroc"][1] - v["ci95"]["auroc"][0] for k, v in (("patch", patch), ("slide", slide))}
    assert width["slide"] > 2 * width["patch"]


def test_slide_ids_must_match_the_predictions() -> None:
    y, p = scores(20, 1.0, seed=0)
    with pytest.raises(ValueError, match="19 slide ids for 20 predictions"):
        confidence_intervals(y, p, np.arange(19), draws=10)


# ---------------------------------------------------------------- paired comparison and DeLong


def slow_delong(y: np.ndarray, *scores_: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong et al. (1988) straight from the definition: placement values over all positive-negative pairs."""
    pos, neg = y == 1, y == 0
    m, n = pos.sum(), neg.sum()
    v10, v01, aucs = [], [], []
    for s in scores_:
        x, z = s[pos], s[neg]
        psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
        aucs.append(psi.mean())
        v10.append(psi.mean(axis=1))
        v01.append(psi.mean(axis=0))
    s10 = np.atleast_2d(np.cov(np.array(v10)))
    s01 = np.atleast_2d(np.cov(np.array(v01)))
    return np.array(aucs), s10 / m + s01 / n


def test_fast_delong_equals_the_slow_definition_with_ties() -> None:
    y, a = scores(300, 1.0, seed=4)
    b = np.round(a + np.random.default_rng(5).normal(0, 0.1, 300), 2)  # correlated, with ties
    aucs, cov = delong_covariance(y, np.round(a, 2), b)
    slow_aucs, slow_cov = slow_delong(y, np.round(a, 2), b)
    np.testing.assert_allclose(aucs, slow_aucs, atol=1e-12)
    np.testing.assert_allclose(cov, slow_cov, atol=1e-14)
    var = slow_cov[0, 0] + slow_cov[1, 1] - 2 * slow_cov[0, 1]
    z = (slow_aucs[0] - slow_aucs[1]) / math.sqrt(var)
    assert delong_test(y, np.round(a, 2), b) == pytest.approx(2 * (1 - NormalDist().cdf(abs(z))), rel=1e-9)


def test_paired_comparison_of_a_model_with_itself_finds_no_difference() -> None:
    y, p = scores(200, 1.0, seed=6)
    intervals, paired = paired_comparison(y, p, p.copy(), draws=200, seed=0)
    assert intervals == confidence_intervals(y, p, draws=200, seed=0)  # the same draws as the model's own
    for m in METRICS:
        assert paired[m.name]["diff"] == 0 and paired[m.name]["ci95"] == [0.0, 0.0]
        assert not excludes_zero(paired[m.name]["ci95"])
    assert paired["auroc"]["p_delong"] == 1.0


def test_paired_comparison_finds_a_real_improvement_and_its_size() -> None:
    y, _ = scores(2000, 0.0, seed=7)
    rng = np.random.default_rng(8)
    signal = rng.standard_normal(2000) + 1.0 * y
    better = 1 / (1 + np.exp(-(signal + 0.3 * rng.standard_normal(2000))))
    worse = 1 / (1 + np.exp(-(signal + 1.5 * rng.standard_normal(2000))))
    _, paired = paired_comparison(y, better, worse, draws=300, seed=0)
    truth = binary_metrics(y, better)["auroc"] - binary_metrics(y, worse)["auroc"]
    assert paired["auroc"]["diff"] == pytest.approx(truth, abs=1e-12)
    lo, hi = paired["auroc"]["ci95"]
    assert 0 < lo < truth < hi and excludes_zero([lo, hi])
    assert paired["auroc"]["p_delong"] < 1e-6


# ---------------------------------------------------------------- temperature scaling


def test_temperature_undoes_an_overconfident_model() -> None:
    rng = np.random.default_rng(9)
    logit = rng.normal(0, 2, 20000)
    y = (rng.random(20000) < 1 / (1 + np.exp(-logit))).astype(int)
    overconfident = 1 / (1 + np.exp(-3.0 * logit))  # logits three times too large
    t = fit_temperature(y, overconfident)
    grid = np.linspace(2.0, 4.0, 2001)
    losses = [nll(y, apply_temperature(overconfident, g)) for g in grid]
    assert t == pytest.approx(grid[int(np.argmin(losses))], abs=2e-3)  # the NLL minimum, found independently
    assert t == pytest.approx(3.0, rel=0.05)
    assert binary_metrics(y, apply_temperature(overconfident, t))["ece"] < binary_metrics(y, overconfident)["ece"]


def test_temperature_one_changes_nothing_and_order_is_kept() -> None:
    p = np.array([1e-3, 0.2, 0.5, 0.7, 0.999])
    np.testing.assert_allclose(apply_temperature(p, 1.0), p, rtol=1e-12)
    hot = apply_temperature(p, 2.0)
    assert (np.diff(hot) > 0).all() and hot[2] == pytest.approx(0.5)
    assert (np.abs(hot - 0.5) < np.abs(p - 0.5) + 1e-15).all()  # T > 1 moves every p toward 0.5


# ---------------------------------------------------------------- the resampling machinery, in detail


def test_every_patch_can_be_drawn_and_the_defaults_are_1000_seeded_draws() -> None:
    y = np.array([0] * 30 + [1] * 10)
    counts = resample_counts(y, None, 200, np.random.default_rng(0))
    assert (counts.sum(axis=0) > 0).all()  # the first patch of each class too
    y, p = scores(60, 1.0, seed=11)
    assert confidence_intervals(y, p) == confidence_intervals(y, p, None, 1000, 0)
    assert paired_comparison(y, p, p ** 2) == paired_comparison(y, p, p ** 2, None, 1000, 0)
    lo, hi = confidence_intervals(y, p, draws=1)["ci95"]["auroc"]
    assert lo == hi  # one draw: a degenerate interval, not none


def test_intervals_are_the_2_5_and_97_5_percentiles_of_every_draw() -> None:
    y, p = scores(200, 1.0, seed=12)
    (values,) = _draw_metrics([Ranked.of(y, p)], y, None, 300, 5)  # more draws than one chunk
    assert all(len(v) == 300 for v in values.values())
    out = confidence_intervals(y, p, draws=300, seed=5)
    for name, v in values.items():
        assert out["ci95"][name] == pytest.approx(np.quantile(v, [0.025, 0.975]).tolist(), abs=1e-15)


def test_every_model_of_a_paired_draw_is_weighted_by_its_own_patches(monkeypatch: pytest.MonkeyPatch) -> None:
    # Two models that rank the patches differently, on the same resamples: each model's metrics on a draw
    # must equal sklearn's on that draw's repeated patches (counts are drawn in the first model's order).
    import pcamx.evaluation.uncertainty as uncertainty

    y, p = scores(60, 1.0, seed=21)
    q = np.random.default_rng(22).random(60)
    first = Ranked.of(y, p).order
    drawn: list[np.ndarray] = []

    def recording(*args, **kwargs) -> np.ndarray:
        counts = resample_counts(*args, **kwargs)
        drawn.append(counts)
        return counts

    monkeypatch.setattr(uncertainty, "resample_counts", recording)
    values = _draw_metrics([Ranked.of(y, p), Ranked.of(y, q)], y, None, 3, seed=4)
    (counts,) = drawn
    for row in range(3):
        per_patch = np.empty(60, dtype=int)
        per_patch[first] = counts[row].astype(int)
        idx = np.repeat(np.arange(60), per_patch)
        for probs, got in ((p, values[0]), (q, values[1])):
            truth = binary_metrics(y[idx], probs[idx])
            for name in got:  # float32 counts: agreement to float32 precision
                assert got[name][row] == pytest.approx(truth[name], abs=1e-6), (name, row)


def test_slide_resampling_redraws_single_class_resamples() -> None:
    # One slide holds every positive: a resample without it has one class and must be drawn again.
    y = np.array([1] * 4 + [0] * 12)
    slides = np.repeat([0, 1, 2, 3], 4)
    counts = resample_counts(y, slides, 400, np.random.default_rng(1))
    positive_slide = counts[:, 0]
    assert (positive_slide >= 1).all() and (counts[:, y == 0].sum(axis=1) > 0).all()
    assert (positive_slide == 1).any()  # drawn once is enough
    assert (counts.reshape(400, 4, 4).sum(axis=(1, 2)) == 16).all()  # 4 slides of 4 patches each time


def test_the_paired_comparison_resamples_slides_when_it_has_them() -> None:
    y0, p0 = scores(30, 1.0, seed=13)
    y, p, slides = np.repeat(y0, 8), np.repeat(p0, 8), np.repeat(np.arange(30), 8)
    q = np.clip(p + np.random.default_rng(14).normal(0, 0.05, len(p)), 0, 1)
    by_slide, paired_slide = paired_comparison(y, p, q, slides, draws=300, seed=0)
    by_patch, paired_patch = paired_comparison(y, p, q, None, draws=300, seed=0)
    assert by_slide["ci_method"] == "slide" and by_slide["ci_slides"] == 30 and by_patch["ci_method"] == "patch"
    width = {k: v["auroc"]["ci95"][1] - v["auroc"]["ci95"][0] for k, v in (("slide", paired_slide),
                                                                          ("patch", paired_patch))}
    assert width["slide"] > 1.5 * width["patch"]


def test_delong_needs_two_of_each_class_and_a_saturated_probability_stays_finite() -> None:
    assert delong_covariance(np.array([1, 1, 0, 0]), np.array([0.9, 0.4, 0.5, 0.1]))[0][0] == 0.75
    with pytest.raises(ValueError, match="at least 2 patches of each class"):
        delong_covariance(np.array([1, 0, 0]), np.array([0.9, 0.5, 0.1]))
    with pytest.raises(ValueError, match="at least 2 patches of each class"):
        delong_covariance(np.array([1, 1, 0]), np.array([0.9, 0.5, 0.1]))
    # p = 1 and p = 0 are clipped to 1 ∓ 1e-7 before the logit, so T still acts on them.
    logit = math.log((1 - 1e-7) / 1e-7)
    out = apply_temperature(np.array([1.0, 0.0]), 2.0)
    np.testing.assert_allclose(out, [1 / (1 + math.exp(-logit / 2)), 1 / (1 + math.exp(logit / 2))], rtol=1e-12)


def test_a_paired_comparison_without_draws_has_differences_but_no_intervals() -> None:
    y, p = scores(60, 1.0, seed=31)
    q = np.clip(p + 0.1, 0, 1)
    intervals, paired = paired_comparison(y, p, q, None, draws=0)
    assert intervals == {} and "ci95" not in paired["auroc"] and "diff" in paired["auroc"]
    intervals, paired = paired_comparison(y, p, q, None, draws=1)  # one draw: degenerate intervals, not none
    assert intervals["bootstrap"] == 1 and paired["auroc"]["ci95"][0] == paired["auroc"]["ci95"][1]
