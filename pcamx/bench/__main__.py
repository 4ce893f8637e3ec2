"""`python -m pcamx.bench`: see pcamx/bench/__init__.py and docs/benchmarks.md."""

from pcamx.bench.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
