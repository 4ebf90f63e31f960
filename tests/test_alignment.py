"""Aligned widths by default: pruned channel counts in the runtime's channel
block (budget.Constraints.alignments), finer only where a budget needs it,
and counted in the layers' channel dims (a head stands for head_dim channels)."""
import pytest
import torch
import torch.nn as nn
from helpers import assert_same_outputs, masked_original

import cpdfx
from cpdfx import passes
from cpdfx.budget import Constraints
from cpdfx.models import MODELS
from cpdfx.passes.spaces import PROD, Spaces
from cpdfx import runtime
from cpdfx.runtime import channel_block


def _changed_widths(slim):
    """Every parameter dim the pruning shrank: (name, after)."""
    return [(row["name"], after) for row in slim.meta["cpdfx_report"]["layers"]
            for before, after in zip(row["before"], row["after"]) if after != before]


def test_default_widths_are_multiples_of_the_runtime_block():
    """cuda's block is 8 on every machine, so this holds wherever it runs."""
    model = MODELS["resnet"](widths=(32, 64, 128)).eval()
    x = torch.randn(2, 3, 16, 16)
    slim = cpdfx.prune(model, x, macs=0.5, runtime="cuda")
    assert slim.meta["cpdfx_report"]["round_to"] == 8
    changed = _changed_widths(slim)
    assert changed and all(after % 8 == 0 for _, after in changed), changed
    assert 0.475 <= slim.meta["cpdfx_report"]["achieved"]["macs"] <= 0.5
    assert_same_outputs(slim(x), masked_original(model, slim.meta["cpdfx_kept"])(x))


def test_cpu_default_is_this_machines_block_and_round_to_1_frees_the_counts():
    model = MODELS["resnet"](widths=(32, 64, 128)).eval()
    x = torch.randn(2, 3, 16, 16)
    aligned = cpdfx.prune(model, x, macs=0.6)
    block = aligned.meta["cpdfx_report"]["round_to"]
    assert block in (channel_block(), channel_block() // 2)  # the block, or half where the budget needed it
    assert all(after % block == 0 for _, after in _changed_widths(aligned))
    free = cpdfx.prune(model, x, macs=0.6, round_to=1)
    assert free.meta["cpdfx_report"]["round_to"] == 1
    assert any(after % 2 for _, after in _changed_widths(free))  # odd counts: nothing rounds them


def test_a_small_model_falls_back_to_finer_widths_to_meet_the_budget():
    """12-channel layers have room for one block of 8 at most: 30% of the MACs
    needs finer widths, so the solver steps down (4, 2, 1), lands close to the
    budget, and says which it used."""
    model = nn.Sequential(nn.Conv2d(3, 12, 3), nn.ReLU(), nn.Conv2d(12, 12, 3), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5)).eval()
    x = torch.randn(2, 3, 16, 16)
    slim = cpdfx.prune(model, x, macs=0.3, runtime="cuda")
    report = slim.meta["cpdfx_report"]
    assert report["round_to"] < 8
    assert 0.28 <= report["achieved"]["macs"] <= 0.3
    assert all(after % report["round_to"] == 0 for _, after in _changed_widths(slim))


def test_an_explicit_round_to_never_falls_back():
    model = MODELS["vgg"]().eval()
    with pytest.raises(cpdfx.BudgetError, match="multiples of 32"):
        cpdfx.prune(model, torch.randn(2, 3, 16, 16), macs=0.2, round_to=32)


def test_unknown_runtime_is_refused_in_one_line():
    with pytest.raises(ValueError, match="runtime='tpu'.*'cpu' or 'cuda'"):
        cpdfx.prune(MODELS["vgg"]().eval(), torch.randn(2, 3, 16, 16), macs=0.5, runtime="tpu")


# -- what one element stands for ----------------------------------------------------------

def test_multiplicity_counts_the_factors_that_stay_whole():
    s = Spaces()
    dim, heads, head_dim = s.new(48), s.new(4), s.new(12)
    s.define(dim, PROD, [heads, head_dim])
    assert s.multiplicity(dim, heads) == 12 and s.multiplicity(dim, head_dim) == 4
    assert s.multiplicity(dim, heads, free={s.find(head_dim)}) == 1  # head_dim may shrink: a head is 1 for sure
    assert s.multiplicity(heads, heads) == 1 and s.multiplicity(head_dim, heads) == 0


class FixedHeadDim(nn.Module):
    """Attention whose q head_dim (16) is fixed by a per-dim scale made in the
    graph (no rule prunes it), so a q/k head stands for 16 channels: a whole
    block of 16, and the heads may go one by one."""

    def __init__(self, heads=6, head_dim=16):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        dim = heads * head_dim
        self.embed = nn.Conv2d(3, dim, 4, 4)
        self.q, self.k, self.v = (nn.Linear(dim, dim) for _ in range(3))
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        b, n, _ = x.shape
        split = lambda t: t.reshape(b, n, self.heads, self.head_dim).transpose(1, 2)
        ramp = torch.linspace(1, 2, self.head_dim, device=x.device)
        y = nn.functional.scaled_dot_product_attention(split(self.q(x)) * ramp, split(self.k(x)), split(self.v(x)))
        return self.head(self.proj(y.transpose(1, 2).reshape(b, n, -1)).mean(1))


def test_a_head_steps_by_one_when_it_stands_for_a_whole_block():
    model = FixedHeadDim().eval()
    x = torch.randn(2, 3, 16, 16)
    comb = passes.comb(cpdfx.capture(model, x))
    rules = Constraints(round_to=16).alignments(comb)[0]
    steps = {g.size: rules.step(g.id) for g in comb.prunable}
    assert steps == {96: 16, 16: 16, 6: 1}  # channels and the v head_dim by 16; heads by one
    slim = cpdfx.prune(model, x, macs=0.6, round_to=16)
    assert all(after % 16 == 0 for _, after in _changed_widths(slim))
    assert_same_outputs(slim(x), masked_original(model, slim.meta["cpdfx_kept"])(x))


def test_a_cuda_latency_budget_needs_the_cuda_provider(monkeypatch):
    """Aligning for a GPU works anywhere; timing on one needs onnxruntime's
    CUDA provider, and its absence is said in one line before any work."""
    monkeypatch.setattr(runtime.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(ValueError, match="CUDAExecutionProvider, which this onnxruntime lacks"):
        runtime.provider("cuda")
    monkeypatch.setattr(runtime.ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert runtime.provider("cuda") == "CUDAExecutionProvider" and runtime.channel_block("cuda") == 8
