"""Issue 13's compression: data-aware importance against hand computations, global allocation, whole-block
removal, budgets, and that every variant reloads exactly."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
import torch.nn.functional as F

from conftest import HEAD_DIM, HIDDEN, LAYERS, VISIBLE_STD, WIDTH, images, layers, logits, prune_plan, tiny_model
from conftest import HEADS as N_HEADS
from pcamx.compress.blocks import BLOCKS, block_change, keep_blocks
from pcamx.compress.budget import compress_to_budget, unit_count
from pcamx.compress.chain import Budget, run_plan
from pcamx.compress.heads import HEADS
from pcamx.compress.importance import activation, taylor, unit_scores
from pcamx.compress.mlp import MLP
from pcamx.compress.spec import load_compressed, save_compressed
from pcamx.compress.units import allocate, prune_units
from pcamx.evaluation.footprint import count_params


def calibration(n: int = 2, batch: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(images(batch, seed=10 + i), torch.tensor([i % 2, 1, 0])[:batch]) for i in range(n)]


def recorded_inputs(model, module_of, batches) -> list[list[torch.Tensor]]:
    """The input of `module_of(layer)` in every layer, per batch: by wrapping its forward (not a hook)."""
    seen: list[list[torch.Tensor]] = [[] for _ in layers(model)]
    for i, layer in enumerate(layers(model)):
        target = module_of(layer)
        original = target.forward

        def wrapped(x, original=original, i=i):
            seen[i].append(x.detach().clone())
            return original(x)

        target.forward = wrapped
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    for layer in layers(model):
        del module_of(layer).forward
    return seen


# --- importance ------------------------------------------------------------------------------------


def test_activation_scores_equal_a_hand_computation() -> None:
    model, batches = tiny_model(std=VISIBLE_STD), calibration()
    heads = activation(model, HEADS, batches)
    mlp = activation(model, MLP, batches)
    o_inputs = recorded_inputs(model, lambda layer: layer.attention.o_proj, batches)
    d_inputs = recorded_inputs(model, lambda layer: layer.mlp.down_proj, batches)
    for i, layer in enumerate(layers(model)):
        a = torch.cat([t.reshape(-1, t.shape[-1]) for t in o_inputs[i]]).double()
        w = layer.attention.o_proj.weight.double()
        for h in range(N_HEADS):
            cols = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
            by_hand = a[:, cols].norm(dim=1).mean() * w[:, cols].norm()
            assert heads[f"backbone.model.layer.{i}.attention"][h].item() == pytest.approx(by_hand.item(), rel=1e-9)
        a = torch.cat([t.reshape(-1, t.shape[-1]) for t in d_inputs[i]]).double()
        w = layer.mlp.down_proj.weight.double()
        by_hand = torch.stack([a[:, j].abs().mean() * w[:, j].norm() for j in range(WIDTH)])
        torch.testing.assert_close(mlp[f"backbone.model.layer.{i}.mlp"], by_hand, rtol=1e-9, atol=0)


def test_taylor_scores_equal_a_hand_computation_and_leave_the_model_as_it_was() -> None:
    model, batches = tiny_model(std=VISIBLE_STD), calibration()
    model.requires_grad_(False)  # a frozen backbone (head-only / LoRA) must be scored and stay frozen
    heads, mlp = taylor(model, HEADS, batches), taylor(model, MLP, batches)
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())

    hand = copy.deepcopy(model).requires_grad_(True)
    loss = sum(F.cross_entropy(hand(x), y) for x, y in batches) / len(batches)
    params = list(hand.parameters())
    grads = dict(zip([id(p) for p in params], torch.autograd.grad(loss, params, allow_unused=True),
                     strict=True))

    def wg(p: torch.Tensor) -> torch.Tensor:
        return (p.detach().double() * grads[id(p)].double()).abs()

    for i, layer in enumerate(layers(hand)):
        att = layer.attention
        for h in range(N_HEADS):
            rows = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
            total = sum(wg(getattr(att, n).weight)[rows].sum() for n in ("q_proj", "k_proj", "v_proj"))
            total += sum(wg(getattr(att, n).bias)[rows].sum() for n in ("q_proj", "k_proj", "v_proj")
                         if getattr(att, n).bias is not None)
            total += wg(att.o_proj.weight)[:, rows].sum()
            assert heads[f"backbone.model.layer.{i}.attention"][h].item() == pytest.approx(total.item(), rel=1e-9)
        up, down = layer.mlp.up_proj, layer.mlp.down_proj
        by_hand = torch.stack([wg(up.weight)[j].sum() + wg(up.bias)[j] + wg(down.weight)[:, j].sum()
                               for j in range(WIDTH)])
        torch.testing.assert_close(mlp[f"backbone.model.layer.{i}.mlp"], by_hand, rtol=1e-9, atol=0)


def test_taylor_keeps_the_gradients_a_model_already_had() -> None:
    model, batches = tiny_model(std=VISIBLE_STD), calibration()
    fresh = taylor(copy.deepcopy(model), MLP, batches)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    before = {name: p.grad for name, p in model.named_parameters()}
    scores = taylor(model, MLP, batches)
    assert all(p.grad is before[name] and bool((p.grad == 0.5).all()) for name, p in model.named_parameters())
    for name, s in scores.items():  # the scores start from zero gradients, not from the ones the model had
        torch.testing.assert_close(s, fresh[name], rtol=0, atol=0)


def test_scoring_needs_a_kind_that_says_where_its_units_are() -> None:
    from dataclasses import replace

    for criterion, name in ((activation, "activation"), (taylor, "taylor")):
        for missing in ("consumers", "producers", "width"):
            with pytest.raises(ValueError, match=f"cannot be scored by {name}$"):
                criterion(tiny_model(), replace(MLP, **{missing: None}), calibration())


def test_taylor_without_labels_uses_the_models_own_predictions() -> None:
    model, batches = tiny_model(std=VISIBLE_STD), calibration()
    own = [(x, logits(model, x).argmax(1)) for x, _ in batches]
    unlabeled = [(x, None) for x, _ in batches]
    for name, scores in taylor(model, HEADS, unlabeled).items():
        torch.testing.assert_close(scores, taylor(model, HEADS, own)[name], rtol=0, atol=0)


def test_block_change_is_one_minus_cosine_of_each_blocks_input_and_output() -> None:
    model, batches = tiny_model(std=VISIBLE_STD), calibration()
    scores = block_change(model, [x for x, _ in batches])["backbone.model"]
    inputs = recorded_inputs(model, lambda layer: layer.norm1, batches)  # a block's input enters norm1
    outputs = [inputs[1][b] for b in range(len(batches))]  # block 0's output is block 1's input
    cos = torch.cat([F.cosine_similarity(i.double(), o.double(), dim=-1).flatten()
                     for i, o in zip(inputs[0], outputs, strict=True)])
    assert scores[0].item() == pytest.approx((1 - cos).mean().item(), rel=1e-9)
    assert scores.shape == (2,) and (scores > 0).all()


# --- allocation ------------------------------------------------------------------------------------


def test_global_allocation_ranks_across_groups_and_never_empties_one() -> None:
    scores = {"a": torch.tensor([10.0, 1.0]), "b": torch.tensor([0.1, 0.2])}
    # total 11.3; τ = 0.9 needs 10.17: 10 + 1 from a; b would be empty, so it keeps its best unit.
    kept = allocate(scores, 0.9, "global")
    assert kept["a"].tolist() == [0, 1] and kept["b"].tolist() == [1]
    # per group: a needs 9.9 of its 11 (unit 0 alone), b 0.27 of its 0.3 (both)
    assert {k: v.tolist() for k, v in allocate(scores, 0.9, "layer").items()} == {"a": [0], "b": [0, 1]}
    assert {k: v.tolist() for k, v in allocate(scores, 1.0, "global").items()} == {"a": [0, 1], "b": [0, 1]}


def test_global_scope_prunes_the_low_energy_block_harder() -> None:
    model = tiny_model(std=VISIBLE_STD)
    with torch.no_grad():  # block 0's heads carry 100x the o_proj energy of block 1's
        layers(model)[0].attention.o_proj.weight.mul_(10)
    report = prune_units(copy.deepcopy(model), HEADS, 0.8, scope="global")
    assert report[1]["after"] < report[0]["after"] and report[1]["after"] >= 1
    per_layer = prune_units(copy.deepcopy(model), HEADS, 0.8, scope="layer")
    assert per_layer[1]["after"] > report[1]["after"]
    # prune.scope reaches the step when it runs from a plan
    assert run_plan(copy.deepcopy(model), prune_plan("heads", 0.8, scope="global"))["heads"] == report


def test_scores_must_cover_every_group() -> None:
    model = tiny_model()
    scores = {name: torch.ones(N_HEADS, dtype=torch.float64) for name, _ in HEADS.groups(model)}
    missing = scores.popitem()[0]
    with pytest.raises(ValueError, match=rf"^no heads scores for \['{re.escape(missing)}'\]$"):
        prune_units(model, HEADS, 0.8, scores, "layer")


@pytest.mark.parametrize("criterion", ["weight", "activation", "taylor"])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_tau_one_is_lossless_for_every_criterion_and_scope(criterion: str, scope: str) -> None:
    model = tiny_model(std=VISIBLE_STD)
    before = logits(model)
    p = prune_plan("all", 1.0, order=("heads", "mlp", "svd", "blocks"), criterion=criterion, scope=scope,
                   calib_batches=2)
    report = run_plan(model, p, calibration())
    assert all(row["after"] == row["before"] for step in report.values() for row in step)
    assert torch.equal(logits(model), before)


# --- whole blocks ----------------------------------------------------------------------------------


def test_removing_a_block_equals_running_the_remaining_blocks() -> None:
    model, x = tiny_model(std=VISIBLE_STD), images()
    backbone = model.backbone
    with torch.no_grad():  # by hand: embeddings → block 1 only → norm → CLS → head
        h = backbone.embeddings(x)
        rope = backbone.rope_embeddings(x)
        h = backbone.model.layer[1](h, position_embeddings=rope)
        by_hand = model.head(backbone.norm(h)[:, 0])
    keep_blocks(backbone.model, [1])
    assert len(backbone.model.layer) == 1
    assert torch.equal(logits(model, x), by_hand)


@pytest.mark.parametrize("blocks", [[0, 0], [LAYERS], [-1], []])
def test_keep_blocks_refuses_repeated_or_missing_positions(blocks: list[int]) -> None:
    encoder = tiny_model().backbone.model
    with pytest.raises(ValueError, match="block"):
        keep_blocks(encoder, blocks)
    assert len(encoder.layer) == LAYERS  # nothing was removed
    keep_blocks(encoder, [LAYERS - 1, 0])  # any order given, kept in model order
    assert len(encoder.layer) == 2


def test_blocks_removed_twice_still_name_their_original_positions() -> None:
    from pcamx.compress.blocks import kept_blocks

    encoder = tiny_model(num_hidden_layers=4).backbone.model
    assert kept_blocks(encoder) == [0, 1, 2, 3]
    third = encoder.layer[2]
    keep_blocks(encoder, [0, 2, 3])
    keep_blocks(encoder, [1, 2])  # positions in the encoder as it is now: its blocks 2 and 3
    assert kept_blocks(encoder) == [2, 3] and encoder.layer[0] is third


@pytest.mark.parametrize("shape, message", [({"backbone.model.layer.9.mlp": 3}, "no mlp groups named"),
                                            ({"backbone.model.layer.0.mlp": 0}, "0 mlp units"),
                                            ({"backbone.model.layer.0.mlp": WIDTH + 1}, f"{WIDTH + 1} mlp units")])
def test_a_recorded_shape_the_architecture_cannot_take_is_refused(shape, message) -> None:
    with pytest.raises(ValueError, match=message):
        MLP.reshape(tiny_model(), shape)


def test_a_recorded_shape_of_one_unit_per_group_is_rebuilt() -> None:
    model = tiny_model()
    MLP.reshape(model, {"backbone.model.layer.0.mlp": 1, "backbone.model.layer.1.mlp": WIDTH})
    assert [layer.mlp.up_proj.out_features for layer in layers(model)] == [1, WIDTH]


def test_blocks_step_removes_the_least_changing_block_and_reloads(tmp_path) -> None:
    model, batches = tiny_model(std=VISIBLE_STD), calibration()
    scores = unit_scores(model, BLOCKS, "weight", batches)["backbone.model"]
    report = run_plan(model, prune_plan("blocks", 0.5, calib_batches=2), batches)["blocks"]
    assert report[0]["before"] == 2 and report[0]["after"] == 1
    assert report[0]["kept"] == [int(scores.argmax())]
    directory = save_compressed(model, tmp_path / "compressed")
    loaded = load_compressed(directory)
    assert len(loaded.backbone.model.layer) == 1 and count_params(loaded) == count_params(model)
    assert torch.equal(logits(loaded), logits(model))


@pytest.mark.parametrize("criterion", ["activation", "taylor"])
def test_every_data_aware_variant_reloads_with_identical_outputs(tmp_path, criterion: str) -> None:
    model = tiny_model(std=VISIBLE_STD)
    run_plan(model, prune_plan("all", 0.7, order=("blocks", "heads", "mlp", "svd"), criterion=criterion, scope="global",
                         calib_batches=2), calibration())
    loaded = load_compressed(save_compressed(model, tmp_path / criterion))
    assert torch.equal(logits(loaded), logits(model))


# --- budgets ---------------------------------------------------------------------------------------


def compressed_copy(model: torch.nn.Module, method: str, tau: float) -> torch.nn.Module:
    """A copy of `model` compressed by `method` at τ (conf/prune's defaults otherwise); the model is left as it was."""
    trial = copy.deepcopy(model)
    run_plan(trial, prune_plan(method, tau))
    return trial


def params_only(model) -> dict[str, float]:
    return {"params": count_params(model), "gflops": 1.0}


def test_budget_is_met_within_one_unit_by_the_largest_model() -> None:
    model = tiny_model(std=VISIBLE_STD)
    full = count_params(model)
    limit = full - 40 * (2 * HIDDEN + 1) - 7  # room for 40 fewer neurons, less a few parameters
    p = prune_plan("mlp", target_params=limit)
    compressed, report, found = compress_to_budget(model, p, params_only)
    per_neuron = 2 * HIDDEN + 1  # an up_proj row, its bias entry and a down_proj column
    assert found["achieved"]["params"] <= limit < found["achieved"]["params"] + per_neuron
    assert count_params(compressed) == found["achieved"]["params"]
    assert count_params(model) == full  # the original is left as it was
    # the largest such model: every larger τ makes a model over the budget
    tau = found["tau"]["mlp"]
    for larger in torch.linspace(tau, 1.0, 50)[1:].tolist():
        trial = compressed_copy(model, "mlp", larger)
        assert count_params(trial) > limit or unit_count(trial, p) == unit_count(compressed, p)


@pytest.mark.parametrize("resolution", [None, 0.2])  # None: the module's own; 0.2: τ resolution stops it first
def test_budget_search_bisects_until_one_unit_or_tau_resolution_and_counts_its_trials(monkeypatch,
                                                                                       resolution) -> None:
    """Every trial recorded: τ = 1, then the floor, then midpoints of the interval still open; the search stops
    at the first trial after which at most one unit separates the kept model from the smallest rejected one,
    or the τ interval is no wider than TAU_RESOLUTION."""
    from pcamx.compress import budget as budget_module

    if resolution is not None:
        monkeypatch.setattr(budget_module, "TAU_RESOLUTION", resolution)

    model, batches = tiny_model(std=VISIBLE_STD), calibration()
    full, per_neuron = count_params(model), 2 * HIDDEN + 1
    limit = full - 40 * per_neuron - 7
    p = prune_plan("mlp", target_params=limit, criterion="activation", calib_batches=2)
    trials: list[tuple[float, int, int]] = []  # (τ, params, units) of every compressed candidate

    def recording_run_plan(candidate, plan, calibration):
        assert calibration is batches  # the caller's calibration reaches every trial
        report = run_plan(candidate, plan, calibration)
        trials.append((plan.tau["mlp"], count_params(candidate), unit_count(candidate, p)))
        return report

    monkeypatch.setattr(budget_module, "run_plan", recording_run_plan)
    _, _, found = compress_to_budget(model, p, params_only, batches)
    assert found["search_trials"] == len(trials) and trials[0][0] == 1.0 and trials[1][0] == budget_module.TAU_FLOOR
    assert found["limit"] == {"params": limit}
    assert found["achieved"]["params_ratio"] == round(found["achieved"]["params"] / full, 6)
    lo, hi, hi_units, kept_units = trials[1][0], 1.0, unit_count(model, p), trials[1][2]
    for i, (tau, params, units) in enumerate(trials[2:]):
        # each trial was needed: the interval was still open when it was made
        assert hi - lo > budget_module.TAU_RESOLUTION and hi_units - kept_units > 1, i
        assert tau == (lo + hi) / 2
        lo, kept_units = (tau, units) if params <= limit else (lo, kept_units)
        hi, hi_units = (hi, hi_units) if params <= limit else (tau, units)
    assert not (hi - lo > budget_module.TAU_RESOLUTION and hi_units - kept_units > 1)  # and then it stopped
    assert found["tau"] == {"mlp": lo} and len(trials) > 4
    if resolution is not None:
        assert hi_units - kept_units > 1  # units still apart: the resolution was what stopped it


def test_a_model_exactly_at_the_budget_meets_it() -> None:
    from pcamx.compress.budget import TAU_FLOOR

    model = tiny_model(std=VISIBLE_STD)
    # the smallest model the plan can make is within a budget of its own size
    floor = count_params(compressed_copy(model, "mlp", TAU_FLOOR))
    assert compress_to_budget(model, prune_plan("mlp", target_params=floor), params_only)[2]["achieved"]["params"] \
        == floor
    mid = (TAU_FLOOR + 1.0) / 2  # the search's first midpoint, exactly at the limit, is kept
    at_mid = count_params(compressed_copy(model, "mlp", mid))
    found = compress_to_budget(model, prune_plan("mlp", target_params=at_mid), params_only)[2]
    assert found["tau"]["mlp"] >= mid


@pytest.mark.parametrize("method, tau, keys", [
    ("all", 0.8, dict(criterion="activation", scope="global", calib_batches=3, svd_targets=["q_proj", "v_proj"])),
    ("mlp", None, dict(target_ratio=0.5)),
    ("heads", {"heads": 0.9}, dict(target_params=1e5, criterion="taylor", calib_batches=1)),
])
def test_metrics_json_prune_record_rebuilds_the_plan(method, tau, keys) -> None:
    """A run's `prune` block says everything the plan was: the plan rebuilt from it alone is the same plan."""
    from pcamx.compress.chain import plan

    original = prune_plan(method, tau, **keys)
    record = json.loads(json.dumps(original.describe()))  # as metrics.json stores it
    rebuilt = plan("all", None if record["budget"] else record["tau"], order=record["steps"],
                   svd_targets=record["svd_targets"], criterion=record["criterion"], scope=record["scope"],
                   calib_batches=record["calib_batches"], **(record["budget"] or {}))
    assert rebuilt == original


def test_compress_hands_its_calibration_to_the_steps() -> None:
    from pcamx.compress.chain import compress

    model, batches = tiny_model(std=VISIBLE_STD), calibration()
    expected = copy.deepcopy(model)
    run_plan(expected, prune_plan("mlp", 0.5, criterion="activation", calib_batches=len(batches)), batches)
    compress(model, "mlp", 0.5, batches, criterion="activation")
    assert count_params(model) < count_params(tiny_model()) and torch.equal(logits(model), logits(expected))


def test_ratio_budget_uses_the_uncompressed_cost_and_a_loose_one_changes_nothing() -> None:
    model = tiny_model(std=VISIBLE_STD)
    full = count_params(model)
    _, _, found = compress_to_budget(model, prune_plan("all", target_ratio=0.75), lambda m: {"gflops": count_params(m),
                                                                                    "params": count_params(m)})
    assert found["achieved"]["gflops"] <= 0.75 * full and found["achieved"]["gflops_ratio"] <= 0.75
    # the largest: with SVD in the plan too (whose layers fall back to dense together at some τ), no larger
    # τ makes a model within the budget
    tau = found["tau"]["heads"]
    for larger in torch.linspace(tau, 1.0, 40)[1:].tolist():
        trial = compressed_copy(model, "all", larger)
        assert count_params(trial) > 0.75 * full or count_params(trial) == found["achieved"]["params"], larger
    same, report, found = compress_to_budget(model, prune_plan("heads", target_params=full), params_only)
    assert found["tau"] == {"heads": 1.0} and torch.equal(logits(same), logits(model))


def test_an_unreachable_budget_fails_with_the_smallest_reachable_cost() -> None:
    with pytest.raises(ValueError, match=r"out of reach: the smallest model .* has \d+ params"):
        compress_to_budget(tiny_model(std=VISIBLE_STD), prune_plan("heads", target_params=1000), params_only)


@pytest.mark.parametrize("method, tau, kwargs, message", [
    ("all", None, dict(target_ratio=0.5, target_params=10), "give one budget"),
    ("all", None, dict(target_ratio=1.5), r"^prune.target_ratio is the fraction .* in \(0, 1\]; got 1.5$"),
    ("all", None, dict(target_gflops=-1), r"^prune.target_gflops must be a positive number, got -1$"),
    ("all", None, dict(target_params=0), r"^prune.target_params must be a positive number, got 0$"),
    ("all", None, dict(target_params=True), "positive number, got True$"),
    ("all", None, dict(target_gflops="2"), "positive number, got '2'$"),
    ("heads", 1.5, {}, r"^prune.tau must be a number in"),
    ("heads", 0.5, dict(calib_batches=-1), r"^prune.calib_batches must be a whole number >= 0, got -1$"),
    ("heads", 0.5, dict(calib_batches=1.5), "whole number >= 0, got 1.5$"),
    ("heads", 0.5, dict(criterion="taylor", calib_batches=0), r"^prune.criterion=taylor scores units on training"),
    ("blocks", 0.5, dict(calib_batches=0), r"^the blocks step scores units on training batches"),
])
def test_bad_compression_arguments_are_named(method, tau, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        prune_plan(method, tau, **kwargs)


def test_plan_keeps_what_it_was_given_and_nothing_else() -> None:
    assert prune_plan("all", target_ratio=1).budget == Budget("target_ratio", 1.0)  # (0, 1]: 1 is allowed
    assert prune_plan("all", target_gflops=2).budget == Budget("target_gflops", 2.0)
    assert prune_plan("heads", 0.5, svd_targets="all").svd_targets == ()  # targets only for a plan with SVD
    assert prune_plan("heads", 0.5, calib_batches=0).calib_batches == 0  # the weight criterion reads no batches


def test_a_layer_factorized_counts_fewer_units_than_the_dense_one() -> None:
    # The search's stop rule compares unit counts: a dense SVD target must count its full rank, or a model
    # whose layers went back to dense would look smaller than one with factorized layers.
    from pcamx.compress.svd import SVD_TARGETS, truncated_svd

    dense, factorized = tiny_model(std=VISIBLE_STD), tiny_model(std=VISIBLE_STD)
    truncated_svd(factorized, 0.3, SVD_TARGETS)
    p = prune_plan("svd", 0.3, svd_targets="all")
    low = unit_count(factorized, p)
    assert low < unit_count(dense, p)
    assert unit_count(dense, p) == LAYERS * (4 * HIDDEN + 2 * HIDDEN)  # full ranks: q,k,v,o (32×32), up, down
    # The other steps' units are their heads, neurons and blocks.
    others = prune_plan("all", 0.3, order=["heads", "mlp", "blocks"], calib_batches=1)
    assert unit_count(dense, others) == LAYERS * (N_HEADS + WIDTH) + LAYERS
