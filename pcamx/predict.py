"""Score new patches, or a whole region, with a model pcamx trained or compressed.

    python -m pcamx.predict CHECKPOINT INPUT... [--out preds.csv] [--threshold val95spec]
    python -m pcamx.predict CHECKPOINT --region big.png --tile 96 --stride 48 [--out tiles.csv]

Patches are fed exactly as the run's test evaluation fed them (the settings stored with the model, each
overridable); a JSON beside the CSV records how every number was made.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from pcamx.compress.quant import QUANT_MODES
from pcamx.data.transforms import TTA_VIEWS
from pcamx.evaluation.operating_points import THRESHOLD_RULES, resolve_threshold
from pcamx.inference.inputs import InputError, Skipped, batches, discover
from pcamx.inference.region import MAX_PIXELS, TileGrid, read_region, tile_batches
from pcamx.inference.scoring import SYNTHETIC_NOTE, predict_all, threshold_note, trained_on, write_csv
from pcamx.inference.settings import LoadedModel, load_for_inference
from pcamx.report.heatmap import plot_heatmap
from pcamx.runtime import disk
from pcamx.runtime.errors import UserError
from pcamx.runtime.errors import report as report_error
from pcamx.runtime.hardware import DEVICES, PRECISIONS, resolve_device

log = logging.getLogger("pcamx")
DEFAULT_BATCH = 64
def describe(loaded: LoadedModel, args: argparse.Namespace, threshold: float, n: int, skipped: Skipped,
             note: str | None) -> dict[str, Any]:
    points = loaded.operating_points or {}
    data = trained_on(loaded)
    return {
        "checkpoint": loaded.source["path"], "checkpoint_kind": loaded.source.get("kind"),
        "method": loaded.source.get("method"), "trained_on": data,
        **({"note": SYNTHETIC_NOTE} if data == "synthetic" else {}),
        "settings": loaded.settings.to_dict(), "device": str(loaded.device),
        "threshold": {"rule": args.threshold, "value": threshold,
                      **({"chosen_on": {k: points.get(k) for k in ("split", "n", "measured_with")}}
                         if args.threshold in points.get("thresholds", {}) and args.threshold != "0.5" else {}),
                      **({"warning": note} if note else {})},
        "n": n, "skipped": [{"path": p, "reason": r} for p, r in skipped.items],
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pcamx.predict", description=__doc__.split("\n\n")[0],
        epilog="Inputs: image files (" + ", ".join(("PNG", "JPEG", "TIFF")) + ", RGB, any size: resized to the "
               "model's resolution as in training), folders of them (searched recursively), PCam-layout *_x.h5 "
               "files, .npy uint8 (N, H, W, 3) arrays. Exit status 2 for bad input or checkpoint.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="a run directory, its best.pt / last.pt, or its compressed/ directory")
    p.add_argument("inputs", nargs="*", help="image files, folders, *_x.h5 or .npy files")
    p.add_argument("--region", help="a large RGB image (PNG/TIFF) to tile; writes the per-tile CSV and a heatmap")
    p.add_argument("--tile", type=int, default=96, help="--region: tile size in pixels (PCam patches are 96 px)")
    p.add_argument("--stride", type=int, default=None, help="--region: step between tiles (default: --tile)")
    p.add_argument("--heatmap", help="--region: heatmap image path (default: heatmap.png beside --out)")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                   help="--region: refuse larger images (decoding takes about 4 bytes a pixel)")
    p.add_argument("--out", help="CSV to write (default preds.csv; tiles.csv with --region); a .json with the "
                                 "same stem records how it was made")
    p.add_argument("--threshold", default="0.5",
                   help=f"decision threshold: {' | '.join(THRESHOLD_RULES)} (chosen on the run's validation "
                        "split, stored with the model) or a number in [0, 1]")
    p.add_argument("--tta-views", type=int, choices=sorted(TTA_VIEWS), help="override the run's TTA views")
    p.add_argument("--quant", choices=QUANT_MODES, help="override the run's quantization")
    p.add_argument("--precision", choices=PRECISIONS, help="override the run's autocast precision (unquantized)")
    p.add_argument("--resolution", type=int, help="override the model's input resolution (needed only for a "
                                                  "checkpoint that records none and has no run config beside it)")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
    p.add_argument("--workers", type=int, default=4, help="threads decoding image files")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave out unreadable or non-RGB inputs (listed on stderr and in the .json) instead of "
                        "stopping at the first")
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Everything `main` does, returning what the .json beside the CSV records."""
    if bool(args.inputs) == bool(args.region):
        raise InputError("give either INPUT files/folders or --region IMAGE (not both, not neither)")
    for flag, value in (("--batch-size", args.batch_size), ("--workers", args.workers), ("--tile", args.tile),
                        ("--stride", args.stride or args.tile), ("--max-pixels", args.max_pixels)):
        if value < 1:
            raise InputError(f"{flag} must be >= 1, got {value}")
    out = disk.check_writable(args.out or ("tiles.csv" if args.region else "preds.csv"), "--out")
    disk.check_writable(out.with_suffix(".json"), "--out")
    heatmap = disk.check_writable(args.heatmap or out.with_name("heatmap.png"), "--heatmap") if args.region else None
    loaded = load_for_inference(args.checkpoint, resolve_device(args.device), resolution=args.resolution,
                                tta_views=args.tta_views, quant=args.quant, precision=args.precision)
    threshold = resolve_threshold(args.threshold, loaded.operating_points, where=loaded.source["path"])
    note = threshold_note(loaded.operating_points, loaded.settings, args.threshold)
    if note:
        log.warning(note)
    skipped = Skipped()
    if args.region:
        image = read_region(args.region, args.max_pixels)
        grid = TileGrid(image.height, image.width, args.tile, args.stride or args.tile)
        preds = predict_all(loaded, tile_batches(image, grid, args.batch_size, str(args.region)), len(grid),
                            desc="tiles")
        origins = [grid.origin(i) for i in preds.indices]
        rows, cols = grid.shape
        write_csv(out, preds, threshold, {"row": [i // cols for i in preds.indices],
                                          "col": [i % cols for i in preds.indices],
                                          "y": [o[0] for o in origins], "x": [o[1] for o in origins]})
        data = trained_on(loaded)
        title = (f"P(tumour) over {Path(args.region).name}: {rows}×{cols} tiles of {grid.tile} px, stride "
                 f"{grid.stride}" + (f"\n({SYNTHETIC_NOTE})" if data == "synthetic" else ""))
        plot_heatmap(heatmap, grid, preds.probs, title, image.size, image)
        extra = {"region": str(args.region), "tile": grid.tile, "stride": grid.stride, "grid": [rows, cols],
                 "heatmap": str(heatmap)}
    else:
        sources = discover(args.inputs, skipped if args.skip_bad else None)
        total = sum(s.count for s in sources)
        preds = predict_all(loaded, batches(sources, args.batch_size, skipped if args.skip_bad else None,
                                            args.workers), total)
        if not len(preds.probs):
            raise InputError(f"every input was skipped as unreadable ({len(skipped.items)}); nothing to predict")
        write_csv(out, preds, threshold)
        extra = {}
    record = {**describe(loaded, args, threshold, len(preds.probs), skipped, note), **extra, "csv": str(out)}
    disk.write_json(out.with_suffix(".json"), record)
    return record


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = parser().parse_args(argv)
    try:
        record = run(args)
    except (UserError, ValueError) as err:
        return report_error(err, "pcamx.predict")
    for item in record["skipped"]:
        print(f"skipped {item['path']}: {item['reason']}", file=sys.stderr)
    where = f" ({record['note']})" if "note" in record else ""
    print(f"{record['n']} patches → {record['csv']}" + (f", heatmap {record['heatmap']}" if "heatmap" in record
                                                          else "")
          + f"; threshold {record['threshold']['rule']} = {record['threshold']['value']:.6g}"
          + (f"; {len(record['skipped'])} input(s) skipped" if record["skipped"] else "") + where)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
