"""Score whole-slide images with a model pcamx trained: a tumour map and a score per slide, at the model's scale.

    python -m pcamx.wsi CHECKPOINT SLIDE_OR_FOLDER... --out DIR [--labels slides.csv] [--mpp 0.25]

Tiles cut on level 0 at the model's µm/px, tissue only, are scored as the run's test evaluation scored patches
(reading: pcamx.inference.slide). Killed, the same command continues where it stopped; finished slides are skipped.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import sys
import time
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openslide
import torch
from tqdm import tqdm

from pcamx.compress.quant import QUANT_MODES
from pcamx.data.transforms import TTA_VIEWS
from pcamx.evaluation.metrics import binary_metrics
from pcamx.evaluation.operating_points import THRESHOLD_RULES, resolve_threshold
from pcamx.evaluation.uncertainty import confidence_intervals
from pcamx.inference import slide as ws
from pcamx.inference.inputs import InputError
from pcamx.inference.scoring import SYNTHETIC_NOTE, Predictions, finite, scored, threshold_note, trained_on, write_csv
from pcamx.inference.settings import LoadedModel, load_for_inference
from pcamx.report.heatmap import plot_heatmap
from pcamx.runtime import disk, run_files
from pcamx.runtime.conf import conf_defaults
from pcamx.runtime.errors import OutputError, UserError
from pcamx.runtime.errors import report as report_error
from pcamx.runtime.hardware import DEVICES, PRECISIONS, resolve_device

log = logging.getLogger("pcamx")
SLIDE_JSON = "slide.json"
COLUMNS = ("slide", "status", "reason", "mpp", "level", "tile", "tiles_total", "tiles_tissue", "tiles_scored",
           "tiles_tumour", "max_prob", "top_k_mean", "seconds")


@dataclass
class Job:
    args: argparse.Namespace
    loaded: LoadedModel
    out: Path
    threshold: float
    model_mpp: float
    digest: str  # sha256 of the checkpoint file (of architecture.json, which holds the weights' sha256, if compressed)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pcamx.wsi", description=__doc__.split("\n\n")[0], epilog="Exit "
                                "status 2 for a bad slide, checkpoint or argument.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="a run directory, its best.pt / last.pt, or its compressed/ directory")
    p.add_argument("slides", nargs="+", help="slides (any format OpenSlide reads) or folders (searched recursively)")
    p.add_argument("--out", required=True, help="output directory (created): DIR/<slide name>/ per slide")
    p.add_argument("--mpp", type=float, help="level-0 µm/px of every slide (for slides that do not record it)")
    p.add_argument("--stride", type=int, help=f"step between tiles in level-0 px; None: a tile's size ({ws.PATCH} px "
                                              "at the model's µm/px)")
    p.add_argument("--min-tissue", type=float, default=0.25, help="score tiles with at least this tissue fraction")
    p.add_argument("--no-tissue-mask", action="store_true", help="score every tile, glass included")
    p.add_argument("--labels", help="CSV of slide name,0/1 (a header line is allowed): slide-level AUROC")
    p.add_argument("--top-k", type=int, default=10, help="slide score: also the mean of the k highest tiles")
    p.add_argument("--threshold", default="val95spec", help=f"tile decision: {' | '.join(THRESHOLD_RULES)} (chosen "
                                                            "on the run's validation split) or a number in [0, 1]")
    p.add_argument("--tta-views", type=int, choices=sorted(TTA_VIEWS), help="override the run's TTA views")
    p.add_argument("--quant", choices=QUANT_MODES, help="override the run's quantization")
    p.add_argument("--precision", choices=PRECISIONS, help="override the run's autocast precision (unquantized)")
    p.add_argument("--device", default="auto", choices=DEVICES, help="where the model runs")
    p.add_argument("--batch-size", type=int, default=64, help="tiles per forward (times the TTA views)")
    p.add_argument("--workers", type=int, default=4, help="threads reading tiles ahead of the model")
    p.add_argument("--save-every", type=int, default=2048, help="save scored tiles every N (a rerun resumes there)")
    p.add_argument("--skip-bad", action="store_true", help="leave out (and name) slides that cannot be scored")
    p.add_argument("--overwrite", action="store_true", help="score finished slides again (default: skip them)")
    return p


def check_out(args: argparse.Namespace) -> Path:
    """Arguments checked, then the output directory created and checked writable, before any work."""
    for flag, value in (("--batch-size", args.batch_size), ("--workers", args.workers), ("--top-k", args.top_k),
                        ("--save-every", args.save_every), ("--stride", args.stride or 1)):
        if value < 1:
            raise InputError(f"{flag} must be >= 1, got {value}")
    if not 0 <= args.min_tissue <= 1 or (args.mpp is not None and not 0 < args.mpp < 1000):
        raise InputError(f"--min-tissue is a fraction in [0, 1] (got {args.min_tissue}); --mpp the slides' level-0 "
                         f"µm per pixel, about 0.25 at 40× (got {args.mpp})")
    out = Path(args.out).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"--out {out}: cannot create this directory ({err.strerror}); give a writable one") from None
    return disk.check_writable(out / "summary.csv", "--out").parent


def read_labels(path: str, names: list[str]) -> dict[str, int]:
    """slide name → 0/1 (a name may carry its file suffix); both classes among `names`."""
    try:
        with open(Path(path).expanduser(), newline="") as f:
            rows = [[c.strip() for c in row] for row in csv.reader(f)]
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"--labels {path} could not be read ({err})") from None
    labels = {}
    for k, row in enumerate(rows):
        if len(row) >= 2 and row[1] in ("0", "1"):
            labels[row[0] if row[0] in names else Path(row[0]).stem] = int(row[1])
        elif k and any(row):  # not the header, not a blank line
            raise InputError(f"--labels {path}, line {k + 1}: expected 'slide name,0 or 1', got {','.join(row)!r}")
    if len({labels[n] for n in names if n in labels}) < 2:
        raise InputError(f"--labels {path} gives these slides fewer than two classes (a slide AUROC needs both); "
                         "check the names: the slide file names without suffix")
    return labels


def score_slide(path: Path, geo: ws.Geometry, job: Job) -> dict[str, Any]:
    """Score one slide into DIR/<name>/ and return its slide.json (a finished slide's, if made the same way)."""
    a, name, folder, start = job.args, path.stem, job.out / path.stem, time.perf_counter()
    with ws.open_slide(path) as slide:
        # What the results depend on (slide.json's first keys): a finished slide or a saved part made otherwise is
        # never mixed in.
        stat = path.stat()
        made = json.loads(json.dumps({
            **asdict(geo), "slide_id": slide.properties.get(openslide.PROPERTY_NAME_QUICKHASH1) or
            f"{stat.st_size}:{stat.st_mtime_ns}", "checkpoint_sha256": job.digest, "model_mpp": job.model_mpp,
            "settings": job.loaded.settings.to_dict(), "min_tissue": None if a.no_tissue_mask else a.min_tissue,
            "threshold": job.threshold, "top_k": a.top_k, "save_every": a.save_every}))
        if (folder / SLIDE_JSON).is_file() and not a.overwrite:
            record = json.loads((folder / SLIDE_JSON).read_text())
            if {k: record.get(k) for k in made} != made:
                raise OutputError(f"{folder} holds results made otherwise (checkpoint, settings, --mpp, --stride, "
                                  "--min-tissue, --threshold, --top-k, --save-every); pass --overwrite to score the "
                                  "slide again, or give another --out")
            log.info("%s: already scored; --overwrite scores it again", name)
            return record
        tissue = ws.find_tissue(slide, geo)
        on_tissue = np.flatnonzero(tissue.fraction >= a.min_tissue)
        if not len(keep := np.arange(len(geo.grid)) if a.no_tissue_mask else on_tissue):
            raise ws.SlideError(f"{path}: no tissue found (no tile has {a.min_tissue:g} of its area above saturation "
                                f"{tissue.threshold}/255); pass --no-tissue-mask to score every tile, or --skip-bad")
        if a.overwrite:  # not finished any more; a saved part made the same way is still resumed
            (folder / SLIDE_JSON).unlink(missing_ok=True)
        store = ws.TileStore(folder / "partial", made, discard=a.overwrite)
        chunks = store.done()
        resumed, began = sum(map(len, chunks)), time.perf_counter()
        with tqdm(total=len(keep), initial=resumed, unit="tile", desc=name, disable=None) as bar:
            for k in range(len(chunks), math.ceil(len(keep) / a.save_every)):
                part, probs = keep[k * a.save_every:(k + 1) * a.save_every], []
                with closing(scored(job.loaded, ws.tile_batches(slide, geo, part, a.batch_size, a.workers, name),
                                    ws.PATCH)) as stream:  # closed before the slide is, on any exception too
                    for batch, p in stream:
                        probs.append(p)
                        bar.update(len(batch.indices))
                chunks.append(finite(torch.cat(probs).cpu().double().numpy()))
                store.save(k, chunks[-1])
        scoring, probs = time.perf_counter() - began, np.concatenate(chunks)
        write_outputs(folder, name, geo, job, keep, probs, tissue)
    k, data = min(a.top_k, len(keep)), trained_on(job.loaded)
    record = {**made, "slide": str(path), "name": name, "grid": geo.grid.shape, "tissue_threshold": tissue.threshold,
              "tiles": {"total": len(geo.grid), "tissue": len(on_tissue), "scored": len(keep),
                        "tumour": int((probs >= job.threshold).sum())},
              "score": {"max": float(probs.max()), "top_k_mean": float(np.sort(probs)[-k:].mean()), "k": k},
              "threshold_rule": a.threshold, "checkpoint": job.loaded.source["path"], "trained_on": data,
              **({"note": SYNTHETIC_NOTE} if data == "synthetic" else {}), "device": str(job.loaded.device),
              "resumed_tiles": resumed, "seconds": time.perf_counter() - start,
              "tiles_per_s": (len(keep) - resumed) / scoring if len(keep) > resumed else None}
    disk.write_json(folder / SLIDE_JSON, record)  # last: its presence marks the slide finished
    store.remove()
    return record


def write_outputs(folder: Path, name: str, geo: ws.Geometry, job: Job, keep: np.ndarray, probs: np.ndarray,
                  tissue: ws.Tissue) -> None:
    """tiles.csv, heatmap.png, overlay.png and tiles.geojson."""
    n, s = len(keep), geo.tile
    yx = [geo.grid.origin(i) for i in keep.tolist()]
    write_csv(folder / "tiles.csv", Predictions([name] * n, keep.tolist(), probs), job.threshold,
              {"x": [x for _, x in yx], "y": [y for y, _ in yx], "size": [s] * n,
               "tissue": [f"{t:.4f}" for t in tissue.fraction[keep]]})
    title = f"P(tumour), {name}: {s} px tiles at level 0" + (
        f"\n({SYNTHETIC_NOTE})" if trained_on(job.loaded) == "synthetic" else "")
    cells = np.full(len(geo.grid), np.nan)  # unscored tiles stay blank
    cells[keep] = probs
    plot_heatmap(folder / "heatmap.png", geo.grid, cells, title, (geo.width, geo.height), axes="level-0 px")
    plot_heatmap(folder / "overlay.png", geo.grid, cells, title, (geo.width, geo.height), tissue.thumbnail,
                 "level-0 px")
    # QuPath imports tiles as detections, `prob` as a measurement, tumour tiles in its Tumor class.
    features = [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [
        [[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]]}, "properties": {
        "objectType": "detection", "prob": p, "measurements": {"prob": p},
        **({"classification": {"name": "Tumor", "color": [200, 0, 0]}} if p >= job.threshold else {})}}
        for (y, x), p in zip(yx, probs.tolist(), strict=True)]
    disk.write_text(folder / "tiles.geojson", json.dumps({"type": "FeatureCollection", "features": features}))


def summarize(out: Path, rows: list[dict[str, Any]], labels: dict[str, int] | None) -> dict[str, Any] | None:
    """summary.csv (a label column with --labels); the slide-level AUROC of each score with the bootstrap's 95%
    interval over the labelled scored slides."""
    text = io.StringIO()
    writer = csv.DictWriter(text, [*COLUMNS, *(["label"] if labels else [])], lineterminator="\n")
    writer.writeheader()
    writer.writerows({**r, **({"label": labels.get(r["slide"], "")} if labels else {})} for r in rows)
    disk.write_text(out / "summary.csv", text.getvalue())
    if labels is None:
        return None
    done = [r for r in rows if r["status"] == "scored" and r["slide"] in labels]
    y = np.array([labels[r["slide"]] for r in done])
    result: dict[str, Any] = {"slides": len(y), "positive": int(y.sum())}
    if len(set(y.tolist())) < 2:
        return {**result, "error": "the scored slides hold one class only: no AUROC"}
    for score in ("max_prob", "top_k_mean"):
        p = np.array([r[score] for r in done])
        result[score] = {"auroc": binary_metrics(y, p)["auroc"], "ci95": confidence_intervals(y, p)["ci95"]["auroc"]}
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Everything `main` does; returns what DIR/summary.json records."""
    out = check_out(args)
    slides = ws.find_slides(args.slides)
    names = [p.stem for p in slides]
    if twice := sorted({n for n in names if names.count(n) > 1}):
        raise InputError(f"several slides are named {', '.join(twice)}: their outputs would share DIR/<name>; "
                         "score them into separate --out directories")
    labels = read_labels(args.labels, names) if args.labels else None
    loaded = load_for_inference(args.checkpoint, resolve_device(args.device), tta_views=args.tta_views,
                                quant=args.quant, precision=args.precision)
    threshold = resolve_threshold(args.threshold, loaded.operating_points, where=loaded.source["path"])
    if note := threshold_note(loaded.operating_points, loaded.settings, args.threshold):
        log.warning(note)
    if (model_mpp := loaded.settings.mpp) is None:  # a checkpoint from before data.mpp was recorded: PCam's
        model_mpp = conf_defaults("data", "pcam")["mpp"]
        log.info("%s records no µm/px (data.mpp): using PCam's %g", loaded.source["path"], model_mpp)
    source = Path(loaded.source["path"])
    job = Job(args, loaded, out, threshold, model_mpp,
              disk.sha256_file(source if source.is_file() else source / run_files.ARCHITECTURE))
    rows: dict[str, dict[str, Any]] = {}

    def attempt(path: Path, work: Any, *inputs: Any) -> Any:
        """`work(*inputs)`; with --skip-bad, a bad slide's summary row says why instead (the result is None)."""
        try:
            return work(*inputs)
        except ws.SlideError as err:
            if not args.skip_bad:
                raise
            rows[path.stem] = {"slide": path.stem, "status": "skipped", "reason": str(err)}

    def plan(path: Path) -> ws.Geometry:
        with ws.open_slide(path) as slide:
            return ws.geometry(slide, path, job.model_mpp, args.mpp, args.stride)

    # Every slide is opened before any is scored: a bad one (unreadable, no µm/px) stops the command here.
    plans = [(path, geo) for path in slides if (geo := attempt(path, plan, path)) is not None]
    for path, geo in plans:
        if (r := attempt(path, score_slide, path, geo, job)) is not None:
            rows[path.stem] = {"slide": path.stem, "status": "scored", "mpp": r["mpp"], "level": r["level"],
                               "tile": r["tile"], **{f"tiles_{k}": v for k, v in r["tiles"].items()},
                               "max_prob": r["score"]["max"], "top_k_mean": r["score"]["top_k_mean"],
                               "seconds": round(r["seconds"], 2)}
        summarize(out, [rows[n] for n in names if n in rows], None)  # the slides so far, in case of a kill
    ordered = [rows[n] for n in names]
    auroc = summarize(out, ordered, labels)
    record = {"checkpoint": str(source), "checkpoint_sha256": job.digest, "trained_on": trained_on(loaded),
              "settings": loaded.settings.to_dict(), "model_mpp": job.model_mpp,
              "threshold": threshold, "threshold_rule": args.threshold, "slides": len(slides),
              "scored": sum(r["status"] == "scored" for r in ordered),
              "skipped": [{"slide": r["slide"], "reason": r["reason"]} for r in ordered if r["status"] != "scored"],
              **({"labels": args.labels, "slide_auroc": auroc} if labels else {})}
    disk.write_json(out / "summary.json", record)
    return record


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = parser().parse_args(argv)
    try:
        record = run(args)
    except (UserError, ValueError) as err:
        return report_error(err, "pcamx.wsi")
    for item in record["skipped"]:
        print(f"skipped {item['slide']}: {item['reason']}", file=sys.stderr)
    print(f"{record['scored']} of {record['slides']} slide(s) scored → {Path(args.out) / 'summary.csv'}")
    for score, r in record.get("slide_auroc", {}).items():
        if isinstance(r, dict):
            print(f"slide AUROC ({score}): {r['auroc']:.4f} [{r['ci95'][0]:.4f}, {r['ci95'][1]:.4f}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
