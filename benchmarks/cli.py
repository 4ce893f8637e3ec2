"""`python -m benchmarks`: pcamx's on-device batched input pipeline, TTA, training and compressed models against
the usual per-sample pipeline, on synthetic PCam-layout data; writes bench.json and prints markdown tables."""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from benchmarks.report import evaluate_targets, render_markdown
from benchmarks.sections import SECTIONS, Bench
from pcamx.config import compose
from pcamx.data.synthetic import ensure_synthetic
from pcamx.model import ARCHITECTURES
from pcamx.runtime import disk
from pcamx.runtime.hardware import resolve_device, resolve_precision

# CPU: small batches, 6 s per figure and few forwards per compressed variant keep a vits16 run near 15 minutes on
# 2 cores (section 4's budget searches take ~6). CUDA: pcamx's own batch sizes (conf/data/pcam.yaml).
CPU_DEFAULTS = {"batch_size": 16, "eval_batch_size": 8, "seconds": 6.0, "forward_iters": (20, 4)}
CUDA_DEFAULTS = {"seconds": 3.0, "forward_iters": (50, 20)}
DATA_SIZES = {False: {"train": 4096, "valid": 64, "test": 1024}, True: {"train": 128, "valid": 8, "test": 64}}
log = functools.partial(print, "[benchmarks]", file=sys.stderr, flush=True)
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}  # dense tensor-core peak, by CUDA device name
# Measured on the 2-core dev machine: ~50 s of compile warm-up per model, and the compiled vits16 head_only step
# was slower than eager (3.2 s vs 0.85 s at batch 16).
CPU_COMPILE_REASON = "CPU: ~50 s compile warm-up per model exceeds the time budget (--compile on to force)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--model", choices=tuple(ARCHITECTURES), default="vits16", help="architecture (random init)")
    for flag, kind, text in (
            ("--resolution", int, "model input size (default: conf data.resolution)"),
            ("--batch-size", int, "training / pipeline / throughput batch (CPU 16; CUDA: conf data.batch_size)"),
            ("--eval-batch-size", int, "images per TTA batch (CPU 8; CUDA: conf data.eval_batch_size)"),
            ("--duration", float, "timed seconds per figure, all repeats (CPU 6, CUDA 3)"),
            ("--iters", int, "fixed timed calls per repeat instead of --duration; section 4: forwards per figure"),
            ("--repeats", int, "samples per figure, the median reported (default 3)"),
            ("--warmup", int, "untimed calls before each figure (default 2)"),
            ("--workers", int, "reference DataLoader workers (default: min(8, CPUs))"),
            ("--threads", int, "torch threads (default: torch's)"),
            ("--peak-tflops", float, "dense bf16 TFLOP/s for MFU (default by GPU name: A100 312, H100/H200 989)")):
        p.add_argument(flag, type=kind, help=text)
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile the pcamx training step too (auto: on CUDA only)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--data-dir", help="where the synthetic files are written or reused (default: a temp dir)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench.json")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny data, one call per figure, no compile")
    return p


def resolve_settings(args: argparse.Namespace) -> SimpleNamespace:
    """The run's settings: the flags, else per-device defaults, else pcamx's conf/ (what `python run.py` uses)."""
    device = resolve_device(args.device)
    cfg, cuda, quick = compose(), device.type == "cuda", args.quick
    defaults = {**CUDA_DEFAULTS, "batch_size": cfg.data.batch_size, "eval_batch_size": cfg.data.eval_batch_size} \
        if cuda else CPU_DEFAULTS
    iters = args.iters if args.iters is not None else 1 if quick else None
    name = torch.cuda.get_device_name(device) if cuda else ""
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    return SimpleNamespace(
        device=device, model=args.model, resolution=args.resolution or cfg.data.resolution,  # model: random init
        batch_size=args.batch_size or defaults["batch_size"],  # training, pipeline and throughput batch
        eval_batch_size=args.eval_batch_size or defaults["eval_batch_size"],  # images per TTA batch
        workers=args.workers if args.workers is not None else min(8, os.cpu_count() or 1),  # reference DataLoader
        # pcamx.runtime.timing.measure: samples per figure (the median reported), timed seconds per figure over all
        # samples or fixed calls per sample, warm-up calls; section 4: timed forwards at batch 1 and batch N.
        repeats=args.repeats or (1 if quick else 3), seconds=args.duration or defaults["seconds"], calls=iters,
        warmup=args.warmup if args.warmup is not None else 1 if quick else 2,
        forward_iters=(iters, iters) if iters else defaults["forward_iters"],
        compile_skipped={"on": None, "off": "--compile off"}.get(args.compile, "--quick" if quick else None if cuda
                                                                 else CPU_COMPILE_REASON),  # None: compiled too
        views=cfg.eval.tta_views,  # pcamx's TTA views
        precision=str(resolve_precision(cfg.train.precision, "train.precision", device, cfg.hardware.device)),
        peak_tflops=peak, seed=args.seed, quick=quick)


def environment(device: torch.device) -> dict[str, Any]:
    import transformers

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")), "?")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or None
    return {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
            "cpu": cpu, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "transformers": transformers.__version__, "python": platform.python_version(),
            "commit": commit, "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "loadavg_start": list(os.getloadavg())}


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, write the JSON, print the markdown; returns the result document."""
    args = build_parser().parse_args(argv)
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    if unknown := sorted(set(wanted) - set(SECTIONS)):
        raise SystemExit(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    try:  # the bench extra: torchvision backs the reference pipeline, tifffile writes section 6's slides
        __import__("torchvision"), __import__("tifffile")
    except ImportError as err:
        raise SystemExit(f"{err.name} is missing: python -m benchmarks needs pcamx's bench extra, "
                         "pip install -e '.[bench]' (make bench installs it)") from None
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or threads)
    try:
        settings = resolve_settings(args)
        meta, started, sizes = environment(settings.device), time.perf_counter(), DATA_SIZES[args.quick]  # --quick
        with tempfile.TemporaryDirectory(prefix="pcamx-bench-") as tmp:
            root = Path(args.data_dir or tmp) / "pcam"
            log(f"synthetic PCam-layout data in {root} ({sizes})")
            bench = Bench(settings, ensure_synthetic(root, sizes, args.seed))
            sections: dict[str, Any] = {name: {"skipped": "not requested (--sections)"} for name in SECTIONS}
            for name, section in ((n, f) for n, f in SECTIONS.items() if n in wanted):
                log(f"section {name} ...")
                start = time.perf_counter()
                try:
                    sections[name] = section(bench, sections)
                except Exception as err:  # one failing section must not lose the others' numbers
                    sections[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
                    log(f"section {name} failed: {type(err).__name__}: {err}")
                sections[name]["section_s"] = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)  # a caller in the same process (a test) gets its setting back
    meta |= {"loadavg_end": list(os.getloadavg()), "total_s": time.perf_counter() - started}
    argv = sys.argv[1:] if argv is None else argv
    doc = {"meta": meta, "settings": {**vars(settings), "sections": wanted, "argv": argv},
           "data": {"kind": "synthetic (pcamx.data.synthetic), official PCam layout", "sizes": sizes},
           "sections": sections, "targets": evaluate_targets(sections, settings.device.type)}
    disk.write_json(args.out, doc)
    print(render_markdown(doc))
    log(f"wrote {args.out}")
    return doc


def main(argv: list[str] | None = None) -> int:
    return 1 if any("error" in sec for sec in run(argv)["sections"].values()) else 0
