"""Blocks of forward under `with torch.autocast(...)` or `torch.no_grad()`: torch.export
captures each as a higher-order op that runs a sub-graph on its operands. Comb
sees through them as if inline, elimination slices and rewrites inside, cost and
set_mode count and switch inside, and the wrappers stay; another higher-order op
freezes what it touches."""
import numpy as np
import torch
import torch.nn as nn
from helpers import assert_same_outputs, in_times_out, masked_original, random_keep
from torch.utils.flop_counter import FlopCounterMode

import cpdfx
import cpdfx.latency as latency
from cpdfx import passes
from cpdfx.batchnorm import batch_norms
from cpdfx.importance import _norm_weights
from cpdfx.passes.comb import Inline

WRAPPERS = {torch.ops.higher_order.wrap_with_autocast, torch.ops.higher_order.wrap_with_set_grad_enabled}


class Wrapped(nn.Module):
    """A stem, a conv + norm kept in float32 (autocast off), and a gate on its
    channels computed without gradients."""

    def __init__(self, width=16):
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width)
        self.body, self.body_bn = nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width)
        self.gate = nn.Conv2d(width, width, 1)
        self.head = nn.Conv2d(width, 4, 1)

    def forward(self, x):
        y = torch.relu(self.stem_bn(self.stem(x)))
        with torch.autocast("cpu", enabled=False):
            z = torch.relu(self.body_bn(self.body(y)))
        with torch.no_grad():
            g = torch.sigmoid(self.gate(z))
        return self.head(z * g)


def _trained_stats(model):
    """Batch-norm statistics that are not the identity, so that pruning them shows."""
    for bn in (model.stem_bn, model.body_bn):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return model


def _wrappers(gm) -> set:
    return {n.target for n in gm.graph.nodes if n.op == "call_function"} & WRAPPERS


def _group(comb, param, dim):
    return next(g for g in comb.groups if (param, dim) in g.params)


def test_comb_groups_channels_across_the_wrappers():
    gm = cpdfx.capture(Wrapped().eval(), torch.randn(2, 3, 8, 8))
    assert _wrappers(gm) == WRAPPERS
    comb = passes.comb(gm)
    stem, body = _group(comb, "stem.weight", 0), _group(comb, "body.weight", 0)
    assert stem.prunable and body.prunable, comb.table()
    assert {("stem_bn.running_mean", 0), ("body.weight", 1)} <= set(stem.params)  # read inside autocast
    assert {("body_bn.weight", 0), ("gate.weight", 1), ("gate.weight", 0), ("head.weight", 1)} <= set(body.params)


def test_eliminate_slices_and_rewrites_inside_the_wrappers():
    model = _trained_stats(Wrapped()).eval()
    x = torch.randn(2, 3, 8, 8)
    gm = cpdfx.capture(model, x)
    comb = passes.comb(gm)
    x3 = torch.randn(3, 3, 8, 8)  # another batch size than at capture
    for seed in range(3):
        keep = random_keep(comb, np.random.default_rng(seed), share=None)
        slim = passes.eliminate(gm, comb, keep)
        assert _wrappers(slim) == WRAPPERS  # seen through, not inlined away
        with torch.no_grad():
            assert_same_outputs(slim(x3), masked_original(model, slim.meta["cpdfx_kept"])(x3))
        again = passes.comb(slim)  # the sub-graphs' shapes were propagated again
        assert sorted(g.size for g in again.prunable) == sorted(len(keep[g.id]) for g in comb.prunable)


def test_cost_counts_the_layers_inside_the_wrappers():
    model, x = Wrapped().eval(), torch.randn(2, 3, 8, 8)
    with FlopCounterMode(display=False) as counter:
        model(x)
    assert cpdfx.cost(model, x).macs * 2 == counter.get_total_flops()


def test_prune_and_export_a_model_with_wrapped_blocks(tmp_path):
    model, x = _trained_stats(Wrapped()).eval(), torch.randn(2, 3, 8, 8)
    slim = cpdfx.prune(model, x, macs=0.5)
    assert cpdfx.cost(slim, x).macs <= 0.5 * cpdfx.cost(model, x).macs
    assert slim.get_submodule("body").weight.shape[0] < 16
    x3 = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert_same_outputs(slim(x3), masked_original(model, slim.meta["cpdfx_kept"])(x3))
    cpdfx.export_onnx(slim, x, tmp_path / "slim.onnx")  # checked against onnxruntime at another batch


def test_the_wrappers_keep_their_meaning_in_training():
    """Captured in train mode: the norm inside the autocast block switches with
    the graph, counts its batches in train mode only, and the gate still gets
    no gradient."""
    model, x = Wrapped().train(), torch.randn(4, 3, 8, 8)
    gm = cpdfx.capture(model, x)
    slim = passes.eliminate(gm, passes.comb(gm), {})
    slim.eval()
    counted = int(slim.get_submodule("body_bn").num_batches_tracked)
    with torch.no_grad():
        assert_same_outputs(slim(x), model.eval()(x))
    assert int(slim.get_submodule("body_bn").num_batches_tracked) == counted
    slim.train()
    slim(x).sum().backward()
    assert int(slim.get_submodule("body_bn").num_batches_tracked) == counted + 1
    assert slim.get_submodule("gate").weight.grad is None
    assert slim.get_submodule("body").weight.grad is not None


def _names(gm) -> list:
    return [n.name for m in gm.modules() if isinstance(m, torch.fx.GraphModule) for n in m.graph.nodes]


def test_a_loaded_graph_whose_names_collide_prunes_again(tmp_path):
    """torch.export names a sub-graph's placeholders after the operands they
    take; comb, which keys its facts by node name, renames them."""
    model, x = _trained_stats(Wrapped()).eval(), torch.randn(2, 3, 8, 8)
    cpdfx.save(cpdfx.prune(model, x, macs=0.7), tmp_path / "slim.pt2")
    loaded = cpdfx.load(tmp_path / "slim.pt2")
    assert _wrappers(loaded) == WRAPPERS and len(set(_names(loaded))) < len(_names(loaded))
    again = cpdfx.prune(loaded, x, macs=0.5)
    assert len(set(_names(loaded))) == len(_names(loaded))
    x3 = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert_same_outputs(again(x3), masked_original(model, again.meta["cpdfx_kept"])(x3))


class Branches(nn.Module):
    """torch.cond between two convs: two sub-graphs, operands in a list."""

    def __init__(self):
        super().__init__()
        self.stem, self.mid = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.left, self.right, self.head = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = torch.relu(self.mid(torch.relu(self.stem(x))))
        y = torch.cond(x.mean() > 0, lambda t: self.left(t), lambda t: self.right(t), (y,))
        return self.head(y)


def test_another_higher_order_op_freezes_what_it_touches():
    model, x = Branches().eval(), torch.randn(2, 3, 8, 8)
    gm = cpdfx.capture(model, x)
    comb = passes.comb(gm)
    assert _group(comb, "stem.weight", 0).prunable
    for param in ("mid.weight", "left.weight", "right.weight"):
        assert _group(comb, param, 0).frozen_reason == "no rule for cond", comb.table()
    slim = passes.eliminate(gm, comb, random_keep(comb, np.random.default_rng(0)))
    x3 = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert_same_outputs(slim(x3), masked_original(model, slim.meta["cpdfx_kept"])(x3))


def test_batch_norms_inside_a_wrapper_are_reestimated():
    """reestimate_batch_norm finds the norm under autocast and averages its
    batch statistics into the buffer it reads from outside."""
    model = _trained_stats(Wrapped().eval())
    x = torch.randn(4, 3, 8, 8)
    gm = cpdfx.capture(model, x)
    assert len(batch_norms(gm)) == 2
    assert cpdfx.reestimate_batch_norm(gm, [(x,)]) == 4
    with torch.no_grad():
        expected = model.body(torch.relu(model.stem_bn.train()(model.stem(x)))).mean((0, 2, 3))
    assert torch.allclose(gm.get_buffer("body_bn.running_mean"), expected, atol=1e-5)


def test_bn_scale_reads_the_gamma_of_a_norm_inside_a_wrapper():
    gm = cpdfx.capture(_trained_stats(Wrapped().eval()), torch.randn(2, 3, 8, 8))
    assert {"stem_bn.weight", "body_bn.weight"} <= set(_norm_weights(gm))


def test_the_latency_model_prices_elementwise_work_inside_a_wrapper(monkeypatch):
    """The ReLU and sigmoid under the wrappers have element terms too."""
    monkeypatch.setattr(latency, "time_onnx", in_times_out)
    x = torch.randn(2, 3, 8, 8)
    gm = cpdfx.capture(Wrapped().eval(), x)
    comb = passes.comb(gm)
    model = latency.LatencyModel(gm, comb, x, batch=2, block=8, cache=False, progress=False, full_ms=1.0)
    priced = [n for n in Inline(gm).nodes if latency._element_term(n, comb, model.values)]
    assert any(n.graph is not gm.graph for n in priced) and len(model.element_terms) == len(priced)
