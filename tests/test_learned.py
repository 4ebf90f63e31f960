"""The learned structure (compress(importance="learned"), cpdfx.learned) on
sklearn's digits: the penalty is weighted by what each channel costs, it alone
brings the open gates to the budget, the fallback closes gates only when the
pruning phase ends before it has, and the "fisher" ranking is the batch
Fisher criterion of the folded network."""
import inspect

import pytest
import torch

import cpdfx
from cpdfx.budget import Target
from cpdfx.compress import compress
from cpdfx.importance import Fisher
from cpdfx.learned import gated_student, resolve_options

X = torch.randn(2, 1, 8, 8)

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = dict(epochs=2, batch_size=32, lr=3e-3, progress=False)  # 42 steps an epoch: pruning in steps 1-42


def penalty_grads(teacher, cost_power):
    """The penalty's gradient on each free group's gates, every group's gates
    set alike: 1, but 0.5 for channel 0."""
    student, callback = gated_student(cpdfx.capture(teacher, X), X, Target(macs=0.5), 10, {}, {},
                                      resolve_options({"cost_power": cost_power}))
    with torch.no_grad():
        for gate in student.gates.values():
            gate.fill_(1.0)[0] = 0.5
    free = [student.gates[f"g{gid}"] for gid in callback.free_ids]
    return callback, dict(zip(callback.free_ids, torch.autograd.grad(callback.sparsity(), free)))


def test_the_penalty_is_weighted_by_what_a_channel_costs(teacher):
    weighted, grads = penalty_grads(teacher, 1.0)
    _, plain = penalty_grads(teacher, 0.0)
    model = weighted.cost_model
    full = {g.id: g.size for g in weighted.free}
    base = model().macs
    unit = {gid: (base - model({**full, gid: n - 1}).macs) / base for gid, n in full.items()}  # one channel's MACs
    costly, cheap = max(unit, key=unit.get), min(unit, key=unit.get)
    assert unit[costly] > 2 * unit[cheap]
    # the same gate pulls harder towards 0 in the costlier group, in proportion to the cost of its channels
    assert grads[costly][0] > 2 * grads[cheap][0] > 0
    for gid in unit:
        assert torch.isclose(grads[gid][0] / plain[gid][0], torch.tensor(weighted.weights[gid]), rtol=1e-5)
        assert weighted.weights[gid] / weighted.weights[cheap] == pytest.approx(unit[gid] / unit[cheap])
    # unweighted (cost_power 0), a channel's pull does not depend on its group's cost
    assert plain[costly][0] == pytest.approx(plain[cheap][0], rel=0.1)


def test_the_penalty_alone_brings_the_gates_to_the_budget(digits, teacher):
    result = compress(teacher, X, *digits, macs=0.5, importance="learned", **RUN)
    report = result.report
    learned = report["learned"]
    assert learned["cost_power"] == 1.0  # resource-weighted by default
    assert learned["fallback"] is False and learned["fallback_at"] is None
    met = learned["met_by_gates_at"]
    assert report["prune_at"] == [42] and met is not None and met <= 42
    assert [e["step"] for e in report["pruning"]] == [met]  # cut as soon as the open gates fitted the budget
    assert learned["end_share"]["macs"] <= 0.5
    trace = learned["trace"]
    assert trace[0]["used"] > 1.5 >= 1 >= trace[-1]["used"]  # from the full model, about twice the budget
    assert learned["final_penalty"] > learned["penalty"]  # the controller pushed while the gates lagged the path
    assert 0.48 <= report["achieved"]["macs"] <= 0.5  # the solver's cut lands on the budget exactly
    assert report["student"]["top1"] > 0.8, report["student"]
    assert "gates" not in str(list(dict(result.model.named_parameters())))


def test_a_phase_too_short_for_the_penalty_falls_back_and_says_so(digits, teacher):
    result = compress(teacher, X, *digits, macs=0.5, importance="learned", prune_share=0.1, **RUN)
    report = result.report
    learned = report["learned"]
    assert report["prune_at"] == [8]
    assert learned["fallback"] is True and learned["fallback_at"] == 8 and learned["met_by_gates_at"] is None
    assert learned["end_share"]["macs"] > 0.6  # the open gates were well over the budget when the phase ended
    assert [e["step"] for e in report["pruning"]] == [8]
    assert 0.48 <= report["achieved"]["macs"] <= 0.5


def test_fisher_rank_is_the_fisher_criterion_of_the_folded_network(digits, teacher):
    """rank="fisher" scores channels by g x dL/dg squared: on gates set apart,
    it is exactly what the batch Fisher (fisher_batch) measures on the plain
    graph with the gates folded in."""
    student, callback = gated_student(cpdfx.capture(teacher, X), X, Target(macs=0.5), 10, {}, {},
                                      resolve_options({"rank": "fisher"}))
    torch.manual_seed(0)
    with torch.no_grad():
        for gate in student.gates.values():
            gate.uniform_(0.2, 1.5)
    x, y = next(iter(torch.utils.data.DataLoader(digits[0], batch_size=32)))
    student.train()
    torch.nn.functional.cross_entropy(student(x), y).backward()
    callback.on_backward(student)
    scores = callback.scores()
    student.fold()
    gm, comb = callback.pruner.gm, callback.pruner.comb
    gm.zero_grad()
    torch.nn.functional.cross_entropy(gm(x), y).backward()
    # the batch's mask gradient squared, what the gates' own gradient gives (Fisher() before the per-sample form)
    fisher = Fisher(per_sample=False) if "per_sample" in inspect.signature(Fisher).parameters else Fisher()
    fisher.accumulate(gm, comb)
    expected = fisher.scores(gm, comb)
    assert scores.keys() and all(torch.allclose(torch.as_tensor(scores[gid]), torch.as_tensor(expected[gid]),
                                                rtol=1e-3, atol=1e-12) for gid in scores)
    assert any(scores[gid].max() > 10 * scores[gid].min() for gid in scores)  # they tell channels apart


def test_unknown_rank_is_refused():
    with pytest.raises(ValueError, match="rank one of"):
        resolve_options({"rank": "l1"})
