"""What compression buys, in the sweep tables: the Pruning/τ text of every form of the `prune` entry, the
Resolution column, the Pareto mark (summary.md ◆, summary.csv `pareto`) and frontier.png's series."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import PNG_MAGIC, REFERENCE, make_run, read_csv, run_metrics, table_rows
from pcamx.report.frontier import frontier_data
from pcamx.report.reference_table import method_label
from pcamx.report.runs import collect_runs, format_pruning, pareto_optimal
from pcamx.report.summary import summarize
from pcamx.runtime import run_files

STEPS = ["heads", "mlp", "svd"]
TAUS = {"heads": 0.89, "mlp": 0.975, "svd": 0.975}


def new_prune(method: str = "all", tau: dict | None = None, criterion: str = "weight", scope: str = "layer",
              budget: dict | None = None, achieved: dict | None = None) -> dict:
    """metrics.json's prune entry as the pipeline writes it now."""
    steps = STEPS if method == "all" else [method]
    return {"method": method, "steps": steps, "tau": tau if tau is not None else {s: TAUS[s] for s in steps},
            "criterion": criterion, "scope": scope, "budget": budget, "achieved": achieved,
            "svd_targets": ["q_proj"], "calib_batches": 8}


# ---------------------------------------------------------------- the Pruning/τ column


@pytest.mark.parametrize("prune,expected", [
    # metrics.json, old form (τ per step; None: the step did not run)
    ({"method": "heads", "tau_heads": 0.89, "tau_mlp": None, "tau_svd": None}, "heads τ=0.89"),
    ({"method": "all", "tau_heads": 0.89, "tau_mlp": 0.975, "tau_svd": 0.975},
     "all τ_heads=0.89 τ_mlp=0.975 τ_svd=0.975"),
    ({"method": "all", "tau_heads": 0.9, "tau_mlp": 0.9, "tau_svd": 0.9}, "all τ=0.9"),
    # metrics.json, new form
    (new_prune("heads"), "heads τ=0.89"),
    (new_prune("all"), "all τ_heads=0.89 τ_mlp=0.975 τ_svd=0.975"),
    (new_prune("all", tau={"heads": 0.9, "mlp": 0.9, "svd": 0.9}), "all τ=0.9"),
    (new_prune("heads", tau={"heads": 0.9}, criterion="activation", scope="global"),
     "heads τ=0.9 · activation · global"),
    (new_prune("mlp", tau={"mlp": 0.95}, criterion="taylor"), "mlp τ=0.95 · taylor"),
    (new_prune("svd", tau={"svd": 0.95}, scope="global"), "svd τ=0.95 · global"),
    (new_prune("blocks", tau={"blocks": 0.8}), "blocks τ=0.8"),
    (new_prune("all", tau={s: 0.931 for s in STEPS}, budget={"target_ratio": 0.6},
               achieved={"gflops": 5.1, "params": 14.2e6, "gflops_ratio": 0.59, "params_ratio": 0.66}),
     "all ≤60% GFLOPs (τ=0.931)"),
    (new_prune("all", tau={s: 0.9 for s in STEPS}, budget={"target_gflops": 6.0}), "all ≤6 GFLOPs (τ=0.9)"),
    (new_prune("all", tau={s: 0.9 for s in STEPS}, budget={"target_params": 15_000_000.0}, criterion="activation"),
     "all ≤15.0M params (τ=0.9) · activation"),
    (new_prune("heads", tau={"heads": 0.7}, budget={"target_ratio": 0.07}), "heads ≤7% GFLOPs (τ=0.7)"),
    # .hydra/config.yaml of a run that wrote no metrics: old keys, then new ones
    ({"method": "all", "tau": 0.9, "tau_heads": None, "tau_mlp": None, "tau_svd": None}, "all τ=0.9"),
    ({"method": "all", "tau": 0.9, "tau_heads": 0.8, "tau_mlp": None, "tau_svd": None},
     "all τ_heads=0.8 τ_mlp=0.9 τ_svd=0.9"),
    ({"method": "all", "tau": 0.95, "order": STEPS, "criterion": "weight", "scope": "layer", "target_ratio": None,
      "target_gflops": None, "target_params": None}, "all τ=0.95"),
    ({"method": "all", "tau": TAUS, "order": STEPS, "criterion": "weight", "scope": "layer"},
     "all τ_heads=0.89 τ_mlp=0.975 τ_svd=0.975"),
    ({"method": "all", "tau": {"svd": 0.9, "heads": 0.8}, "order": STEPS}, "all τ_heads=0.8 τ_svd=0.9"),
    ({"method": "all", "tau": TAUS, "order": ["mlp", "heads"]}, "all τ_mlp=0.975 τ_heads=0.89"),  # run order
    ({"method": "heads", "tau": TAUS}, "heads τ=0.89"),  # a mapping names steps this method does not run
    ({"method": "all", "tau_mlp": 0.9, "tau_heads": 0.8}, "all τ_mlp=0.9 τ_heads=0.8"),  # old: keys in run order
    ({"method": "heads", "tau": None, "criterion": "activation", "scope": "global"}, "heads · activation · global"),
    # a budget in the config: the search, not the config's τ, decides the τ; the run never said which
    ({"method": "all", "tau": 0.95, "order": STEPS, "target_ratio": 0.6, "target_gflops": None}, "all ≤60% GFLOPs"),
    ({"method": "all", "tau": None, "order": STEPS, "target_params": 15_250_000}, "all ≤15.25M params"),
    ({"method": "none"}, "none"),
    ({"method": "none", "tau": None, "criterion": "activation"}, "none"),
    ({"method": None}, "—"),
])
def test_pruning_text_of_every_form(prune: dict, expected: str) -> None:
    assert format_pruning(prune) == expected


def test_old_and_new_forms_read_the_same() -> None:
    old = {"method": "all", "tau_heads": 0.89, "tau_mlp": 0.975, "tau_svd": 0.975, "svd_targets": ["q_proj"]}
    assert format_pruning(old) == format_pruning(new_prune("all"))
    old_heads = {"method": "heads", "tau_heads": 0.89, "tau_mlp": None, "tau_svd": None}
    assert format_pruning(old_heads) == format_pruning(new_prune("heads"))


# ---------------------------------------------------------------- Pareto


def test_pareto_marks_on_hand_built_points() -> None:
    points = [
        (0.95, 8.0),  # 0: the best AUROC
        (0.95, 8.0),  # 1: ties with 0: neither beats the other
        (0.94, 8.0),  # 2: same GFLOPs as 0, lower AUROC: dominated
        (0.95, 9.0),  # 3: same AUROC as 0, more GFLOPs: dominated
        (0.90, 4.0),  # 4: cheapest: optimal
        (0.89, 4.0),  # 5: dominated by 4
        (0.93, 6.0),  # 6: a trade-off between 4 and 0: optimal
        (0.92, 7.0),  # 7: worse than 6 on both: dominated
        None,         # 8: a failed row: never optimal, beats nothing
        (0.80, 3.9),  # 9: the cheapest of all: optimal however poor
    ]
    assert pareto_optimal(points) == [True, True, False, False, True, False, True, False, False, True]
    assert pareto_optimal([]) == [] and pareto_optimal([None]) == [False]
    assert pareto_optimal([(0.5, 1.0)]) == [True]


def test_seed_groups_are_marked_by_their_means(tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    # Seeds of heads τ=0.9: AUROC 0.90 and 0.98 (mean 0.94) at 5 GFLOPs. The mlp run: 0.95 at 5 GFLOPs, which
    # beats the mean though not the better seed; the svd run: 0.93 at 4 GFLOPs, cheaper: optimal.
    heads = new_prune("heads", tau={"heads": 0.9})
    for job, (seed, auroc) in enumerate(((1, 0.90), (2, 0.98))):
        make_run(root, str(job), ["prune=heads", f"seed={seed}"],
                 run_metrics("lora", prune=heads, gflops=5.0, auroc=auroc))
    make_run(root, "2", ["prune=mlp", "seed=1"], run_metrics("lora", prune=new_prune("mlp"), gflops=5.0, auroc=0.95))
    make_run(root, "3", ["prune=svd", "seed=1"], run_metrics("lora", prune=new_prune("svd"), gflops=4.0, auroc=0.93))
    # Failed after it was scored (say, while saving): its numbers are no trade-off anyone can use.
    make_run(root, "4", ["prune=svd", "seed=2", "train.lr=1e9"],
             {"status": "failed", "error": "disk full", "gflops": 1.0, "auroc": 0.99})
    _, paths = summarize([root], root)
    header, _, *rows = table_rows(paths["md"].read_text())
    marks = {row[0]: dict(zip(header, row, strict=True))["Pareto"] for row in rows}
    assert marks == {"0,1": "", "2": "◆", "3": "◆", "4": ""}
    by_job = {r["job"]: r["pareto"] for r in read_csv(paths["csv"])}
    assert by_job == {"0": "False", "1": "False", "2": "True", "3": "True", "4": "False"}


def test_no_pareto_column_without_an_ok_run_with_both_numbers(tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    make_run(root, "0", ["method=lora"], run_metrics("lora", gflops=None))
    make_run(root, "1", ["method=fullft"], None)
    (root / run_files.FRONTIER).write_bytes(PNG_MAGIC)  # an earlier table's figure: it no longer matches
    _, paths = summarize([root], root)
    md = paths["md"].read_text()
    assert "Pareto" not in table_rows(md)[0] and "◆" not in md
    assert "frontier" not in paths and not (root / run_files.FRONTIER).exists()


# ---------------------------------------------------------------- resolution and the csv


def test_resolution_has_its_own_column_even_when_it_varies(tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    make_run(root, "0", ["data.resolution=224"], run_metrics("lora", resolution=224, gflops=4.6))
    make_run(root, "1", ["data.resolution=112"], run_metrics("lora", resolution=112, gflops=1.2, auroc=0.93))
    make_run(root, "2", ["data.resolution=160"], None, config={"data": {"resolution": 160}})
    _, paths = summarize([root], root)
    md = paths["md"].read_text()
    header, _, *rows = table_rows(md)
    assert header.count("Resolution (px)") == 1 and "resolution" not in header and "data.resolution" not in header
    assert [dict(zip(header, r, strict=True))["Resolution (px)"] for r in rows] == ["224", "112", "160"]
    assert "resolution:" not in md  # not constant: not in the header line either
    assert [r["resolution"] for r in read_csv(paths["csv"])] == ["224", "112", "160"]


def test_csv_has_the_compression_plan_of_every_form(tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    budget = new_prune("all", tau={s: 0.931 for s in STEPS}, criterion="activation", scope="global",
                       budget={"target_ratio": 0.6},
                       achieved={"gflops": 5.1, "params": 14.2e6, "gflops_ratio": 0.59, "params_ratio": 0.66})
    make_run(root, "0", ["prune=all", "prune.target_ratio=0.6", "prune.criterion=activation", "prune.scope=global"],
             run_metrics("lora", prune=budget, gflops=5.1))
    make_run(root, "1", ["prune=heads"], run_metrics("lora", prune={"method": "heads", "tau_heads": 0.89,
                                                                "tau_mlp": None, "tau_svd": None}))
    make_run(root, "2", ["prune=blocks"], run_metrics("lora", prune=new_prune("blocks", tau={"blocks": 0.8})))
    _, paths = summarize([root], root)
    rows = {r["job"]: r for r in read_csv(paths["csv"])}
    assert (rows["0"]["tau_heads"], rows["0"]["tau_svd"], rows["0"]["prune_criterion"], rows["0"]["prune_scope"]) == (
        "0.931", "0.931", "activation", "global")
    assert rows["0"]["prune_target_ratio"] == "0.6" and rows["0"]["prune_target_gflops"] == ""
    assert rows["0"]["prune_achieved_gflops_ratio"] == "0.59" and rows["0"]["prune_achieved_params_ratio"] == "0.66"
    assert rows["1"]["tau_heads"] == "0.89" and rows["1"]["tau_mlp"] == "" and rows["1"]["prune_criterion"] == "weight"
    assert rows["2"]["tau_blocks"] == "0.8" and rows["1"]["tau_blocks"] == ""
    header = table_rows(paths["md"].read_text())[0]
    # Every override above is said by the Pruning/τ column: none becomes a column of its own.
    assert not [h for h in header if h.startswith("prune")]


def test_reference_layout_labels_the_new_forms() -> None:
    class Run:  # what method_label reads of a RunRecord
        def __init__(self, prune: dict) -> None:
            from pcamx.report.runs import prune_summary

            self.method, self.compressed_model, self.plan = "fullft", True, prune_summary(prune)

    seen: set = set()
    assert method_label(Run(new_prune("all")), seen) == (
        "Full FT + compression *(heads+MLP+SVD, τ=[0.89, 0.975, 0.975])*")
    old = {"method": "all", "tau_heads": 0.89, "tau_mlp": 0.975, "tau_svd": 0.975}
    assert method_label(Run(old), seen) == "Full FT + compression *(same τ)*"
    budget = new_prune("all", tau={s: 0.931 for s in STEPS}, budget={"target_ratio": 0.6}, criterion="activation")
    assert method_label(Run(budget), seen) == (
        "Full FT + compression *(heads+MLP+SVD, ≤60% GFLOPs, τ=0.931, activation)*")
    assert method_label(Run(new_prune("heads", tau={"heads": 0.9}, scope="global")), seen) == (
        "Full FT + compression *(heads, τ=0.9, global)*")


# ---------------------------------------------------------------- frontier.png


def frontier_sweep(root: Path) -> Path:
    """Two criteria of heads pruning at two τ each, an mlp run, an uncompressed run, a failed one."""
    ref = {**REFERENCE, "auroc": 0.96, "gflops": 8.0, "ci95": {"auroc": [0.95, 0.97]}}
    runs = [  # (job, prune entry, gflops, auroc, ci95 of auroc)
        ("0", new_prune("heads", tau={"heads": 0.95}), 7.0, 0.955, [0.945, 0.965]),
        ("1", new_prune("heads", tau={"heads": 0.8}), 5.0, 0.93, None),
        ("2", new_prune("heads", tau={"heads": 0.95}, criterion="activation"), 6.5, 0.957, [0.95, 0.96]),
        ("3", new_prune("heads", tau={"heads": 0.8}, criterion="activation"), 5.5, 0.90, None),
        ("4", new_prune("mlp", tau={"mlp": 0.9}), 6.0, 0.94, None),
    ]
    for job, prune, gflops, auroc, ci in runs:
        values = {"ci95": {"auroc": ci}} if ci else {}
        make_run(root, job, [f"prune={prune['method']}", f"prune.criterion={prune['criterion']}"],
                 run_metrics("lora", prune=prune, gflops=gflops, auroc=auroc, reference=ref, **values))
    make_run(root, "5", ["prune=none"], run_metrics("lora", gflops=8.0, auroc=0.96))
    make_run(root, "6", ["prune=heads", "train.lr=1e9"], {"status": "failed", "error": "nan"})
    return root


def test_frontier_series_points_and_pareto_marks(tmp_path: Path) -> None:
    data = frontier_data(collect_runs([frontier_sweep(tmp_path / "sweep")]))
    series = {s.label: [(p.gflops, p.auroc) for p in s.points] for s in data.series}
    assert series == {
        "heads (weight)": [(5.0, 0.93), (7.0, 0.955)],  # in order of GFLOPs, whatever the job order
        "heads (activation)": [(5.5, 0.90), (6.5, 0.957)],
        "mlp (weight)": [(6.0, 0.94)],
        "not pruned": [(8.0, 0.96)],
    }
    # Five compressed runs measured against one reference: drawn once, with its interval.
    assert [(p.gflops, p.auroc, p.yerr) for p in data.uncompressed] == [(8.0, 0.96, pytest.approx((0.01, 0.01)))]
    # 5.0 (cheapest), 6.0 (beats 5.5/0.90), 6.5/0.957 (beats 7.0/0.955), 8.0 (best AUROC) are optimal.
    assert [(p.gflops, p.auroc) for p in data.pareto] == [(5.0, 0.93), (6.0, 0.94), (6.5, 0.957), (8.0, 0.96)]
    weight = next(s for s in data.series if s.label == "heads (weight)")
    assert weight.points[1].yerr == pytest.approx((0.01, 0.01)) and weight.points[0].yerr is None
    assert [p.note for p in weight.points] == ["τ=0.8", "τ=0.95"]
    activation = next(s for s in data.series if s.label == "heads (activation)")
    assert [p.note for p in activation.points] == ["τ=0.8", "τ=0.95"]  # the label says the criterion
    assert [p.note for p in next(s for s in data.series if s.label == "not pruned").points] == [""]
    assert data.title == "Test AUROC vs GFLOPs at 32 px (synthetic stand-in data — not PCam)"


def test_frontier_splits_what_differs_and_uses_seed_means(tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    heads = new_prune("heads", tau={"heads": 0.9})
    make_run(root, "0", ["res=224", "seed=1"], run_metrics("lora", prune=heads, resolution=224, gflops=4.0, auroc=0.90))
    make_run(root, "1", ["res=224", "seed=2"], run_metrics("lora", prune=heads, resolution=224, gflops=4.0, auroc=0.94))
    make_run(root, "2", ["res=112", "seed=1"], run_metrics("lora", prune=heads, resolution=112, gflops=1.0, auroc=0.85,
                                                       ci95={"auroc": [0.80, 0.88]}))
    make_run(root, "3", ["res=112", "quant=int8", "seed=1"],
             run_metrics("lora", quant="int8", eval_precision="int8-dynamic", prune=heads, resolution=112,
                     gflops=1.0, auroc=0.84))
    data = frontier_data(collect_runs([root]))
    series = {s.label: s.points for s in data.series}
    assert set(series) == {"heads (weight) · none (f32) · 224 px", "heads (weight) · none (f32) · 112 px",
                           "heads (weight) · int8 (dynamic) · 112 px"}
    (group,) = series["heads (weight) · none (f32) · 224 px"]
    sd = (0.04**2 / 2) ** 0.5  # the sample sd of 0.90 and 0.94
    assert group.auroc == pytest.approx(0.92) and group.yerr == pytest.approx((sd, sd))
    (single,) = series["heads (weight) · none (f32) · 112 px"]
    assert single.yerr == pytest.approx((0.05, 0.03))
    assert data.title == "Test AUROC vs GFLOPs (synthetic stand-in data — not PCam)"  # no one resolution
    assert data.uncompressed == ()


def test_frontier_png_is_written_beside_the_summary(tmp_path: Path) -> None:
    root = frontier_sweep(tmp_path / "sweep")
    _, paths = summarize([root], tmp_path / "tables")
    assert paths["frontier"] == tmp_path / "tables" / run_files.FRONTIER
    assert paths["frontier"].read_bytes()[:8] == PNG_MAGIC
    _, paths = summarize([root], tmp_path / "reference", style="reference")  # every layout gets it
    assert paths["frontier"].read_bytes()[:8] == PNG_MAGIC
    assert frontier_data(collect_runs([tmp_path / "nothing"])) is None
