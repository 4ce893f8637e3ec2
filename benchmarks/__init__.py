"""Benchmark: pcamx against the usual PCam fine-tuning pipeline (`benchmarks.reference`: h5py per sample, PIL
augmentation, the HF processor, a DataLoader, a TTA loop), same data, same device, same run. Sections:
1. pipeline (input pipeline, train/eval, and its host side); 2. eval (TTA, views batched vs a per-view loop, same
probabilities); 3. train (training step per method, eager and compiled on CUDA); 4. compress (latency and
throughput of the compressed variants); 5. mfu (training MFU, CUDA). `python -m benchmarks`; docs/benchmarks.md.
"""

from benchmarks.cli import main, run

__all__ = ["main", "run"]
