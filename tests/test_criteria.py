"""Importance criteria and the budget solver's constraints."""
import json

import numpy as np
import pytest
import torch

import cpdfx
from cpdfx import passes
from cpdfx import zoo
from cpdfx.models import MODELS

CRITERIA = list(cpdfx.CRITERIA)
BUDGETS = [("macs", 0.5), ("params", 0.4)]


def _calibration(shape, batches=2, n=4):
    return [(torch.randn(n, *shape),) for _ in range(batches)]


def _achieved(model, slim, x, metric):
    before, after = cpdfx.cost(model, x), cpdfx.cost(slim, x)
    return getattr(after, metric) / getattr(before, metric)


@pytest.fixture(scope="module")
def captured():
    """name -> (captured graph, example input) for the CNNs and transformers families."""
    out = {}
    for name in sorted(MODELS):
        torch.manual_seed(0)
        x = torch.randn(2, 3, 16, 16)
        out[name] = cpdfx.capture(MODELS[name]().eval(), x), x
    for name in sorted(zoo.FAMILIES):
        torch.manual_seed(0)
        x = torch.randn(2, 3, 64, 64)
        out[f"hf:{name}"] = cpdfx.capture(zoo.build(name).eval(), x), x
    return out


@pytest.mark.parametrize("name", sorted(MODELS) + [f"hf:{n}" for n in sorted(zoo.FAMILIES)])
@pytest.mark.parametrize("importance", CRITERIA)
def test_every_criterion_meets_macs_and_params_budgets(captured, name, importance):
    gm, x = captured[name]
    cal = _calibration(tuple(x.shape[1:]))
    for metric, share in BUDGETS:
        slim = cpdfx.prune(gm, x, importance=importance, calibration=cal, **{metric: share})
        achieved = _achieved(gm, slim, x, metric)
        assert share - 0.02 <= achieved <= share + 1e-9, (metric, achieved)
        assert slim.meta["cpdfx_report"]["achieved"][metric] == pytest.approx(achieved)


def test_round_to_eight_on_a_transformer(captured):
    """round_to counts channels in the layers' dims: a head_dim group of a
    4-head attention steps by 2 (2 x 4 heads = 8 channels of q and k)."""
    gm, x = captured["hf:vit"]
    slim = cpdfx.prune(gm, x, macs=0.5, importance="fisher", calibration=_calibration((3, 64, 64)), round_to=8)
    layers = slim.meta["cpdfx_report"]["layers"]
    assert layers
    for row in layers:
        for before, after in zip(row["before"], row["after"]):
            assert after == before or after % 8 == 0, row
    assert any(after % 8 for row in slim.meta["cpdfx_report"]["groups"] for after in row["size"][1:]), \
        "no group steps by fewer than 8 elements: the head-aware steps went unused"
    assert 0.48 <= _achieved(gm, slim, x, "macs") <= 0.5


def test_min_keep_share_and_overrides(captured):
    gm, x = captured["resnet"]
    slim = cpdfx.prune(gm, x, macs=0.5, min_keep=0.4, overrides={"layers.5.conv1": 0.75})
    groups = {g["id"]: g for g in slim.meta["cpdfx_report"]["groups"]}
    for g in groups.values():
        assert g["size"][1] >= 0.4 * g["size"][0]
    assert slim.get_submodule("layers.5.conv1.0").weight.shape[0] == 48  # 0.75 x 64
    assert 0.48 <= _achieved(gm, slim, x, "macs") <= 0.5


def test_bad_constraints_are_refused(captured):
    gm, x = captured["vgg"]
    for kwargs, words in [({"round_to": 0}, "round_to"), ({"min_keep": 1.5}, "min_keep"),
                          ({"overrides": {"features.0": 0}}, "overrides"), ({"latency": 2}, "latency=2")]:
        with pytest.raises(cpdfx.BudgetError, match=words):
            cpdfx.prune(gm, x, **{"macs": 0.5, **kwargs})


def _vgg_with_dead_and_strong_channels():
    """features.0 channel 3 feeds nothing (its consumers' columns are zero);
    channel 5 carries a large batch-norm scale, channel 7 none (so it is dead too)."""
    model = MODELS["vgg"]().eval()
    with torch.no_grad():
        model.features[2][0].weight[:, 3] = 0
        model.features[0][1].weight[5] = 10.0
        model.features[0][1].weight[7] = 0.0
    return model


@pytest.mark.parametrize("importance", ["fisher", "taylor"])
def test_gradient_criteria_give_a_channel_that_feeds_nothing_zero(importance):
    model = _vgg_with_dead_and_strong_channels()
    x = torch.randn(2, 3, 16, 16)
    gm = cpdfx.capture(model, x)
    comb = passes.comb(gm)
    criterion = cpdfx.CRITERIA[importance]()
    cpdfx.importance.calibrate(criterion, gm, comb, _calibration((3, 16, 16)), 1)
    scores = criterion.scores(gm, comb)
    group = next(g for g in comb.prunable if ("features.0.0.weight", 0) in g.params)
    s = scores[group.id]
    assert s[3] == 0 and s[7] == 0 and (np.delete(s, [3, 7]) > 0).all()
    assert not any(p.grad is not None for p in gm.parameters())  # gradients cleaned up


def test_taylor_takes_the_absolute_gradient_per_batch():
    """Two batches whose gradients are opposite (as on a converged model, where
    they average to about zero) still show which channels matter: taylor is the
    mean |mask gradient| per batch, so with equal magnitudes its square is the
    batch form of fisher's."""
    gm = cpdfx.capture(MODELS["vgg"]().eval(), torch.randn(2, 3, 16, 16))
    comb = passes.comb(gm)
    taylor, fisher = cpdfx.CRITERIA["taylor"](), cpdfx.CRITERIA["fisher_batch"]()
    for sign in (1.0, -1.0):
        for p in gm.parameters():
            p.grad = sign * torch.ones_like(p)
        taylor.accumulate(gm, comb)
        fisher.accumulate(gm, comb)
    t, f = taylor.scores(gm, comb), fisher.scores(gm, comb)
    assert all((t[g.id] > 0).all() for g in comb.prunable)
    assert all(np.allclose(t[g.id] ** 2, f[g.id]) for g in comb.prunable)


def test_bn_scale_ranks_by_gamma():
    model = _vgg_with_dead_and_strong_channels()
    x = torch.randn(2, 3, 16, 16)
    slim = cpdfx.prune(model, x, macs=0.5, importance="bn_scale", round_to=1)
    kept = slim.meta["cpdfx_kept"]["features.0.0.weight"][0]
    assert 5 in kept and 7 not in kept


def test_calibration_targets_reach_the_loss():
    seen = []

    def loss_fn(output, target):
        seen.append(target)
        return torch.nn.functional.cross_entropy(output, target)

    x = torch.randn(2, 3, 16, 16)
    cal = [(torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))) for _ in range(3)]
    # the batch form: its loss sees each batch whole (fisher's per-sample loss: test_fisher.py)
    cpdfx.prune(MODELS["vgg"]().eval(), x, macs=0.5, importance="fisher_batch", calibration=cal, loss_fn=loss_fn)
    assert len(seen) == 3 and all(torch.equal(t, c[1]) for t, c in zip(seen, cal))


def test_segmentation_model_scores_without_labels():
    """The default loss takes the model's own per-pixel predictions as targets."""
    x = torch.randn(2, 3, 16, 16)
    model = MODELS["unet"]().eval()
    slim = cpdfx.prune(model, x, macs=0.5, importance="taylor", calibration=_calibration((3, 16, 16)))
    assert slim(torch.randn(3, 3, 16, 16)).shape == (3, 4, 16, 16)


def test_report_is_json_and_reads_well(captured):
    gm, x = captured["se"]
    slim = cpdfx.prune(gm, x, macs=0.5, importance="l1")
    report = json.loads(json.dumps(slim.meta["cpdfx_report"]))
    assert report["criterion"] == "l1" and report["target"] == {"macs": 0.5}
    assert report["macs"][1] < report["macs"][0]
    changed = {r["name"]: r for r in report["layers"]}
    assert changed["conv.0.weight"]["after"][0] == slim.get_submodule("conv.0").weight.shape[0]
    text = cpdfx.format_report(report)
    assert "target macs 50%" in text and "conv.0.weight" in text and "->" in text
