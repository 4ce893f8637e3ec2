"""Files one run writes into its directory. Every write is atomic."""

from __future__ import annotations

import io as _io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: runs on clusters and CI without a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

from pcamx import io  # noqa: E402


def write_predictions(path: Path, labels: np.ndarray, probs: np.ndarray) -> Path:
    buf = _io.StringIO()
    buf.write("index,label,prob\n")
    for i, (y, p) in enumerate(zip(labels.tolist(), probs.tolist(), strict=True)):
        buf.write(f"{i},{y},{p:.8f}\n")
    return io.write_text(path, buf.getvalue())


def plot_roc(path: Path, labels: np.ndarray, probs: np.ndarray, title: str) -> Path:
    fpr, tpr, _ = roc_curve(labels, probs)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(fpr, tpr, label=f"AUROC = {roc_auc_score(labels, probs):.4f}")
    ax.plot([0, 1], [0, 1], "--", color="gray", linewidth=0.8)
    ax.set(xlabel="False positive rate", ylabel="True positive rate", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right")
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path
