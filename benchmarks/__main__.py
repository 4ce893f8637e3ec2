"""`python -m benchmarks`: see benchmarks/__init__.py and docs/benchmarks.md."""

from benchmarks.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
