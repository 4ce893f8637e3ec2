"""Benchmark: pcamx against the usual PCam fine-tuning pipeline (`benchmarks.reference`: h5py per sample, PIL
augmentation, the HF processor, a DataLoader, a TTA loop), same data, same device, same run:

1. pipeline  input pipeline alone (train/eval) and its host side;
2. eval      TTA evaluation, views batched vs a per-view loop (and equal probabilities);
3. train     training step per method, eager and compiled (CUDA), with peak memory;
4. compress  latency and throughput of the compressed variants (reference τ, budgets, bf16, int8);
5. mfu       model FLOPs utilization of the training step (CUDA only).

    python -m benchmarks [--device cuda] [--model vits16] [--out bench.json]

Results and how to read them: docs/benchmarks.md.
"""

from benchmarks.cli import main, run

__all__ = ["main", "run"]
