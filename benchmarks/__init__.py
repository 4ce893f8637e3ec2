"""Benchmark: pcamx against the usual PCam fine-tuning pipeline, same data, same device, same run.

The usual way decodes every 96x96 patch on the CPU, runs PIL augmentation and the Hugging Face image
processor per sample to get a 224x224 float tensor, and runs test-time augmentation as a Python loop of
separate forwards (`benchmarks.reference`). pcamx keeps images uint8 until they are on the device and
does augmentation, resize, normalization and the TTA views batched there. Sections:

1. pipeline  input pipeline alone (train/eval) and its host side;
2. eval      test-set inference with 8-view TTA, batched vs a loop (and equal probabilities);
3. train     training step for head_only / lora / fullft, eager and compiled, with peak memory;
4. compress  latency and throughput of the compressed variants, bf16 and int8;
5. mfu       model FLOPs utilization (CUDA only);
   load      `data.in_memory=true` load time and memory for a 32,768-image split;
   uncertainty  every interval and test of a compressed row;
   predict   `python -m pcamx.predict` on a folder of PNG patches vs a per-file PIL + processor loop;
   export    ONNX Runtime vs PyTorch CPU latency, uncompressed and compressed (pcamx.export).

    python -m benchmarks [--device cuda] [--model vits16] [--out bench.json]

Results and how to read them: docs/benchmarks.md.
"""

from benchmarks.cli import main, run

__all__ = ["main", "run"]
