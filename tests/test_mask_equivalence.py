"""Removing channels = zeroing their consumer-side weights in the original."""
import numpy as np
import pytest
import torch

import cpdfx
from cpdfx import passes
from cpdfx.models import MODELS
from helpers import assert_same_outputs, masked_original, random_keep


def with_running_stats(model):
    """Non-trivial batch-norm statistics, so that eval-mode BN is not an identity."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("share", [0.5, None])  # half of each group, or a random count
def test_slim_equals_masked_original(name, share):
    model = with_running_stats(MODELS[name]())
    gm = cpdfx.capture(model, torch.randn(2, 3, 16, 16))
    comb = passes.comb(gm)
    assert comb.prunable, f"{name}: nothing prunable"
    slim = passes.eliminate(gm, comb, random_keep(comb, np.random.default_rng(7), share))
    masked = masked_original(model, slim.meta["cpdfx_kept"])
    x = torch.randn(3, 3, 16, 16)  # another batch size than at capture
    with torch.no_grad():
        assert_same_outputs(slim(x), masked(x))
    assert cpdfx.cost(slim, x).params < cpdfx.cost(model, x).params


@pytest.mark.parametrize("name", sorted(MODELS))
def test_keeping_everything_is_the_same_function(name):
    model = with_running_stats(MODELS[name]())
    gm = cpdfx.capture(model, torch.randn(2, 3, 16, 16))
    comb = passes.comb(gm)
    slim = passes.eliminate(gm, comb, {g.id: np.arange(g.size) for g in comb.groups})
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert_same_outputs(slim(x), model(x), atol=1e-6)
    assert slim.meta["cpdfx_kept"] == {}


def test_groups_cover_the_expected_couplings():
    """Residual adds join the two branches' output channels in one group."""
    model = MODELS["resnet"]()
    comb = passes.comb(cpdfx.capture(model.eval(), torch.randn(2, 3, 16, 16)))
    by_param = {(n, d): g for g in comb.groups for n, d in g.params}
    stem = by_param[("stem.0.weight", 0)]
    assert ("layers.0.conv2.0.weight", 0) in stem.params  # identity shortcut: same space
    assert ("layers.1.conv2.0.weight", 0) in stem.params
    assert ("layers.2.shortcut.0.weight", 1) in stem.params  # consumed by the projection
    assert not by_param[("fc.weight", 0)].prunable  # the logits are the model's output


def test_grouped_conv_groups_shrink_with_channels():
    model = with_running_stats(MODELS["grouped"]())
    gm = cpdfx.capture(model, torch.randn(2, 3, 16, 16))
    comb = passes.comb(gm)
    slim = passes.eliminate(gm, comb, random_keep(comb, np.random.default_rng(0), 0.5))
    convs = {n.args[1].target: n.args[6] for n in slim.graph.nodes
             if n.target is torch.ops.aten.conv2d.default and len(n.args) > 6}
    depthwise = slim.get_submodule("depthwise.0").weight
    assert convs["depthwise.0.weight"] == depthwise.shape[0]  # still depthwise
    assert convs["grouped.0.weight"] == 2  # 4 groups, half removed


def test_bad_keep_sets_are_refused():
    gm = cpdfx.capture(MODELS["resnet"]().eval(), torch.randn(2, 3, 16, 16))
    comb = passes.comb(gm)
    group = comb.prunable[0]
    frozen = next(g for g in comb.groups if not g.prunable)
    with pytest.raises(ValueError, match="keep at least one"):
        passes.eliminate(gm, comb, {group.id: []})
    with pytest.raises(ValueError, match="cannot be pruned"):
        passes.eliminate(gm, comb, {frozen.id: [0]})
    with pytest.raises(ValueError, match="does not have"):
        passes.eliminate(gm, comb, {-5: [0]})
