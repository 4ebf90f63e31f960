"""Batch-norm statistics re-estimated on a captured graph."""
import copy

import pytest
import torch

import cpdfx
from cpdfx.batchnorm import batch_norms, reestimate_batch_norm
from cpdfx.models import MODELS


def _batches(n=4, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 16, 16, generator=g) * 2 + 1,) for _ in range(n)]


def _running_stats(module):
    return {k: v.clone() for k, v in module.state_dict().items() if "running" in k}


def test_matches_torch_cumulative_average_and_leaves_dropout_off():
    """VGGTiny has dropout before its classifier: only the batch norms switch
    to batch statistics, so the result is torch's momentum=None average with
    the rest of the model in eval mode."""
    torch.manual_seed(0)
    model = MODELS["vgg"]().eval()
    batches = _batches()
    gm = cpdfx.capture(model, batches[0][0])

    reference = copy.deepcopy(model)
    for m in reference.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
            m.train()
    with torch.no_grad():
        for (x,) in batches:
            reference(x)

    code = gm.code
    assert reestimate_batch_norm(gm, batches) == 32
    expected = _running_stats(reference)
    got = _running_stats(gm)
    assert expected.keys() == got.keys() and len(got) == 2 * len(batch_norms(gm)) > 0
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6)
    assert gm.code == code and not gm.training  # the graph and its mode are as before
    x = batches[0][0]
    torch.testing.assert_close(gm(x), gm(x))  # eval: deterministic, dropout off


def test_an_error_midway_leaves_the_statistics_as_they_were():
    model = MODELS["resnet"]().eval()
    batches = _batches()
    gm = cpdfx.capture(model, batches[0][0])
    before, code = _running_stats(gm), gm.code

    def failing():
        yield batches[0]
        yield batches[1]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        reestimate_batch_norm(gm, failing())
    after = _running_stats(gm)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert gm.code == code
    assert reestimate_batch_norm(gm, []) == 0
    assert all(torch.equal(before[k], v) for k, v in _running_stats(gm).items())


def test_a_graph_without_batch_norm_is_left_alone():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.LayerNorm(14)).eval()
    gm = cpdfx.capture(model, torch.randn(2, 3, 16, 16))
    assert reestimate_batch_norm(gm, _batches()) == 0


def test_batches_of_one_behind_a_pooled_batch_norm_are_refused_not_nan():
    """BatchNorm1d after global pooling sees one value per channel in a batch of
    one: its variance is undefined, and the statistics must not become NaN."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 4)).eval()
    x = torch.randn(2, 3, 8, 8)
    gm = cpdfx.capture(model, x)
    before = _running_stats(gm)
    with pytest.raises(ValueError, match="two or more samples"):
        reestimate_batch_norm(gm, [(torch.randn(1, 3, 8, 8),)])
    assert all(torch.equal(before[k], v) for k, v in _running_stats(gm).items())
    assert torch.isfinite(gm(x)).all()
