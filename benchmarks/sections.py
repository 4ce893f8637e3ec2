"""The benchmark's sections. Each takes the shared `Bench` (and the results so far) and returns a JSON-ready
dict; every figure carries its own conditions (device, threads, torch, batch size, resolution, steps)."""

from __future__ import annotations

import contextlib
import copy
import gc
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate

from benchmarks.data import LOAD_SPLIT, BenchData
from benchmarks.measure import Timing, measure, ratio
from benchmarks.reference import (
    JITTER,
    PREFETCH_FACTOR,
    ReferencePCamDataset,
    reference_loader,
    reference_train_step,
    reference_tta,
)
from pcamx.compress.budget import compress_to_budget
from pcamx.compress.chain import compress, plan
from pcamx.compress.quant import quantize
from pcamx.config import compose
from pcamx.data.device_loader import to_device
from pcamx.data.layout import X_KEY
from pcamx.data.pcam import PCamSplit, split_paths
from pcamx.data.transforms import NUM_DIHEDRAL, ColorJitter, preprocess
from pcamx.evaluation.evaluate import predict_batch
from pcamx.evaluation.footprint import count_params, gflops
from pcamx.model import PCamClassifier, architecture, build_classifier, build_model
from pcamx.training.loop import train_step
from pcamx.training.methods import METHODS, apply_method, plain_state_dict
from pcamx.training.optim import build_optimizer

EQUIVALENCE_ATOL = 1e-4
COMPRESSED_VARIANTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("heads", {"method": "heads", "tau": 0.89}),
    ("mlp", {"method": "mlp", "tau": 0.975}),
    ("svd", {"method": "svd", "tau": 0.975}),
    ("all", {"method": "all", "tau": {"heads": 0.89, "mlp": 0.975, "svd": 0.975}}),
)
# Compression to a budget (`compress.budget.compress_to_budget`): at most a fraction of the uncompressed
# GFLOPs, every step (heads, mlp, svd) with one τ, units ranked across layers (scope=global), scored by the
# weights alone or by activations on calibration batches; and whole-block removal to a budget.
BUDGET_RATIOS = (0.75, 0.5)
BUDGET_CRITERIA = ("weight", "activation")
BLOCKS_RATIO = 0.75
# Calibration for the data-aware scores: the first batches of a seeded shuffle of the bench's synthetic
# training patches, preprocessed without augmentation (as pcamx.pipeline.calibration_batches does), no labels.
CALIB_BATCHES, CALIB_BATCH_SIZE = 2, 4


def budget_variants(quick: bool) -> tuple[tuple[str, dict[str, Any]], ...]:
    """(name, `compress.chain.plan` arguments) of section 4's budget variants; --quick keeps the first
    ratio only (the searches are the section's slowest part)."""
    ratios = BUDGET_RATIOS[:1] if quick else BUDGET_RATIOS
    out = [(f"all_r{r:g}_{c}", {"method": "all", "criterion": c, "scope": "global", "target_ratio": r,
                                 "calib_batches": 0 if c == "weight" else CALIB_BATCHES})
           for r in ratios for c in BUDGET_CRITERIA]
    out.append((f"blocks_r{BLOCKS_RATIO:g}", {"method": "blocks", "target_ratio": BLOCKS_RATIO,
                                             "calib_batches": CALIB_BATCHES}))
    return tuple(out)


@dataclass
class Settings:
    device: torch.device
    model: str  # an architecture of pcamx.model.ARCHITECTURES
    weights: str | None  # HF id or local dir; None = random init
    resolution: int
    batch_size: int  # training batch, pipeline batch, throughput batch N
    eval_batch_size: int  # images per TTA batch
    workers: int  # reference DataLoader workers
    timing: Timing
    compile: bool
    compile_skip_reason: str | None
    ref_tta_views: tuple[int, ...]
    peak_tflops: float | None
    seed: int
    quick: bool

    @property
    def precision(self) -> str:
        # pcamx's default training precision on this device (hardware=auto: bf16 autocast on CUDA only).
        return "bf16" if self.device.type == "cuda" else "fp32"


class Bench:
    """Settings, data and the in-memory splits every section shares."""

    def __init__(self, settings: Settings, data: BenchData):
        self.s, self.data = settings, data
        self.train = PCamSplit.load(data.root, "train")
        self.test = PCamSplit.load(data.root, "test")
        for name, split, batch in (("train", self.train, settings.batch_size),
                                   ("test", self.test, settings.eval_batch_size)):
            if len(split) < batch:
                raise ValueError(f"the {name} split ({len(split)} patches) is smaller than one batch ({batch})")

    def figure(self, measurement: dict[str, Any], batch_size: int | None, **extra: Any) -> dict[str, Any]:
        return {**measurement, "device": str(self.s.device), "threads": torch.get_num_threads(),
                "torch": torch.__version__, "batch_size": batch_size, "resolution": self.s.resolution, **extra}

    def new_model(self) -> PCamClassifier:
        torch.manual_seed(self.s.seed)
        if self.s.weights:
            return build_model({"name_or_path": self.s.weights, "architecture": self.s.model, "config": {}})
        model = build_classifier(architecture(self.s.model))
        # Random init gives logits near 0 and every probability near 0.5, which would make the TTA
        # equivalence check pass whatever the views; a unit-scale head spreads them out.
        with torch.no_grad():
            model.head.weight.normal_(0.0, 1.0)
        return model

    def new_method(self, method: str) -> tuple[PCamClassifier, list[dict]]:
        """A fresh model set up for `method` with pcamx's own defaults (conf/method/<method>.yaml)."""
        model = self.new_model()
        cfg = compose(f"method={method}")
        return model, apply_method(model, cfg.method, cfg.train.lr, cfg.train.weight_decay,
                                   cfg.train.decay_all_params)

    def host_batches(self, split: PCamSplit, batch_size: int, shuffle: bool) -> Iterator[tuple]:
        """pcamx's own batches (full ones only), epoch after epoch, on the host."""
        generator = torch.Generator().manual_seed(self.s.seed)
        while True:
            yield from split.batches(batch_size, shuffle=shuffle, generator=generator, drop_last=True)

    def device_batches(self, split: PCamSplit, batch_size: int, shuffle: bool) -> Iterator[tuple]:
        """The same, delivered as pcamx's loops get them (pinned staging, copies one batch ahead on CUDA)."""
        return to_device(self.host_batches(split, batch_size, shuffle), self.s.device)

    @contextlib.contextmanager
    def reference_batches(self, split: str, train: bool, batch_size: int, pin_memory: bool | None = None):
        """An iterator over the reference DataLoader; its workers are shut down on exit."""
        pin = self.s.device.type == "cuda" if pin_memory is None else pin_memory
        dataset = ReferencePCamDataset(self.data.root, split, train, self.s.resolution)
        loader = reference_loader(dataset, batch_size, self.s.workers, shuffle=train, pin_memory=pin,
                                  seed=self.s.seed)
        iterator = iter(loader)
        try:
            yield iterator
        finally:
            del iterator, loader  # the iterator's finalizer stops the worker processes
            dataset.close()

    def reference_warmup(self, model_bound: bool = False) -> int:
        """Warm-up steps for a figure fed by the reference DataLoader: its workers fill their prefetch
        slots before the first batch is taken, and a consumer faster than the workers must drain that
        burst before timing. A model step on the CPU is slower than the workers: the buffer stays full."""
        if self.s.quick or (model_bound and self.s.device.type == "cpu"):
            return self.s.timing.warmup
        return max(self.s.timing.warmup, self.s.workers * PREFETCH_FACTOR + 1)


def release(device: torch.device) -> None:
    """Hand cached CUDA memory back between figures."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def _reference_input_step(iterator: Iterator, device: torch.device | None) -> Callable[[], int]:
    def step() -> int:
        x, y = next(iterator)
        if device is not None:
            x.to(device, non_blocking=True)
            y.to(device, non_blocking=True)
        return len(x)

    return step


# --- 1. input pipeline -------------------------------------------------------------------------------


def _preprocess_step(b: Bench, split: PCamSplit, augment: bool, jitter: ColorJitter) -> Callable[[], int]:
    batches, generator = b.device_batches(split, b.s.batch_size, shuffle=augment), torch.Generator().manual_seed(
        b.s.seed)

    def step() -> int:
        images, _ = next(batches)
        preprocess(images, b.s.resolution, augment=augment, generator=generator, jitter=jitter)
        return len(images)

    return step


def section_pipeline(b: Bench, results: dict[str, Any]) -> dict[str, Any]:
    """Images/s delivered to the device ready for the model, the host side alone, and (CUDA) the transfer."""
    s, device, batch = b.s, b.s.device, b.s.batch_size
    jitter = ColorJitter(**JITTER)
    out: dict[str, Any] = {}
    for mode, split_name, split in (("train", "train", b.train), ("eval", "test", b.test)):
        augment = mode == "train"
        pcamx = measure(_preprocess_step(b, split, augment, jitter), device, s.timing)
        with b.reference_batches(split_name, augment, batch) as iterator:
            reference = measure(_reference_input_step(iterator, device), device, s.timing, b.reference_warmup())
        out[mode] = {"augment": augment,
                     "pcamx": b.figure(pcamx, batch, what="in-memory uint8 batch → device → batched preprocess"),
                     "reference": b.figure(reference, batch, workers=s.workers,
                                           what="DataLoader(h5py per sample → PIL aug → processor) → device"),
                     "ratio": ratio(pcamx, reference)}

    # Host side, train mode (the reference's heaviest path): all CPU work before the device gets the batch.
    cpu = torch.device("cpu")
    host = b.host_batches(b.train, batch, shuffle=True)
    host_pcamx = measure(lambda: len(next(host)[0]), cpu, s.timing)
    with b.reference_batches("train", True, batch, pin_memory=False) as iterator:
        host_reference = measure(_reference_input_step(iterator, None), cpu, s.timing, b.reference_warmup())
    dataset = ReferencePCamDataset(b.data.root, "train", True, s.resolution)
    rng, threads = random.Random(s.seed), torch.get_num_threads()
    torch.set_num_threads(1)  # what a DataLoader worker runs with
    try:
        one_core = measure(lambda: len(default_collate([dataset[rng.randrange(len(dataset))] for _ in range(batch)])),
                           cpu, s.timing)
    finally:
        torch.set_num_threads(threads)
        dataset.close()
    out["host"] = {
        "pcamx": b.figure(host_pcamx, batch, processes=1, what="shuffled uint8 batch gathered from memory"),
        "reference": b.figure(host_reference, batch, workers=s.workers,
                              what="DataLoader workers: h5py read + decode + PIL aug + processor + collate"),
        "reference_1core": b.figure(one_core, batch, threads=1, processes=1, what="the same work in one process"),
        "ratio": ratio(host_pcamx, host_reference),
        "pcamx_us_per_image": 1e6 / host_pcamx["images_per_s"],
        "reference_us_per_image_1core": 1e6 / one_core["images_per_s"],
    }
    if device.type == "cuda":
        out["transfer"] = _transfer(b)
    return out


def _transfer(b: Bench) -> dict[str, Any]:
    """Shuffled uint8 batches to the device, each followed by a few matmuls standing in for the model:
    pageable `.to(device)` (the copy blocks the host) against pcamx's pinned staging with the copy issued
    one batch ahead (it overlaps the work)."""
    s, device = b.s, b.s.device
    work = torch.randn(2048, 2048, device=device)

    def compute(images: torch.Tensor) -> None:
        y = work
        for _ in range(4):
            y = y @ work
        images.float().mean()

    pageable, prefetched = b.host_batches(b.train, s.batch_size, True), b.device_batches(b.train, s.batch_size, True)

    def pageable_step() -> int:
        images = next(pageable)[0].to(device)
        compute(images)
        return len(images)

    def prefetched_step() -> int:
        images = next(prefetched)[0]
        compute(images)
        return len(images)

    slow, fast = measure(pageable_step, device, s.timing), measure(prefetched_step, device, s.timing)
    return {"pageable": b.figure(slow, s.batch_size, what="shuffled batch → .to(device) → work"),
            "prefetched": b.figure(fast, s.batch_size, what="pinned staging, copy one batch ahead → work"),
            "ratio": ratio(fast, slow)}


# --- 2. evaluation with TTA -------------------------------------------------------------------------


@contextlib.contextmanager
def strict_fp32():
    """No TF32 anywhere, so that batch-size-dependent kernel choices cannot move fp32 results by ~1e-3."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def tta_equivalence(b: Bench, model: torch.nn.Module, n: int = 8) -> dict[str, Any]:
    """pcamx's batched 8-view TTA vs the reference loop (processor per sample, a forward per view), fp32."""
    n = min(n, len(b.test))
    dataset = ReferencePCamDataset(b.data.root, "test", False, b.s.resolution)
    try:
        x = torch.stack([dataset[i][0] for i in range(n)]).to(b.s.device)
    finally:
        dataset.close()
    with strict_fp32():
        ours = predict_batch(model, b.test.images[:n].to(b.s.device), b.s.resolution, NUM_DIHEDRAL, "fp32").cpu()
        theirs = reference_tta(model, x, NUM_DIHEDRAL).cpu()
    diff = float((ours - theirs).abs().max())
    return {"images": n, "views": NUM_DIHEDRAL, "max_abs_diff": diff, "atol": EQUIVALENCE_ATOL,
            "passed": diff <= EQUIVALENCE_ATOL, "prob_min": float(ours.min()), "prob_max": float(ours.max())}


def section_eval(b: Bench, results: dict[str, Any]) -> dict[str, Any]:
    s, device, batch = b.s, b.s.device, b.s.eval_batch_size
    model = b.new_model().to(device).eval()

    def pcamx(precision: str, views: int) -> dict[str, Any]:
        batches = b.device_batches(b.test, batch, shuffle=False)

        def step() -> int:
            images, _ = next(batches)
            predict_batch(model, images, s.resolution, views, precision).cpu()
            return len(images)

        return b.figure(measure(step, device, s.timing), batch, views=views, precision=precision,
                        forward_batch=views * batch)

    out: dict[str, Any] = {"equivalence": tta_equivalence(b, model), "pcamx": pcamx(s.precision, NUM_DIHEDRAL)}
    if s.precision != "fp32":
        out["pcamx_fp32"] = pcamx("fp32", NUM_DIHEDRAL)  # separates what batching buys from what bf16 buys
    if 6 in s.ref_tta_views:
        out["pcamx_6_fp32"] = pcamx("fp32", 6)  # like for like with the reference protocol's evaluation
    out["reference"] = {}
    for views in s.ref_tta_views:
        with b.reference_batches("test", False, batch) as iterator:
            def step(iterator: Iterator = iterator, views: int = views) -> int:
                x, _ = next(iterator)
                reference_tta(model, x.to(device, non_blocking=True), views).cpu()
                return len(x)

            fig = measure(step, device, s.timing, b.reference_warmup(model_bound=True))
        out["reference"][str(views)] = b.figure(fig, batch, views=views, precision="fp32", workers=s.workers,
                                                forward_batch=batch)
    out["ratio"] = {views: ratio(out["pcamx"], fig) for views, fig in out["reference"].items()}
    if "pcamx_6_fp32" in out:
        out["ratio_like_for_like"] = ratio(out["pcamx_6_fp32"], out["reference"].get("6"))
    release(device)
    return out


# --- 3. training step ------------------------------------------------------------------------------


def _peak_memory(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _train_figure(b: Bench, method: str, pipeline: str) -> dict[str, Any]:
    """pipeline: pcamx_eager | pcamx_compiled | reference."""
    s, device = b.s, b.s.device
    release(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model, groups = b.new_method(method)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    with contextlib.ExitStack() as stack:
        if pipeline == "reference":
            iterator = stack.enter_context(b.reference_batches("train", True, s.batch_size))
            optimizer = torch.optim.AdamW(groups, lr=1e-4)

            def step() -> int:
                x, y = next(iterator)
                reference_train_step(model, optimizer, params, x.to(device, non_blocking=True),
                                     y.to(device, non_blocking=True))
                return len(x)

            warmup, precision = b.reference_warmup(model_bound=True), "fp32"
        else:
            optimizer = build_optimizer(groups, device, 1e-4)  # as pcamx.training.loop does
            forward = torch.compile(model) if pipeline == "pcamx_compiled" else model
            batches, generator, jitter = b.device_batches(b.train, s.batch_size, True), \
                torch.Generator().manual_seed(s.seed), ColorJitter(**JITTER)

            def step() -> int:
                # pcamx.training.loop's own step: batched augmentation on the device, autocast, clip, fused AdamW.
                images, labels = next(batches)
                train_step(forward, optimizer, images, labels, resolution=s.resolution, augment=True,
                           generator=generator, precision=s.precision, jitter=jitter, label_smoothing=0.05,
                           grad_clip=1.0)
                return len(images)

            # Compilation happens in the first steps (forward, then backward graphs): keep them off the clock.
            warmup, precision = max(s.timing.warmup, 3) if pipeline == "pcamx_compiled" else None, s.precision
        fig = measure(step, device, s.timing, warmup)
    if pipeline == "pcamx_compiled":
        torch._dynamo.reset()
    return b.figure(fig, s.batch_size, method=method, precision=precision, compiled=pipeline == "pcamx_compiled",
                    trainable_params=sum(p.numel() for p in params), peak_memory_bytes=_peak_memory(device))


def section_train(b: Bench, results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for method in METHODS:
        entry: dict[str, Any] = {"pcamx_eager": _train_figure(b, method, "pcamx_eager")}
        if b.s.compile:
            try:
                entry["pcamx_compiled"] = _train_figure(b, method, "pcamx_compiled")
            except Exception as err:  # a compiler backend failure is a result to record, not a crash
                torch._dynamo.reset()
                entry["pcamx_compiled"] = {"skipped": f"torch.compile failed: {type(err).__name__}: {err}"[:500]}
        else:
            entry["pcamx_compiled"] = {"skipped": b.s.compile_skip_reason}
        entry["reference"] = _train_figure(b, method, "reference")
        best = max((entry[k] for k in ("pcamx_eager", "pcamx_compiled") if "images_per_s" in entry[k]),
                   key=lambda fig: fig["images_per_s"])
        entry["best_pcamx"] = "pcamx_compiled" if best is entry["pcamx_compiled"] else "pcamx_eager"
        entry["ratio"] = ratio(best, entry["reference"])
        entry["ratio_eager"] = ratio(entry["pcamx_eager"], entry["reference"])
        out[method] = entry
    return out


# --- 4. compressed models ----------------------------------------------------------------------------


def _forward_figures(b: Bench, model: torch.nn.Module) -> dict[str, Any]:
    """Latency at batch 1 (ms per forward) and throughput at batch N, eval mode."""
    s, device = b.s, b.s.device
    dtype = next(model.parameters()).dtype
    generator = torch.Generator().manual_seed(s.seed)
    out = {}
    for key, batch in (("latency", 1), ("throughput", s.batch_size)):
        x = torch.randn(batch, 3, s.resolution, s.resolution, generator=generator).to(device, dtype)
        with torch.inference_mode():
            fig = measure(lambda x=x: (model(x), len(x))[1], device, s.timing)
        out[key] = b.figure(fig, batch)
    return {"latency_ms": 1e3 / out["latency"]["images_per_s"], "images_per_s": out["throughput"]["images_per_s"],
            **out}


def _calibration(b: Bench) -> list[tuple[torch.Tensor, None]]:
    generator = torch.Generator().manual_seed(b.s.seed)
    batches = b.train.batches(CALIB_BATCH_SIZE, shuffle=True, generator=generator, drop_last=True)
    return [(preprocess(images.to(b.s.device), b.s.resolution), None)
            for (images, _), _ in zip(batches, range(CALIB_BATCHES), strict=False)]


def section_compress(b: Bench, results: dict[str, Any]) -> dict[str, Any]:
    device, resolution = b.s.device, b.s.resolution
    base = b.new_model().eval()
    variants: dict[str, Any] = {}

    def cost(model: torch.nn.Module) -> dict[str, float]:
        return {"params": count_params(model), "gflops": gflops(model, resolution, device)}

    def run(name: str, model: torch.nn.Module, **info: Any) -> None:
        model.to(device).eval()
        fig = {"params": count_params(model), **info}
        if "gflops" not in fig and name != "int8":  # ptflops cannot hook torchao's quantized linears
            fig["gflops"] = gflops(model, resolution, device)
        variants[name] = {**fig, **_forward_figures(b, model)}
        release(device)

    run("uncompressed", copy.deepcopy(base), precision="fp32")
    for name, spec in COMPRESSED_VARIANTS:
        model, spec = copy.deepcopy(base), dict(spec)
        start = time.perf_counter()
        compress(model, spec.pop("method"), **spec)
        run(name, model, precision="fp32", taus=spec, compress_s=time.perf_counter() - start)
    calibration = _calibration(b)
    for name, spec in budget_variants(b.s.quick):
        spec = dict(spec)
        p = plan(spec.pop("method"), **spec)
        start = time.perf_counter()
        try:
            model, _, found = compress_to_budget(copy.deepcopy(base).to(device), p, cost,
                                                 calibration if p.needs_calibration else None)
        except ValueError as err:  # a budget the steps cannot reach on this model
            variants[name] = {"skipped": f"budget not reachable: {err}"}
            continue
        seconds = time.perf_counter() - start
        run(name, model, precision="fp32", gflops=found["achieved"]["gflops"], taus={"tau": found["tau"]},
            compress_s=seconds, prune=p.describe(), budget={p.budget.key: p.budget.value}, limit=found["limit"],
            achieved=found["achieved"], search_trials=found["search_trials"], search_s=seconds)
    for mode in ("bf16", "int8"):
        model = copy.deepcopy(base)
        try:
            quantize(model, mode, device)
        except (RuntimeError, ValueError, ImportError) as err:
            variants[mode] = {"skipped": f"{mode} not supported here: {err}"}
            continue
        extra = {"gflops": variants["uncompressed"]["gflops"]} if mode == "bf16" else {}  # same modules
        run(mode, model, precision=mode, quantized_from="uncompressed", **extra)
    first = variants["uncompressed"]
    for fig in variants.values():
        if "latency_ms" in fig:
            fig["speedup_latency"] = first["latency_ms"] / fig["latency_ms"]
            fig["speedup_throughput"] = fig["images_per_s"] / first["images_per_s"]
        if fig.get("gflops") is not None:
            fig["gflops_ratio"] = fig["gflops"] / first["gflops"]
    note = None if b.s.weights else (
        "random-init weights: energy-based pruning at a fixed τ removes far less from random matrices than from "
        "trained ones, so the fixed-τ speedups understate a trained model's (the budget rows reach their "
        "GFLOPs whatever the weights; which units go depends on them); pass --weights for real ones")
    return {"variants": variants, "note": note,
            "calibration": {"batches": len(calibration), "batch_size": CALIB_BATCH_SIZE, "labels": None,
                            "images": "the bench's synthetic training patches, seeded shuffle, no augmentation",
                            "used_by": "criterion=activation and the blocks step"},
            "budget_note": f"--quick: target_ratio {BUDGET_RATIOS[0]:g} only" if b.s.quick else None}


# --- 5. model FLOPs utilization ---------------------------------------------------------------------


def section_mfu(b: Bench, results: dict[str, Any]) -> dict[str, Any]:
    """Achieved FLOP/s of the figures already measured ÷ the GPU's dense bf16 peak."""
    device = b.s.device
    if device.type != "cuda":
        return {"skipped": "no CUDA"}
    forward_gflops = gflops(b.new_model().to(device), b.s.resolution, device)
    release(device)
    peak = b.s.peak_tflops
    out: dict[str, Any] = {"peak_tflops_bf16": peak, "forward_gflops": forward_gflops, "train": {}, "inference": {},
                           "convention": "footprint.gflops (module hooks only; attention core not counted, so MFU is a "
                                         "lower bound); training = 3x forward FLOPs per image"}

    def entry(ips: float, gflops_per_image: float) -> dict[str, Any]:
        achieved = ips * gflops_per_image / 1e3
        return {"images_per_s": ips, "achieved_tflops": achieved, "mfu": achieved / peak if peak else None}

    for method, figs in (results.get("train") or {}).items():
        for key in ("pcamx_eager", "pcamx_compiled", "reference"):
            if "images_per_s" in (figs.get(key) or {}):
                out["train"][f"{method}/{key}"] = entry(figs[key]["images_per_s"], 3 * forward_gflops)
    ev = results.get("eval") or {}
    for key in ("pcamx", "pcamx_fp32", "pcamx_6_fp32"):
        if ev.get(key):
            out["inference"][f"eval_tta/{key}"] = entry(ev[key]["images_per_s"], ev[key]["views"] * forward_gflops)
    for views, fig in (ev.get("reference") or {}).items():
        out["inference"][f"eval_tta/reference_{views}views"] = entry(fig["images_per_s"], int(views) * forward_gflops)
    if not peak:
        out["note"] = "peak bf16 FLOP/s unknown for this GPU: pass --peak-tflops to get MFU"
    return out


# --- data.in_memory load ----------------------------------------------------------------------------


def section_load(b: Bench, results: dict[str, Any]) -> dict[str, Any]:
    """Loading a 32,768-image split into RAM with contiguous reads, against per-sample h5py reads."""
    s, root, n = b.s, b.data.load_root, b.data.load_size
    x_path, y_path = split_paths(root, LOAD_SPLIT)
    seconds, nbytes = [], 0
    for _ in range(s.timing.repeats):
        start = time.perf_counter()
        split = PCamSplit.load(root, LOAD_SPLIT, in_memory=True)
        seconds.append(time.perf_counter() - start)
        nbytes = split.images.nbytes + split.labels.nbytes
        del split
    load_s = sorted(seconds)[len(seconds) // 2]
    # The per-sample way, timed on a random subset and scaled up: reading all of it would take minutes.
    samples, rng = min(n, 32 if s.quick else 256), random.Random(s.seed)
    with h5py.File(x_path, "r") as f:
        ds = f[X_KEY]
        ds[0]
        start = time.perf_counter()
        for _ in range(samples):
            ds[rng.randrange(n)]
        per_read = (time.perf_counter() - start) / samples
    return {"images": n, "bytes": nbytes, "file_bytes": x_path.stat().st_size + y_path.stat().st_size,
            "load_s": load_s, "load_repeats_s": seconds, "images_per_s": n / load_s,
            "per_sample_read_us": per_read * 1e6, "per_sample_estimate_s": per_read * n,
            "ratio": per_read * n / load_s, "per_sample_reads_timed": samples,
            "page_cache": "warm (files written just before); a cold read adds the disk's time for file_bytes"}


UNCERTAINTY_N = 32_768  # the PCam test split
UNCERTAINTY_SLIDES = 130  # about as many slides as PCam's test split comes from
UNCERTAINTY_BUDGET_S = 3.0


def section_uncertainty(b: Bench, results: dict[str, Any]) -> dict[str, Any]:
    """Every interval and test of a compressed row (its own intervals, the paired intervals against its
    reference, DeLong) on 32,768 predictions, 1,000 draws, on one core. The cost depends on n and the draws,
    not on the model, so the predictions are drawn, not computed."""
    from threadpoolctl import threadpool_limits

    from pcamx.evaluation.uncertainty import confidence_intervals, paired_comparison

    rng = np.random.default_rng(b.s.seed)
    n, draws = (4096, 200) if b.s.quick else (UNCERTAINTY_N, 1000)
    y = np.repeat([0, 1], n // 2)
    logit = rng.standard_normal(n) + 2.5 * y
    probs = (1 / (1 + np.exp(-logit))).astype(np.float32).astype(np.float64)
    reference = (1 / (1 + np.exp(-(logit + 0.2 * rng.standard_normal(n))))).astype(np.float32).astype(np.float64)
    slides = rng.integers(0, UNCERTAINTY_SLIDES, n)
    timings: dict[str, list[float]] = {"patch_intervals": [], "slide_intervals": [], "paired_slide": []}
    with threadpool_limits(1):
        for _ in range(b.s.timing.repeats):
            for name, call in (("patch_intervals", lambda: confidence_intervals(y, probs, None, draws, 0)),
                               ("slide_intervals", lambda: confidence_intervals(y, probs, slides, draws, 0)),
                               ("paired_slide", lambda: paired_comparison(y, probs, reference, slides, draws, 0))):
                start = time.perf_counter()
                call()
                timings[name].append(time.perf_counter() - start)
    median = {k: sorted(v)[len(v) // 2] for k, v in timings.items()}
    return {"predictions": n, "draws": draws, "threads": 1, **{f"{k}_s": v for k, v in median.items()},
            "repeats_s": timings, "budget_s": UNCERTAINTY_BUDGET_S}


# --- predict: a folder of PNG patches --------------------------------------------------------------

# Patches in the PNG folder per TTA setting (views: patches). A warm-up and every repeat is at least one pass
# over the folder, so the TTA folder is smaller: the reference runs one forward per view and patch.
PREDICT_FOLDER = {"cpu": {1: 32, NUM_DIHEDRAL: 16}, "cuda": {1: 1024, NUM_DIHEDRAL: 256}}
QUICK_PREDICT_FOLDER = {1: 8, NUM_DIHEDRAL: 8}


def write_pngs(images: torch.Tensor, folder: Path) -> Path:
    """uint8 NHWC patches as one RGB PNG file each (PIL's default compression), in file-name order."""
    folder.mkdir(parents=True)
    for i, image in enumerate(images.numpy()):
        Image.fromarray(image).save(folder / f"patch_{i:05d}.png")
    return folder


def save_bench_checkpoint(model: PCamClassifier, s: Settings, path: Path, views: int) -> Path:
    """`model` as a training checkpoint (the keys of pcamx.training.loop.checkpoint_payload), fp32, unquantized."""
    from pcamx.checkpoint import save_checkpoint

    return save_checkpoint({
        "model": plain_state_dict(model), "backbone_config": model.config.to_dict(),
        "model_name": f"dinov3_{s.model}", "method": "fullft", "method_config": {"name": "fullft"},
        "train_precision": s.precision, "step": 0, "val_metrics": {},
        "inference": {"resolution": s.resolution, "tta_views": views, "precision": "fp32", "quant": "none"},
    }, path)


SPREAD_IMAGES = 16


@torch.no_grad()
def spread_head(model: PCamClassifier, images: torch.Tensor, resolution: int) -> dict[str, float]:
    """Rescale and shift the head so that the logit margin (tumour - normal) over `images` has mean 0 and std 1:
    P(tumour) then spreads over roughly [0.1, 0.9]. Near 0 or 1 (a random model's unit-scale head saturates
    there) softmax flattens every difference, and |Δp| would say little about the two pipelines' inputs."""
    margin = model(preprocess(images, resolution)).diff(dim=-1).squeeze(-1)
    mean, std = float(margin.mean()), max(float(margin.std()), 1e-6)
    model.head.weight /= std
    model.head.bias /= std
    model.head.bias += torch.tensor([mean / 2, -mean / 2]) / std
    return {"margin_mean": mean, "margin_std": std, "images": len(images)}


def reference_folder_predict(model: torch.nn.Module, transform: Callable[[Image.Image], torch.Tensor],
                             folder: Path, device: torch.device, views: int) -> tuple[list[str], np.ndarray]:
    """The usual loop over a folder: per file PIL open + convert, the HF processor, one fp32 forward per image
    (per view with TTA, as `reference_tta`), softmax, the probability read back per file."""
    paths = sorted(folder.glob("*.png"))
    probs = []
    for path in paths:
        image = Image.open(path).convert("RGB")
        probs.append(reference_tta(model, transform(image)[None].to(device), views).item())
    return [str(p) for p in paths], np.asarray(probs)


def _predict_views(b: Bench, model: PCamClassifier, reference_model: torch.nn.Module,
                   transform: Callable[[Image.Image], torch.Tensor], workdir: Path, views: int, n: int
                   ) -> dict[str, Any]:
    """Both ways over a folder of `n` PNG patches with `views` TTA views: images/s and the largest |Δp|."""
    from pcamx.inference.inputs import batches, discover
    from pcamx.inference.settings import load_for_inference
    from pcamx.predict import DEFAULT_BATCH, predict_all
    from pcamx.predict import parser as predict_parser

    s, device = b.s, b.s.device
    workers = predict_parser().get_default("workers")  # pcamx.predict's decode threads (--workers)
    start = time.perf_counter()
    folder = write_pngs(b.test.images[:n], workdir / f"png_{views}views")
    write_s = time.perf_counter() - start
    checkpoint = save_bench_checkpoint(model, s, workdir / f"best_{views}views.pt", views)
    start = time.perf_counter()
    loaded = load_for_inference(checkpoint, device, tta_views=views)
    load_s = time.perf_counter() - start
    last: dict[str, Any] = {}

    def pcamx_pass() -> int:
        sources = discover([folder])
        total = sum(source.count for source in sources)
        preds = predict_all(loaded, batches(sources, DEFAULT_BATCH, None, workers), total)
        last["pcamx"] = (preds.sources, preds.probs)
        return total

    def reference_pass() -> int:
        last["reference"] = reference_folder_predict(reference_model, transform, folder, device, views)
        return len(last["reference"][0])

    # A warm-up step is a whole pass over the folder: one is enough.
    pcamx, reference = measure(pcamx_pass, device, s.timing, 1), measure(reference_pass, device, s.timing, 1)
    (ours_sources, ours), (their_sources, theirs) = last["pcamx"], last["reference"]
    if ours_sources != their_sources:
        raise RuntimeError("pcamx.predict and the reference loop read the folder in different orders")
    diff = float(np.abs(ours - theirs).max())
    release(device)
    return {
        "images": n, "png_bytes": sum(p.stat().st_size for p in folder.iterdir()), "write_s": write_s,
        "load_s": load_s, "settings": loaded.settings.to_dict(),
        "pcamx": b.figure(pcamx, DEFAULT_BATCH, views=views, precision="fp32", images=n, decode_threads=workers,
                          what="discover → threaded PIL decode → uint8 batches → predict_all (batched "
                               "resize/normalize/TTA on the device)"),
        "reference": b.figure(reference, 1, views=views, precision="fp32", images=n,
                              what="per file: PIL open + convert → HF processor → a forward per view → softmax "
                                   "→ .item()"),
        "ratio": ratio(pcamx, reference),
        "equivalence": {"images": n, "views": views, "max_abs_diff": diff, "atol": EQUIVALENCE_ATOL,
                        "passed": diff <= EQUIVALENCE_ATOL, "prob_min": float(ours.min()),
                        "prob_max": float(ours.max())},
    }


def section_predict(b: Bench, results: dict[str, Any]) -> dict[str, Any]:
    """`python -m pcamx.predict CHECKPOINT FOLDER` on a folder of PNG patches (threaded PIL decode, uint8
    batches, batched resize/normalize/TTA on the device) against the usual per-file PIL + processor loop, fp32
    (TF32 off), the same weights; the checkpoint is written and loaded as a user's would be."""
    s, device = b.s, b.s.device
    sizes = QUICK_PREDICT_FOLDER if s.quick else PREDICT_FOLDER["cuda" if device.type == "cuda" else "cpu"]
    model = b.new_model().eval()
    spread = spread_head(model, b.test.images[:SPREAD_IMAGES], s.resolution)
    reference_model = copy.deepcopy(model).to(device).eval()
    processor = ReferencePCamDataset(b.data.root, "test", False, s.resolution)  # .transform: the HF processor
    out: dict[str, Any] = {"views": {}, "checkpoint": "training checkpoint (pcamx.checkpoint.save_checkpoint), "
                                                     "loaded with pcamx.inference.settings.load_for_inference",
                           "timed": "whole passes over the folder (decode included); model loaded before timing",
                           "head": {**spread, "what": "head rescaled so P(tumour) spreads out (spread_head)"}}
    try:
        with tempfile.TemporaryDirectory(prefix="pcamx-bench-predict-", dir=b.data.root.parent) as tmp, \
                strict_fp32():
            for views, size in sizes.items():
                out["views"][str(views)] = _predict_views(b, model, reference_model, processor.transform, Path(tmp),
                                                          views, min(size, len(b.test)))
    finally:
        processor.close()
    return out


# --- ONNX Runtime vs PyTorch, CPU latency -------------------------------------------------------------

EXPORT_ITERS, EXPORT_WARMUP = 20, 3
QUICK_EXPORT_ITERS, QUICK_EXPORT_WARMUP = 2, 1
EXPORT_VARIANTS = ("uncompressed", "all")  # "all": COMPRESSED_VARIANTS' heads → mlp → svd chain


def section_export(b: Bench, results: dict[str, Any]) -> dict[str, Any]:
    """`pcamx.export`'s ONNX graph (uint8 patches → P(tumour), TTA folded in) under ONNX Runtime on the CPU
    against PyTorch's `predict_batch` on the CPU, batch 1, fp32, for the uncompressed and a compressed model.
    Both run on torch's thread count; whatever the bench's device, this section is a CPU figure."""
    from pcamx.export import ExportDependencyError, export_latency_figures, require_export_dependencies

    try:
        require_export_dependencies()
    except ExportDependencyError as err:  # onnx / onnxscript / onnxruntime missing: a reason, not a failure
        return {"skipped": str(err)}
    s = b.s
    iters, warmup = (QUICK_EXPORT_ITERS, QUICK_EXPORT_WARMUP) if s.quick else (EXPORT_ITERS, EXPORT_WARMUP)
    base = b.new_model().eval()
    specs = dict(COMPRESSED_VARIANTS)
    out: dict[str, Any] = {"variants": {}, "views": [1, NUM_DIHEDRAL], "device": "cpu", "precision": "fp32",
                           "torch": torch.__version__}
    for name in EXPORT_VARIANTS:
        model, info = copy.deepcopy(base), {}
        if name != "uncompressed":
            spec = dict(specs[name])
            compress(model, spec.pop("method"), **spec)
            info["taus"] = spec
        entry: dict[str, Any] = {"params": count_params(model), **info}
        for views in out["views"]:
            entry[str(views)] = export_latency_figures(model, s.resolution, views, batch=1, iters=iters,
                                                       warmup=warmup)
        out["variants"][name] = entry
    return out


SECTIONS: dict[str, Callable[[Bench, dict[str, Any]], dict[str, Any]]] = {
    "pipeline": section_pipeline,
    "eval": section_eval,
    "train": section_train,
    "compress": section_compress,
    "mfu": section_mfu,
    "load": section_load,
    "uncertainty": section_uncertainty,
    "predict": section_predict,
    "export": section_export,
}
