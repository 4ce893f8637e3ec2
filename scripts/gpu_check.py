"""pcamx's GPU check (run it through scripts/gpu_check.sh or `make gpu-check`): one prepared command for a
short GPU window that tells everything at once.

Steps, each time-boxed and reported even when an earlier one failed:
  install      the wheels of scripts/gpu-wheels.txt (`make gpu-wheels`) and pcamx itself, pip --no-index
  imports      every module the check uses, and that torch sees a CUDA device
  pytest_cuda  `pytest -m cuda`: the CUDA-only tests
  e2e          run.py with the ViT-S/16 architecture (random init, save_pretrained) at 224 px on synthetic
               patches: method=lora, bf16 + torch.compile, 1 epoch; then compress + bf16 and + int8 from its
               checkpoint; every artifact checked; python -m pcamx.predict with the trained and the int8
               model on the test file (against their predictions.csv) and on a synthetic region
  bench        python -m benchmarks --device cuda, sized to fit
The report (GPU, driver, versions, each step with its time, the bench tables) is printed and written with
the logs into --out. --quick fits in about 3.5 minutes, the full check in about 9 on one H200. --dry-run
checks every step's command without CUDA or wheels: the installs are listed, the imports tried, the CUDA
tests collected, the run.py commands composed (--cfg job) and the bench arguments parsed.

Standard library only: nothing else may be importable before the install step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEEL_LIST = REPO / "scripts" / "gpu-wheels.txt"
IMPORTS = ("torch", "torchvision", "transformers", "peft", "h5py", "sklearn", "matplotlib", "tqdm", "safetensors",
           "pytest", "yaml", "cloudpickle", "omegaconf", "hydra", "hydra_plugins.hydra_submitit_launcher",
           "submitit", "ptflops", "torchao", "pcamx")
# Seconds per step (full, quick), and for the whole check: sized by estimate for one H200 with 16 cores
# (the CPU-side parts measured on a 2-core machine: 10k synthetic patches in 25 s, the wheels in 5 s).
BUDGETS = {"install": (60, 60), "imports": (60, 45), "pytest_cuda": (120, 75), "e2e": (280, 130),
           "bench": (210, 60)}
TOTAL = {"full": 520, "quick": 210}
# The end-to-end run: patches per split, and the settings that differ between the modes.
E2E = {"full": {"n_train": 8192, "n_valid": 1024, "n_test": 1024, "compile": "true", "resolution": 224, "batch": 256},
       "quick": {"n_train": 2048, "n_valid": 256, "n_test": 256, "compile": "false", "resolution": 224, "batch": 256},
       # --device cpu, the developers' smoke test of the chain: the same commands, sizes a CPU can run.
       "cpu": {"n_train": 512, "n_valid": 64, "n_test": 64, "compile": "false", "resolution": 32, "batch": 64}}
# The wsi section is left out: it measures CPU figures (pcamx.wsi on the CPU beside the per-tile script).
GPU_SECTIONS = "pipeline,eval,train,compress,mfu"
BENCH = {"full": ["--batch-size", "256", "--duration", "1.0", "--repeats", "2", "--sections", GPU_SECTIONS],
         "quick": ["--quick", "--batch-size", "64", "--eval-batch-size", "64", "--sections", GPU_SECTIONS]}
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pcamx.runtime import run_files  # noqa: E402  (file names only: no torch needed to read them)

RUN_FILES = (run_files.METRICS, run_files.PREDICTIONS, run_files.ROC, run_files.RESOLVED_CONFIG)


@dataclass
class Step:
    name: str
    commands: list[list[str]]  # run in order; the step fails at the first that fails
    check: list[str] = field(default_factory=list)  # the dry-run's commands instead
    status: str = "not run"
    seconds: float = 0.0
    budget: float = 0.0
    note: str = ""


def python() -> str:
    return os.environ.get("PYTHON", sys.executable)


def wheel_names() -> list[str]:
    return [line.split("==")[0].strip() for line in WHEEL_LIST.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def wheels_present(wheels: Path) -> tuple[list[Path], list[str]]:
    """(the wheel files for the list, the list's names with no wheel in `wheels`)."""
    files = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    have = {re.sub(r"[-_.]+", "_", f.name.split("-")[0]).lower(): f for f in files}
    missing = [n for n in wheel_names() if re.sub(r"[-_.]+", "_", n).lower() not in have]
    return files, missing


def run_py(*args: str) -> list[str]:
    return [python(), "run.py", *args]


def build_steps(mode: str, work: Path, out: Path, wheels: Path, site: Path, device: str = "cuda") -> list[Step]:
    e2e = E2E["cpu" if device == "cpu" else mode]
    weights, data = work / "vits16", work / "data"
    train_dir, sweep_dir = work / "e2e-train", work / "e2e-compress"
    common = ["data=synthetic", f"data.root={data}", f"data.n_train={e2e['n_train']}",
              f"data.n_valid={e2e['n_valid']}", f"data.n_test={e2e['n_test']}", "data.seed=0",
              "model=dinov3_vits16", f"model.name_or_path={weights}", f"hardware={device}",
              f"data.resolution={e2e['resolution']}"]
    train = [*common, "method=lora", "train.precision=bf16", f"hardware.compile={e2e['compile']}",
             "train.epochs=1", f"data.batch_size={e2e['batch']}", f"data.eval_batch_size={e2e['batch']}",
             "train.warmup_steps=4"]
    compress = [*common, "method=lora", f"checkpoint={train_dir}", "prune=all", "prune.tau=0.95", "quant=bf16,int8"]
    save_weights = [python(), "-c", "import sys; from transformers import DINOv3ViTModel; "
                    "from pcamx.model import architecture; "
                    "DINOv3ViTModel(architecture('vits16')).save_pretrained(sys.argv[1])", str(weights)]
    check_files = [python(), str(REPO / "scripts" / "gpu_check.py"), "--check-e2e", str(train_dir), str(sweep_dir),
                   "--out", str(out)]
    # The trained and the int8 model used as users do (python -m pcamx.predict) on the test file and a region.
    test_x = data / "camelyonpatch_level_2_split_test_x.h5"
    predict = [python(), "-m", "pcamx.predict", "--device", device, "--threshold", "val95spec"]
    use = [[*predict, str(train_dir), str(test_x), "--out", str(out / "predict_train.csv")],
           [*predict, str(sweep_dir / "1"), str(test_x), "--out", str(out / "predict_int8.csv")],
           [python(), "-m", "pcamx.data.synthetic", "--region", str(work / "region.png"), "--grid", "8x12"],
           [*predict, str(train_dir), "--region", str(work / "region.png"), "--stride", "48",
            "--out", str(out / "region_tiles.csv")]]
    bench_args = ["--device", "cuda", "--out", str(out / "bench.json"), "--data-dir", str(work / "bench-data"),
                  *BENCH[mode]]
    files, _ = wheels_present(wheels)
    pip = [python(), "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--upgrade", "--target", str(site)]
    import_check = [python(), "-c", IMPORT_CHECK, *IMPORTS]
    return [
        Step("install", [[*pip, *map(str, files)], [*pip, "--no-build-isolation", str(REPO)]],
             check=[python(), str(REPO / "scripts" / "gpu_check.py"), "--check-wheels", str(wheels)]),
        Step("imports", [[*import_check, "--need-cuda"]], check=import_check),
        Step("pytest_cuda", [[python(), "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "tests"]],
             check=[python(), "-m", "pytest", "-m", "cuda", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"]),
        Step("e2e", [save_weights, run_py(*train, f"hydra.run.dir={train_dir}"),
                     run_py("-m", *compress, f"hydra.sweep.dir={sweep_dir}"), *use, check_files],
             # A single composition has no comma lists: the sweep's quant=bf16,int8 is checked as int8.
             check=[python(), str(REPO / "scripts" / "gpu_check.py"), "--compose",
                    json.dumps([train, ["quant=int8" if a.startswith("quant=") else a for a in compress]])]),
        Step("bench", [[python(), "-m", "benchmarks", *bench_args]],
             check=[python(), "-c", "import sys; from benchmarks.cli import build_parser; "
                    "print(build_parser().parse_args(sys.argv[1:]))", *bench_args]),
    ]


IMPORT_CHECK = """
import importlib, sys
need_cuda = "--need-cuda" in sys.argv
failed = []
for name in [a for a in sys.argv[1:] if not a.startswith("--")]:
    try:
        module = importlib.import_module(name)
        print(f"ok {name} {getattr(module, '__version__', '')}")
    except Exception as err:
        failed.append(name)
        print(f"FAILED {name}: {type(err).__name__}: {err}")
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
      f"cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    print(f"device: {torch.cuda.get_device_name(0)}, capability {torch.cuda.get_device_capability(0)}, "
          f"bf16 supported: {torch.cuda.is_bf16_supported()}")
if failed or (need_cuda and not torch.cuda.is_available()):
    sys.exit(f"missing: {failed}" if failed else "torch sees no CUDA device")
"""


def shown(command: list[str]) -> str:
    """The command as a shell line, an inline `-c` program abbreviated."""
    return shlex.join(a if "\n" not in a and len(a) < 300 else "<inline program>" for a in command)


def run_step(step: Step, dry_run: bool, budget: float, env: dict[str, str], log: Path) -> None:
    step.budget = budget
    commands = [step.check] if dry_run else step.commands
    started = time.perf_counter()
    with open(log, "w") as f:
        for command in commands:
            remaining = budget - (time.perf_counter() - started)
            f.write(f"$ {shown(command)}\n")
            f.flush()
            if remaining <= 0:
                step.status, step.note = "timed out", f"budget of {budget:.0f} s used up"
                break
            try:
                proc = subprocess.run(command, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                      timeout=remaining)
            except subprocess.TimeoutExpired:
                step.status, step.note = "timed out", f"after {budget:.0f} s, in: {shown(command)[:120]}"
                break
            if proc.returncode != 0:
                step.status, step.note = "failed", f"exit {proc.returncode}: {shown(command)[:120]}"
                break
        else:
            step.status = "checked" if dry_run else "ok"
    step.seconds = time.perf_counter() - started
    tail = log.read_text().strip().splitlines()[-1:] if log.exists() else []
    if step.status not in ("ok", "checked") and tail:
        step.note += f" — {tail[0][:200]}"


def gpu_facts() -> dict[str, str]:
    facts = {"python": platform.python_version(), "host": platform.node(), "cpus": str(os.cpu_count())}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        facts["gpu"] = smi.stdout.strip() or smi.stderr.strip() or "nvidia-smi printed nothing"
    except (OSError, subprocess.SubprocessError) as err:
        facts["gpu"] = f"no nvidia-smi ({type(err).__name__})"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=5).stdout.strip()
        facts["commit"] = commit or "unknown"
    except (OSError, subprocess.SubprocessError):
        facts["commit"] = "unknown"
    return facts


def report(steps: list[Step], mode: str, dry_run: bool, facts: dict[str, str], out: Path, total: float) -> str:
    title = "dry run (no GPU needed)" if dry_run else f"{mode} check"
    lines = [f"# pcamx GPU check — {title}", "",
             f"- GPU: {facts['gpu']}", f"- host: {facts['host']}, {facts['cpus']} CPUs, Python {facts['python']}",
             f"- pcamx commit: {facts['commit']}; {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; total {total:.0f} s", ""]
    versions = out / "imports.log"
    if versions.exists():
        kept = [line for line in versions.read_text().splitlines()
                if line.startswith(("ok ", "FAILED ", "torch ", "device: ", "missing: "))]
        lines += ["```", *kept, "```", ""]
    lines += ["| step | status | seconds | budget | log | note |", "| --- | --- | ---: | ---: | --- | --- |"]
    for step in steps:
        note = step.note.replace("|", "\\|")
        lines.append(f"| {step.name} | {step.status} | {step.seconds:.0f} | {step.budget:.0f} | "
                     f"{step.name}.log | {note} |")
    pytest_log = out / "pytest_cuda.log"
    if pytest_log.exists():
        summary = [line for line in pytest_log.read_text().splitlines()
                   if re.search(r"\d+ (passed|failed|errors?|skipped)|tests? collected", line)]
        lines += ["", f"pytest -m cuda: {summary[-1] if summary else 'no summary line (see pytest_cuda.log)'}"]
    e2e = out / "e2e_metrics.json"
    if e2e.exists():
        lines += ["", "## End to end (ViT-S/16, random init, synthetic data — not PCam)", ""]
        lines += ["| run | status | train steps | train s | AUROC | eval precision | GFLOPs | memory MB |",
                  "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: |"]
        for name, m in json.loads(e2e.read_text()).items():
            auroc = f"{m['auroc']:.4f}" if isinstance(m.get("auroc"), float) else "—"
            cells = [name, m.get("status"), m.get("train_steps"), m.get("train_seconds"), auroc,
                     m.get("eval_precision"), m.get("gflops"), m.get("memory_mb")]
            lines.append("| " + " | ".join("—" if c is None else str(c) for c in cells) + " |")
    bench_md = out / "bench.log"
    if bench_md.exists() and (out / "bench.json").exists():
        text = bench_md.read_text()
        start = text.find("## pcamx bench")
        if start >= 0:
            lines += ["", text[start:].split("\n[benchmarks]")[0].strip()]
    return "\n".join(lines) + "\n"


def check_wheels(wheels: Path) -> int:
    files, missing = wheels_present(wheels)
    for f in files:
        print(f"would install {f.name}")
    print(f"would install pcamx from {REPO} (--no-deps --no-build-isolation)")
    if missing:
        print(f"missing wheels in {wheels}: {', '.join(missing)}; run `make gpu-wheels` first")
        return 1
    return 0


def check_e2e(train_dir: Path, sweep_dir: Path, out: Path) -> int:
    """Every artifact of the end-to-end runs is there and says ok; their metrics go into e2e_metrics.json."""
    problems, metrics = [], {}
    runs = {"train": train_dir, **{f"compress/{d.name}": d for d in sorted(sweep_dir.glob("[0-9]*"))}}
    if len(runs) != 3:
        problems.append(f"expected the training run and 2 compressed runs, found {sorted(runs)}")
    for name, run_dir in runs.items():
        compressed = (f"{run_files.COMPRESSED}/{run_files.WEIGHTS}", f"{run_files.COMPRESSED}/{run_files.ARCHITECTURE}")
        wanted = [*RUN_FILES, *(run_files.TRAIN_CHECKPOINTS if name == "train" else compressed)]
        problems += [f"{name}: no {f}" for f in wanted if not (run_dir / f).is_file()]
        if (run_dir / run_files.METRICS).is_file():
            m = json.loads((run_dir / run_files.METRICS).read_text())
            metrics[name] = {k: m.get(k) for k in ("status", "auroc", "train_steps", "train_seconds", "eval_precision",
                                                   "train_precision", "gflops", "memory_mb", "quant", "device")}
            if m.get("status") != "ok":
                problems.append(f"{name}: status {m.get('status')}: {m.get('error')}")
    problems += [f"sweep: no {f}" for f in ("summary.md", "summary.csv") if not (sweep_dir / f).is_file()]
    for csv_name, run_dir in (("predict_train.csv", train_dir), ("predict_int8.csv", sweep_dir / "1")):
        problems += predict_agreement(out / csv_name, run_dir, metrics)
    (out / "e2e_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    for p in problems:
        print(f"missing or not ok: {p}")
    print(json.dumps(metrics, indent=2))
    return 1 if problems else 0


def _probs(path: Path, column: str = "prob") -> list[float]:
    with open(path) as f:
        rows = f.read().splitlines()
    header = rows[0].split(",")
    return [float(r.split(",")[header.index(column)]) for r in rows[1:]]


def predict_agreement(csv_path: Path, run_dir: Path, metrics: dict) -> list[str]:
    """`python -m pcamx.predict` on the test file gives the run's own predictions.csv (max |Δp| recorded)."""
    if not csv_path.is_file() or not (run_dir / run_files.PREDICTIONS).is_file():
        return [f"{csv_path.name}: not written"]
    got, want = _probs(csv_path), _probs(run_dir / run_files.PREDICTIONS)
    if len(got) != len(want):
        return [f"{csv_path.name}: {len(got)} rows, the run's predictions.csv has {len(want)}"]
    worst = max(abs(a - b) for a, b in zip(got, want, strict=True))
    metrics[csv_path.name] = {"max_abs_diff_vs_predictions_csv": worst}
    return [f"{csv_path.name}: max |Δp| {worst:.3g} against {run_dir}/predictions.csv"] if worst > 1e-4 else []


def compose(commands: list[list[str]]) -> int:
    """Each run.py command composes (`--cfg job`): every override names a real key or option."""
    status = 0
    for args in commands:
        proc = subprocess.run(run_py(*args, "--cfg", "job"), cwd=REPO, capture_output=True, text=True, timeout=120)
        print(f"{'ok' if proc.returncode == 0 else 'FAILED'}: run.py {shlex.join(args)}")
        if proc.returncode != 0:
            print(proc.stderr[-2000:])
            status = 1
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="check every step's command; no GPU needed")
    parser.add_argument("--quick", action="store_true", help="the short version (about 3.5 minutes)")
    parser.add_argument("--out", type=Path, default=Path("."), help="where the report and logs go (default: .)")
    parser.add_argument("--wheels", type=Path, default=REPO / ".whl", help="the wheels of `make gpu-wheels`")
    parser.add_argument("--steps", default=",".join(BUDGETS), help=f"a subset of {','.join(BUDGETS)}")
    # Developers' smoke test of the step chain without a GPU (slow: ViT-S/16 on the CPU).
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--check-wheels", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--check-e2e", type=Path, nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--compose", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.check_wheels:
        return check_wheels(args.check_wheels)
    if args.check_e2e:
        return check_e2e(*args.check_e2e, args.out)
    if args.compose:
        return compose(json.loads(args.compose))

    mode = "quick" if args.quick else "full"
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="pcamx-gpu-check-"))
    site = work / "site"
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(site), str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    wanted = [s.strip() for s in args.steps.split(",") if s.strip()]
    if unknown := sorted(set(wanted) - set(BUDGETS)):
        parser.error(f"unknown steps {unknown}; choose from {', '.join(BUDGETS)}")
    steps = [s for s in build_steps(mode, work, out, args.wheels.resolve(), site, args.device) if s.name in wanted]
    try:
        return run_steps(steps, mode, args.dry_run, env, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_steps(steps: list[Step], mode: str, dry_run: bool, env: dict[str, str], out: Path) -> int:
    started = time.perf_counter()
    for step in steps:
        left = TOTAL[mode] - (time.perf_counter() - started)
        budget = BUDGETS[step.name][mode == "quick"]
        if not dry_run and left < 10:
            step.status, step.note = "skipped", f"the check's {TOTAL[mode]} s are used up"
            continue
        print(f"[gpu-check] {step.name} ...", flush=True)
        run_step(step, dry_run, budget if dry_run else min(budget, left), env, out / f"{step.name}.log")
        print(f"[gpu-check] {step.name}: {step.status} in {step.seconds:.0f} s {step.note}", flush=True)
    text = report(steps, mode, dry_run, gpu_facts(), out, time.perf_counter() - started)
    (out / "gpu_check.md").write_text(text)
    print(text)
    return 0 if all(s.status in ("ok", "checked") for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
