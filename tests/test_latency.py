"""The latency model (tables, cache, block rounding) and the latency budget's
correction loop. No assertion here depends on how fast anything ran: timing
claims live in benchmarks/."""
import pytest
import torch

import cpdfx
import cpdfx.latency as latency
from cpdfx import passes
from cpdfx.models import MODELS


@pytest.fixture(scope="module")
def vgg():
    x = torch.randn(2, 3, 16, 16)
    gm = cpdfx.capture(MODELS["vgg"]().eval(), x)
    return gm, passes.comb(gm), x


def test_tables_are_cached_and_estimates_follow_the_block(vgg, tmp_path, monkeypatch):
    gm, comb, x = vgg
    model = latency.LatencyModel(gm, comb, x, batch=2, block=16, repeats=2, cache=tmp_path, progress=False)
    assert len(model.layers) == 5  # three convs and two linear layers
    assert model() > 0
    timed = []
    monkeypatch.setattr(latency, "time_onnx", lambda *a, **k: timed.append(a) or 1.0)
    again = latency.LatencyModel(gm, comb, x, batch=2, block=16, repeats=2, cache=tmp_path, progress=False)
    assert timed == [] and again() == pytest.approx(model())  # all from the cache
    wide = next(g for g in comb.prunable if ("features.2.0.weight", 0) in g.params)  # 32 channels
    assert model({wide.id: 17}) == pytest.approx(model({wide.id: 32}))  # one block of 16 costs the same
    fresh = latency.LatencyModel(gm, comb, x, batch=2, block=16, cache=False, progress=False, full_ms=1e6)
    assert timed and fresh() == pytest.approx(1e6)  # the rest makes up the measured whole


def test_latency_budget_corrects_by_what_it_measures(monkeypatch):
    """The tables say one thing, onnxruntime another: the loop asks again."""
    shares = iter([0.85, 0.71, 0.69])
    asked = []

    class FakeMeasured:
        full_ms = 0.0  # no rest: the tables alone

        def __init__(self, *args, **kwargs):
            pass

        def share(self, slim):
            return next(shares)

    real_plan = cpdfx.prune.__globals__["plan"]

    def spy_plan(*args, **kwargs):
        asked.append(args[3].latency)  # plan(gm, groups, example_inputs, target, ...)
        return real_plan(*args, **kwargs)

    monkeypatch.setitem(cpdfx.prune.__globals__, "Measured", FakeMeasured)
    monkeypatch.setitem(cpdfx.prune.__globals__, "plan", spy_plan)
    model = MODELS["resnet"](widths=(32, 64, 128)).eval()
    slim = cpdfx.prune(model, torch.randn(2, 3, 16, 16), latency=0.7,
                       latency_options={"cache": False, "progress": False, "repeats": 1, "block": 8})
    assert asked[0] == 0.7 and asked[1] == pytest.approx(0.7 * 0.7 / 0.85)  # tightened after 0.85
    assert slim.meta["cpdfx_report"]["achieved"]["latency"] == 0.71  # within 2 points, so kept
    assert len(asked) == 2


def test_latency_budget_that_cannot_be_met_says_so(monkeypatch):
    class Slow:
        full_ms = 0.0  # no rest: the tables alone

        def __init__(self, *args, **kwargs):
            pass

        def share(self, slim):
            return 0.95

    monkeypatch.setitem(cpdfx.prune.__globals__, "Measured", Slow)
    with pytest.raises(cpdfx.BudgetError, match="latency=0.7 was not reached"):
        cpdfx.prune(MODELS["resnet"](widths=(32, 64, 128)).eval(), torch.randn(2, 3, 16, 16), latency=0.7,
                    latency_options={"cache": False, "progress": False, "repeats": 1, "block": 8})
