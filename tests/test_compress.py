"""Energy-based compression: the shared keep rule, each method's exact choices and maths, the chain,
and compressed checkpoints. Tiny random DINOv3 models keep the whole file to a few seconds on CPU."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn
from transformers import DINOv3ViTModel

from conftest import HEAD_DIM, HEADS, HIDDEN, LAYERS, VISIBLE_STD, WIDTH, layers, logits, tiny_model
from pcamx.compress.chain import compress
from pcamx.compress.energy import keep_by_energy, kept_fraction, validate_tau
from pcamx.compress.heads import head_energies, prune_attention_heads
from pcamx.compress.mlp import neuron_energies, prune_mlp_neurons
from pcamx.compress.spec import CheckpointMismatchError, architecture_spec, load_compressed, save_compressed
from pcamx.compress.surgery import LowRankLinear
from pcamx.compress.svd import truncated_svd
from pcamx.evaluation.footprint import count_params as count_parameters
from pcamx.model import PCamClassifier, architecture

ATOL = 1e-6


def expected_params(base: int, heads_kept: list[int], widths: list[int]) -> int:
    """Closed form: a dropped head removes its q/k/v rows and o_proj columns, plus its q and v bias
    entries (DINOv3 has no key bias); a dropped neuron removes an up_proj row, its bias entry and a
    down_proj column."""
    per_head = 4 * HEAD_DIM * HIDDEN + 2 * HEAD_DIM
    per_neuron = 2 * HIDDEN + 1
    return (
        base - sum((HEADS - k) * per_head for k in heads_kept) - sum((WIDTH - w) * per_neuron for w in widths)
    )


# --- the shared rule -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "energies, tau, kept",
    [
        ([4, 3, 2, 1], 0.7, [0, 1]),  # 4 + 3 = 7 reaches exactly 0.7 · 10
        ([4, 3, 2, 1], 0.71, [0, 1, 2]),
        ([4, 3, 2, 1], 1e-9, [0]),  # always at least one unit
        ([4, 3, 2, 1], 1.0, [0, 1, 2, 3]),
        ([1, 3, 4, 2], 0.7, [1, 2]),  # indices come back in original order
        ([1, 2, 2, 1], 0.3, [1]),  # tie: the lower index is ranked first
        ([1, 2, 2, 1], 0.4, [1, 2]),
        ([2, 1, 1, 2], 0.5, [0, 3]),
        ([2, 1, 1, 2], 0.7, [0, 1, 3]),  # 4 < 0.7 · 6 = 4.2: the tied 1s go lower index first
        ([1, 1, 1], 2 / 3, [0, 1]),  # an exact fraction is not missed through round-off
        ([0, 0, 0], 0.5, [0]),
        ([0, 0, 0], 1.0, [0, 1, 2]),  # τ = 1 keeps everything, even zero-energy units
        ([5, 0, 0], 1.0, [0, 1, 2]),
        ([7], 0.5, [0]),  # a layer of one unit keeps it
        ([0.25, 0.25, 0.25, 0.25], 0.5, [0, 1]),  # total exactly 1: only an all-zero total keeps one unit
        ([1.0, 2e-8], 1 - 1e-8, [0, 1]),  # summed in float64: in float32, 1 + 2e-8 is 1 and one unit looks enough
    ],
)
def test_keep_by_energy(energies, tau, kept):
    assert keep_by_energy(torch.tensor(energies, dtype=torch.float32), tau).tolist() == kept


@pytest.mark.parametrize("tau", [0, 0.0, -1, 1.5, float("nan"), float("inf"), True, "0.5", None])
def test_bad_tau_is_rejected_with_the_allowed_range(tau):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        validate_tau(tau)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        keep_by_energy(torch.ones(3), tau)


def test_bad_energies_are_rejected():
    with pytest.raises(ValueError, match="non-negative"):
        keep_by_energy(torch.tensor([1.0, -1.0]), 0.5)
    with pytest.raises(ValueError, match="1-D"):
        keep_by_energy(torch.ones(2, 2), 0.5)


# --- τ = 1 changes nothing -------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["heads", "mlp", "svd", "all"])
def test_tau_one_leaves_architecture_and_outputs_unchanged(method):
    model = tiny_model(std=VISIBLE_STD)
    before_spec, before_params, before = architecture_spec(model), count_parameters(model), logits(model)
    compress(model, method, 1.0)
    assert architecture_spec(model) == before_spec
    assert count_parameters(model) == before_params
    torch.testing.assert_close(logits(model), before, atol=ATOL, rtol=0)


# --- attention heads -------------------------------------------------------------------------------


def set_head_energies(model: PCamClassifier, energies: list[float]) -> None:
    """Zero o_proj and put sqrt(e_h) in one entry of each head's column block, so ‖W_o[:, S_h]‖² = e_h."""
    with torch.no_grad():
        for layer in layers(model):
            weight = layer.attention.o_proj.weight
            weight.zero_()
            for head, energy in enumerate(energies):
                weight[head % HIDDEN, head * HEAD_DIM + head % HEAD_DIM] = math.sqrt(energy)


@pytest.mark.parametrize(
    "energies, tau, kept",
    [
        ([4, 3, 2, 1], 0.7, [0, 1]),
        ([4, 3, 2, 1], 0.75, [0, 1, 2]),
        ([1, 3, 4, 2], 0.7, [1, 2]),
        ([1, 2, 2, 1], 0.3, [1]),
        ([1, 1, 1, 1], 0.5, [0, 1]),
        ([1, 1, 1, 1], 0.01, [0]),
    ],
)
def test_head_pruning_keeps_exactly_the_expected_heads(energies, tau, kept):
    model = tiny_model(std=VISIBLE_STD)
    set_head_energies(model, energies)
    torch.testing.assert_close(
        head_energies(layers(model)[0].attention), torch.tensor(energies, dtype=torch.float64)
    )
    base = count_parameters(model)

    report = prune_attention_heads(model, tau)

    assert [row["kept"] for row in report] == [kept] * LAYERS
    assert [(row["before"], row["after"]) for row in report] == [(HEADS, len(kept))] * LAYERS
    assert report[0]["layer"] == "backbone.model.layer.0.attention"
    # The report's kept energy, from the hand-set energies.
    assert [row["kept_energy"] for row in report] == pytest.approx(
        [sum(energies[i] for i in kept) / sum(energies)] * LAYERS, abs=1e-6)
    for layer in layers(model):
        assert layer.attention.num_heads == len(kept)
        assert layer.attention.o_proj.in_features == len(kept) * HEAD_DIM
    assert count_parameters(model) == expected_params(base, [len(kept)] * LAYERS, [WIDTH] * LAYERS)
    assert logits(model).shape == (2, 2)


def test_dropping_heads_equals_zeroing_their_o_proj_columns():
    model = tiny_model(std=VISIBLE_STD)
    reference = copy.deepcopy(model)
    tau = 0.75
    kept_per_layer = [keep_by_energy(head_energies(layer.attention), tau).tolist() for layer in layers(model)]
    assert any(len(kept) < HEADS for kept in kept_per_layer), "the test needs at least one dropped head"
    with torch.no_grad():
        for layer, kept in zip(layers(reference), kept_per_layer, strict=True):
            for head in set(range(HEADS)) - set(kept):
                layer.attention.o_proj.weight[:, head * HEAD_DIM : (head + 1) * HEAD_DIM] = 0
    base = count_parameters(model)

    report = prune_attention_heads(model, tau)

    assert [row["kept"] for row in report] == kept_per_layer
    assert all(row["kept_energy"] >= tau for row in report)
    torch.testing.assert_close(logits(model), logits(reference), atol=ATOL, rtol=0)
    assert not torch.allclose(logits(model), logits(tiny_model(std=VISIBLE_STD)), atol=1e-3)  # the heads did matter
    widths = [WIDTH] * LAYERS
    assert count_parameters(model) == expected_params(base, [len(k) for k in kept_per_layer], widths)


# --- MLP neurons -----------------------------------------------------------------------------------


def set_neuron_energies(model: PCamClassifier, energies: list[float]) -> None:
    """One-hot up_proj rows and down_proj columns of height sqrt(e_i), so (‖up_i‖ · ‖down_i‖)² = e_i
    exactly: ties must be real ties in float32, not round-off apart."""
    with torch.no_grad():
        for layer in layers(model):
            up, down = layer.mlp.up_proj.weight, layer.mlp.down_proj.weight
            up.zero_()
            down.zero_()
            for neuron, energy in enumerate(energies):
                up[neuron, neuron % HIDDEN] = 1.0
                down[neuron % HIDDEN, neuron] = math.sqrt(energy)


@pytest.mark.parametrize(
    "tau, kept",
    [
        (0.8, list(range(60, 64))),  # the four strong neurons hold 400 of 460 ≥ 0.8 · 460 = 368
        (0.9, list(range(14)) + list(range(60, 64))),  # 414 needs 14 more unit neurons, lowest index first
        (1e-6, [60]),
    ],
)
def test_mlp_pruning_keeps_exactly_the_expected_neurons(tau, kept):
    model = tiny_model(std=VISIBLE_STD)
    energies = [1.0] * 60 + [100.0] * 4
    set_neuron_energies(model, energies)
    mlp = layers(model)[0].mlp
    torch.testing.assert_close(neuron_energies(mlp), torch.tensor(energies, dtype=torch.float64))
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for layer in layers(reference):
            layer.mlp.down_proj.weight[:, sorted(set(range(WIDTH)) - set(kept))] = 0
    base = count_parameters(model)

    report = prune_mlp_neurons(model, tau)

    assert [(row["before"], row["after"]) for row in report] == [(WIDTH, len(kept))] * LAYERS
    assert [row["kept_energy"] for row in report] == pytest.approx(
        [sum(energies[i] for i in kept) / sum(energies)] * LAYERS, abs=1e-6)
    assert report[1]["layer"] == "backbone.model.layer.1.mlp"
    assert all(layer.mlp.intermediate_size == len(kept) for layer in layers(model))
    assert count_parameters(model) == expected_params(base, [HEADS] * LAYERS, [len(kept)] * LAYERS)
    torch.testing.assert_close(logits(model), logits(reference), atol=ATOL, rtol=0)


def test_dropping_neurons_equals_zeroing_their_down_proj_columns():
    model = tiny_model(std=VISIBLE_STD)
    reference = copy.deepcopy(model)
    tau = 0.8
    kept_per_layer = [keep_by_energy(neuron_energies(layer.mlp), tau).tolist() for layer in layers(model)]
    with torch.no_grad():
        for layer, kept in zip(layers(reference), kept_per_layer, strict=True):
            layer.mlp.down_proj.weight[:, sorted(set(range(WIDTH)) - set(kept))] = 0
    base = count_parameters(model)

    report = prune_mlp_neurons(model, tau)

    assert [row["after"] for row in report] == [len(k) for k in kept_per_layer]
    assert all(len(k) < WIDTH for k in kept_per_layer)
    torch.testing.assert_close(logits(model), logits(reference), atol=ATOL, rtol=0)
    assert count_parameters(model) == expected_params(
        base, [HEADS] * LAYERS, [len(k) for k in kept_per_layer]
    )


# --- truncated SVD ---------------------------------------------------------------------------------


def matrix_with_singular_values(sigma: list[float], out: int, inp: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out, len(sigma), generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(inp, len(sigma), generator=generator, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(sigma, dtype=torch.float64)) @ v.T


@pytest.mark.parametrize(
    "tau, rank",
    [(0.8, 2), (0.5, 1), (0.01, 1), (0.96, 3), (0.999, 4)],  # σ² = 16, 9, 4, 1 (+ zeros): total 30
)
def test_svd_finds_the_exact_rank_and_factorizes(tau, rank):
    model = tiny_model(std=VISIBLE_STD)
    sigma = [4.0, 3.0, 2.0, 1.0]
    weight = matrix_with_singular_values(sigma, HIDDEN, HIDDEN)
    with torch.no_grad():
        for layer in layers(model):
            layer.attention.q_proj.weight.copy_(weight)
    base, bias = count_parameters(model), layers(model)[0].attention.q_proj.bias.clone()

    report = truncated_svd(model, tau, targets=("q_proj",))

    assert [(row["rank_for_tau"], row["replaced"]) for row in report] == [(rank, True)] * LAYERS
    energies = [v * v for v in sigma]
    assert report[1] == {"layer": "backbone.model.layer.1.attention.q_proj", "before": HIDDEN, "after": rank,
                         "rank_for_tau": rank, "replaced": True, "weight_params_before": HIDDEN * HIDDEN,
                         "weight_params_after": rank * 2 * HIDDEN,
                         "kept_energy": pytest.approx(sum(energies[:rank]) / sum(energies), abs=1e-9)}
    q_proj = layers(model)[0].attention.q_proj
    assert isinstance(q_proj, LowRankLinear) and q_proj.rank == rank
    assert (q_proj.in_features, q_proj.out_features) == (HIDDEN, HIDDEN)
    u, s, vh = torch.linalg.svd(weight)
    truncated = (u[:, :rank] * s[:rank]) @ vh[:rank]
    product = q_proj.up.weight.double() @ q_proj.down.weight.double()
    torch.testing.assert_close(product, truncated, atol=1e-5, rtol=0)
    torch.testing.assert_close(q_proj.up.bias, bias)
    saved = LAYERS * (HIDDEN * HIDDEN - rank * 2 * HIDDEN)
    assert count_parameters(model) == base - saved
    assert logits(model).shape == (2, 2)


def test_svd_skips_layers_where_factorizing_would_not_save_parameters():
    model = tiny_model(std=VISIBLE_STD)
    flat = matrix_with_singular_values([1.0] * HIDDEN, HIDDEN, HIDDEN)  # every direction holds 1/32
    with torch.no_grad():
        for layer in layers(model):
            layer.attention.v_proj.weight.copy_(flat)
    before = logits(model)

    # 0.6 · 32 = 19.2 → rank 20, and 20 · (32 + 32) = 1280 ≥ 32 · 32: no saving, so nothing changes.
    report = truncated_svd(model, 0.6, targets="v_proj")

    assert [(row["rank_for_tau"], row["replaced"]) for row in report] == [(20, False)] * LAYERS
    # Left dense: the report says so (full rank, dense weights, all of the energy).
    assert {k: report[0][k] for k in ("before", "after", "weight_params_before", "weight_params_after",
                                      "kept_energy")} == {"before": HIDDEN, "after": HIDDEN,
                                                          "weight_params_before": HIDDEN * HIDDEN,
                                                          "weight_params_after": HIDDEN * HIDDEN, "kept_energy": 1.0}
    assert all(type(layer.attention.v_proj) is nn.Linear for layer in layers(model))
    torch.testing.assert_close(logits(model), before, atol=ATOL, rtol=0)


def test_svd_targets_are_validated():
    with pytest.raises(ValueError, match="unknown SVD targets"):
        truncated_svd(tiny_model(std=VISIBLE_STD), 0.5, targets=("head",))


# --- the chain -------------------------------------------------------------------------------------


def test_unknown_method_lists_the_allowed_ones():
    with pytest.raises(ValueError, match="allowed: none, heads, mlp, svd, blocks, all"):
        compress(tiny_model(std=VISIBLE_STD), "prune", 0.5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="all", tau={"heads": 0.5, "mlp": 0.5, "svd": 1.5}), r"tau.svd must be a number in \(0, 1\]"),
        (dict(method="heads", tau=float("nan")), r"tau must be a number in \(0, 1\]"),
        (dict(method="mlp", tau=None), r"need a τ"),
        (dict(method="all", tau={"heads": 0.5}), r"\['mlp', 'svd'\] need a τ"),
        (dict(method="heads", tau={"heads": 0.5, "svd": 0}), r"tau.svd must be"),  # checked even when unused
        (dict(method="heads", tau={"head": 0.5}), r"unknown steps \['head'\]"),
        (dict(method="none", tau=2.0), r"tau must be"),
        (dict(method="all", tau=0.5, order=("heads", "svd", "heads")), "each at most once"),
        (dict(method="all", tau=0.5, order=("heads", "depth")), "each at most once"),
        (dict(method="heads", tau=0.5, criterion="magnitude"), "weight, activation, taylor"),
        (dict(method="heads", tau=0.5, scope="model"), "layer, global"),
        (dict(method="heads", tau=0.5, criterion="taylor"), "calib_batches >= 1"),
        (dict(method="blocks", tau=0.5), "calib_batches >= 1"),
        (dict(method="all", tau=0.5, svd_targets=("gate",)), "unknown SVD targets"),
    ],
)
def test_bad_arguments_fail_before_the_model_is_touched(kwargs, message):
    model = tiny_model(std=VISIBLE_STD)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        compress(model, **kwargs)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_tau_per_step_as_a_mapping():
    model = tiny_model(std=VISIBLE_STD)
    report = compress(model, "all", tau={"heads": 1.0, "mlp": 0.5, "svd": 1.0})
    assert list(report) == ["heads", "mlp", "svd"]
    assert all(row["after"] == row["before"] for row in report["heads"])
    assert all(row["after"] < row["before"] for row in report["mlp"])
    assert compress(tiny_model(std=VISIBLE_STD), "none", None) == {}
    # A τ for the heads alone; svd_targets limits what SVD factorizes.
    model = tiny_model(std=VISIBLE_STD)
    report = compress(model, "all", tau={"heads": 0.5, "mlp": 1.0, "svd": 1.0}, svd_targets=("q_proj",))
    assert all(row["after"] < row["before"] for row in report["heads"])
    assert all(row["after"] == row["before"] for row in report["mlp"])
    assert {row["layer"].rsplit(".", 1)[1] for row in report["svd"]} == {"q_proj"}


def test_chain_save_and_load_rebuild_the_exact_model(tmp_path):
    model = tiny_model(std=VISIBLE_STD)
    report = compress(model, "all", tau={"heads": 0.8, "mlp": 0.8, "svd": 0.5}, order=("svd", "heads", "mlp"))
    assert list(report) == ["svd", "heads", "mlp"]
    assert any(isinstance(m, LowRankLinear) for m in model.modules())
    assert any(row["after"] < row["before"] for row in report["heads"])
    assert any(row["after"] < row["before"] for row in report["mlp"])

    directory = save_compressed(model, tmp_path / "compressed", extra={"method": "all", "tau": 0.8})
    assert sorted(p.name for p in directory.iterdir()) == ["architecture.json", "model.safetensors"]
    spec = json.loads((directory / "architecture.json").read_text())
    assert spec["extra"] == {"method": "all", "tau": 0.8}
    assert spec["shapes"] == architecture_spec(model)["shapes"]
    # what each step left: ranks of the factorized linears, kept heads and neurons per block
    assert spec["shapes"]["svd"] and all(0 < r < HIDDEN for r in spec["shapes"]["svd"].values())
    assert sorted(spec["shapes"]["heads"].values()) == sorted(row["after"] for row in report["heads"])

    loaded = load_compressed(directory)

    assert count_parameters(loaded) == count_parameters(model)
    assert architecture_spec(loaded)["shapes"] == spec["shapes"]
    torch.testing.assert_close(logits(loaded), logits(model), atol=ATOL, rtol=0)


def test_heads_then_svd_on_sliced_projections_roundtrip(tmp_path):
    model = tiny_model(seed=3, std=VISIBLE_STD)
    compress(model, "all", tau=0.6, order=("heads", "mlp", "svd"), svd_targets="all")
    loaded = load_compressed(save_compressed(model, tmp_path))
    torch.testing.assert_close(logits(loaded), logits(model), atol=ATOL, rtol=0)


# --- checkpoint errors -----------------------------------------------------------------------------


def test_missing_checkpoint_directory_or_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        load_compressed(tmp_path / "no-such-dir")
    save_compressed(tiny_model(std=VISIBLE_STD), tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_compressed(tmp_path / "ckpt")


def test_weights_that_do_not_match_the_spec_are_reported(tmp_path):
    pruned = tiny_model(std=VISIBLE_STD)
    compress(pruned, "heads", 0.5)
    save_compressed(pruned, tmp_path / "pruned")
    save_compressed(tiny_model(std=VISIBLE_STD), tmp_path / "full")
    # Pair the full model's weights with the pruned model's architecture: the recorded sha256 says so ...
    spec = json.loads((tmp_path / "pruned" / "architecture.json").read_text())
    (tmp_path / "full" / "architecture.json").write_text(json.dumps(spec))
    with pytest.raises(CheckpointMismatchError, match="sha256 differs from the one recorded"):
        load_compressed(tmp_path / "full")
    # ... and without it (a spec written before digests were recorded) the shapes do.
    del spec["weights_sha256"]
    (tmp_path / "full" / "architecture.json").write_text(json.dumps(spec))
    with pytest.raises(CheckpointMismatchError, match="do not match the architecture"):
        load_compressed(tmp_path / "full")


def test_a_spec_asking_for_more_heads_than_the_config_is_reported(tmp_path):
    save_compressed(tiny_model(std=VISIBLE_STD), tmp_path)
    path = tmp_path / "architecture.json"
    spec = json.loads(path.read_text())
    spec["shapes"]["heads"]["backbone.model.layer.0.attention"] = HEADS + 1
    path.write_text(json.dumps(spec))
    with pytest.raises(CheckpointMismatchError, match="buildable architecture"):
        load_compressed(tmp_path)


def test_save_requires_the_classifier():
    with pytest.raises(TypeError, match="PCamClassifier"):
        architecture_spec(tiny_model(std=VISIBLE_STD).backbone)


# --- the real ViT-S/16 shape -----------------------------------------------------------------------


def test_vits16_parameter_count_and_compression():
    backbone = DINOv3ViTModel(architecture("vits16"))
    backbone.config._attn_implementation = "sdpa"
    model = PCamClassifier(backbone, backbone.config.hidden_size).eval()
    full = count_parameters(model)
    assert round(full / 1e6, 2) == 21.6

    # One SVD target keeps the test quick: a dozen 1536 × 384 SVDs instead of 72.
    report = compress(model, "all", 0.9, svd_targets=("up_proj",))

    assert count_parameters(model) < full
    assert any(row["replaced"] for row in report["svd"])
    assert all(row["kept_energy"] >= 0.9 for step in report.values() for row in step)
    assert logits(model, torch.randn(1, 3, 32, 32)).shape == (1, 2)


def test_gated_mlp_prunes_its_gate_too_and_roundtrips(tmp_path):
    model = tiny_model(use_gated_mlp=True)
    report = prune_mlp_neurons(model, 0.5)
    mlp = layers(model)[0].mlp
    assert mlp.gate_proj.out_features == mlp.up_proj.out_features == report[0]["after"] < WIDTH
    loaded = load_compressed(save_compressed(model, tmp_path))
    torch.testing.assert_close(logits(loaded), logits(model), atol=ATOL, rtol=0)


def test_bare_backbone_is_accepted():
    backbone = tiny_model(std=VISIBLE_STD).backbone
    report = prune_mlp_neurons(backbone, 0.5)
    assert report[0]["layer"] == "model.layer.0.mlp"


@pytest.mark.parametrize("nonzero,replaced", [(16, False), (15, True)])
def test_svd_break_even_is_not_a_saving(nonzero: int, replaced: bool):
    # q_proj is 32×32 (1024 weights); rank r costs r·(32 + 32): at r = 16 exactly as much, so it stays dense.
    model = tiny_model(std=VISIBLE_STD)
    weight = matrix_with_singular_values([1.0] * nonzero, HIDDEN, HIDDEN)
    with torch.no_grad():
        for layer in layers(model):
            layer.attention.q_proj.weight.copy_(weight)
    report = truncated_svd(model, 0.999, targets=("q_proj",))  # all the energy lies in `nonzero` directions
    assert [(row["rank_for_tau"], row["replaced"]) for row in report] == [(nonzero, replaced)] * LAYERS
    assert isinstance(layers(model)[0].attention.q_proj, LowRankLinear) is replaced


def test_kept_fraction_is_the_kept_share_of_the_energy():
    energies = torch.tensor([4.0, 3.0, 2.0, 1.0])
    assert kept_fraction(energies, torch.tensor([0, 2])) == pytest.approx(0.6, abs=1e-15)
    assert kept_fraction(energies, torch.arange(4)) == 1.0
    assert kept_fraction(torch.zeros(3), torch.tensor([1])) == 1.0  # nothing to lose
    assert kept_fraction(torch.tensor([1e-30, 3e-30]), torch.tensor([1])) == pytest.approx(0.75)


def test_slicing_keeps_a_frozen_weight_frozen() -> None:
    # Head-only and LoRA runs compress a backbone whose weights do not train; pruning must not unfreeze them.
    from pcamx.compress.surgery import keep_input_columns, keep_output_rows

    linear = nn.Linear(4, 3)
    linear.weight.requires_grad_(False)
    keep_output_rows(linear, torch.tensor([0, 2]))
    assert not linear.weight.requires_grad and linear.bias.requires_grad
    keep_input_columns(linear, torch.tensor([1, 3]))
    assert not linear.weight.requires_grad and linear.weight.shape == (2, 2)
