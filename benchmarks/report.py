"""The issue's targets, checked against a result, and the markdown summary printed after a run."""

from __future__ import annotations

from typing import Any

from pcamx.training.methods import METHODS


def _get(tree: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _ips(fig: Any) -> float | None:
    return fig.get("images_per_s") if isinstance(fig, dict) else None


def _target(name: str, description: str, value: float | None, threshold: float, applies: bool,
            not_applicable: str, detail: dict[str, Any] | None = None) -> dict[str, Any]:
    if not applies:
        status = f"n/a ({not_applicable})"
    elif value is None:
        status = "n/a (section not run or failed)"
    else:
        status = "met" if value >= threshold else "not met"
    return {"name": name, "description": description, "value": value, "threshold": threshold,
            "status": status, "detail": detail or {}}


def evaluate_targets(sections: dict[str, Any], device_type: str) -> list[dict[str, Any]]:
    cuda, cpu = device_type == "cuda", device_type == "cpu"
    train = sections.get("train") or {}
    targets = [
        _target("host_side", "host-side images/s, pcamx ÷ reference (reference: all CPU workers; pcamx: 1 process)",
                _get(sections, "pipeline", "host", "ratio"), 100.0, True, ""),
    ]

    # CPU as the device, end to end (data and model together): evaluation with TTA and each training method.
    end_to_end = {
        "eval_tta_8views": _get(sections, "eval", "ratio", "8"),
        **{f"train_{m}_eager": _get(train, m, "ratio_eager") for m in METHODS},
    }
    known = [v for v in end_to_end.values() if v is not None]
    targets.append(_target("cpu_end_to_end", "CPU device, end to end: pcamx ÷ reference images/s, worst of TTA "
                           "eval and the three training methods (no slower = ≥ 1)", min(known) if known else None,
                           1.0, cpu, "CPU-device target", end_to_end))

    targets.append(_target("gpu_eval_tta", "GPU: pcamx 6-view fp32 TTA images/s ÷ reference 6-view fp32 loop",
                           _get(sections, "eval", "ratio_like_for_like"), 5.0, cuda, "GPU target",
                           {"pcamx_default_vs_6view_loop": _get(sections, "eval", "ratio", "6")}))

    per_method = {m: _get(train, m, "ratio") for m in METHODS}
    known = [v for v in per_method.values() if v is not None]
    targets.append(_target("gpu_training", "GPU: pcamx training images/s ÷ reference (worst method)",
                           min(known) if known else None, 5.0, cuda, "GPU target", per_method))

    training = [_ips(_get(train, m, k)) for m in METHODS for k in ("pcamx_eager", "pcamx_compiled")]
    training = [v for v in training if v is not None]
    pipeline = _ips(_get(sections, "pipeline", "train", "pcamx"))
    value = pipeline / max(training) if pipeline is not None and training else None
    targets.append(_target("pipeline_vs_training", "pcamx input pipeline (train mode) images/s ÷ fastest pcamx "
                           "training images/s", value, 5.0, True, ""))
    host = _ips(_get(sections, "pipeline", "host", "pcamx"))
    targets.append(_target("host_vs_training", "pcamx host side images/s ÷ fastest pcamx training images/s",
                           host / max(training) if host is not None and training else None, 10.0, True, ""))
    mfu = {m: _get(sections, "mfu", "train", f"{m}/pcamx_compiled", "mfu") for m in METHODS}
    known = [v for v in mfu.values() if v is not None]
    targets.append(_target("gpu_training_mfu", "GPU: training MFU, bf16 + compile (best method; a fraction of "
                           "peak, attention core not counted)", max(known) if known else None, 0.35, cuda,
                           "GPU target", mfu))
    seconds = _get(sections, "uncertainty", "paired_slide_s")
    targets.append(_target("uncertainty_budget", "budget ÷ seconds for every interval and test of a compressed "
                           "row, 32,768 predictions, 1 core (≥ 1: within the 3 s budget)",
                           _get(sections, "uncertainty", "budget_s") / seconds if seconds else None, 1.0,
                           True, ""))
    return targets


# --- markdown -----------------------------------------------------------------------------------------


def _n(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "—"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def _x(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}×"


def _iters(fig: dict[str, Any] | None) -> str:
    if not isinstance(fig, dict) or "timed_iters" not in fig:
        return "—"
    return f"{sum(fig['timed_iters'])} ({'/'.join(map(str, fig['timed_iters']))})"


def _mb(value: float | None) -> str:
    return "—" if value is None else f"{value / 1e6:,.0f} MB"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _skip_or_error(section: Any) -> str | None:
    if not isinstance(section, dict):
        return "not run"
    if "error" in section:
        return f"error: {section['error']}"
    if "skipped" in section:
        return f"skipped: {section['skipped']}"
    return None


def _pipeline_md(sec: dict[str, Any]) -> list[str]:
    out: list[str] = []
    rows = []
    for mode in ("train", "eval"):
        p, r = sec[mode]["pcamx"], sec[mode]["reference"]
        rows.append([f"{mode}{' (augment)' if sec[mode]['augment'] else ''}", _n(_ips(p)), _n(_ips(r)),
                     _x(sec[mode]["ratio"]), str(p["batch_size"]), _iters(p), _iters(r)])
    h = sec["host"]
    rows.append(["host side, train", _n(_ips(h["pcamx"])), _n(_ips(h["reference"])), _x(h["ratio"]),
                 str(h["pcamx"]["batch_size"]), _iters(h["pcamx"]), _iters(h["reference"])])
    out += _table(["figure", "pcamx", "reference", "ratio", "batch", "timed iters pcamx", "timed iters ref"],
                  rows)
    out.append(f"\nHost CPU time per image: pcamx {h['pcamx_us_per_image']:.2f} µs; reference "
               f"{h['reference_us_per_image_1core']:,.0f} µs on one core.")
    if "transfer" in sec:
        t = sec["transfer"]
        out.append(f"\nHost → device with a stand-in step: pinned staging, copy one batch ahead "
                   f"{_n(_ips(t['prefetched']))} images/s; pageable `.to(device)` {_n(_ips(t['pageable']))} "
                   f"images/s ({_x(t['ratio'])}).")
    return out


def _eval_md(sec: dict[str, Any]) -> list[str]:
    out: list[str] = []
    rows = [[f"pcamx, {q['views']} views batched, {q['precision']}", _n(_ips(q)), "—", str(q["batch_size"]),
             _iters(q)] for q in (sec.get(k) for k in ("pcamx", "pcamx_fp32", "pcamx_6_fp32")) if q]
    for views, r in sec["reference"].items():
        rows.append([f"reference, {views}-view loop, fp32", _n(_ips(r)), _x(sec["ratio"][views]),
                     str(r["batch_size"]), _iters(r)])
    out += _table(["figure", "images/s", "pcamx ÷ this", "batch", "timed iters"], rows)
    e = sec["equivalence"]
    out.append(f"\nSame probabilities: max |Δp| = {e['max_abs_diff']:.2e} over {e['images']} images "
               f"(atol {e['atol']:g}): {'pass' if e['passed'] else 'FAIL'}; p in "
               f"[{e['prob_min']:.3f}, {e['prob_max']:.3f}].")
    return out


def _train_md(sec: dict[str, Any]) -> list[str]:
    out: list[str] = []
    rows = []
    for method, entry in sec.items():
        if method not in METHODS:
            continue
        for key in ("pcamx_eager", "pcamx_compiled", "reference"):
            fig = entry[key]
            if "skipped" in fig:
                rows.append([method, key, f"skipped: {fig['skipped']}", "—", "—", "—", "—"])
                continue
            r = _x(entry["ratio_eager"] if key == "pcamx_eager" else entry["ratio"]) if key != "reference" \
                else "1×"
            rows.append([method, key, _n(_ips(fig)), r, fig["precision"], _mb(fig["peak_memory_bytes"]),
                         _iters(fig)])
    out += _table(["method", "pipeline", "images/s", "÷ reference", "precision", "peak memory", "timed iters"],
                  rows)
    first = next(iter(sec.values()))
    out.append(f"\nBatch {first['pcamx_eager']['batch_size']}; peak memory: CUDA max_memory_allocated (— on CPU).")
    return out


def _tau(fig: dict[str, Any]) -> str:
    """τ of a compressed variant: the one given, or the one a budget search found (one τ for every step)."""
    tau = (fig.get("taus") or {}).get("tau")
    if isinstance(tau, dict):
        values = set(tau.values())
        return _n(values.pop(), 4) if len(values) == 1 else ", ".join(f"{k} {_n(v, 4)}" for k, v in tau.items())
    return _n(tau, 4) if tau is not None else "—"


def _variant(name: str, fig: dict[str, Any]) -> str:
    if "budget" not in fig:
        return name
    (key, value), = fig["budget"].items()
    what = {"target_ratio": "GFLOPs ≤ {:g}×", "target_gflops": "GFLOPs ≤ {:g}", "target_params": "params ≤ {:g}"}
    prune = fig.get("prune") or {}
    steps = "+".join(prune.get("steps", []))
    how = f", {prune['criterion']}, {prune['scope']}" if "blocks" not in prune.get("steps", []) else ""
    return f"{name}: {steps}, {what[key].format(value)}{how}"


def _compress_md(sec: dict[str, Any]) -> list[str]:
    out: list[str] = []
    rows = []
    for name, fig in sec["variants"].items():
        if "skipped" in fig:
            rows.append([name, fig["skipped"]] + ["—"] * 7)
            continue
        search = "—" if "compress_s" not in fig else _n(fig["compress_s"]) + (
            f" ({fig['search_trials']} trials)" if "search_trials" in fig else "")
        rows.append([_variant(name, fig), f"{fig['params'] / 1e6:.2f} M", _n(fig.get("gflops")),
                     "—" if fig.get("gflops_ratio") is None else f"{fig['gflops_ratio']:.3f}", _tau(fig),
                     _n(fig["latency_ms"]), _n(_ips(fig)),
                     f"{_x(fig['speedup_latency'])} / {_x(fig['speedup_throughput'])}", search])
    out += _table(["variant", "params", "GFLOPs", "GFLOPs ÷ uncompressed", "τ", "latency ms", "images/s",
                   "speedup lat / thr", "compress s"], rows)
    any_fig = next(f for f in sec["variants"].values() if "throughput" in f)
    out.append(f"\nN = {any_fig['throughput']['batch_size']}. compress s: the compression, for a budget the "
               "whole search (a compressed copy and its GFLOPs per trial).")
    cal = sec.get("calibration")
    if cal:
        out.append(f"Calibration ({cal['used_by']}): {cal['batches']} batches of {cal['batch_size']} images, "
                   f"{cal['images']}, labels none.")
    if sec.get("budget_note"):
        out.append(f"Budgets: {sec['budget_note']}.")
    if sec.get("note"):
        out.append(f"Note: {sec['note']}.")
    return out


def _mfu_md(sec: dict[str, Any]) -> list[str]:
    out: list[str] = []
    rows = [[f"{kind}: {name}", _n(e["images_per_s"]), _n(e["achieved_tflops"]),
             "—" if e["mfu"] is None else f"{100 * e['mfu']:.1f}%"]
            for kind in ("train", "inference") for name, e in sec[kind].items()]
    out += _table(["figure", "images/s", "achieved TFLOP/s", "MFU"], rows)
    out.append(f"\nPeak bf16 dense: {sec['peak_tflops_bf16']} TFLOP/s; forward {sec['forward_gflops']:.2f} "
               f"GFLOPs/image ({sec['convention']}).")
    return out


def _load_md(sec: dict[str, Any]) -> list[str]:
    out: list[str] = []
    out.append(f"{sec['images']:,} images in {sec['load_s']:.2f} s ({_n(sec['images_per_s'])} images/s), "
               f"{sec['bytes'] / 1e6:,.0f} MB in RAM (file {sec['file_bytes'] / 1e6:,.0f} MB); per-sample "
               f"h5py reads: {sec['per_sample_read_us']:,.0f} µs each, ~{sec['per_sample_estimate_s']:,.0f} s "
               f"for the split ({_x(sec['ratio'])} slower).")
    return out


def _uncertainty_md(sec: dict[str, Any]) -> list[str]:
    rows = [[what, f"{sec[key]:.2f}"] for what, key in (
        ("95% intervals of all 7 metrics, patches resampled", "patch_intervals_s"),
        ("the same, slides resampled", "slide_intervals_s"),
        ("a compressed row: its intervals + paired intervals against its reference + DeLong", "paired_slide_s"))]
    return [f"{sec['predictions']:,} predictions, {sec['draws']:,} draws, {sec['threads']} thread:", "",
            *_table(["what", "seconds"], rows)]


def _predict_md(sec: dict[str, Any]) -> list[str]:
    rows, checks = [], []
    for views, e in sec["views"].items():
        p, r = e["pcamx"], e["reference"]
        rows.append([views, str(e["images"]), _n(_ips(p)), _n(_ips(r)), _x(e["ratio"]), _iters(p), _iters(r),
                     f"{e['load_s']:.2f}"])
        q = e["equivalence"]
        checks.append(f"{views} view(s): max |Δp| = {q['max_abs_diff']:.2e} over {q['images']} images "
                      f"({'pass' if q['passed'] else 'FAIL'}, atol {q['atol']:g}; p in [{q['prob_min']:.3f}, "
                      f"{q['prob_max']:.3f}])")
    out = _table(["TTA views", "PNGs", "pcamx.predict", "per-file loop", "ratio", "timed passes pcamx",
                  "timed passes loop", "load s"], rows)
    first = next(iter(sec["views"].values()))
    out.append(f"\nImages/s over whole passes of the folder, fp32 (TF32 off). pcamx: `python -m pcamx.predict "
               f"CHECKPOINT FOLDER` (batch {first['pcamx']['batch_size']}, {first['pcamx']['decode_threads']} "
               "decode threads); loop: PIL + HF processor + a forward per image and view. The model is loaded "
               "before timing (load s: `load_for_inference`).")
    out.append("Same probabilities: " + "; ".join(checks) + ".")
    return out


def _export_md(sec: dict[str, Any]) -> list[str]:
    rows = []
    for name, entry in sec["variants"].items():
        for views in map(str, sec["views"]):
            f = entry[views]
            rows.append([name, f"{entry['params'] / 1e6:.2f} M", views, _n(f["onnxruntime_cpu_ms"]),
                         _n(f["pytorch_cpu_ms"]), _x(f["speedup"]), f"{f['max_abs_diff']:.1e}",
                         f"{f['export_s']:.1f}"])
    out = _table(["variant", "params", "TTA views", "onnxruntime ms", "PyTorch ms", "PyTorch ÷ onnxruntime",
                  "max \\|Δp\\|", "export s"], rows)
    f = next(v for v in next(iter(sec["variants"].values())).values() if isinstance(v, dict) and "batch" in v)
    out.append(f"\nCPU, fp32, batch {f['batch']} uint8 patch(es) → P(tumour) at {f['resolution']} px, "
               f"{f['threads']} thread(s) for both; median of {f['iters']} calls after {f['warmup']} "
               "(`pcamx.export.export_latency_figures`: the ONNX graph includes the views, resize and normalization, "
               "as PyTorch's `predict_batch` does).")
    return out


# Each section: its key in bench.json, its heading, and how its figures become markdown lines.
SECTION_RENDERERS = [
    ("pipeline", "### 1. Input pipeline (images/s ready on the device)", _pipeline_md),
    ("eval", "### 2. Evaluation with TTA (images/s)", _eval_md),
    ("train", "### 3. Training step (images/s)", _train_md),
    ("compress", "### 4. Compressed models (latency at batch 1, throughput at batch N)", _compress_md),
    ("mfu", "### 5. Model FLOPs utilization", _mfu_md),
    ("load", "### data.in_memory load", _load_md),
    ("uncertainty", "### Confidence intervals and paired tests (one core)", _uncertainty_md),
    ("predict", "### pcamx.predict on a folder of PNG patches (images/s)", _predict_md),
    ("export", "### ONNX Runtime vs PyTorch, CPU latency at batch 1", _export_md),
]


def render_markdown(doc: dict[str, Any]) -> str:
    meta, sections = doc["meta"], doc["sections"]
    s = doc["settings"]
    out = [
        f"## pcamx bench: {meta['device']} ({meta['device_name']}), torch {meta['torch']}, "
        f"{meta['threads']} threads, {s['model']} at {s['resolution']} px",
        "",
        f"Median of {s['timing']['repeats']} repeats; images/s; 'timed iters' = steps after warm-up "
        f"(total (per repeat)). Reference DataLoader workers: {s['workers']}. Load average at start/end: "
        f"{meta['loadavg_start']} / {meta['loadavg_end']}. Total {meta['total_s']:.0f} s.",
    ]

    for name, title, render in SECTION_RENDERERS:
        sec = sections.get(name)
        out += ["", title]
        msg = _skip_or_error(sec)
        out += [msg] if msg is not None else render(sec)

    out += ["", "### Targets"]
    rows = [[t["name"], t["description"], _x(t["value"]), f"≥ {t['threshold']:g}×", t["status"]]
            for t in doc["targets"]]
    out += _table(["target", "what", "value", "threshold", "status"], rows)
    for t in doc["targets"]:
        if t["detail"]:
            out.append(f"\n{t['name']}: " + ", ".join(f"{k} {_x(v)}" for k, v in t["detail"].items()))
    return "\n".join(out) + "\n"
