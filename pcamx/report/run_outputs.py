"""Files one run writes into its directory. Every write is atomic."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: runs on clusters and CI without a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

from pcamx.evaluation.metrics import ECE_BINS, expected_calibration_error, reliability_bins  # noqa: E402
from pcamx.runtime import disk  # noqa: E402


def write_predictions(path: Path, labels: np.ndarray, probs: np.ndarray, calibrated: np.ndarray | None = None) -> Path:
    """index,label,prob[,prob_calibrated]: P(tumor) of each test patch in file order; `prob_calibrated` is
    the same after temperature scaling (eval.calibrate=temperature)."""
    buf = io.StringIO()
    columns = [labels.tolist(), probs.tolist()] + ([calibrated.tolist()] if calibrated is not None else [])
    buf.write("index,label,prob" + (",prob_calibrated" if calibrated is not None else "") + "\n")
    for i, (y, *ps) in enumerate(zip(*columns, strict=True)):
        buf.write(f"{i},{y}," + ",".join(f"{p:.8f}" for p in ps) + "\n")
    return disk.write_text(path, buf.getvalue())


def plot_reliability(path: Path, curves: list[tuple[str, np.ndarray, np.ndarray]], title: str,
                     n_bins: int = ECE_BINS) -> Path:
    """Reliability diagram: accuracy against mean confidence of the predicted class in the ECE's bins, one
    line per (label, labels, probs), and below it the number of patches in each bin."""
    fig, (ax, ax_n) = plt.subplots(2, 1, figsize=(6, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0.5, 1], [0.5, 1], "--", color="gray", linewidth=0.8, label="perfect calibration")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    width = (edges[1] - edges[0]) / max(len(curves), 1)
    for k, (label, y, p) in enumerate(curves):
        counts, conf_sum, correct_sum = reliability_bins(y, p, n_bins)
        used = counts > 0
        ax.plot(conf_sum[used] / counts[used], correct_sum[used] / counts[used], "o-", markersize=4,
                label=f"{label} (ECE {expected_calibration_error(y, p, n_bins):.4f})")
        bars = ax_n.bar(edges[:-1][used] + k * width, counts[used], width=width, align="edge", alpha=0.7)
        if len(curves) <= 2:
            ax_n.bar_label(bars, fontsize=6)
    ax.set(ylabel="accuracy", title=title, xlim=(0.5, 1.0), ylim=(0.0, 1.02))
    ax.legend(loc="upper left", fontsize=7)
    ax_n.set(xlabel=f"confidence of the predicted class ({n_bins} bins)", ylabel="patches")
    fig.tight_layout()
    with disk.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


def plot_roc(path: Path, labels: np.ndarray, probs: np.ndarray, title: str) -> Path:
    fpr, tpr, _ = roc_curve(labels, probs)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(fpr, tpr, label=f"AUROC = {roc_auc_score(labels, probs):.4f}")
    ax.plot([0, 1], [0, 1], "--", color="gray", linewidth=0.8)
    ax.set(xlabel="False positive rate", ylabel="True positive rate", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right")
    fig.tight_layout()
    with disk.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path
