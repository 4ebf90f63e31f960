"""The step-wise pruner: schedule, budget in k steps, optimizer state carried through."""
import pytest
import torch
import torch.nn.functional as F

import cpdfx
from cpdfx.models import MODELS
from cpdfx.pruner import schedule


def _batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(8, 3, 16, 16, generator=g)
        yield x, (x.mean((1, 2, 3)) > 0).long()  # a label the model can learn


def test_schedules_end_at_the_target():
    geo = schedule(0.5, 5, "geometric")
    assert geo[-1] == pytest.approx(0.5) and all(a > b for a, b in zip(geo, geo[1:]))
    assert geo[1] / geo[0] == pytest.approx(geo[4] / geo[3])  # the same fraction each step
    assert schedule(0.5, 4, "linear") == pytest.approx([0.875, 0.75, 0.625, 0.5])
    with pytest.raises(ValueError, match="unknown schedule"):
        schedule(0.5, 4, "cubic")


def test_five_steps_reach_the_budget_and_adam_keeps_working():
    model = MODELS["resnet"]().train()
    x = torch.randn(2, 3, 16, 16)
    pruner = cpdfx.Pruner(model, x, "fisher", macs=0.5, steps=5)
    gm = pruner.gm
    assert gm.training
    opt = torch.optim.Adam(gm.parameters(), lr=1e-3)
    batches = _batches(40)
    losses = []
    while not pruner.done:
        for _ in range(4):
            inputs, labels = next(batches)
            loss = F.cross_entropy(gm(inputs), labels)
            loss.backward()
            pruner.accumulate(gm, (inputs,), labels, loss_fn=F.cross_entropy)  # fisher scores the samples
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        name = "layers.5.conv1.0.weight"
        weight = dict(gm.named_parameters())[name]
        moments = opt.state[weight]["exp_avg"].clone()
        previous_kept = gm.meta.get("cpdfx_kept", {}).get(name, {})
        gm = pruner.step(opt)
        # the moments were sliced exactly like the weight, in every dim the step shrank
        kept_now = gm.meta["cpdfx_kept"][name]
        for dim, kept in kept_now.items():
            before = previous_kept.get(dim, list(range(weight.shape[dim])))
            moments = moments.index_select(dim, torch.tensor([before.index(i) for i in kept]))
        new_param = dict(gm.named_parameters())[name]
        assert torch.equal(opt.state[new_param]["exp_avg"], moments)
    assert gm.training and pruner.steps_done == 5
    params = list(gm.parameters())
    assert {id(p) for group in opt.param_groups for p in group["params"]} == {id(p) for p in params}
    for p in params:
        state = opt.state[p]
        assert state["exp_avg"].shape == p.shape and state["exp_avg_sq"].shape == p.shape
    for inputs, labels in _batches(5, seed=1):  # training goes on
        loss = F.cross_entropy(gm(inputs), labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
        assert torch.isfinite(loss)
    achieved = cpdfx.cost(gm, x).macs / cpdfx.cost(model, x).macs
    assert 0.48 <= achieved <= 0.5
    steps = gm.meta["cpdfx_report"]["steps"]
    for planned, done in zip(schedule(0.5, 5), steps):
        assert planned - 0.02 <= done["macs"] <= planned + 1e-9


def test_weight_criterion_and_params_budget_with_sgd_momentum():
    model = MODELS["se"]().eval()
    x = torch.randn(2, 3, 16, 16)
    pruner = cpdfx.Pruner(model, x, "l2", params=0.4, steps=3, schedule="linear")
    gm = pruner.gm
    opt = torch.optim.SGD(gm.parameters(), lr=0.01, momentum=0.9)
    for _ in range(3):
        gm(torch.randn(4, 3, 16, 16)).sum().backward()
        opt.step()
        opt.zero_grad()
        gm = pruner.step(opt)
    assert pruner.done and pruner.step(opt) is gm  # nothing left to do
    for p in gm.parameters():
        assert opt.state[p]["momentum_buffer"].shape == p.shape
    assert 0.38 <= cpdfx.cost(gm, x).params / cpdfx.cost(model, x).params <= 0.4


def test_gradient_criterion_without_training_falls_back_to_calibration():
    model = MODELS["vgg"]().eval()
    x = torch.randn(2, 3, 16, 16)
    pruner = cpdfx.Pruner(model, x, "taylor", macs=0.6, steps=2,
                          calibration=[(torch.randn(4, 3, 16, 16),)])
    gm = pruner.step()
    gm = pruner.step()
    assert 0.58 <= cpdfx.cost(gm, x).macs / cpdfx.cost(model, x).macs <= 0.6


def test_bad_steps_are_refused():
    with pytest.raises(ValueError, match="steps=0"):
        cpdfx.Pruner(MODELS["vgg"](), torch.randn(2, 3, 16, 16), macs=0.5, steps=0)
