"""`python -m pcamx.report DIR [DIR ...] [--out OUTDIR] [--style default|reference] [--baseline RUN_DIR] [--ci]`:
the sweep table of every run under DIRs (--help says more). It reads only the run directories, so it works on any
sweep folder, one whose launcher died included. Exit status: 0 when every run is ok, 1 when a run failed or is
missing (the tables are written first), 2 when there is nothing to report (nothing is written) or a bad argument.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from pcamx.report.runs import any_failed, collect_runs
from pcamx.report.summary import STYLES, write_summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pcamx.report", description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="sweep or run folders, searched recursively")
    parser.add_argument("--out", type=Path, default=None,
                        help="where summary.csv, summary.md and roc.png go (default: DIR, when only one)")
    parser.add_argument("--style", choices=STYLES, default="default",
                        help="summary.md layout: default (every run, changes against its own uncompressed model) "
                             "or reference (the reference results table)")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="(--style reference) the run directory every change is computed against "
                             "(default: the full-FT, unquantized, f32-evaluated run)")
    parser.add_argument("--ci", action=argparse.BooleanOptionalAction, default=None,
                        help="each metric with its 95%% interval in summary.md (default: on for --style reference, "
                             "off otherwise)")
    args = parser.parse_args(argv)
    for d in args.dirs:
        if not d.is_dir():
            parser.error(f"not a directory: {d}")
    if args.out is None and len(args.dirs) > 1:
        parser.error("several DIRs: say where the tables go with --out")
    out = args.out or args.dirs[0]
    runs = collect_runs(args.dirs)
    if not runs:  # nothing is written: an earlier summary in --out stays as it was
        print(f"pcamx.report: error: no run directories (metrics.json or .hydra/overrides.yaml) under "
              f"{' '.join(map(str, args.dirs))}; nothing written", file=sys.stderr)
        return 2
    try:
        paths = write_summary(runs, out, args.style, args.baseline, args.ci)
    except ValueError as err:
        parser.error(str(err))
    print(paths["md"].read_text())
    print("written: " + ", ".join(str(p) for p in paths.values()))
    if any_failed(runs):
        bad = [r for r in runs if not r.ok]
        print(f"{len(bad)} of {len(runs)} runs did not finish ok: " + ", ".join(f"{r.job} ({r.status})" for r in bad),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
