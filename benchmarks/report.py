"""The issue's targets, checked against a result, and the markdown summary printed after a run."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from benchmarks.wsi import render_wsi
from pcamx.training.methods import METHODS


def _get(tree: Any, *keys: str) -> Any:
    return functools.reduce(lambda t, key: t.get(key) if isinstance(t, dict) else None, keys, tree)


def _pick(values: dict[str, float | None], pick: Callable = min) -> float | None:
    known = [v for v in values.values() if v is not None]
    return pick(known) if known else None


def _target(name: str, description: str, value: float | None, threshold: float, not_here: str | None,
            detail: dict[str, Any] | None = None, at_most: bool = False) -> dict[str, Any]:
    """status: `n/a (<why>)` when the target is not for this device (`not_here` says why) or has no value, else
    `met` / `not met` by value ≥ threshold (≤ with `at_most`)."""
    status = f"n/a ({not_here})" if not_here else "n/a (section not run or failed)" if value is None else \
        "met" if (value <= threshold if at_most else value >= threshold) else "not met"
    return {"name": name, "description": description, "value": value, "threshold": threshold, "status": status,
            "detail": detail or {}, "at_most": at_most}


def evaluate_targets(sections: dict[str, Any], device_type: str) -> list[dict[str, Any]]:
    gpu, cpu = None if device_type == "cuda" else "GPU target", None if device_type == "cpu" else "CPU-device target"
    train, ev, pipeline = (sections.get(k) or {} for k in ("train", "eval", "pipeline"))
    best = {m: _pick({k: _get(train, m, k, "ratio") for k in ("eager", "compiled")}, max) for m in METHODS}
    end_to_end = {"eval_tta": _get(ev, "comparisons", f"{ev.get('views')} views, fp32", "ratio"),
                  **{f"train_{m}_eager": _get(train, m, "eager", "ratio") for m in METHODS}}
    fastest = _pick({f"{m} {k}": _get(train, m, k, "pcamx", "images_per_s") for m in METHODS
                     for k in ("eager", "compiled")}, max)
    per_fastest = {k: _get(pipeline, k, "pcamx", "images_per_s") for k in ("train", "host")}
    per_fastest = {k: v / fastest if v and fastest else None for k, v in per_fastest.items()}
    mfu = {m: _get(sections, "mfu", "figures", f"{m} compiled", "mfu") for m in METHODS}
    slides = sections.get("wsi") or {}
    return [
        _target("host_side", "host-side images/s, pcamx ÷ reference (reference: all CPU workers; pcamx: 1 process)",
                _get(pipeline, "host", "ratio"), 100.0, None),
        _target("cpu_end_to_end", "CPU device, end to end: pcamx ÷ reference images/s, worst of TTA eval and the "
                "training methods (no slower = ≥ 1)", _pick(end_to_end), 1.0, cpu, end_to_end),
        _target("gpu_eval_tta", "GPU: pcamx fp32 TTA images/s ÷ the reference protocol's fp32 loop, same views",
                _get(ev, "comparisons", f"{ev.get('protocol_views')} views, fp32", "ratio"), 5.0, gpu),
        _target("gpu_training", "GPU: pcamx training images/s (eager or compiled) ÷ reference, worst method",
                _pick(best), 5.0, gpu, best),
        _target("pipeline_vs_training", "pcamx input pipeline (train mode) images/s ÷ fastest pcamx training "
                "images/s", per_fastest["train"], 5.0, None),
        _target("host_vs_training", "pcamx host side images/s ÷ fastest pcamx training images/s",
                per_fastest["host"], 10.0, None),
        _target("gpu_training_mfu", "GPU: training MFU, bf16 + compile (best method; a fraction of peak, attention "
                "core not counted)", _pick(mfu, max), 0.35, gpu, mfu),
        _target("wsi_batched", "pcamx.wsi tiles/s ÷ per-tile read_region + one-image forwards (CPU, 1 TTA view)",
                _get(slides, "views_1", "ratio"), 2.0, None),
        _target("wsi_reading", "pcamx.wsi reading + to 96 px tiles/s ÷ its model's tiles/s (CPU)",
                _get(slides, "reading", "ratio"), 10.0, None),
        _target("wsi_peak_rss_gb", "pcamx.wsi peak RSS (GB) on a 50,000² px slide", _get(slides, "big", "peak_rss_gb"),
                2.0, None if _get(slides, "big", "size") in (None, 50_000) else "--quick slide", at_most=True),
    ]


# --- markdown -----------------------------------------------------------------------------------------


def _n(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.{digits}g}"


def _x(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}×"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def _comparisons(rows: dict[str, dict[str, Any]]) -> list[str]:
    """A line per side-by-side figure: pcamx, the reference, the ratio and both figures' conditions."""
    def fig(f: dict[str, Any]) -> str:
        return f"skipped: {f['skipped']}" if "skipped" in f else _n(f["images_per_s"])

    def iters(f: dict[str, Any]) -> str:
        return f"{sum(f['timed_iters'])} ({'/'.join(map(str, f['timed_iters']))})" if "timed_iters" in f else "—"

    return _table(["figure", "pcamx", "reference", "pcamx ÷ reference", "batch", "precision pcamx / ref",
                   "timed iters pcamx / ref"],
                  [[name, fig(c["pcamx"]), fig(c["reference"]), _x(c["ratio"]), str(c["reference"]["batch_size"]),
                    f"{c['pcamx'].get('precision', '—')} / {c['reference']['precision']}",
                    f"{iters(c['pcamx'])} / {iters(c['reference'])}"] for name, c in rows.items()])


def _eval_md(sec: dict[str, Any]) -> list[str]:
    e = sec["equivalence"]
    return [*_comparisons(sec["comparisons"]),
            f"\nSame probabilities: max |Δp| = {e['max_abs_diff']:.2e} over {e['images']} images, {e['views']} views "
            f"(atol {e['atol']:g}): {'pass' if e['passed'] else 'FAIL'}; p in [{e['prob_min']:.3f}, "
            f"{e['prob_max']:.3f}] (head rescaled so that P(tumour) spreads out)."]


def _train_md(sec: dict[str, Any]) -> list[str]:
    rows = {f"{m} {k}": c for m in METHODS if m in sec for k, c in sec[m].items()}
    memory = {k: c["pcamx"]["peak_memory_bytes"] for k, c in rows.items() if c["pcamx"].get("peak_memory_bytes")}
    return [*_comparisons(rows), *(["\nPeak memory (CUDA max_memory_allocated), pcamx: " + ", ".join(
        f"{k} {v / 1e6:,.0f} MB" for k, v in memory.items()) + "."] if memory else [])]


def _compress_md(sec: dict[str, Any]) -> list[str]:
    rows = []
    for name, f in sec["variants"].items():
        tau = f.get("tau") or {}
        tau = _n(next(iter(tau.values())), 4) if len(set(tau.values())) == 1 else ", ".join(
            f"{k} {_n(v, 4)}" for k, v in tau.items()) or "—"
        trials = f" ({f['search']['search_trials']} trials)" if "search" in f else ""
        rows.append([name, f["skipped"], *["—"] * 7] if "skipped" in f else [
            name, f"{f['params'] / 1e6:.2f} M", _n(f.get("gflops")), _n(f.get("gflops_ratio")),
            tau, _n(f["latency_ms"]), _n(f["images_per_s"]),
            f"{_x(f['speedup_latency'])} / {_x(f['speedup_throughput'])}", _n(f.get("compress_s")) + trials])
    f = next(f for f in sec["variants"].values() if "throughput" in f)
    return [*_table(["variant", "params", "GFLOPs", "÷ uncompressed", "τ", "latency ms", "images/s",
                     "speedup lat / thr", "compress s"], rows),
            f"\nLatency: median of {f['latency']['timed_iters']} forwards at batch 1; throughput: "
            f"{f['throughput']['timed_iters']} forwards at batch {f['throughput']['batch_size']} "
            "(pcamx.evaluation.footprint). Budget rows (all_r<ratio>_<criterion>, blocks_r<ratio>): at most that "
            "fraction of the GFLOPs, one τ for every step, found by compress_to_budget (compress s: the whole "
            f"search). Calibration: {sec['calibration']['batches']} batches of {sec['calibration']['batch_size']}.",
            f"Note: {sec['note']}."]


def _mfu_md(sec: dict[str, Any]) -> list[str]:
    rows = [[name, _n(e["images_per_s"]), _n(e["achieved_tflops"]), "—" if e["mfu"] is None else f"{e['mfu']:.1%}"]
            for name, e in sec["figures"].items()]
    return [*_table(["training step", "images/s", "achieved TFLOP/s", "MFU"], rows),
            f"\nPeak bf16 dense: {sec['peak_tflops_bf16']} TFLOP/s; forward {sec['forward_gflops']:.2f} GFLOPs/image "
            f"({sec['convention']}).", *([f"Note: {sec['note']}."] if sec["note"] else [])]


SECTION_RENDERERS: dict[str, tuple[str, Callable[[dict[str, Any]], list[str]]]] = {
    "pipeline": ("### 1. Input pipeline (images/s ready on the device)", lambda sec: _comparisons(
        {"train (augment)": sec["train"], "eval": sec["eval"], "host side, train": sec["host"]})),
    "eval": ("### 2. Evaluation with TTA (images/s)", _eval_md),
    "train": ("### 3. Training step (images/s)", _train_md),
    "compress": ("### 4. Compressed models (latency at batch 1, throughput at batch N)", _compress_md),
    "mfu": ("### 5. Model FLOPs utilization of the training step", _mfu_md),
    "wsi": ("### 6. Whole slides: pcamx.wsi beside the per-tile script (CPU)", render_wsi),
}


def render_markdown(doc: dict[str, Any]) -> str:
    meta, s, _loads = doc["meta"], doc["settings"], lambda loads: " / ".join(f"{v:.2f}" for v in loads)
    out = [f"## pcamx bench: {meta['device']} ({meta['device_name']}), torch {meta['torch']}, {meta['threads']} "
           f"threads, {s['model']} at {s['resolution']} px", "",
           f"{meta['started']}, commit {meta['commit']}. Median of {s['repeats']} repeats (pcamx.runtime.timing); "
           f"'timed iters' = calls after warm-up, total (per repeat). pcamx precision {s['precision']}; reference "
           f"DataLoader workers: {s['workers']}. Load average (1/5/15 min) at start: {_loads(meta['loadavg_start'])}, "
           f"at the end: {_loads(meta['loadavg_end'])}. Total {meta['total_s']:.0f} s."]
    for name, (title, render) in SECTION_RENDERERS.items():
        sec = doc["sections"].get(name) or {"skipped": "not run"}
        problem = f"error: {sec['error']}" if "error" in sec else f"skipped: {sec['skipped']}" if "skipped" in sec \
            else None
        out += ["", title, *([problem] if problem else render(sec))]
    rows = [[t["name"], t["description"], _n(t["value"]), f"{'≤' if t['at_most'] else '≥'} {t['threshold']:g}",
             t["status"]]
            for t in doc["targets"]]
    out += ["", "### Targets", *_table(["target", "what", "value", "threshold", "status"], rows)]
    out += [f"\n{t['name']}: " + ", ".join(f"{k} {_n(v)}" for k, v in t["detail"].items())
            for t in doc["targets"] if t["detail"]]
    return "\n".join(out) + "\n"
