"""Export a trained or compressed model as one ONNX graph: PCam patches as stored (uint8 NHWC) in, P(tumour) out.

    python -m pcamx.export CHECKPOINT --format onnx [--out model.onnx] [--dynamic-batch] [--tta-views 8]

The graph folds in all of `predict_batch` (scale, TTA views, antialiased resize, normalization, the fp32 model,
softmax, the mean over views) and is written only after ONNX Runtime has reproduced PyTorch on random and
PCam-layout patches to max |Δp| <= 1e-4. Exporter: torch.onnx.export(dynamo=True) at opset 18, the first with
Resize(antialias); the TorchScript exporter has no rot90 and no antialiased resize. Needs the `export` extra.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import pcamx
from pcamx.checkpoint import load_checkpoint
from pcamx.data.layout import IMAGE_SHAPE
from pcamx.data.synthetic import generate_split
from pcamx.data.transforms import TTA_VIEWS, check_tta_views, tta_views
from pcamx.evaluation.evaluate import predict_batch
from pcamx.inference.inputs import batches, discover
from pcamx.inference.scoring import threshold_note
from pcamx.inference.settings import InferenceSettings, settings_with
from pcamx.runtime import disk
from pcamx.runtime.errors import UserError
from pcamx.runtime.errors import report as report_error
from pcamx.runtime.timing import measure

log = logging.getLogger("pcamx")

FORMATS = ("onnx",)
OPSET = 18
TOLERANCE = 1e-4  # max |Δp| between ONNX Runtime and PyTorch (fp32) for an export to be written
INPUT_NAME = "images"
OUTPUT_NAME = "p_tumor"
EXPORT_DEPENDENCIES = ("onnx", "onnxscript", "onnxruntime")
INSTALL_HINT = "pip install -e '.[export]'"
INPUT_DOC = "uint8 (N, 96, 96, 3): RGB PCam patches, NHWC, 0-255, as stored in the *_x.h5 files"
OUTPUT_DOC = "float32 (N,): P(tumour), the mean over the TTA views of softmax(logits)[1]"
CHECK_SAMPLES = 16
LATENCY_ITERS = 20
LATENCY_WARMUP = 3


class ExportError(UserError, RuntimeError):
    """The model could not be exported, or the exported graph does not reproduce PyTorch."""


class ExportDependencyError(ImportError):
    """onnx / onnxscript / onnxruntime are not installed."""


def require_export_dependencies() -> None:
    """Import the export dependencies, or say how to install them."""
    missing = []
    for name in EXPORT_DEPENDENCIES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ExportDependencyError(f"ONNX export needs {', '.join(missing)}, not installed in this environment; "
                                    f"install the export extra: {INSTALL_HINT}")


class ExportedClassifier(nn.Module):
    """uint8 NHWC patches (N, H, W, 3) → P(tumour) float32 (N,): `predict_batch`'s computation (fp32) as one
    module, so that it exports as one graph. It calls the same transforms (`tta_views`) as evaluation."""

    def __init__(self, model: nn.Module, resolution: int, views: int = 1):
        super().__init__()
        self.model = model
        self.resolution = int(resolution)
        self.views = check_tta_views(int(views))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        n = images.shape[0]
        x = tta_views(images, self.resolution, self.views)  # (views·N, 3, R, R), view-major
        probs = torch.softmax(self.model(x).float(), dim=-1)[:, 1]
        return probs.view(self.views, n).mean(dim=0)


# ---------------------------------------------------------------- graph


def to_onnx(wrapper: ExportedClassifier, batch: int | None = 1):
    """The onnx.ModelProto of `wrapper`: a fixed batch of `batch` patches, or any batch when it is None."""
    require_export_dependencies()
    example = torch.zeros((2 if batch is None else batch, *IMAGE_SHAPE), dtype=torch.uint8)
    shapes = ({0: torch.export.Dim("batch")},) if batch is None else None
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's and transformers' tracing notes: parity is the judge
            program = torch.onnx.export(wrapper.eval(), (example,), dynamo=True, opset_version=OPSET,
                                        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                        dynamic_shapes=shapes, external_data=False, verbose=False)
    except Exception as err:
        raise ExportError(f"torch.onnx.export failed ({type(err).__name__}: {str(err).strip()[:2000]})") from err
    return program.model_proto


def set_metadata(proto: Any, metadata: Mapping[str, Any]) -> None:
    """Write `metadata` into the model's metadata_props (strings; non-strings as JSON), replacing old keys."""
    import onnx

    props = {p.key: p.value for p in proto.metadata_props}
    props.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    onnx.helper.set_model_props(proto, props)


def onnx_session(model: bytes | str | Path, threads: int | None = None):
    """An ONNX Runtime CPU session running on `threads` intra-op threads (default: torch's)."""
    require_export_dependencies()
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    source = str(model) if isinstance(model, str | Path) else model
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def graph_signature(proto: Any) -> dict[str, Any]:
    """{"input": (name, elem type name, shape), "output": ...}; a symbolic dimension shows by its name."""
    import onnx

    def describe(value: Any) -> dict[str, Any]:
        t = value.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in t.shape.dim]
        return {"name": value.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": dims}

    return {"input": [describe(v) for v in proto.graph.input], "output": [describe(v) for v in proto.graph.output]}


# ---------------------------------------------------------------- parity


def check_inputs(n: int = CHECK_SAMPLES, seed: int = 0, h5: str | Path | None = None) -> dict[str, np.ndarray]:
    """The patches an export is checked on: uniform random uint8 and real-layout patches (the first `n` of a
    PCam *_x.h5 file, else the synthetic generator's PCam-layout patches)."""
    rng = np.random.default_rng(seed)
    inputs = {"random": rng.integers(0, 256, (n, *IMAGE_SHAPE), dtype=np.uint8)}
    if h5 is None:
        inputs["synthetic"] = generate_split(n, seed, "test")[0]
    else:
        inputs["h5"] = read_h5_patches(h5, n)
    return inputs


def read_h5_patches(path: str | Path, n: int) -> np.ndarray:
    """The first `n` patches of a PCam x file (dataset "x", uint8 (N, 96, 96, 3)), read as predict reads it."""
    (source,) = discover([path])  # an InputError (a ValueError) names the file and what is wrong with it
    if source.kind != "h5":
        raise ValueError(f"--check-h5 {path}: give a PCam *_x.h5 file")
    return next(batches([source], n)).images.numpy()


def onnx_probabilities(session: Any, images: np.ndarray, batch: int) -> np.ndarray:
    """The exported graph's P(tumour) for `images`, fed `batch` patches at a time (a short last batch is
    padded with copies of its last patch, for a fixed-batch graph)."""
    probs = []
    for i in range(0, len(images), batch):
        chunk = images[i:i + batch]
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), axis=0)])
        probs.append(session.run(None, {INPUT_NAME: padded})[0][:len(chunk)])
    return np.concatenate(probs)


def check_parity(session: Any, wrapper: ExportedClassifier, inputs: Mapping[str, np.ndarray],
                 batch_sizes: Sequence[int], tolerance: float = TOLERANCE) -> dict[str, Any]:
    """max |Δp| between ONNX Runtime and `predict_batch` (fp32) per input kind and batch size; ExportError
    when the largest exceeds `tolerance`."""
    diffs = {}
    with torch.inference_mode():
        for kind, images in inputs.items():
            truth = predict_batch(wrapper.model, torch.from_numpy(images), wrapper.resolution, wrapper.views)
            for b in batch_sizes:
                got = onnx_probabilities(session, images, b)
                diffs[f"{kind}@batch{b}"] = float(np.abs(got.astype(np.float64) - truth.double().numpy()).max())
    worst = max(diffs, key=lambda k: (np.nan_to_num(diffs[k], nan=np.inf), k))
    report = {"max_abs_diff": diffs[worst], "tolerance": tolerance, "per_input": diffs,
              "samples": {kind: len(images) for kind, images in inputs.items()}, "batch_sizes": list(batch_sizes)}
    if not diffs[worst] <= tolerance:  # NaN fails too
        raise ExportError(f"the ONNX graph does not reproduce PyTorch: max |Δp| = {diffs[worst]:.3g} on {worst} "
                          f"(tolerance {tolerance:g}); nothing was written")
    return report


# ---------------------------------------------------------------- latency


def compare_latency(session: Any, wrapper: ExportedClassifier, batch: int = 1, iters: int = LATENCY_ITERS,
                    warmup: int = LATENCY_WARMUP) -> dict[str, Any]:
    """ONNX Runtime CPU vs PyTorch CPU (`predict_batch`, fp32) median ms for `batch` patches, both on torch's
    thread count (the session should have been made with it: `onnx_session`)."""
    images = generate_split(batch, 1, "test")[0]
    tensor = torch.from_numpy(images)
    with torch.inference_mode():
        torch_ms = measure(lambda: predict_batch(wrapper.model, tensor, wrapper.resolution, wrapper.views),
                           warmup=warmup, samples=iters, calls=1).median_ms
    onnx_ms = measure(lambda: session.run(None, {INPUT_NAME: images}), warmup=warmup, samples=iters, calls=1).median_ms
    return {"batch": batch, "tta_views": wrapper.views, "resolution": wrapper.resolution,
            "threads": torch.get_num_threads(), "iters": iters, "warmup": warmup,
            "onnxruntime_cpu_ms": onnx_ms, "pytorch_cpu_ms": torch_ms, "speedup": torch_ms / onnx_ms}


# ---------------------------------------------------------------- one export


def _thresholds(points: Mapping[str, Any] | None, resolution: int, views: int) -> dict[str, Any]:
    """The operating points' metadata; a warning when they were chosen with other inference settings."""
    if not points:
        return {}
    note = threshold_note(points, InferenceSettings(resolution, views))
    if note:
        log.warning(note.replace("--quant / --precision", "settings (the export runs in fp32)"))
    return {"pcamx.thresholds": points.get("thresholds") or {}, "pcamx.operating_points": points}


def export_onnx(checkpoint: str | Path, out: str | Path = "model.onnx", *, tta_views: int | None = None,
                resolution: int | None = None, dynamic_batch: bool = False, batch: int = 1,
                check_samples: int = CHECK_SAMPLES, check_h5: str | Path | None = None,
                tolerance: float = TOLERANCE, latency_iters: int = LATENCY_ITERS) -> dict[str, Any]:
    """Export `checkpoint` to `out` (ONNX) and `<out>.json`; returns what the JSON records. Nothing is
    written unless ONNX Runtime reproduces PyTorch within `tolerance` (else ExportError)."""
    require_export_dependencies()
    if batch < 1 or check_samples < 1:
        raise ValueError(f"--batch and --check-samples must be >= 1, got {batch} and {check_samples}")
    out = disk.check_writable(out, "--out")
    disk.check_writable(report_path(out), "--out")
    model, source = load_checkpoint(checkpoint, {})
    settings, points = settings_with(source, resolution=resolution, tta_views=tta_views)
    views = settings.tta_views
    if settings.precision != "fp32" or settings.quant != "none":
        log.info("exporting in fp32; the run evaluated this model with precision=%s, quantization=%s",
                 settings.precision, settings.quant)
    wrapper = ExportedClassifier(model.float().eval(), settings.resolution, views).eval()
    proto = to_onnx(wrapper, None if dynamic_batch else batch)
    session = onnx_session(proto.SerializeToString())
    batch_sizes = [1, max(2, check_samples)] if dynamic_batch else [batch]
    parity = check_parity(session, wrapper, check_inputs(check_samples, h5=check_h5), batch_sizes, tolerance)
    latency = compare_latency(session, wrapper, 1 if dynamic_batch else batch, latency_iters)
    settings_record = {"resolution": settings.resolution, "tta_views": views, "precision": "fp32",
                       "batch": "dynamic" if dynamic_batch else batch, "opset": OPSET,
                       "checkpoint_settings": settings.to_dict()}
    set_metadata(proto, {"pcamx.version": pcamx.__version__, "pcamx.source": str(source["path"]),
                         "pcamx.resolution": str(settings.resolution), "pcamx.tta_views": str(views),
                         "pcamx.input": INPUT_DOC, "pcamx.output": OUTPUT_DOC,
                         "pcamx.parity_max_abs_diff": f"{parity['max_abs_diff']:.3g}",
                         **_thresholds(points, settings.resolution, views)})
    proto.doc_string = f"pcamx {pcamx.__version__} PCam classifier. input {INPUT_DOC}; output {OUTPUT_DOC}"
    data = proto.SerializeToString()
    out = Path(out)
    with disk.atomic_path(out, len(data)) as tmp:
        tmp.write_bytes(data)
    record = {"format": "onnx", "onnx": str(out), "bytes": len(data), "checkpoint": source,
              "settings": settings_record, "signature": graph_signature(proto), "parity": parity,
              "latency": latency, "operating_points": points, "pcamx_version": pcamx.__version__}
    disk.write_json(report_path(out), record)
    return record


def report_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".json")


# ---------------------------------------------------------------- CLI


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pcamx.export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("checkpoint", type=Path, help="a run directory, its best.pt / last.pt, or its compressed/ dir")
    p.add_argument("--format", required=True, choices=FORMATS, help="export format (only onnx so far)")
    p.add_argument("--out", type=Path, default=Path("model.onnx"),
                   help="the file to write (default: model.onnx); the report goes to OUT.json beside it")
    p.add_argument("--dynamic-batch", action="store_true",
                   help="any batch size N (checked at two); default: a fixed batch of --batch patches")
    p.add_argument("--batch", type=int, default=1, help="patches per call of a fixed-batch graph (default 1)")
    p.add_argument("--tta-views", type=int, choices=sorted(TTA_VIEWS), default=None,
                   help="TTA views folded into the graph: 1 none, 6 the reference's set, 8 the dihedral group "
                        "(default: the checkpoint's setting)")
    p.add_argument("--resolution", type=int, default=None,
                   help="the model's input size in px, patches resized to it (default: the checkpoint's setting)")
    p.add_argument("--check-samples", type=int, default=CHECK_SAMPLES,
                   help=f"patches of each kind (random, real-layout) in the parity check (default {CHECK_SAMPLES})")
    p.add_argument("--check-h5", type=Path, default=None,
                   help="a PCam *_x.h5 whose first patches are the real-layout check inputs "
                        "(default: synthetic PCam-layout patches)")
    p.add_argument("--tolerance", type=float, default=TOLERANCE,
                   help=f"largest |Δp| allowed between ONNX Runtime and PyTorch (default {TOLERANCE:g})")
    p.add_argument("--latency-iters", type=int, default=LATENCY_ITERS,
                   help=f"timed calls per latency figure, median reported (default {LATENCY_ITERS})")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for both PyTorch and ONNX Runtime (default: torch's)")
    return p


def summary(record: Mapping[str, Any]) -> str:
    s, lat, parity = record["settings"], record["latency"], record["parity"]
    return (f"wrote {record['onnx']} ({record['bytes'] / 1e6:.1f} MB; opset {s['opset']}; input uint8 "
            f"(N, 96, 96, 3) with N = {s['batch']}; output P(tumour); {s['tta_views']} TTA view(s) at "
            f"{s['resolution']} px) and {report_path(record['onnx'])}\n"
            f"parity: max |Δp| = {parity['max_abs_diff']:.2g} (tolerance {parity['tolerance']:g})\n"
            f"CPU latency, batch {lat['batch']}, {lat['threads']} thread(s): onnxruntime "
            f"{lat['onnxruntime_cpu_ms']:.2f} ms, PyTorch {lat['pytorch_cpu_ms']:.2f} ms "
            f"(PyTorch / onnxruntime = {lat['speedup']:.2f})")


def main(argv: Sequence[str] | None = None) -> int:
    # Warnings from everyone, our own notes too; not the exporter's optimizer, which logs each rewrite at INFO.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    log.setLevel(logging.INFO)
    args = parser().parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser().error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    try:
        record = export_onnx(args.checkpoint, args.out, tta_views=args.tta_views, resolution=args.resolution,
                             dynamic_batch=args.dynamic_batch, batch=args.batch, check_samples=args.check_samples,
                             check_h5=args.check_h5, tolerance=args.tolerance, latency_iters=args.latency_iters)
    except (ExportDependencyError, UserError, ValueError) as err:
        return report_error(err, "pcamx.export")
    print(summary(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
