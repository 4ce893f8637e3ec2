"""Print the mutation score per module from mutmut's results (mutants/**/*.meta), for `make mutation`.

A mutant counts as caught when a test failed (killed), ran past its time limit (timeout: the mutant made
the code loop or crawl) or crashed the interpreter. Score = caught / checked. `--survivors` lists the
mutants that no test caught, to explain in docs/testing.md or kill with a test (`mutmut show NAME`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

CAUGHT = {1: "killed", 3: "killed", 36: "timeout", 24: "timeout", -24: "timeout", 152: "timeout",
          255: "timeout", -11: "crashed", -9: "crashed", 37: "caught"}
SURVIVED = 0
NO_TESTS = {5, 33}


def classify(code: int | None) -> str:
    if code is None:
        return "unchecked"
    if code == SURVIVED:
        return "survived"
    if code in NO_TESTS:
        return "no tests"
    return "caught" if code in CAUGHT else "suspicious"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mutants", type=Path, default=Path("mutants"))
    parser.add_argument("--survivors", action="store_true", help="list every mutant no test caught")
    parser.add_argument("--min-score", type=float, default=None, help="exit 1 below this score (percent)")
    args = parser.parse_args(argv)
    metas = sorted(args.mutants.rglob("*.py.meta"))
    if not metas:
        print(f"no mutmut results under {args.mutants}/: run `make mutation` first", file=sys.stderr)
        return 2
    total: Counter = Counter()
    survivors: list[str] = []
    print(f"{'module':34} {'mutants':>7} {'caught':>7} {'survived':>8} {'no tests':>8} {'score':>7}")
    for meta in metas:
        module = str(meta.relative_to(args.mutants)).removesuffix(".meta")
        codes = json.loads(meta.read_text()).get("exit_code_by_key", {})
        counts = Counter(classify(code) for code in codes.values())
        survivors += [name for name, code in codes.items() if classify(code) in ("survived", "no tests")]
        total += counts
        print(_row(module, counts))
    print(_row("all", total))
    if args.survivors:
        print("\nnot caught:" if survivors else "\nevery checked mutant was caught")
        print("\n".join(f"  {name}" for name in survivors))
    if total["unchecked"]:
        print(f"\n{total['unchecked']} mutants not checked yet (an interrupted run): `make mutation` continues it")
    score = _score(total)
    return 1 if args.min_score is not None and (score is None or score < args.min_score) else 0


def _score(counts: Counter) -> float | None:
    checked = counts["caught"] + counts["survived"] + counts["no tests"] + counts["suspicious"]
    return 100.0 * counts["caught"] / checked if checked else None


def _row(module: str, counts: Counter) -> str:
    score = _score(counts)
    text = "—" if score is None else f"{score:.1f}%"
    return (f"{module:34} {sum(counts.values()):>7} {counts['caught']:>7} {counts['survived']:>8} "
            f"{counts['no tests']:>8} {text:>7}")


if __name__ == "__main__":
    sys.exit(main())
