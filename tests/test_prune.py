"""One-shot global pruning to MACs and parameter budgets."""
import math

import pytest
import torch
from helpers import assert_same_outputs, masked_original

import cpdfx
from cpdfx import passes
from cpdfx.batchnorm import reestimate_batch_norm
from cpdfx.models import MODELS


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("importance", ["l1", "l2"])
def test_macs_budget_met_on_every_model(name, importance):
    model = MODELS[name]().eval()
    x = torch.randn(2, 3, 16, 16)
    slim = cpdfx.prune(model, x, macs=0.5, importance=importance)
    ratio = cpdfx.cost(slim, x).macs / cpdfx.cost(model, x).macs
    assert 0.47 <= ratio <= 0.5 + 1e-9, ratio
    report = slim.meta["cpdfx_report"]
    assert report["macs"][1] / report["macs"][0] == pytest.approx(ratio)


def test_params_budget_and_both_together():
    model = MODELS["resnet"]().eval()
    x = torch.randn(2, 3, 16, 16)
    base = cpdfx.cost(model, x)
    slim = cpdfx.prune(model, x, params=0.4)
    assert 0.37 <= cpdfx.cost(slim, x).params / base.params <= 0.4
    both = cpdfx.cost(cpdfx.prune(model, x, macs=0.6, params=0.3), x)
    assert both.macs <= 0.6 * base.macs and both.params <= 0.3 * base.params


def test_round_to_gives_multiples_of_eight():
    model = MODELS["resnet"](widths=(32, 64, 128)).eval()
    x = torch.randn(2, 3, 16, 16)
    slim = cpdfx.prune(model, x, macs=0.5, round_to=8)
    comb = passes.comb(slim)
    for group in comb.groups:
        if group.prunable:
            assert group.size % 8 == 0, (group.size, group.params[:2])


def test_ignored_layers_keep_their_channels():
    model = MODELS["vgg"]().eval()
    x = torch.randn(2, 3, 16, 16)
    slim = cpdfx.prune(model, x, macs=0.6, ignore=["classifier.1"])
    assert slim.get_submodule("classifier.1").weight.shape == model.classifier[1].weight.shape


def test_importance_ranks_what_is_removed():
    """With one channel made huge, magnitude pruning keeps it."""
    model = MODELS["vgg"]().eval()
    with torch.no_grad():
        model.features[0][0].weight[5] *= 100
    slim = cpdfx.prune(model, torch.randn(2, 3, 16, 16), macs=0.5, importance="l1", round_to=1)
    assert 5 in slim.meta["cpdfx_kept"]["features.0.0.weight"][0]


def test_pruning_a_slim_model_again_composes_kept_indices():
    model = MODELS["resnet"]().eval()
    x = torch.randn(2, 3, 16, 16)
    once = cpdfx.prune(model, x, macs=0.7, round_to=1)
    twice = cpdfx.prune(once, x, macs=0.7, round_to=1)
    assert 0.46 <= cpdfx.cost(twice, x).macs / cpdfx.cost(model, x).macs <= 0.5
    kept1 = once.meta["cpdfx_kept"]["stem.0.weight"][0]
    kept2 = twice.meta["cpdfx_kept"]["stem.0.weight"][0]
    assert set(kept2) <= set(kept1)
    original = model.stem[0].weight.detach()
    assert torch.equal(twice.get_submodule("stem.0").weight.detach(), original[kept2])


def _images(n_batches=3, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 3, 16, 16, generator=g) for _ in range(n_batches)]


def test_pruning_in_steps_rescores_and_reaches_the_budget():
    """Each round scores the graph the last one left; the kept indices compose
    back to the original, which the masked original checks."""
    torch.manual_seed(0)
    model = MODELS["resnet"]().eval()
    x = torch.randn(2, 3, 16, 16)
    calibration = (batch for batch in _images())  # a generator: read once per round all the same
    slim = cpdfx.prune(model, x, macs=0.5, importance="fisher", calibration=calibration, steps=3,
                       reestimate_bn=False, round_to=1)
    report = slim.meta["cpdfx_report"]
    assert [s["step"] for s in report["steps"]] == [1, 2, 3]
    assert [round(s["macs"], 2) for s in report["steps"][:2]] == [0.79, 0.63]  # geometric: 0.5 ** (k / 3)
    assert 0.48 <= report["achieved"]["macs"] <= 0.5
    assert "batch_norm_reestimated_on" not in report
    assert "pruned in 3 steps" in cpdfx.format_report(report)
    assert_same_outputs(slim(x), masked_original(model, slim.meta["cpdfx_kept"])(x))


def test_shares_in_the_constraints_do_not_compound_over_steps():
    """min_keep and overrides are shares of the original group: five rounds
    keep what one round keeps, not the share of a share of a share."""
    model = MODELS["resnet"]().eval()
    x = torch.randn(2, 3, 16, 16)
    slim = cpdfx.prune(model, x, macs=0.6, steps=5, overrides={"stem.0": 0.5}, min_keep=0.4, round_to=1)
    assert 0.58 <= slim.meta["cpdfx_report"]["achieved"]["macs"] <= 0.6
    kept = slim.meta["cpdfx_kept"]
    assert len(kept["stem.0.weight"][0]) == 8  # half of 16
    sizes = [g["size"] for g in slim.meta["cpdfx_report"]["groups"]]  # original -> final, not the last step's
    assert [16, 8] in sizes and {before for before, _ in sizes} == {16, 32, 64}
    for name, p in model.named_parameters():
        if p.dim() == 4 and 0 in kept.get(name, {}):
            assert len(kept[name][0]) >= math.ceil(0.4 * p.shape[0]), name


def test_batch_norm_statistics_are_reestimated_on_the_calibration_inputs():
    torch.manual_seed(0)
    model = MODELS["resnet"]().eval()
    x = torch.randn(2, 3, 16, 16)
    images = _images()
    labelled = [(b, torch.randint(0, 10, (len(b),))) for b in images]  # the targets do not reach the statistics
    slim = cpdfx.prune(model, x, macs=0.5, importance="l1", calibration=labelled)
    stale = cpdfx.prune(model, x, macs=0.5, importance="l1", calibration=labelled, reestimate_bn=False)
    assert slim.meta["cpdfx_report"]["batch_norm_reestimated_on"] == 24
    assert "re-estimated on 24 calibration samples" in cpdfx.format_report(slim.meta["cpdfx_report"])
    assert slim.meta["cpdfx_kept"] == stale.meta["cpdfx_kept"]
    assert not torch.allclose(slim(x), stale(x))
    reestimate_batch_norm(stale, [(b,) for b in images])
    assert_same_outputs(slim(x), stale(x))


@pytest.mark.parametrize("kwargs,match", [
    ({}, "give a budget"), ({"macs": 0}, "in \\(0, 1\\]"), ({"macs": 1.5}, "in \\(0, 1\\]"),
    ({"params": -1}, "in \\(0, 1\\]"), ({"macs": 1e-6}, "cannot reach macs=1e-06: pruning every prunable group to its minimum"),
    ({"macs": 0.5, "importance": "nope"}, "unknown importance"), ({"macs": 0.5, "steps": 0}, "positive number"),
    ({"latency": 0.5, "runtime": "tpu"}, "runtime='tpu'"), ({"macs": 0.5, "round_to": 0}, "round_to=0")])
def test_bad_budgets_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cpdfx.prune(MODELS["vgg"]().eval(), torch.randn(2, 3, 16, 16), **kwargs)
