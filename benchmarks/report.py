"""The issue's targets, checked against a result, and the markdown summary printed after a run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pcamx.training.methods import METHODS

GPU, CPU = "GPU target", "CPU-device target"  # why a target is n/a on the other kind of device


def _get(tree: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _ips(fig: Any) -> float | None:
    return fig.get("images_per_s") if isinstance(fig, dict) else None


def _target(name: str, description: str, value: float | None, threshold: float, not_applicable: str | None,
            detail: dict[str, Any] | None = None) -> dict[str, Any]:
    """status: `n/a (<why>)` when the target is not for this device (`not_applicable`) or has no value, else
    `met` / `not met` by value ≥ threshold."""
    if not_applicable:
        status = f"n/a ({not_applicable})"
    elif value is None:
        status = "n/a (section not run or failed)"
    else:
        status = "met" if value >= threshold else "not met"
    return {"name": name, "description": description, "value": value, "threshold": threshold, "status": status,
            "detail": detail or {}}


def _best(values: dict[str, float | None], pick: Callable = min) -> float | None:
    known = [v for v in values.values() if v is not None]
    return pick(known) if known else None


def evaluate_targets(sections: dict[str, Any], device_type: str) -> list[dict[str, Any]]:
    gpu_only, cpu_only = None if device_type == "cuda" else GPU, None if device_type == "cpu" else CPU
    train, ev = sections.get("train") or {}, sections.get("eval") or {}
    eager = {m: _get(train, m, "eager", "ratio") for m in METHODS}
    per_method = {m: _best({k: _get(train, m, k, "ratio") for k in ("eager", "compiled")}, max) for m in METHODS}
    end_to_end = {"eval_tta": _get(ev, "comparisons", f"{ev.get('views')} views, fp32", "ratio"),
                  **{f"train_{m}_eager": v for m, v in eager.items()}}
    fastest = _best({f"{m} {k}": _ips(_get(train, m, k, "pcamx")) for m in METHODS for k in ("eager", "compiled")},
                    max)
    pipeline, host = _ips(_get(sections, "pipeline", "train", "pcamx")), _ips(_get(sections, "pipeline", "host",
                                                                                  "pcamx"))
    mfu = {m: _get(sections, "mfu", "figures", f"{m} compiled", "mfu") for m in METHODS}
    return [
        _target("host_side", "host-side images/s, pcamx ÷ reference (reference: all CPU workers; pcamx: 1 process)",
                _get(sections, "pipeline", "host", "ratio"), 100.0, None),
        _target("cpu_end_to_end", "CPU device, end to end: pcamx ÷ reference images/s, worst of TTA eval and the "
                "training methods (no slower = ≥ 1)", _best(end_to_end), 1.0, cpu_only, end_to_end),
        _target("gpu_eval_tta", "GPU: pcamx fp32 TTA images/s ÷ the reference protocol's fp32 loop, same views",
                _get(ev, "comparisons", f"{ev.get('protocol_views')} views, fp32", "ratio"), 5.0, gpu_only),
        _target("gpu_training", "GPU: pcamx training images/s (eager or compiled) ÷ reference, worst method",
                _best(per_method), 5.0, gpu_only, per_method),
        _target("pipeline_vs_training", "pcamx input pipeline (train mode) images/s ÷ fastest pcamx training "
                "images/s", pipeline / fastest if pipeline and fastest else None, 5.0, None),
        _target("host_vs_training", "pcamx host side images/s ÷ fastest pcamx training images/s",
                host / fastest if host and fastest else None, 10.0, None),
        _target("gpu_training_mfu", "GPU: training MFU, bf16 + compile (best method; a fraction of peak, attention "
                "core not counted)", _best(mfu, max), 0.35, gpu_only, mfu),
    ]


# --- markdown -----------------------------------------------------------------------------------------


def _n(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "—"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.{digits}g}"


def _x(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}×"


def _iters(fig: dict[str, Any] | None) -> str:
    if not isinstance(fig, dict) or "timed_iters" not in fig:
        return "—"
    iters = fig["timed_iters"] if isinstance(fig["timed_iters"], list) else [fig["timed_iters"]]
    return f"{sum(iters)} ({'/'.join(map(str, iters))})"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _fig(fig: dict[str, Any]) -> str:
    return f"skipped: {fig['skipped']}" if "skipped" in fig else _n(_ips(fig))


def _comparisons(rows: dict[str, dict[str, Any]]) -> list[str]:
    """One line per side-by-side figure: pcamx, the reference, the ratio and both figures' conditions."""
    return _table(["figure", "pcamx", "reference", "pcamx ÷ reference", "batch", "precision pcamx / ref",
                   "timed iters pcamx / ref"],
                  [[name, _fig(c["pcamx"]), _fig(c["reference"]), _x(c["ratio"]), str(c["reference"]["batch_size"]),
                    f"{c['pcamx'].get('precision', '—')} / {c['reference']['precision']}",
                    f"{_iters(c['pcamx'])} / {_iters(c['reference'])}"] for name, c in rows.items()])


def _pipeline_md(sec: dict[str, Any]) -> list[str]:
    return [*_comparisons({"train (augment)": sec["train"], "eval": sec["eval"], "host side, train": sec["host"]}),
            f"\nHost CPU time per image, pcamx: {sec['host']['pcamx_us_per_image']:.2f} µs (one process); the "
            f"reference: {sec['host']['reference']['workers']} DataLoader workers."]


def _eval_md(sec: dict[str, Any]) -> list[str]:
    e = sec["equivalence"]
    return [*_comparisons(sec["comparisons"]),
            f"\nSame probabilities: max |Δp| = {e['max_abs_diff']:.2e} over {e['images']} images, {e['views']} views "
            f"(atol {e['atol']:g}): {'pass' if e['passed'] else 'FAIL'}; p in [{e['prob_min']:.3f}, "
            f"{e['prob_max']:.3f}] (head rescaled so that P(tumour) spreads out)."]


def _train_md(sec: dict[str, Any]) -> list[str]:
    rows = {f"{m} {k}": c for m in METHODS if m in sec for k, c in sec[m].items()}
    memory = {k: c["pcamx"].get("peak_memory_bytes") for k, c in rows.items()}
    out = _comparisons(rows)
    if any(v is not None for v in memory.values()):
        out.append("\nPeak memory (CUDA max_memory_allocated), pcamx: " + ", ".join(
            f"{k} {v / 1e6:,.0f} MB" for k, v in memory.items() if v is not None) + ".")
    return out


def _compress_md(sec: dict[str, Any]) -> list[str]:
    rows = []
    for name, fig in sec["variants"].items():
        if "skipped" in fig:
            rows.append([name, fig["skipped"], *["—"] * 7])
            continue
        taus = sorted(set((fig.get("tau") or {}).values()))
        search = fig.get("search") or {}
        seconds = "—" if "compress_s" not in fig else _n(fig["compress_s"]) + (
            f" ({search['search_trials']} trials)" if search else "")
        rows.append([name, f"{fig['params'] / 1e6:.2f} M", _n(fig.get("gflops")), _n(fig.get("gflops_ratio")),
                     " / ".join(_n(t, 4) for t in taus) or "—", _n(fig["latency_ms"]), _n(_ips(fig)),
                     f"{_x(fig['speedup_latency'])} / {_x(fig['speedup_throughput'])}", seconds])
    out = _table(["variant", "params", "GFLOPs", "÷ uncompressed", "τ", "latency ms", "images/s", "speedup lat / thr",
                  "compress s"], rows)
    fig = next(f for f in sec["variants"].values() if "throughput" in f)
    out.append(f"\nLatency: median of {fig['latency']['timed_iters']} forwards at batch 1; throughput: "
               f"{fig['throughput']['timed_iters']} forwards at batch {fig['throughput']['batch_size']} "
               "(pcamx.evaluation.footprint). Budget rows (all_r<ratio>_<criterion>, blocks_r<ratio>): at most that "
               "fraction of the GFLOPs, one τ for every step, found by compress_to_budget (compress s: the whole "
               f"search). Calibration: {sec['calibration']['batches']} batches of {sec['calibration']['batch_size']}.")
    out += [f"{label}: {sec[key]}." for key, label in (("budget_note", "Budgets"), ("note", "Note")) if sec.get(key)]
    return out


def _mfu_md(sec: dict[str, Any]) -> list[str]:
    rows = [[name, _n(e["images_per_s"]), _n(e["achieved_tflops"]), "—" if e["mfu"] is None else f"{e['mfu']:.1%}"]
            for name, e in sec["figures"].items()]
    return [*_table(["figure", "images/s", "achieved TFLOP/s", "MFU"], rows),
            f"\nPeak bf16 dense: {sec['peak_tflops_bf16']} TFLOP/s; forward {sec['forward_gflops']:.2f} GFLOPs/image "
            f"({sec['convention']}).", *([f"Note: {sec['note']}."] if sec["note"] else [])]


SECTION_RENDERERS: dict[str, tuple[str, Callable[[dict[str, Any]], list[str]]]] = {
    "pipeline": ("### 1. Input pipeline (images/s ready on the device)", _pipeline_md),
    "eval": ("### 2. Evaluation with TTA (images/s)", _eval_md),
    "train": ("### 3. Training step (images/s)", _train_md),
    "compress": ("### 4. Compressed models (latency at batch 1, throughput at batch N)", _compress_md),
    "mfu": ("### 5. Model FLOPs utilization", _mfu_md),
}


def render_markdown(doc: dict[str, Any]) -> str:
    meta, s = doc["meta"], doc["settings"]
    out = [f"## pcamx bench: {meta['device']} ({meta['device_name']}), torch {meta['torch']}, {meta['threads']} "
           f"threads, {s['model']} at {s['resolution']} px", "",
           f"{meta['started']}, commit {meta['commit']}. Median of {s['repeats']} repeats (pcamx.runtime.timing); "
           f"'timed iters' = calls after warm-up, total (per repeat). pcamx precision {s['precision']}; reference "
           f"DataLoader workers: {s['workers']}. Load average at start/end: {meta['loadavg_start']} / "
           f"{meta['loadavg_end']}. Total {meta['total_s']:.0f} s."]
    for name, (title, render) in SECTION_RENDERERS.items():
        sec = doc["sections"].get(name) or {"skipped": "not run"}
        out += ["", title]
        if "error" in sec or "skipped" in sec:
            out.append(f"error: {sec['error']}" if "error" in sec else f"skipped: {sec['skipped']}")
        else:
            out += render(sec)
    rows = [[t["name"], t["description"], _x(t["value"]) if t["name"] != "gpu_training_mfu" else _n(t["value"]),
             f"≥ {t['threshold']:g}", t["status"]] for t in doc["targets"]]
    out += ["", "### Targets", *_table(["target", "what", "value", "threshold", "status"], rows)]
    out += [f"\n{t['name']}: " + ", ".join(f"{k} {_n(v)}" for k, v in t["detail"].items())
            for t in doc["targets"] if t["detail"]]
    return "\n".join(out) + "\n"
