"""Sweep tables from fabricated run directories: no training, a few seconds in all."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import CONF, PNG_MAGIC, REFERENCE, make_run, read_csv, run_metrics, table_rows
from pcamx.report import callback as callback_module
from pcamx.report.__main__ import main as cli
from pcamx.report.callback import SweepSummaryCallback, log_to_wandb
from pcamx.report.format import format_cell
from pcamx.report.runs import collect_runs, format_pruning
from pcamx.report.summary import summarize, write_summary


def make_sweep(root: Path, failing: bool = True) -> Path:
    """Jobs 0-3 ok (two uncompressed references, two compressed lora runs), 4 failed, 5 missing."""
    heads = {"method": "heads", "tau_heads": 0.89, "tau_mlp": None, "tau_svd": None}
    make_run(root, "0", ["method=lora", "debug=fast"], run_metrics("lora"), seed=0)
    # Its own reference (the same trained model before pruning) and the changes the pipeline wrote:
    # params (20.08M - 21.6M) / 21.6M = -7.037 %, AUROC (0.9512 - 0.9540) / 0.9540 = -0.2935 %.
    change = {"params": -7.037, "gflops": 0.0, "memory_mb": 0.0, "auroc": -0.294}
    make_run(root, "1", ["method=lora", "prune=heads", "prune.tau=0.89", "debug=fast"],
             run_metrics("lora", prune=heads, params=20_080_000, auroc=0.9512,
                     reference={**REFERENCE, "change_pct": change}), seed=1)
    make_run(root, "2", ["method=lora", "quant=int8", "debug=fast"],
             run_metrics("lora", quant="int8", memory_mb=21.0, eval_precision="int8-dynamic",
                     reference={**REFERENCE, "change_pct": {"memory_mb": -74.515}}), seed=2)
    make_run(root, "3", ["method=fullft", "debug=fast"], run_metrics("fullft", params=21_700_000), seed=3)
    if failing:
        make_run(root, "4", ["method=fullft", "prune=all", "prune.tau=0.9", "debug=fast", "train.lr=1e9"],
                 {"status": "failed", "error": "FloatingPointError: loss is nan | at step 3\n" + "x" * 200,
                  "traceback": "Traceback ..."},
                 config={"method": {"name": "fullft"}, "data": {"name": "synthetic"}, "model": {"name": "dinov3_tiny"},
                         "prune": {"method": "all", "tau": 0.9, "tau_heads": None, "tau_mlp": None, "tau_svd": None},
                         "eval": {"tta": True}})
        make_run(root, "5", ["method=head_only", "debug=fast"], None,
                 config={"method": {"name": "head_only"}, "eval": {"tta": True}})
    (root / "multirun.yaml").write_text("not read: the launcher may have died before writing a true one\n")
    return root


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    return make_sweep(tmp_path / "multirun" / "2025-01-01" / "12-00-00")


def test_collect_finds_every_job_in_job_order(sweep: Path) -> None:
    runs = collect_runs([sweep])
    assert [r.job for r in runs] == ["0", "1", "2", "3", "4", "5"]
    assert [r.status for r in runs] == ["ok", "ok", "ok", "ok", "failed", "missing"]
    assert runs[4].overrides[-1] == "train.lr=1e9" and runs[4].method == "fullft"
    assert runs[5].method == "head_only" and "no metrics.json" in runs[5].error


def test_jobs_sort_as_numbers(tmp_path: Path) -> None:
    for job in ("10", "9", "2"):
        make_run(tmp_path, job, [f"seed={job}"], run_metrics("lora"))
    assert [r.job for r in collect_runs([tmp_path])] == ["2", "9", "10"]


def test_summary_csv_has_raw_numbers_traceable_to_run_dirs(sweep: Path) -> None:
    runs, paths = summarize([sweep], sweep)
    rows = read_csv(paths["csv"])
    assert [(r["job"], r["status"]) for r in rows] == [(r.job, r.status) for r in runs]
    for row in rows:
        assert Path(row["run_dir"]).parent == sweep
    by_job = {r["job"]: r for r in rows}
    assert int(by_job["1"]["params"]) == 20_080_000 and float(by_job["1"]["auroc"]) == 0.9512
    assert by_job["1"]["prune_method"] == "heads" and float(by_job["1"]["tau_heads"]) == 0.89
    assert int(by_job["1"]["reference.params"]) == 21_600_000 and by_job["2"]["quant"] == "int8"
    assert by_job["0"]["reference.params"] == ""  # uncompressed: it is the reference
    assert by_job["2"]["eval_precision"] == "int8-dynamic" and by_job["0"]["tta_views"] == "8"
    assert by_job["1"]["overrides"] == "method=lora prune=heads prune.tau=0.89 debug=fast"
    assert by_job["1"]["override.prune.tau"] == "0.89" and by_job["4"]["override.train.lr"] == "1e9"
    assert by_job["4"]["error"].startswith("FloatingPointError: loss is nan") and by_job["4"]["params"] == ""
    assert by_job["5"]["status"] == "missing"


def test_summary_md_shows_varying_columns_and_a_constant_header(sweep: Path) -> None:
    _, paths = summarize([sweep], sweep)
    md = paths["md"].read_text()
    assert "synthetic stand-in data — not PCam" in md
    assert "data: synthetic · model: dinov3_tiny · tta_views: 8 · resolution: 32 · n_test: 64 · debug: fast" in md
    assert "6 runs: 4 ok, 1 failed, 1 missing" in md
    header, _, *rows = table_rows(md)
    # train.lr differs (set only by job 4); debug=fast and the context do not; method/quant/prune have
    # their own columns; resolution always has one, constant or not.
    assert header == ["Job", "train.lr", "Method", "Quantization", "Pruning/τ", "Resolution (px)", "Parameters",
                      "GFLOPs", "Memory (MB)", "AUROC", "AUPRC", "Sens @95%Spec", "ECE", "Brier", "Acc", "NLL",
                      "Pareto", "Status"]
    cells = {row[0]: dict(zip(header, row, strict=True)) for row in rows}
    assert cells["0"]["Parameters"] == "21.60M" and cells["0"]["AUROC"] == "0.9540"
    assert cells["0"]["Resolution (px)"] == "32" and cells["5"]["Resolution (px)"] == "—"
    # Jobs 0, 2 and 3 tie at 4.61 GFLOPs and AUROC 0.9540 (none beats another); job 1 has the same GFLOPs and a
    # lower AUROC; failed and missing runs are never marked.
    assert {job: c["Pareto"] for job, c in cells.items()} == {"0": "◆", "1": "", "2": "◆", "3": "◆", "4": "", "5": ""}
    assert "◆ Pareto-optimal" in md
    assert cells["1"]["Parameters"] == "20.08M (↓7.0%)"
    assert cells["1"]["AUROC"] == "0.9512 (↓0.3%)" and cells["1"]["GFLOPs"] == "4.61"  # no change: no arrow
    assert cells["1"]["Pruning/τ"] == "heads τ=0.89" and cells["1"]["train.lr"] == "—"
    assert cells["2"]["Memory (MB)"] == "21.0 (↓74.5%)" and cells["2"]["Quantization"] == "int8 (dynamic)"
    assert cells["0"]["Quantization"] == "none (f32)" and cells["3"]["Parameters"] == "21.70M"
    assert cells["4"]["Status"].startswith("failed: FloatingPointError: loss is nan \\| at step 3")
    assert cells["4"]["Status"].endswith("…") and len(cells["4"]["Status"]) < 100
    assert cells["4"]["Method"] == "fullft" and cells["4"]["AUROC"] == "—" and cells["4"]["train.lr"] == "1e9"
    assert cells["4"]["Pruning/τ"] == "all τ=0.9"  # from its config: it wrote no metrics
    assert cells["5"]["Status"].startswith("missing") and cells["5"]["Method"] == "head_only"


def test_relative_change_format() -> None:
    assert format_cell("params", 20_080_000, -7.037) == "20.08M (↓7.0%)"
    assert format_cell("params", 21_600_000) == "21.60M"
    assert format_cell("ece", 0.033, 10.0) == "0.0330 (↑10.0%)"
    assert format_cell("auroc", None, -0.3) == "—"
    assert format_cell("gflops", 2.0, 0.04) == "2.00"  # rounds to 0.0 %: no arrow
    assert format_pruning({"method": "all", "tau_heads": 0.9, "tau_mlp": 0.9, "tau_svd": 0.9}) == "all τ=0.9"
    assert format_pruning({"method": "all", "tau_heads": 0.9, "tau_mlp": 0.8, "tau_svd": None}) == (
        "all τ_heads=0.9 τ_mlp=0.8")


def test_roc_png_is_written(sweep: Path) -> None:
    _, paths = summarize([sweep], sweep)
    assert paths["roc"] == sweep / "roc.png"
    assert paths["roc"].read_bytes()[:8] == PNG_MAGIC


def test_a_run_directory_is_not_an_output_folder(sweep: Path) -> None:
    with pytest.raises(ValueError, match="run directory"):
        write_summary(collect_runs([sweep]), sweep / "0")


def test_cli_exit_status_says_whether_a_run_failed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = make_sweep(tmp_path / "bad")
    assert cli([str(bad)]) == 1
    assert (bad / "summary.csv").is_file() and (bad / "summary.md").is_file() and (bad / "roc.png").is_file()
    assert "| Job |" in capsys.readouterr().out
    good = make_sweep(tmp_path / "good", failing=False)
    assert cli([str(good), "--out", str(tmp_path / "tables")]) == 0
    assert len(read_csv(tmp_path / "tables" / "summary.csv")) == 4
    assert cli([str(tmp_path / "good"), str(tmp_path / "bad"), "--out", str(tmp_path / "both")]) == 1
    assert len(read_csv(tmp_path / "both" / "summary.csv")) == 10
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli([str(empty)]) == 2
    # Nothing to report writes nothing: the sweep's earlier tables and figures stay as they were.
    before = {p.name: p.read_bytes() for p in (tmp_path / "tables").iterdir()}
    assert cli([str(empty), "--out", str(tmp_path / "tables")]) == 2
    assert {p.name: p.read_bytes() for p in (tmp_path / "tables").iterdir()} == before
    assert "no run directories" in capsys.readouterr().err and not list(empty.iterdir())


def test_callback_writes_what_the_cli_writes(sweep: Path, tmp_path: Path) -> None:
    assert cli([str(sweep), "--out", str(tmp_path / "cli")]) == 1
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}, "wandb": {"enabled": False}})
    with pytest.raises(SystemExit) as exit_info:
        SweepSummaryCallback().on_multirun_end(config)
    assert exit_info.value.code == 1
    for name in ("summary.csv", "summary.md"):
        assert (sweep / name).read_text() == (tmp_path / "cli" / name).read_text()
    assert (sweep / "roc.png").read_bytes()[:8] == PNG_MAGIC


def test_callback_tolerates_missing_runs_when_told_not_to_fail(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    make_run(sweep, "0", ["method=lora"], None)  # killed before metrics.json
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}})
    SweepSummaryCallback(exit_on_failure=False).on_multirun_end(config)
    assert read_csv(sweep / "summary.csv")[0]["status"] == "missing"
    (empty := tmp_path / "empty").mkdir()
    SweepSummaryCallback().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(empty)}}}))
    assert read_csv(empty / "summary.csv") == []


class FakeTracker:
    """Stands in for W&B: records what would be logged, never opens a connection."""

    logged: list[dict] = []

    def __init__(self, wandb_cfg, config, run_dir, name=None, group=None) -> None:
        self.run = object()
        FakeTracker.logged = []

    def log(self, values, step=None) -> None:
        FakeTracker.logged.append(dict(values))

    def log_image(self, key, path) -> None:
        FakeTracker.logged.append({key: Path(path)})

    def summary(self, values) -> None:
        FakeTracker.logged.append({"summary": dict(values)})

    def finish(self) -> None:
        pass


def test_wandb_table_only_when_enabled(sweep: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs, paths = summarize([sweep], sweep)
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}, "wandb": {"enabled": True}})
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert not log_to_wandb(config, runs, paths, sweep)
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert not log_to_wandb(OmegaConf.create({"wandb": {"enabled": False}}), runs, paths, sweep)
    monkeypatch.setattr(callback_module, "Tracker", FakeTracker)
    assert log_to_wandb(config, runs, paths, sweep)
    table = FakeTracker.logged[0]["sweep/summary"]
    assert table.columns[:3] == ["job", "status", "error"] and len(table.data) == 6
    assert FakeTracker.logged[1] == {"sweep/roc": sweep / "roc.png"}


def test_config_registers_the_callback() -> None:
    # conf/config.yaml selects it in its defaults (`override hydra/callbacks: sweep_summary`).
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", return_hydra_config=True)
    assert list(cfg.hydra.callbacks) == ["sweep_summary"]
    callback = instantiate(cfg.hydra.callbacks.sweep_summary)
    assert isinstance(callback, SweepSummaryCallback) and callback.exit_on_failure


@pytest.mark.parametrize("overrides,expected", [
    (["hydra/callbacks=sweep_summary", "hydra.mode=MULTIRUN"], True),
    (["hydra/callbacks=sweep_summary", "hydra.mode=RUN"], False),  # a single run must still fail loudly
    (["~hydra/callbacks", "hydra.mode=MULTIRUN"], False),  # no summary at the end: nobody would report it
    (["hydra/callbacks=sweep_summary", "hydra.mode=MULTIRUN",
      "hydra.callbacks.sweep_summary.exit_on_failure=false"], False),
])
def test_jobs_may_leave_failures_to_the_summary_only_when_it_reports_them(overrides, expected) -> None:
    from pcamx.report.callback import sweep_reports_failures

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    assert sweep_reports_failures(cfg.hydra) is expected


def test_runs_that_differ_only_in_seed_share_a_row_with_mean_sd_and_n(tmp_path: Path) -> None:
    root = tmp_path / "seeds"
    aurocs = {1: 0.9512, 2: 0.9540, 3: 0.9601}
    for job, (seed, auroc) in enumerate(aurocs.items()):
        make_run(root, str(job), ["method=lora", f"seed={seed}"], run_metrics("lora", auroc=auroc), seed=seed)
    make_run(root, "3", ["method=fullft", "seed=1"], run_metrics("fullft", auroc=0.97))
    runs, paths = summarize([root], root)
    header, _, *rows = table_rows(paths["md"].read_text())
    cells = {row[0]: dict(zip(header, row, strict=True)) for row in rows}
    assert set(cells) == {"0,1,2", "3"} and header[-1] == "n"
    lora = cells["0,1,2"]
    assert lora["seed"] == "1,2,3" and lora["n"] == "3" and cells["3"]["n"] == "1"
    mean, sd = statistics.mean(aurocs.values()), statistics.stdev(aurocs.values())
    assert lora["AUROC"] == f"{mean:.4f} ± {sd:.4f}"
    assert lora["Parameters"] == "21.60M ± 0.00M"
    assert cells["3"]["AUROC"] == "0.9700"
    assert len(read_csv(paths["csv"])) == 4  # the CSV keeps every run


def test_intervals_and_significant_differences_in_the_tables(tmp_path: Path) -> None:
    root = tmp_path / "ci"
    ci95 = {"auroc": [0.9501, 0.9577], "acc": [0.88, 0.92]}
    paired = {"auroc": {"diff": -0.004, "ci95": [-0.006, -0.002], "p_delong": 0.001},
              "acc": {"diff": 0.001, "ci95": [-0.002, 0.004]}}
    make_run(root, "0", ["quant=bf16"], run_metrics("lora", quant="bf16", auroc=0.9540, ci95=ci95,
                                                  reference={**REFERENCE, "auroc": 0.958, "paired": paired,
                                                             "change_pct": {"auroc": -0.42}}))
    _, paths = summarize([root], root, ci=True)
    md = paths["md"].read_text()
    header, _, row = table_rows(md)
    cells = dict(zip(header, row, strict=True))
    assert cells["AUROC"] == "0.9540 (↓0.4%)† [0.9501, 0.9577]"  # the paired interval excludes 0
    assert cells["Acc"] == "0.9000 [0.8800, 0.9200]"  # it does not: no mark
    assert "† the paired 95% bootstrap interval" in md
    _, paths = summarize([root], root)  # intervals only where asked
    assert "[0.9501" not in paths["md"].read_text()
    row = read_csv(paths["csv"])[0]
    assert row["auroc.ci95_lo"] == "0.9501" and row["reference.paired.auroc.p_delong"] == "0.001"
    _, paths = summarize([root], root, style="reference", baseline=root / "0")  # on by default there
    assert "0.9540† [0.9501, 0.9577]" in paths["md"].read_text()
    assert paths["calibration"].read_bytes()[:8] == PNG_MAGIC


def test_quantization_labels_and_plain_values() -> None:
    from pcamx.report.format import format_value, quantization_label

    assert quantization_label(None, "fp32") == "—"
    assert quantization_label("none", None) == quantization_label("none", "fp32") == "none (f32)"
    assert quantization_label("none", "bf16-autocast") == "none (bf16 autocast)"
    assert quantization_label("int8", "int8-dynamic") == "int8 (dynamic)"
    assert quantization_label("bf16", "bf16") == "bf16"
    assert quantization_label("int8", None) == "int8"  # a run that never evaluated: what its config asked for
    assert format_value("latency_ms_b1", 1.5) == "1.5" and format_value("n_test", 128) == "128"
    assert format_value("gflops", 0.1) == "0.10" and format_value("gflops", 0.0012) == "0.0012"
    assert format_value("gflops", 0.0) == "0.00" and format_value("memory_mb", 1.0) == "1.0"
    assert format_value("params", 1_234_567_000) == "1234.57M"
    assert format_value("params", 1_125_001) == "1.13M"  # millions exactly, rounded half up here
    assert format_value("lr", 0.1 + 0.2) == "0.3" and format_value("n_test", 1_234_567) == "1234567"


def test_mean_sd_of_one_two_or_no_numbers_and_intervals_only_of_two_numbers() -> None:
    from pcamx.report.format import format_interval, format_mean_sd

    assert format_mean_sd("auroc", [0.9, None]) == "0.9000"  # one number: as it is
    assert format_mean_sd("auroc", [0.9, 0.8]) == "0.8500 ± 0.0707"  # sd of two: |a − b| / √2
    assert format_mean_sd("auroc", [None, "n/a"]) == "—"
    assert format_interval("auroc", [0.1, 0.2]) == "[0.1000, 0.2000]"
    assert format_interval("auroc", [0.1]) == format_interval("auroc", (0.1, "x")) == "—"


DEMO_METRICS = {  # a `make demo` run's metrics.json (the parts the table shows), and the table it printed
    "auroc": 0.96112, "auprc": 0.95518, "sens_at_95spec": 0.92531, "ece": 0.01487, "brier": 0.05224, "acc": 0.93848,
    "nll": 0.20418, "ci_method": "slide", "ci_slides": 32,
    "ci95": {"auroc": [0.94629, 0.97501], "auprc": [0.93714, 0.97191], "sens_at_95spec": [0.86903, 0.95591],
             "ece": [0.01291, 0.03118], "brier": [0.04021, 0.06421], "acc": [0.92188, 0.95507],
             "nll": [0.16431, 0.24557]},
    "params": 250050, "gflops": 0.0199, "memory_mb": 1.028, "latency_ms_b1": 7.6985, "throughput_ips": 838.08,
    "n_test": 1024, "tta_views": 8, "resolution": 96, "train_precision": "fp32", "eval_precision": "fp32",
    "data": "synthetic", "operating_points": {"thresholds": {"0.5": 0.5, "val95spec": 0.7821706}},
    "sens_at_val95spec_threshold": 0.89394, "spec_at_val95spec_threshold": 0.96312}
DEMO_TABLE = """\
| metric | value | 95% interval (32 slides resampled) |
| --- | --- | --- |
| AUROC | 0.9611 | [0.9463, 0.9750] |
| AUPRC | 0.9552 | [0.9371, 0.9719] |
| Sens @95%Spec | 0.9253 | [0.8690, 0.9559] |
| ECE | 0.0149 | [0.0129, 0.0312] |
| Brier | 0.0522 | [0.0402, 0.0642] |
| Acc | 0.9385 | [0.9219, 0.9551] |
| NLL | 0.2042 | [0.1643, 0.2456] |
| params | 0.25M | |
| gflops | 0.02 | |
| memory_mb | 1.0 | |
| latency_ms_b1 | 7.6985 | |
| throughput_ips | 838.08 | |
| n_test | 1024 | |
| tta_views | 8 | |
| resolution | 96 | |
| train_precision | fp32 | |
| eval_precision | fp32 | |
| data | synthetic | |
| Sens / Spec at the val95spec threshold (chosen on valid) | 0.8939 / 0.9631 | p >= 0.7822 |"""


def test_the_end_of_run_table_is_the_one_make_demo_prints() -> None:
    from pcamx.report.format import format_table

    assert format_table(DEMO_METRICS) == DEMO_TABLE
    # Intervals over patches, none at all, and a fitted temperature.
    patch = format_table({**DEMO_METRICS, "ci_method": "patch"}).splitlines()
    assert patch[0] == "| metric | value | 95% interval (patches resampled) |"
    bare = {k: v for k, v in DEMO_METRICS.items() if k not in ("ci95", "ci_method", "operating_points")}
    lines = format_table({**bare, "calibration": {"temperature": 1.23456, "before": {"ece": 0.04, "nll": 0.3},
                                                   "after": {"ece": 0.01234, "nll": 0.25}}}).splitlines()
    assert lines[0] == "| metric | value | 95% interval (none) |" and lines[2] == "| AUROC | 0.9611 | — |"
    assert lines[-1] == "| temperature (fitted on valid) | 1.235 | ECE 0.0400 → 0.0123, NLL 0.3000 → 0.2500 |"
    assert not any(line.startswith("| Sens / Spec") for line in lines)
