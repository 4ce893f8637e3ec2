"""The benchmark's sections. Each takes the shared `Bench` (and the results so far) and returns a JSON-ready dict;
every figure carries its conditions (device, threads, torch, batch size, resolution, precision)."""

from __future__ import annotations

import contextlib
import copy
import gc
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from omegaconf import OmegaConf

from benchmarks.reference import PREFETCH_FACTOR, ReferencePCamDataset, reference_loader, reference_step, reference_tta
from benchmarks.wsi import section_wsi
from pcamx.compress.budget import compress_to_budget
from pcamx.compress.chain import plan_from_config, run_plan
from pcamx.compress.quant import quantize
from pcamx.config import compose
from pcamx.data.device_loader import to_device
from pcamx.data.pcam import PCamSplit
from pcamx.data.transforms import ColorJitter, preprocess
from pcamx.evaluation.evaluate import predict_batch
from pcamx.evaluation.footprint import cost, count_params, gflops, latency_ms, throughput_ips
from pcamx.model import PCamClassifier, architecture, build_classifier
from pcamx.runtime.timing import measure
from pcamx.training.loop import train_step
from pcamx.training.methods import METHODS, apply_method
from pcamx.training.optim import build_optimizer

EQUIVALENCE_ATOL, SPREAD_IMAGES = 1e-4, 16
# Section 4's budgets (prune keys over the reference plan): at most a fraction of the GFLOPs, one τ for every step,
# units ranked across blocks by weights or activations; whole blocks. --quick: the 0.75 ones (searches are slow).
BUDGETS = {f"all_r{r:g}_{c}": {"method": "all", "criterion": c, "scope": "global", "target_ratio": r}
           for r in (0.75, 0.5) for c in ("weight", "activation")} | {
    "blocks_r0.75": {"method": "blocks", "target_ratio": 0.75}}
# Smaller than a run's calibration: a budget search scores the model in every trial (4 × 16: minutes on a CPU).
CALIB_BATCHES, CALIB_BATCH_SIZE = 2, 4


def compare(pcamx: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """A side-by-side figure: pcamx's, the reference's, and pcamx ÷ reference images/s (None if one was skipped)."""
    both = "images_per_s" in pcamx and "images_per_s" in reference
    return {"pcamx": pcamx, "reference": reference,
            "ratio": pcamx["images_per_s"] / reference["images_per_s"] if both else None}


class Bench:
    """Settings, the reference protocol's config, and the in-memory splits every section shares."""

    def __init__(self, settings: SimpleNamespace, root: Path):
        self.s, self.root = settings, root
        # The reference protocol (jitter, label smoothing, clipping, τ per step), as `python run.py` composes it.
        self.protocol = compose("experiment=repro_compress")
        self.jitter = OmegaConf.to_container(self.protocol.data.jitter)
        self.splits = {name: PCamSplit.load(root, name) for name in ("train", "test")}
        for name, batch in (("train", settings.batch_size), ("test", settings.eval_batch_size)):
            if len(self.splits[name]) < batch:  # drop_last batches of an endless loop would spin forever
                raise ValueError(f"{name} split: {len(self.splits[name])} images, fewer than a batch ({batch})")

    def figure(self, fig: dict[str, Any], batch_size: int, precision: str, device: torch.device | None = None,
               **extra: Any) -> dict[str, Any]:
        return {**fig, "device": str(device or self.s.device), "threads": torch.get_num_threads(),
                "torch": torch.__version__, "batch_size": batch_size, "resolution": self.s.resolution,
                "precision": precision, **extra}

    def time(self, step: Callable[[], int], batch_size: int, precision: str, warmup: int | None = None,
             device: torch.device | None = None, **extra: Any) -> dict[str, Any]:
        """`step` (returns the images it handled) timed by pcamx.runtime.timing.measure, with its conditions."""
        s = self.s
        gc.collect()  # the previous figures' models, and on CUDA their cached memory, go before this one is timed
        if s.device.type == "cuda":
            torch.cuda.empty_cache()
        timed = measure(step, device=device or s.device, warmup=max(1, s.warmup if warmup is None else warmup),
                        samples=s.repeats, calls=s.calls, seconds=s.seconds)
        return self.figure(timed.describe(), batch_size, precision, device, **extra)

    def new_model(self) -> PCamClassifier:
        """Random init: speed does not depend on the weights (what a fixed τ removes does: see section 4's note)."""
        torch.manual_seed(self.s.seed)
        return build_classifier(architecture(self.s.model))

    def batches(self, split: str, batch_size: int, shuffle: bool, device: torch.device | None = None) -> Iterator:
        """pcamx's own batches (full ones), epoch after epoch, delivered as its loops get them (pinned staging, a
        copy one batch ahead on CUDA); on the host when `device` is the CPU."""
        def endless() -> Iterator:
            generator = torch.Generator().manual_seed(self.s.seed)
            while True:
                yield from self.splits[split].batches(batch_size, shuffle=shuffle, generator=generator, drop_last=True)

        return to_device(endless(), device or self.s.device)

    @contextlib.contextmanager
    def reference_batches(self, split: str, train: bool, batch_size: int, model_bound: bool = False,
                          device: torch.device | None = None) -> Iterator[tuple[Callable[[], tuple], int]]:
        """(the reference DataLoader's next batch on `device` (default: the bench's), the warm-up its figures need);
        the workers are shut down on exit. They fill their prefetch slots before the first batch is taken: a
        consumer faster than them must drain that burst off the clock (a model step on a CPU is slower)."""
        device = device or self.s.device
        dataset = ReferencePCamDataset(self.root, split, self.s.resolution, self.jitter if train else None)
        # The only reference to the loader's iterator: dropping it on exit runs the finalizer that stops the workers.
        live = [iter(reference_loader(dataset, batch_size, self.s.workers, train, device.type == "cuda", self.s.seed))]
        drain = not (self.s.quick or (model_bound and self.s.device.type == "cpu"))
        try:
            yield (lambda: [t.to(device, non_blocking=True) for t in next(live[0])]), \
                max(self.s.warmup, self.s.workers * PREFETCH_FACTOR + 1 if drain else 0)
        finally:
            live.clear()
            dataset.close()


def section_pipeline(b: Bench, results: dict[str, Any]) -> dict[str, Any]:
    """1. Images/s delivered to the device ready for the model, and the host side alone (train mode, the
    reference's heaviest path: all CPU work before the device gets the batch)."""
    s, batch, jitter, out, cpu = b.s, b.s.batch_size, ColorJitter.from_config(b.jitter), {}, torch.device("cpu")
    for mode, split in (("train", "train"), ("eval", "test")):
        augment, generator = mode == "train", torch.Generator().manual_seed(s.seed)
        batches = b.batches(split, batch, augment)

        def step(batches: Iterator = batches, generator: torch.Generator = generator, augment: bool = augment) -> int:
            images, _ = next(batches)
            preprocess(images, s.resolution, augment=augment, generator=generator, jitter=jitter)
            return len(images)

        pcamx = b.time(step, batch, "fp32", what="in-memory uint8 batch → device → batched preprocess")
        with b.reference_batches(split, augment, batch) as (fetch, warmup):
            out[mode] = compare(pcamx, b.time(lambda fetch=fetch: len(fetch()[0]), batch, "fp32", warmup,
                                              workers=s.workers, what="DataLoader(h5py, PIL aug, processor) → device"))
    host = b.batches("train", batch, True, cpu)
    pcamx = b.time(lambda: len(next(host)[0]), batch, "uint8", device=cpu, what="shuffled uint8 batch from memory")
    with b.reference_batches("train", True, batch, device=cpu) as (fetch, warmup):
        out["host"] = compare(pcamx, b.time(lambda: len(fetch()[0]), batch, "fp32", warmup, cpu, workers=s.workers,
                                            what="DataLoader workers: h5py + PIL aug + processor + collate"))
    return out


@torch.no_grad()
def tta_equivalence(b: Bench, model: PCamClassifier, views: int, n: int = 8) -> dict[str, Any]:
    """pcamx's batched TTA vs the reference loop, fp32, on `n` test patches. The head is first rescaled so that the
    logit margin has mean 0 and std 1: a random model's P(tumour) near 0 or 1 would hide every difference."""
    images = b.splits["test"].images
    margin = model(preprocess(images[:SPREAD_IMAGES], b.s.resolution)).diff(dim=-1).squeeze(-1)
    mean, std = float(margin.mean()), max(float(margin.std()), 1e-6)
    model.head.weight /= std
    model.head.bias.copy_((model.head.bias + torch.tensor([mean / 2, -mean / 2])) / std)
    model.to(b.s.device)
    dataset = ReferencePCamDataset(b.root, "test", b.s.resolution)
    x = torch.stack([dataset[i][0] for i in range(n)]).to(b.s.device)
    dataset.close()
    # No TF32 (torch's default for matmuls; cuDNN's convolutions too here): batch-size-dependent kernel choices
    # would move fp32 results by ~1e-3.
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        ours = predict_batch(model, images[:n].to(b.s.device), b.s.resolution, views, "fp32").cpu()
        diff = float((ours - reference_tta(model, x, views).cpu()).abs().max())
    return {"images": n, "views": views, "max_abs_diff": diff, "atol": EQUIVALENCE_ATOL,
            "passed": diff <= EQUIVALENCE_ATOL, "prob_min": float(ours.min()), "prob_max": float(ours.max()),
            "head_margin_mean_std": [mean, std]}


def section_eval(b: Bench, results: dict[str, Any]) -> dict[str, Any]:
    """2. pcamx.evaluation.evaluate.predict_batch (views stacked, one forward) against a per-view loop: pcamx in
    fp32 at each view count of the loop (like for like), and as configured (its precision) if that differs."""
    s, batch, model, protocol_views = b.s, b.s.eval_batch_size, b.new_model().eval(), b.protocol.eval.tta_views
    # The loop at the reference protocol's views too on CUDA (its target); on a CPU that would double a slow section.
    loop_views = tuple(dict.fromkeys((s.views, protocol_views)))[:None if s.device.type == "cuda" else 1]
    out: dict[str, Any] = {"views": s.views, "protocol_views": protocol_views, "loop_views": loop_views,
                           "equivalence": tta_equivalence(b, model, s.views), "comparisons": {}}
    for views in loop_views:
        with b.reference_batches("test", False, batch, model_bound=True) as (fetch, warmup):
            reference = b.time(lambda fetch=fetch, views=views: len(reference_tta(model, fetch()[0], views).cpu()),
                               batch, "fp32", warmup, views=views, workers=s.workers, forward_batch=batch)
        for precision in dict.fromkeys(("fp32", s.precision) if views == s.views else ("fp32",)):
            batches = b.batches("test", batch, shuffle=False)

            def step(batches: Iterator = batches, views: int = views, precision: str = precision) -> int:
                return len(predict_batch(model, next(batches)[0], s.resolution, views, precision).cpu())

            out["comparisons"][f"{views} views, {precision}"] = compare(
                b.time(step, batch, precision, views=views, forward_batch=views * batch), reference)
    return out


def _train_figure(b: Bench, method: str, pipeline: str) -> dict[str, Any]:
    """pipeline: eager | compiled | reference; the method with pcamx's defaults, the protocol's loss and clipping."""
    s, device, protocol = b.s, b.s.device, b.protocol.train
    torch._dynamo.reset()  # an earlier figure's compiled graphs (and what they hold) go first
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model, cfg = b.new_model(), compose(f"method={method}")
    groups = apply_method(model, cfg.method, cfg.train.lr, cfg.train.weight_decay, cfg.train.decay_all_params)
    model.to(device).train()
    with contextlib.ExitStack() as stack:
        if pipeline == "reference":
            fetch, warmup = stack.enter_context(b.reference_batches("train", True, s.batch_size, model_bound=True))
            optimizer, precision = torch.optim.AdamW(groups, lr=cfg.train.lr), "fp32"

            def step() -> int:
                x, y = fetch()
                reference_step(model, optimizer, x, y, protocol.label_smoothing, protocol.grad_clip)
                return len(x)
        else:
            optimizer, precision = build_optimizer(groups, device, cfg.train.lr), s.precision  # as the loop does
            forward = torch.compile(model) if pipeline == "compiled" else model
            batches, generator = b.batches("train", s.batch_size, True), torch.Generator().manual_seed(s.seed)
            jitter = ColorJitter.from_config(b.jitter)
            # Compilation happens in the first steps (forward, then backward graphs): keep them off the clock.
            warmup = max(s.warmup, 3) if pipeline == "compiled" else None

            def step() -> int:
                images, labels = next(batches)
                train_step(forward, optimizer, images, labels, resolution=s.resolution, augment=True,
                           generator=generator, precision=s.precision, jitter=jitter,
                           label_smoothing=protocol.label_smoothing, grad_clip=protocol.grad_clip)
                return len(images)

        fig = b.time(step, s.batch_size, precision, warmup, method=method, pipeline=pipeline,
                     trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad))
    return fig | {"peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}


def section_train(b: Bench, results: dict[str, Any]) -> dict[str, Any]:
    """3. pcamx.training.loop.train_step per method, eager and compiled, against the reference pipeline and step."""
    out: dict[str, Any] = {}
    for method in METHODS:
        eager, compiled = _train_figure(b, method, "eager"), {"skipped": b.s.compile_skipped}
        try:
            compiled = compiled if b.s.compile_skipped else _train_figure(b, method, "compiled")
        except Exception as err:  # a compiler backend failure is a result to record, not a crash
            compiled = {"skipped": f"torch.compile failed: {type(err).__name__}: {err}"[:500]}
        reference = _train_figure(b, method, "reference")
        out[method] = {"eager": compare(eager, reference), "compiled": compare(compiled, reference)}
    return out


def section_compress(b: Bench, results: dict[str, Any]) -> dict[str, Any]:
    """4. The uncompressed model, each step at the reference τ and their chain, budgets, and bf16 / int8."""
    s, device = b.s, b.s.device
    prune = OmegaConf.to_container(b.protocol.prune)  # conf/experiment/repro_compress.yaml: the reference τ
    base, variants = b.new_model().eval().to(device), {}
    generator = torch.Generator().manual_seed(s.seed)  # calibration: a seeded shuffle, no augmentation, no labels
    batches = b.splits["train"].batches(CALIB_BATCH_SIZE, shuffle=True, generator=generator, drop_last=True)
    calibration = [(preprocess(x.to(device), s.resolution), None)
                   for (x, _), _ in zip(batches, range(CALIB_BATCHES), strict=False)]
    x = torch.randn(s.batch_size, 3, s.resolution, s.resolution, generator=generator).to(device)
    (lat_iters, thr_iters), warmup = s.forward_iters, {"warmup_iters": s.warmup}

    def add(name: str, model: torch.nn.Module, precision: str = "fp32", **info: Any) -> None:
        """Latency at batch 1 and throughput at batch N: pcamx.evaluation.footprint's, as metrics.json has them."""
        if "gflops" not in info and precision != "int8":  # ptflops cannot hook torchao's quantized linears
            info["gflops"] = gflops(model, s.resolution, device)
        lat, thr = latency_ms(model, x[:1], s.warmup, lat_iters), throughput_ips(model, x, s.warmup, thr_iters)
        variants[name] = {"params": count_params(model), **info, "latency_ms": lat, "images_per_s": thr,
                          "latency": b.figure({"median_ms": lat, "timed_iters": lat_iters, **warmup}, 1, precision),
                          "throughput": b.figure({"images_per_s": thr, "timed_iters": thr_iters, **warmup},
                                                 s.batch_size, precision)}

    add("uncompressed", copy.deepcopy(base))
    for method in (*prune["order"], "all"):  # each step at its reference τ, then the chain
        model, p, start = copy.deepcopy(base), plan_from_config({**prune, "method": method}), time.perf_counter()
        run_plan(model, p)
        add(method, model, tau=p.tau, compress_s=time.perf_counter() - start)
    for name, keys in ((k, v) for k, v in BUDGETS.items() if not s.quick or v["target_ratio"] == 0.75):
        p, start = plan_from_config({**prune, **keys, "calib_batches": len(calibration)}), time.perf_counter()
        try:
            model, _, found = compress_to_budget(copy.deepcopy(base), p, lambda m: cost(m, s.resolution),
                                                 calibration if p.needs_calibration else None)
        except ValueError as err:  # a budget the steps cannot reach on this model
            variants[name] = {"skipped": f"budget not reachable: {err}"}
            continue
        add(name, model, gflops=found["achieved"]["gflops"], tau=found["tau"], compress_s=time.perf_counter() - start,
            prune=p.describe(), search=found)
    for mode in ("bf16", "int8"):
        try:
            model = quantize(copy.deepcopy(base), mode, device)
        except (RuntimeError, ValueError, ImportError) as err:
            variants[mode] = {"skipped": f"{mode} not supported here: {err}"}
            continue
        add(mode, model, mode, **({"gflops": variants["uncompressed"]["gflops"]} if mode == "bf16" else {}))
    first = variants["uncompressed"]
    for fig in (f for f in variants.values() if "latency_ms" in f):
        fig |= {"speedup_latency": first["latency_ms"] / fig["latency_ms"],
                "speedup_throughput": fig["images_per_s"] / first["images_per_s"],
                "gflops_ratio": fig["gflops"] / first["gflops"] if fig.get("gflops") is not None else None}
    return {"variants": variants, "calibration": {"batches": len(calibration), "batch_size": CALIB_BATCH_SIZE},
            "note": "random init: a fixed τ removes far less from random matrices than from trained ones (a compressed "
                    "run's metrics.json has its speed); the budget rows reach their GFLOPs whatever the weights"}


def section_mfu(b: Bench, results: dict[str, Any]) -> dict[str, Any]:
    """5. Achieved FLOP/s of the training figures already measured ÷ the GPU's dense bf16 peak."""
    if b.s.device.type != "cuda":
        return {"skipped": "no CUDA"}
    forward, peak, train = gflops(b.new_model().to(b.s.device), b.s.resolution, b.s.device), b.s.peak_tflops, \
        {m: results["train"][m] for m in METHODS if m in results.get("train", {})}
    rows = {f"{m} {k}": c["pcamx"] for m, e in train.items() for k, c in e.items()} | {
        f"{m} reference": e["eager"]["reference"] for m, e in train.items()}
    figures = {name: {"images_per_s": f["images_per_s"], "precision": f["precision"], "achieved_tflops": tflops,
                      "mfu": tflops / peak if peak else None}
               for name, f in rows.items() if "images_per_s" in f for tflops in [f["images_per_s"] * 3 * forward / 1e3]}
    return {"peak_tflops_bf16": peak, "forward_gflops": forward, "figures": figures,
            "note": None if peak else "peak bf16 FLOP/s unknown for this GPU: pass --peak-tflops to get MFU",
            "convention": "footprint.gflops (module hooks only: the attention core is not counted, so MFU is a lower "
                          "bound); a training image = 3x its forward FLOPs"}


SECTIONS: dict[str, Callable[[Bench, dict[str, Any]], dict[str, Any]]] = {
    "pipeline": section_pipeline, "eval": section_eval, "train": section_train, "compress": section_compress,
    "mfu": section_mfu, "wsi": section_wsi}
