"""The repro_* presets run the reference protocol (docs/reference.md) as docs/reproduce.md states it, whatever
the hardware, and the documented recipe renders the reference table's 12 row kinds from a real (tiny) sweep."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from conftest import CONF, REPO, tiny_model
from pcamx.pipeline import effective_precisions
from pcamx.report.__main__ import main as report
from pcamx.report.format import format_change, format_value, percent_change
from pcamx.report.runs import collect_runs
from pcamx.training.methods import apply_method

PRESETS = ["repro_head_only", "repro_lora", "repro_fullft", "repro_compress"]


@pytest.fixture(scope="module")
def conf(tmp_path_factory) -> Path:
    """conf/ as shipped (without this checkout's conf/local/)."""
    copy = tmp_path_factory.mktemp("conf") / "conf"
    shutil.copytree(CONF, copy, ignore=lambda d, names: ["local"] if Path(d) == CONF else [])
    return copy


def compose_from(conf: Path, *overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def value_of(text: str) -> object:
    """A documented value as the config holds it (YAML would read 1e-4 as a string)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return yaml.safe_load(text.strip("'"))


def documented_settings() -> list[tuple[str, str, object]]:
    """(reference setting, pcamx key, value) for every `key=value` docs/reproduce.md gives a preset, read from its
    protocol table (a `{a,b}` key is expanded over its values)."""
    rows = [line.split(" | ") for line in (REPO / "docs" / "reproduce.md").read_text().splitlines()
            if line.startswith("| ") and "`" in line]
    found = []
    for row in rows:
        setting = row[0].strip("| ")
        for item in re.findall(r"`([\w.{},]+)=([^`]+)`", row[2]):
            key, value = item
            if "{" in key:
                stem, names = re.match(r"(.*)\{(.*)\}", key).groups()
                found += [(setting, stem + n, value_of(v)) for n, v in zip(names.split(","), value.split(","),
                                                                                    strict=True)]
            else:
                found.append((setting, key, value_of(value)))
    return found


def preset_of(setting: str) -> list[str]:
    """The presets a row of the protocol table is about: its method's, compression's, or every training one."""
    for prefix, preset in (("head-only", "repro_head_only"), ("LoRA", "repro_lora"), ("full FT", "repro_fullft"),
                           ("compression", "repro_compress")):
        if setting.startswith(prefix):
            return [preset]
    return ["repro_head_only", "repro_lora", "repro_fullft"]


def test_every_preset_value_docs_reproduce_md_states_is_the_composed_one(conf: Path) -> None:
    checked, composed = 0, {}
    for setting, key, value in documented_settings():
        if key in ("quant", "prune", "data", "model", "method"):  # groups: the option's name is what it selects
            key = {"quant": "quant.mode", "prune": "prune.method"}.get(key, f"{key}.name")
            if key == "quant.mode":
                continue  # quant=bf16 is a row of the sweep, not a preset value
        if key.split(".")[0] in ("torch",):
            continue  # built-in behaviour the row explains (TF32), not a config key
        for preset in preset_of(setting):
            if preset not in composed:
                composed[preset] = OmegaConf.create(OmegaConf.to_container(compose_from(conf, f"experiment={preset}"),
                                                                           resolve=True))
            got = OmegaConf.select(composed[preset], key)
            assert got == pytest.approx(value) if isinstance(value, float) else got == value, (setting, preset, key)
            checked += 1
    assert checked >= 40  # the whole table, not a few rows


def test_presets_train_and_evaluate_in_fp32_on_every_hardware(conf: Path) -> None:
    # hardware=a100/cuda/auto default to bf16 training on a GPU; the reference's presets must win over them.
    for preset in PRESETS:
        for hardware in ("auto", "cuda", "a100", "cpu"):
            cfg = effective_precisions(compose_from(conf, f"experiment={preset}", f"hardware={hardware}"),
                                       torch.device("cuda"))
            assert (cfg.train.precision, cfg.eval.precision) == ("fp32", "fp32"), (preset, hardware)


def decay_of(groups: list[dict]) -> dict[int, float]:
    return {id(p): g["weight_decay"] for g in groups for p in g["params"]}


def lr_of(groups: list[dict]) -> dict[int, float]:
    return {id(p): g["lr"] for g in groups for p in g["params"]}


def preset_groups(conf: Path, preset: str) -> tuple[torch.nn.Module, list[dict]]:
    cfg = compose_from(conf, f"experiment={preset}")
    model = tiny_model()
    return model, apply_method(model, cfg.method, cfg.train.lr, cfg.train.weight_decay, cfg.train.decay_all_params)


def test_fullft_preset_decays_every_parameter_at_the_reference_rates(conf: Path) -> None:
    model, groups = preset_groups(conf, "repro_fullft")
    decay, lr = decay_of(groups), lr_of(groups)
    assert len(decay) == sum(1 for _ in model.parameters())
    assert set(decay.values()) == {0.05}  # norms, biases, tokens and LayerScale included
    assert {lr[id(p)] for p in model.head.parameters()} == {2.5e-4}
    assert {lr[id(p)] for p in model.backbone.parameters()} == {5e-5}


def test_lora_preset_decays_only_the_head_and_starts_adapters_as_the_reference(conf: Path) -> None:
    model, groups = preset_groups(conf, "repro_lora")
    decay, lr = decay_of(groups), lr_of(groups)
    head = {id(p) for p in model.head.parameters()}
    assert {decay[i] for i in head} == {1e-4} and {lr[i] for i in head} == {5e-4}
    named = dict(model.backbone.named_parameters())
    adapters = [n for n in named if "lora_" in n]
    assert {decay[id(named[n])] for n in adapters} == {0.0} and {lr[id(named[n])] for n in adapters} == {2.5e-4}
    others = [i for i in decay if i not in head and i not in {id(named[n]) for n in adapters}]
    assert others and {decay[i] for i in others} == {0.0} and {lr[i] for i in others} == {2.5e-4}
    a = torch.cat([named[n].flatten() for n in adapters if "lora_A" in n])
    assert a.std().item() == pytest.approx(0.02, rel=0.1) and abs(a.mean().item()) < 0.002
    assert all(not named[n].any() for n in adapters if "lora_B" in n)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in adapters} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"}
    dropout = next(m for n, m in model.backbone.named_modules() if n.endswith("lora_dropout.default"))
    assert dropout.p == 0.1


def test_head_only_preset_decays_the_head_not_norms_and_biases(conf: Path) -> None:
    model, groups = preset_groups(conf, "repro_head_only")
    decay, lr = decay_of(groups), lr_of(groups)
    head = {id(p) for p in model.head.parameters()}
    assert {decay[i] for i in head} == {1e-4} and {lr[i] for i in head} == {2.5e-4}
    rest = set(decay) - head
    assert rest and {decay[i] for i in rest} == {0.0} and {lr[i] for i in rest} == {1e-4}


# ---------------------------------------------------------------- the recipe, end to end on a tiny model


def tiny(root: Path) -> list[str]:
    return ["model=dinov3_tiny", "debug=fast", f"data.root={root}", "data.resolution=32", "hardware=cpu"]


def run(args: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "run.py", *args], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={"WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def recipe(small_pcam: Path, tmp_path_factory) -> Path:
    """docs/reproduce.md's recipe: three trainings, then {uncompressed, compressed} × {f32, bf16} of each."""
    tmp = tmp_path_factory.mktemp("recipe")
    run(["-m", "experiment=repro_head_only,repro_lora,repro_fullft", *tiny(small_pcam),
         f"hydra.sweep.dir={tmp / 'train'}"])
    checkpoints = ",".join(str(tmp / "train" / str(i)) for i in range(3))
    run(["-m", "experiment=repro_compress", f"checkpoint={checkpoints}", *tiny(small_pcam),
         f"hydra.sweep.dir={tmp / 'compress'}"])
    return tmp / "compress"


@pytest.mark.slow
def test_recipe_renders_all_12_row_kinds_with_hand_computed_changes(recipe: Path) -> None:
    assert report([str(recipe), "--style", "reference"]) == 0
    md = (recipe / "summary.md").read_text()
    rows = [line.strip("|").split(" | ") for line in md.splitlines() if line.startswith("| ")][2:]
    rows = [[c.strip() for c in row] for row in rows]
    assert [(r[0], r[1]) for r in rows] == [
        ("Full fine‑tune (FT)", "none (f32)"), ("-", "bf16"),
        ("LoRA (r=8; attn+MLP adapters)", "none (f32)"), ("-", "bf16"),
        ("Linear probe (head-only)", "none (f32)"), ("-", "bf16"),
        ("Full FT + compression *(heads+MLP+SVD, τ=[0.89, 0.975, 0.975])*", "none (f32)"), ("-", "bf16"),
        ("LoRA + compression *(same τ)*", "none (f32)"), ("-", "bf16"),
        ("Head-only + compression *(same τ)*", "none (f32)"), ("-", "bf16"),
    ]
    runs = {(r.method, r.compressed_model, r.quant): r for r in collect_runs([recipe])}
    assert len(runs) == 12 and all(r.ok for r in runs.values())
    base = runs[("fullft", False, "none")].metrics
    order = [(m, c, q) for c in (False, True) for m in ("fullft", "lora", "head_only") for q in ("none", "bf16")]
    keys = ("params", "gflops", "memory_mb", "auroc", "auprc", "sens_at_95spec", "ece", "brier", "acc", "nll")
    for row, kind in zip(rows, order, strict=True):
        m = runs[kind].metrics
        assert m["tta_views"] == 6 and m["resolution"] == 32
        assert m["eval_precision"] == ("fp32" if kind[2] == "none" else "bf16")
        for cell, key in zip(row[2:], keys, strict=True):
            expected = format_value(key, m[key])
            if key in ("params", "gflops", "memory_mb", "auroc") and kind != ("fullft", False, "none"):
                pct = round(100 * (m[key] - base[key]) / base[key], 1)
                expected += "" if pct == 0 else f" ({'↑' if pct > 0 else '↓'}{abs(pct):.1f}%)"
                assert expected.endswith(format_change(percent_change(m[key], base[key])))
            if key in m.get("ci95", {}):  # a metric: † when the paired interval excludes 0, then its interval
                lo, hi = (m.get("reference") or {}).get("paired", {}).get(key, {}).get("ci95", [0, 0])
                expected += "†" if lo > 0 or hi < 0 else ""
                expected += f" [{format_value(key, m['ci95'][key][0])}, {format_value(key, m['ci95'][key][1])}]"
            assert cell == expected, (kind, key)
    # Compression and bf16 both shrink the model: their changes are really shown.
    assert "↓" in rows[1][4] and "↓" in rows[6][2] and "↓" in rows[6][3]
    # The uncompressed f32 rows re-evaluate the checkpoints exactly as the trainings evaluated them.
    trained = {json.loads((recipe.parent / "train" / str(i) / "metrics.json").read_text())["method"]:
               json.loads((recipe.parent / "train" / str(i) / "metrics.json").read_text()) for i in range(3)}
    for method in ("fullft", "lora", "head_only"):
        assert runs[(method, False, "none")].metrics["auroc"] == pytest.approx(trained[method]["auroc"], abs=1e-6)
        assert trained[method]["train_precision"] == "fp32" and trained[method]["eval_precision"] == "fp32"
