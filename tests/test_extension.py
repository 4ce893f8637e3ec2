"""Extension by adding, not editing: a fine-tuning method and a kind of prunable unit, registered from this test,
run through training, compression, saving and reloading without a line of pcamx changed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from omegaconf import MISSING, OmegaConf

from conftest import WIDTH, compose_config, fast_overrides, logits, prune_plan, tiny_model
from pcamx.compress.chain import STEPS, run_plan
from pcamx.compress.mlp import keep_mlp_neurons, mlp_blocks, mlp_width
from pcamx.compress.spec import load_compressed, save_compressed
from pcamx.compress.units import UnitKind
from pcamx.data import load_data
from pcamx.runtime.tracking import Tracker
from pcamx.training.loop import Session, train
from pcamx.training.methods import METHODS, Method, MethodConfig, apply_method


@dataclass
class BiasTuningConfig(MethodConfig):
    lr_bias: float | None = MISSING
    wd_bias: float | None = MISSING


def bias_tuning(model, cfg, rates) -> list[dict]:
    """BitFit: the head and every bias of the backbone train, nothing else."""
    model.requires_grad_(False)
    biases = [p for n, p in model.backbone.named_parameters() if n.endswith(".bias")]
    for p in [*model.head.parameters(), *biases]:
        p.requires_grad_(True)
    return rates(list(model.head.parameters()), "head") + rates(biases, "bias")


# MLP neurons ranked by their index: the later a neuron, the less it is worth. A kind of its own to the chain,
# the budget search and the checkpoint, sharing only the MLP's surgery.
LATE_NEURONS = UnitKind(name="late_neurons", groups=mlp_blocks, size=mlp_width, keep=keep_mlp_neurons,
                        weight_scores=lambda mlp: torch.arange(mlp_width(mlp), 0, -1, dtype=torch.float64))


def test_a_method_and_a_unit_kind_registered_outside_pcamx_train_compress_save_and_reload(
        small_pcam: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(METHODS, "bitfit", Method("bitfit", BiasTuningConfig, bias_tuning))
    monkeypatch.setitem(STEPS, "late_neurons", LATE_NEURONS)
    cfg = OmegaConf.to_container(compose_config(*fast_overrides(small_pcam, "train.lr=0.05")), resolve=True)
    cfg["method"] = {"name": "bitfit", "lr_head": None, "wd_head": None, "lr_bias": 0.02, "wd_bias": 0.0}

    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    groups = apply_method(model, cfg["method"], cfg["train"]["lr"], cfg["train"]["weight_decay"])
    # the head at train.lr, its bias undecayed; the biases at method.lr_bias without decay (method.wd_bias=0)
    assert {g["name"]: (g["lr"], g["weight_decay"]) for g in groups} == {
        "head": (0.05, 1e-4), "head_no_decay": (0.05, 0.0), "bias": (0.02, 0.0)}
    data = load_data(cfg["data"])
    result = train(model, groups, data.train, data.valid, cfg, torch.device("cpu"), Tracker({}, cfg, tmp_path),
                   Session(1, run_dir=tmp_path))
    assert result.steps > 0 and (tmp_path / "best.pt").is_file()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(n.startswith("head.") or n.endswith(".bias") for n in moved)

    report = run_plan(model, prune_plan("late_neurons", 0.5))["late_neurons"]
    assert all(row["after"] < row["before"] == WIDTH for row in report)
    directory = save_compressed(model, tmp_path / "compressed")
    loaded = load_compressed(directory)
    assert [mlp_width(m) for _, m in mlp_blocks(loaded)] == [row["after"] for row in report]
    torch.testing.assert_close(logits(loaded), logits(model.eval()), atol=0, rtol=0)
