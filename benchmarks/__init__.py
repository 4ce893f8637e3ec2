"""Benchmark: pcamx against the usual PCam fine-tuning pipeline, same data, same device, same run.

The usual way decodes every 96x96 patch on the CPU, runs PIL augmentation and the Hugging Face image processor per
sample, and runs test-time augmentation as a loop of forwards (`benchmarks.reference`). pcamx keeps images uint8
until they are on the device and does augmentation, resize, normalization and the TTA views batched there.

1. pipeline  input pipeline alone (train/eval) and its host side;
2. eval      TTA evaluation, batched vs a per-view loop (and equal probabilities);
3. train     training step per method, eager and compiled (CUDA), with peak memory;
4. compress  latency and throughput of the compressed variants (reference τ, budgets, bf16, int8);
5. mfu       model FLOPs utilization (CUDA only).

    python -m benchmarks [--device cuda] [--model vits16] [--out bench.json]

Timing is pcamx.runtime.timing's; results and how to read them: docs/benchmarks.md.
"""

from benchmarks.cli import main, run

__all__ = ["main", "run"]
