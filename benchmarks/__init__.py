"""`python -m benchmarks` (make bench): pcamx beside the usual PCam pipeline (`benchmarks.reference`), same data,
device and run; sections 1 pipeline, 2 eval, 3 train, 4 compress, 5 mfu (CUDA), 6 wsi. docs/benchmarks.md."""

from benchmarks.cli import main, run  # noqa: F401
