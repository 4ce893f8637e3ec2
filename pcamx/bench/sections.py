"""The benchmark's sections. Each takes the shared `Bench` (and the results so far) and returns a
JSON-ready dict; every figure in it carries its own conditions (device, threads, torch, batch size,
resolution, timed iterations after warm-up)."""

from __future__ import annotations

import contextlib
import copy
import gc
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import h5py
import torch
from torch.utils.data import default_collate
from transformers import DINOv3ViTModel

from pcamx.bench.data import LOAD_SPLIT, BenchData
from pcamx.bench.reference import (
    JITTER,
    PREFETCH_FACTOR,
    ReferencePCamDataset,
    reference_loader,
    reference_train_step,
    reference_tta,
)
from pcamx.bench.timing import PeakMemory, Timing, measure, median_of, rss_bytes
from pcamx.compress import compress
from pcamx.data.device_loader import to_device
from pcamx.data.layout import X_KEY
from pcamx.data.pcam import SLAB_ROWS, PCamSplit, split_paths
from pcamx.data.transforms import NUM_DIHEDRAL, ColorJitter, preprocess
from pcamx.evaluate import predict_batch
from pcamx.footprint import count_params, gflops, latency_ms, throughput_ips
from pcamx.hardware import sync
from pcamx.methods import METHODS, apply_method
from pcamx.model import PCamClassifier, build_model, tiny_config, vits16_config
from pcamx.quant import quantize
from pcamx.train import build_optimizer, train_step

EQUIVALENCE_ATOL = 1e-4
COMPRESSED_VARIANTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("heads", {"method": "heads", "tau_heads": 0.89}),
    ("mlp", {"method": "mlp", "tau_mlp": 0.975}),
    ("svd", {"method": "svd", "tau_svd": 0.975}),
    ("all", {"method": "all", "tau_heads": 0.89, "tau_mlp": 0.975, "tau_svd": 0.975}),
)


@dataclass
class Settings:
    device: torch.device
    model: str  # vits16 | tiny
    weights: str | None  # HF id or local dir; None = random init
    resolution: int
    batch_size: int  # training batch, pipeline batch, throughput batch N
    eval_batch_size: int  # images per TTA batch (x8 views)
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
        # pcamx's default: bf16 autocast on CUDA (hardware/cuda.yaml); fp32 elsewhere (autocast is CUDA-only).
        return "bf16" if self.device.type == "cuda" else "fp32"


class Bench:
    """Settings, data and the in-memory splits every section shares."""

    def __init__(self, settings: Settings, data: BenchData):
        self.s = settings
        self.data = data
        self.train = PCamSplit.load(data.root, "train")
        self.test = PCamSplit.load(data.root, "test")
        for name, split, batch in (("train", self.train, settings.batch_size),
                                   ("test", self.test, settings.eval_batch_size)):
            if len(split) < batch:
                raise ValueError(f"the {name} split ({len(split)} patches) is smaller than one batch ({batch})")

    def conditions(self, batch_size: int | None, **extra: Any) -> dict[str, Any]:
        return {
            "device": str(self.s.device),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "batch_size": batch_size,
            "resolution": self.s.resolution,
            **extra,
        }

    def figure(self, measurement: dict[str, Any], batch_size: int | None, **extra: Any) -> dict[str, Any]:
        return {**measurement, **self.conditions(batch_size, **extra)}

    def new_model(self) -> PCamClassifier:
        torch.manual_seed(self.s.seed)
        if self.s.weights:
            return build_model({"name_or_path": self.s.weights})
        config = vits16_config() if self.s.model == "vits16" else tiny_config()
        backbone = DINOv3ViTModel(config)
        backbone.config._attn_implementation = "sdpa"
        model = PCamClassifier(backbone, config.hidden_size)
        # Random init gives logits near 0 and every probability near 0.5, which would make the TTA
        # equivalence check pass whatever the views; a unit-scale head spreads them out.
        with torch.no_grad():
            model.head.weight.normal_(0.0, 1.0)
        return model

    def endless_batches(self, split: PCamSplit, batch_size: int, shuffle: bool) -> Iterator[tuple]:
        """pcamx's own batches (full ones only), epoch after epoch, on the host."""
        generator = torch.Generator().manual_seed(self.s.seed)
        while True:
            yield from split.batches(batch_size, shuffle=shuffle, generator=generator, drop_last=True)

    def device_batches(self, split: PCamSplit, batch_size: int, shuffle: bool) -> Iterator[tuple]:
        """The same, delivered as pcamx's loops get them: pinned staging and copies one batch ahead on CUDA."""
        return to_device(self.endless_batches(split, batch_size, shuffle), self.s.device)

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
        """Warm-up steps for a figure fed by the reference DataLoader.

        The workers start together and each fills its prefetch slots before the first batch is taken; when
        the consumer is faster than the workers, that burst must be drained, or the first timed steps come
        out of a full buffer. A model step on the CPU is far slower than the workers, so the buffer stays
        full whatever we do and the ordinary warm-up suffices there.
        """
        if self.s.quick or (model_bound and self.s.device.type == "cpu"):
            return self.s.timing.warmup
        return max(self.s.timing.warmup, self.s.workers * PREFETCH_FACTOR + 1)


def release(device: torch.device) -> None:
    """Hand cached CUDA memory back between figures (on the CPU, reference counting already freed it;
    a full gc pass costs ~0.2 s with transformers imported)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
    try:
        return a["images_per_s"] / b["images_per_s"]
    except (KeyError, TypeError, ZeroDivisionError):
        return None


# --- 1. input pipeline -------------------------------------------------------------------------------


def _pcamx_input_step(b: Bench, split: PCamSplit, augment: bool) -> Callable[[], int]:
    batches = b.device_batches(split, b.s.batch_size, shuffle=augment)
    generator = torch.Generator().manual_seed(b.s.seed)
    resolution, jitter = b.s.resolution, ColorJitter(**JITTER)

    def step() -> int:
        images, _ = next(batches)
        preprocess(images, resolution, augment=augment, generator=generator, jitter=jitter)
        return len(images)

    return step


def _reference_input_step(iterator: Iterator, device: torch.device | None) -> Callable[[], int]:
    def step() -> int:
        x, y = next(iterator)
        if device is not None:
            x.to(device, non_blocking=True)
            y.to(device, non_blocking=True)
        return len(x)

    return step


def _reference_one_core_step(dataset: ReferencePCamDataset, batch_size: int, seed: int) -> Callable[[], int]:
    rng = random.Random(seed)

    def step() -> int:
        default_collate([dataset[rng.randrange(len(dataset))] for _ in range(batch_size)])
        return batch_size

    return step


def _transfer(b: Bench) -> dict[str, Any]:
    """Host → device copies of shuffled uint8 batches, each followed by a stand-in for the model's work:
    pageable `.to(device)` (the copy blocks the host) against pcamx's pinned staging with the copy issued
    one batch ahead (it overlaps the work). The stand-in is a few matmuls, so the overlap shows."""
    s, device = b.s, b.s.device
    work = torch.randn(2048, 2048, device=device)

    def compute(images: torch.Tensor) -> None:
        y = work
        for _ in range(4):
            y = y @ work
        images.float().mean()

    def pageable_step(batches: Iterator) -> Callable[[], int]:
        def step() -> int:
            images, labels = next(batches)
            images, labels = images.to(device), labels.to(device)
            compute(images)
            return len(images)
        return step

    def prefetched_step(batches: Iterator) -> Callable[[], int]:
        def step() -> int:
            images, _ = next(batches)
            compute(images)
            return len(images)
        return step

    pageable = measure(pageable_step(b.endless_batches(b.train, s.batch_size, True)), device, s.timing)
    prefetched = measure(prefetched_step(b.device_batches(b.train, s.batch_size, True)), device, s.timing)
    return {
        "pageable": b.figure(pageable, s.batch_size, what="shuffled batch → .to(device) → work"),
        "prefetched": b.figure(prefetched, s.batch_size, what="shuffled batch → pinned staging, copy one batch "
                               "ahead on a side stream → work"),
        "ratio": ratio(prefetched, pageable),
    }


def section_pipeline(b: Bench, results: dict[str, Any]) -> dict[str, Any]:
    """Images/s delivered to the device ready for the model, and the host side alone."""
    s, device, batch = b.s, b.s.device, b.s.batch_size
    out: dict[str, Any] = {}
    for mode, split_name, split in (("train", "train", b.train), ("eval", "test", b.test)):
        augment = mode == "train"
        pcamx = measure(_pcamx_input_step(b, split, augment), device, s.timing)
        with b.reference_batches(split_name, augment, batch) as iterator:
            reference = measure(_reference_input_step(iterator, device), device, s.timing, b.reference_warmup())
        out[mode] = {
            "augment": augment,
            "pcamx": b.figure(pcamx, batch, what="in-memory uint8 batch → device → batched preprocess"),
            "reference": b.figure(reference, batch, workers=s.workers,
                                  what="DataLoader(h5py per sample → PIL aug → processor) → device"),
            "ratio": ratio(pcamx, reference),
        }

    # Host side, train mode (the reference's heaviest path): all CPU work before the device gets the batch.
    cpu = torch.device("cpu")
    batches = b.endless_batches(b.train, batch, shuffle=True)
    host_pcamx = measure(lambda: len(next(batches)[0]), cpu, s.timing)
    with b.reference_batches("train", True, batch, pin_memory=False) as iterator:
        host_reference = measure(_reference_input_step(iterator, None), cpu, s.timing, b.reference_warmup())
    if device.type == "cuda":
        out["transfer"] = _transfer(b)
    dataset = ReferencePCamDataset(b.data.root, "train", True, s.resolution)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what a DataLoader worker runs with
    try:
        one_core = measure(_reference_one_core_step(dataset, batch, s.seed), cpu, s.timing)
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
    return out


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
    return {
        "images": n, "views": NUM_DIHEDRAL, "max_abs_diff": diff, "atol": EQUIVALENCE_ATOL,
        "passed": diff <= EQUIVALENCE_ATOL, "prob_min": float(ours.min()), "prob_max": float(ours.max()),
    }


def _pcamx_tta_step(b: Bench, model: torch.nn.Module, precision: str, views: int = NUM_DIHEDRAL
                    ) -> Callable[[], int]:
    batches = b.device_batches(b.test, b.s.eval_batch_size, shuffle=False)

    def step() -> int:
        images, _ = next(batches)
        predict_batch(model, images, b.s.resolution, views, precision).cpu()
        return len(images)

    return step


def _reference_tta_step(model: torch.nn.Module, iterator: Iterator, device: torch.device,
                        views: int) -> Callable[[], int]:
    def step() -> int:
        x, _ = next(iterator)
        reference_tta(model, x.to(device, non_blocking=True), views).cpu()
        return len(x)

    return step


def section_eval(b: Bench, results: dict[str, Any]) -> dict[str, Any]:
    s, device, batch = b.s, b.s.device, b.s.eval_batch_size
    model = b.new_model().to(device).eval()
    out: dict[str, Any] = {"equivalence": tta_equivalence(b, model)}
    out["pcamx"] = b.figure(measure(_pcamx_tta_step(b, model, s.precision), device, s.timing), batch,
                            views=NUM_DIHEDRAL, precision=s.precision, forward_batch=NUM_DIHEDRAL * batch,
                            what="in-memory uint8 → device → 8 views in one batched forward")
    if s.precision != "fp32":
        # Separates what batching buys from what bf16 buys.
        out["pcamx_fp32"] = b.figure(measure(_pcamx_tta_step(b, model, "fp32"), device, s.timing), batch,
                                     views=NUM_DIHEDRAL, precision="fp32", forward_batch=NUM_DIHEDRAL * batch)
    if 6 in s.ref_tta_views:
        # Like for like with the reference protocol's evaluation: its 6 views, fp32.
        out["pcamx_6_fp32"] = b.figure(measure(_pcamx_tta_step(b, model, "fp32", 6), device, s.timing), batch,
                                       views=6, precision="fp32", forward_batch=6 * batch)
    out["reference"] = {}
    for views in s.ref_tta_views:
        with b.reference_batches("test", False, batch) as iterator:
            fig = measure(_reference_tta_step(model, iterator, device, views), device, s.timing,
                          b.reference_warmup(model_bound=True))
        out["reference"][str(views)] = b.figure(
            fig, batch, views=views, precision="fp32", workers=s.workers, forward_batch=batch,
            what="DataLoader(processor per sample) → device → one fp32 forward per view")
    out["ratio"] = {views: ratio(out["pcamx"], fig) for views, fig in out["reference"].items()}
    if "pcamx_6_fp32" in out:
        out["ratio_like_for_like"] = ratio(out["pcamx_6_fp32"], out["reference"].get("6"))
    del model
    release(device)
    return out


# --- 3. training step ------------------------------------------------------------------------------


def _pcamx_train(b: Bench, method: str, compiled: bool) -> dict[str, Any]:
    s, device = b.s, b.s.device
    release(device)
    with PeakMemory(device) as memory:
        model = b.new_model()
        groups = apply_method(model, {"name": method}, 1e-4, 1e-4)
        model.to(device).train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer(groups, device, 1e-4)  # as pcamx.train does
        forward = torch.compile(model) if compiled else model
        batches = b.device_batches(b.train, s.batch_size, shuffle=True)
        generator = torch.Generator().manual_seed(s.seed)

        def step() -> int:
            # pcamx.train's own step: uint8 to the device, batched augmentation there, autocast, clip.
            images, labels = next(batches)
            train_step(forward, optimizer, images, labels, resolution=s.resolution, augment=True,
                       generator=generator, precision=s.precision, jitter=ColorJitter(**JITTER),
                       label_smoothing=0.05, grad_clip=1.0)
            return len(images)

        # Compilation happens in the first steps (forward, then backward graphs): keep them out of the clock.
        fig = measure(step, device, s.timing, max(s.timing.warmup, 3) if compiled else None)
    trainable = sum(p.numel() for p in params)
    if compiled:
        torch._dynamo.reset()
    return b.figure(fig, s.batch_size, method=method, precision=s.precision, compiled=compiled,
                    trainable_params=trainable, peak_memory_bytes=memory.result["peak_bytes"],
                    peak_memory_kind=memory.result["kind"])


def _reference_train(b: Bench, method: str) -> dict[str, Any]:
    s, device = b.s, b.s.device
    release(device)
    with PeakMemory(device) as memory, b.reference_batches("train", True, s.batch_size) as iterator:
        model = b.new_model()
        groups = apply_method(model, {"name": method}, 1e-4, 1e-4)
        model.to(device).train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(groups, lr=1e-4)

        def step() -> int:
            x, y = next(iterator)
            reference_train_step(model, optimizer, params, x.to(device, non_blocking=True),
                                 y.to(device, non_blocking=True))
            return len(x)

        fig = measure(step, device, s.timing, b.reference_warmup(model_bound=True))
    return b.figure(fig, s.batch_size, method=method, precision="fp32", compiled=False, workers=s.workers,
                    peak_memory_bytes=memory.result["peak_bytes"], peak_memory_kind=memory.result["kind"])


def section_train(b: Bench, results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for method in METHODS:
        entry: dict[str, Any] = {"pcamx_eager": _pcamx_train(b, method, compiled=False)}
        if b.s.compile:
            try:
                entry["pcamx_compiled"] = _pcamx_train(b, method, compiled=True)
            except Exception as err:  # a compiler backend failure is a result to record, not a crash
                torch._dynamo.reset()
                entry["pcamx_compiled"] = {"skipped": f"torch.compile failed: {type(err).__name__}: {err}"[:500]}
        else:
            entry["pcamx_compiled"] = {"skipped": b.s.compile_skip_reason}
        entry["reference"] = _reference_train(b, method)
        best = max((entry[k] for k in ("pcamx_eager", "pcamx_compiled") if "images_per_s" in entry[k]),
                   key=lambda fig: fig["images_per_s"])
        entry["best_pcamx"] = "pcamx_compiled" if best is entry["pcamx_compiled"] else "pcamx_eager"
        entry["ratio"] = ratio(best, entry["reference"])
        entry["ratio_eager"] = ratio(entry["pcamx_eager"], entry["reference"])
        out[method] = entry
    return out


# --- 4. compressed models ----------------------------------------------------------------------------


def _latency_throughput(b: Bench, model: torch.nn.Module) -> dict[str, Any]:
    s = b.s
    generator = torch.Generator().manual_seed(s.seed)
    one = torch.randn(1, 3, s.resolution, s.resolution, generator=generator)
    many = torch.randn(s.batch_size, 3, s.resolution, s.resolution, generator=generator)
    # One short call per figure warms up and sizes the iteration count to the time budget (the same
    # `duration` per figure as everywhere else).
    slice_s = s.timing.duration / s.timing.repeats
    warm = max(1, s.timing.warmup)

    def iters_for(seconds_per_iter: float, minimum: int) -> int:
        return s.timing.iters or min(1000, max(minimum, round(slice_s / max(seconds_per_iter, 1e-6))))

    lat_iters = iters_for(latency_ms(model, one, warmup=warm, iters=1) / 1e3, 3)
    lat, lat_repeats = median_of(lambda: latency_ms(model, one, warmup=0, iters=lat_iters), s.timing.repeats)
    thr_iters = iters_for(s.batch_size / throughput_ips(model, many, warmup=warm, iters=1), 1)
    thr, thr_repeats = median_of(lambda: throughput_ips(model, many, warmup=0, iters=thr_iters), s.timing.repeats)
    return {
        "latency_ms": lat, "latency_repeats_ms": lat_repeats,
        "latency": b.conditions(1, timed_iters=[lat_iters] * s.timing.repeats, repeats=s.timing.repeats,
                                warmup_iters=warm),
        "images_per_s": thr, "repeat_images_per_s": thr_repeats,
        "throughput": b.conditions(s.batch_size, timed_iters=[thr_iters] * s.timing.repeats,
                                   repeats=s.timing.repeats, warmup_iters=warm),
    }


def section_compress(b: Bench, results: dict[str, Any]) -> dict[str, Any]:
    device = b.s.device
    base = b.new_model().eval()
    variants: dict[str, Any] = {}

    def run(name: str, model: torch.nn.Module, **info: Any) -> None:
        model.to(device)
        fig = {"params": count_params(model), **info}
        if name == "bf16":  # same modules as the uncompressed model: same count, no need to run ptflops
            fig["gflops"] = variants["uncompressed"]["gflops"]
        elif name != "int8":  # ptflops cannot hook torchao's quantized linears
            fig["gflops"] = gflops(model, b.s.resolution, device)
        fig.update(_latency_throughput(b, model))
        variants[name] = fig
        del model
        release(device)

    run("uncompressed", copy.deepcopy(base), precision="fp32")
    for name, spec in COMPRESSED_VARIANTS:
        model = copy.deepcopy(base)
        spec = dict(spec)
        start = time.perf_counter()
        compress(model, spec.pop("method"), None, **spec)
        run(name, model, precision="fp32", taus=spec, compress_s=time.perf_counter() - start)
    for mode in ("bf16", "int8"):
        model = copy.deepcopy(base)
        try:
            quantize(model, mode, device)
        except (RuntimeError, ValueError, ImportError) as err:
            variants[mode] = {"skipped": f"{mode} not supported here: {err}"}
            continue
        run(mode, model, precision=mode, quantized_from="uncompressed")
    base_fig = variants["uncompressed"]
    for fig in variants.values():
        if "latency_ms" in fig:
            fig["speedup_latency"] = base_fig["latency_ms"] / fig["latency_ms"]
            fig["speedup_throughput"] = fig["images_per_s"] / base_fig["images_per_s"]
            fig["params_fraction"] = fig["params"] / base_fig["params"]
    note = None if b.s.weights else (
        "random-init weights: energy-based pruning removes far less from random matrices than from trained "
        "ones, so these speedups understate a trained model's; pass --weights for real ones")
    return {"variants": variants, "note": note}


# --- 5. model FLOPs utilization ---------------------------------------------------------------------


def section_mfu(b: Bench, results: dict[str, Any]) -> dict[str, Any]:
    device = b.s.device
    if device.type != "cuda":
        return {"skipped": "no CUDA"}
    model = b.new_model().to(device)
    forward_gflops = gflops(model, b.s.resolution, device)
    del model
    release(device)
    peak = b.s.peak_tflops
    out: dict[str, Any] = {
        "peak_tflops_bf16": peak, "forward_gflops": forward_gflops,
        "convention": "footprint.gflops (module hooks only; attention core not counted, so MFU is a lower "
                      "bound); training = 3x forward FLOPs per image",
        "train": {}, "inference": {},
    }

    def entry(ips: float | None, flops_per_image: float) -> dict[str, Any]:
        achieved = None if ips is None else ips * flops_per_image * 1e9 / 1e12
        return {"images_per_s": ips, "achieved_tflops": achieved,
                "mfu": None if achieved is None or not peak else achieved / peak}

    for method, figs in (results.get("train") or {}).items():
        if isinstance(figs, dict):
            for key in ("pcamx_eager", "pcamx_compiled", "reference"):
                ips = (figs.get(key) or {}).get("images_per_s")
                if ips is not None:
                    out["train"][f"{method}/{key}"] = entry(ips, 3 * forward_gflops)
    ev = results.get("eval") or {}
    for key in ("pcamx", "pcamx_fp32", "pcamx_6_fp32"):
        if ev.get(key):
            out["inference"][f"eval_tta/{key}"] = entry(ev[key]["images_per_s"], ev[key]["views"] * forward_gflops)
    for views, fig in (ev.get("reference") or {}).items():
        out["inference"][f"eval_tta/reference_{views}views"] = entry(fig["images_per_s"], int(views) * forward_gflops)
    for name in ("uncompressed", "bf16"):
        fig = ((results.get("compress") or {}).get("variants") or {}).get(name) or {}
        if "images_per_s" in fig:
            out["inference"][f"forward/{name}"] = entry(fig["images_per_s"], forward_gflops)
    if not peak:
        out["note"] = "peak bf16 FLOP/s unknown for this GPU: pass --peak-tflops to get MFU"
    return out


# --- data.in_memory load ----------------------------------------------------------------------------


def section_load(b: Bench, results: dict[str, Any]) -> dict[str, Any]:
    s, root = b.s, b.data.load_root
    x_path, y_path = split_paths(root, LOAD_SPLIT)

    def load_once() -> tuple[float, int, int | None]:
        before = rss_bytes()
        start = time.perf_counter()
        split = PCamSplit.load(root, LOAD_SPLIT, in_memory=True)
        seconds = time.perf_counter() - start
        after = rss_bytes()
        nbytes = split.images.nbytes + split.labels.nbytes
        del split
        return seconds, nbytes, None if before is None or after is None else after - before

    runs = [load_once() for _ in range(s.timing.repeats)]
    seconds = sorted(r[0] for r in runs)[len(runs) // 2]
    n = b.data.load_size

    # The per-sample way, timed on a random subset and scaled up: reading all of it would take minutes.
    samples = min(n, 32 if s.quick else 256)
    rng = random.Random(s.seed)
    with h5py.File(x_path, "r") as f:
        ds = f[X_KEY]
        ds[0]
        start = time.perf_counter()
        for _ in range(samples):
            ds[rng.randrange(n)]
        per_read = (time.perf_counter() - start) / samples
    return {
        "images": n,
        "bytes": runs[0][1],
        "bytes_per_image": runs[0][1] / n,
        "file_bytes": x_path.stat().st_size + y_path.stat().st_size,
        "load_s": seconds,
        "load_repeats_s": [r[0] for r in runs],
        "images_per_s": n / seconds,
        "rss_delta_bytes": runs[0][2],
        "per_sample_read_us": per_read * 1e6,
        "per_sample_estimate_s": per_read * n,
        "ratio": per_read * n / seconds,
        "page_cache": "warm (files written just before); a cold read adds the disk's time for file_bytes",
        **b.conditions(None, read_rows=SLAB_ROWS, resolution=96, repeats=s.timing.repeats,
                       per_sample_reads_timed=samples, device="cpu"),
    }


SECTIONS: dict[str, Callable[[Bench, dict[str, Any]], dict[str, Any]]] = {
    "pipeline": section_pipeline,
    "eval": section_eval,
    "train": section_train,
    "compress": section_compress,
    "mfu": section_mfu,
    "load": section_load,
}


def run_section(name: str, b: Bench, results: dict[str, Any]) -> dict[str, Any]:
    sync(b.s.device)
    return SECTIONS[name](b, results)
