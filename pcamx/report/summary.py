"""A sweep's comparison, written into one directory: summary.csv, summary.md and the figures."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pcamx.report.frontier import plot_frontier
from pcamx.report.reference_table import pick_baseline, reference_table
from pcamx.report.run_outputs import plot_reliability
from pcamx.report.runs import RunRecord, collect_runs, sweep_title
from pcamx.report.sweep import csv_text, markdown_table, plot_sweep_roc, run_predictions
from pcamx.runtime import disk, run_files

STYLES = ("default", "reference")


def write_summary(runs: Sequence[RunRecord], out_dir: str | Path, style: str = "default",
                  baseline: str | Path | None = None, ci: bool | None = None) -> dict[str, Path]:
    """Write summary.csv, summary.md, roc.png, calibration.png and, when an ok run has GFLOPs and AUROC,
    frontier.png into `out_dir`; returns their paths by kind (csv, md, roc, calibration, frontier).

    style: "default" (every run, changes against each run's own uncompressed model) or "reference" (the
    reference table's layout, changes against one `baseline` run; see pcamx.report.reference_table).
    ci: each metric with its 95% interval in summary.md; None = the style's default (on for reference)."""

    out_dir = Path(out_dir)
    if (out_dir / run_files.METRICS).is_file():
        # A run directory has its own roc.png; the sweep figure must not replace it.
        raise ValueError(f"{out_dir} is a run directory; write the sweep summary elsewhere (--out)")
    if style not in STYLES:
        raise ValueError(f"unknown table style {style!r}; allowed: {', '.join(STYLES)}")
    if baseline is not None and style != "reference":
        raise ValueError("a baseline run only applies to --style reference")
    if style == "reference":
        md = reference_table(runs, pick_baseline(runs, baseline), ci=True if ci is None else ci)
    else:
        md = markdown_table(runs, ci=bool(ci))
    paths = {
        "csv": disk.write_text(out_dir / run_files.SUMMARY_CSV, csv_text(runs)),
        "md": disk.write_text(out_dir / run_files.SUMMARY_MD, md),
        "roc": plot_sweep_roc(runs, out_dir / run_files.ROC),
        "calibration": plot_reliability(out_dir / run_files.CALIBRATION, run_predictions(runs),
                                        sweep_title(runs, "Sweep reliability")),
    }
    frontier = plot_frontier(runs, out_dir / run_files.FRONTIER)
    if frontier is not None:
        paths["frontier"] = frontier
    else:
        (out_dir / run_files.FRONTIER).unlink(missing_ok=True)  # an earlier table's figure would not match this one
    return paths


def summarize(dirs: Sequence[str | Path], out_dir: str | Path, style: str = "default",
              baseline: str | Path | None = None, ci: bool | None = None) -> tuple[list[RunRecord], dict[str, Path]]:
    """collect_runs + write_summary."""
    runs = collect_runs(dirs)
    return runs, write_summary(runs, out_dir, style, baseline, ci)
