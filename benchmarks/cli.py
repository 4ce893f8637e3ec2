"""Command line of `python -m benchmarks`: settings per device, data, sections, bench.json, markdown."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from benchmarks.data import prepare_data
from benchmarks.measure import Timing
from benchmarks.report import evaluate_targets, render_markdown
from benchmarks.sections import SECTIONS, Bench, Settings
from pcamx.model import ARCHITECTURES
from pcamx.runtime import disk
from pcamx.runtime.hardware import resolve_device
from pcamx.runtime.timing import sync

# Defaults per device type. CPU: small batches and 6 s per figure keep the vits16 figures under 10 minutes on
# 2 cores; section 4's five budget searches add ~6 (a compressed copy and its GFLOPs per trial, 18-26 trials
# each). CUDA: pcamx's own batch sizes (conf/data/pcam.yaml).
DEVICE_DEFAULTS: dict[str, dict[str, Any]] = {
    "cpu": {"batch_size": 16, "eval_batch_size": 8, "duration": 6.0, "ref_tta_views": (8,)},
    "cuda": {"batch_size": 128, "eval_batch_size": 256, "duration": 3.0, "ref_tta_views": (8, 6)},
}
DATA_SIZES = {"train": 4096, "valid": 64, "test": 1024}
QUICK_DATA_SIZES = {"train": 128, "valid": 8, "test": 64}
LOAD_SIZE, QUICK_LOAD_SIZE = 32_768, 512
# Dense bf16 tensor-core peak (TFLOP/s), matched against the CUDA device name.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}
# Measured on the 2-core dev machine: ~50 s of compile warm-up per model, and the compiled vits16
# head_only step was slower than eager (3.2 s vs 0.85 s at batch 16).
CPU_COMPILE_REASON = "CPU: ~50 s compile warm-up per model exceeds the time budget (--compile on to force)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="pcamx's on-device batched input pipeline, TTA and training against the usual per-sample "
                    "pipeline (h5py per sample, PIL augmentation, HF processor, DataLoader, TTA loop).",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--model", choices=tuple(ARCHITECTURES), default="vits16",
                   help="architecture (random init unless --weights)")
    p.add_argument("--weights", default=None, help="HF id or local dir of DINOv3 weights (optional)")
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=None, help="training / pipeline / throughput batch")
    p.add_argument("--eval-batch-size", type=int, default=None, help="images per TTA batch (x8 views)")
    p.add_argument("--duration", type=float, default=None, help="timed seconds per figure, all repeats")
    p.add_argument("--iters", type=int, default=None, help="fixed timed steps per repeat (overrides --duration)")
    p.add_argument("--repeats", type=int, default=None, help="repeats per figure (median reported; default 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps before each figure (default 2)")
    p.add_argument("--workers", type=int, default=None,
                   help="reference DataLoader workers (default: min(8, CPU count))")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile the pcamx training step too (auto: on CUDA only)")
    p.add_argument("--no-compile", dest="compile", action="store_const", const="off")
    p.add_argument("--ref-tta-views", default=None,
                   help="comma-separated view counts for the reference TTA loop (default 8 on CPU, 8,6 on CUDA)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak dense bf16 TFLOP/s for MFU (default by GPU name: A100 312, H100/H200 989)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--load-size", type=int, default=None, help=f"images in the load split (default {LOAD_SIZE})")
    p.add_argument("--data-dir", default=None, help="where to write the synthetic files (default: a temp dir)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench.json")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: tiny data, one repeat of one step per figure, no compile")
    return p


def resolve_settings(args: argparse.Namespace) -> Settings:
    device = resolve_device(args.device)
    defaults = DEVICE_DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    if args.quick:
        timing = Timing(repeats=args.repeats or 1, duration=args.duration or 0.05,
                        iters=args.iters if args.iters is not None else 1, warmup=args.warmup or 1)
    else:
        timing = Timing(repeats=args.repeats or 3, duration=args.duration or defaults["duration"],
                        iters=args.iters, warmup=args.warmup if args.warmup is not None else 2)
    compile_on, reason = {
        "on": (True, None), "off": (False, "--no-compile"),
    }.get(args.compile, (False, "--quick") if args.quick else (device.type == "cuda", CPU_COMPILE_REASON))
    peak = args.peak_tflops
    if peak is None and device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((tflops for key, tflops in PEAK_BF16_TFLOPS.items() if key in name), None)
    views = tuple(int(v) for v in args.ref_tta_views.split(",")) if args.ref_tta_views else defaults["ref_tta_views"]
    return Settings(
        device=device, model=args.model, weights=args.weights, resolution=args.resolution,
        batch_size=args.batch_size or defaults["batch_size"],
        eval_batch_size=args.eval_batch_size or defaults["eval_batch_size"],
        workers=args.workers if args.workers is not None else min(8, os.cpu_count() or 1),
        timing=timing, compile=compile_on, compile_skip_reason=None if compile_on else reason,
        ref_tta_views=views, peak_tflops=peak, seed=args.seed, quick=args.quick,
    )


def environment(settings: Settings) -> dict[str, Any]:
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    device = settings.device
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        "cpu": cpu, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "transformers": transformers.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "loadavg_start": list(os.getloadavg()),
    }


def _log(message: str) -> None:
    print(f"[benchmarks] {message}", file=sys.stderr, flush=True)


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, write the JSON, print the markdown; returns the result document."""
    args = build_parser().parse_args(argv)
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    if unknown := sorted(set(wanted) - set(SECTIONS)):
        raise SystemExit(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        settings = resolve_settings(args)
        meta, started = environment(settings), time.perf_counter()
        sizes = QUICK_DATA_SIZES if args.quick else DATA_SIZES
        load_size = args.load_size or (QUICK_LOAD_SIZE if args.quick else LOAD_SIZE)
        with tempfile.TemporaryDirectory(prefix="pcamx-bench-") as tmp:
            workdir = Path(args.data_dir) if args.data_dir else Path(tmp)
            _log(f"generating synthetic PCam-layout data in {workdir} ({sizes}, load split {load_size:,})")
            data = prepare_data(workdir, sizes, load_size, seed=args.seed)
            bench, sections = Bench(settings, data), {}
            for name, section in SECTIONS.items():
                if name not in wanted:
                    sections[name] = {"skipped": "not requested (--sections)"}
                    continue
                _log(f"section {name} ...")
                start = time.perf_counter()
                try:
                    sync(settings.device)
                    sections[name] = section(bench, sections)
                except Exception as err:  # one failing section must not lose the others' numbers
                    sections[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
                    _log(f"section {name} failed: {type(err).__name__}: {err}")
                sections[name]["section_s"] = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)  # a caller in the same process (a test) gets its setting back
    meta.update(loadavg_end=list(os.getloadavg()), total_s=time.perf_counter() - started)
    doc = {
        "meta": meta,
        "settings": {"model": settings.model, "weights": settings.weights, "resolution": settings.resolution,
                     "batch_size": settings.batch_size, "eval_batch_size": settings.eval_batch_size,
                     "workers": settings.workers, "timing": settings.timing.describe(), "compile": settings.compile,
                     "precision": settings.precision, "ref_tta_views": list(settings.ref_tta_views),
                     "peak_tflops": settings.peak_tflops, "seed": settings.seed, "quick": settings.quick,
                     "sections": wanted, "argv": sys.argv[1:] if argv is None else list(argv)},
        "data": data.describe(),
        "sections": sections,
        "targets": evaluate_targets(sections, settings.device.type),
    }
    disk.write_json(args.out, doc)
    print(render_markdown(doc))
    _log(f"wrote {args.out}")
    return doc


def main(argv: list[str] | None = None) -> int:
    doc = run(argv)
    return 1 if any("error" in sec for sec in doc["sections"].values()) else 0
