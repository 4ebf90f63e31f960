"""Quantization-aware distillation: the fake quantization (qat.py) rounds as
onnxruntime's int8 model does, strips back to the plain graph, and
compress --int8 trains with it where post-training int8 loses on val."""
import json

import pytest
import torch

from test_cli import run

from cpdfx import capture, data, pipeline, prune
from cpdfx.distill import distill
from cpdfx.models import ResNetTiny
from cpdfx.pipeline import Int8, int8_ready
from cpdfx.qat import PREFIX, FakeQuantize, distill_int8, fake_quantize, strip


@pytest.fixture(scope="module")
def digits_net(one_thread):
    train, test = data.digits("train"), data.digits("test")
    torch.manual_seed(0)
    model = ResNetTiny(in_channels=1, widths=(8, 16, 32), blocks=(1, 1, 1))
    distill(model, None, train, epochs=1, batch_size=32, lr=3e-3, progress=False)
    x = torch.stack([train[0][0], train[1][0]])
    return model.eval(), x, train, test


def fake_quant_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_module" and str(n.target).startswith(PREFIX)]


def test_every_conv_and_linear_input_and_weight_is_rounded(digits_net):
    model, x, _, _ = digits_net
    gm = capture(model, x)
    rounded = fake_quantize(gm, reduce_range=False)
    layers = [n for n in gm.graph.nodes if n.op == "call_function" and "conv" in str(n.target) or
              "linear" in str(n.target)]
    kinds = sorted(rounded.get_submodule(n.target).kind for n in fake_quant_nodes(rounded))
    assert kinds == ["activation"] * len(layers) + ["weight"] * len(layers) and len(layers) == 10  # 9 convs, the fc
    assert not fake_quant_nodes(gm)  # a copy: the captured graph is untouched


def test_weights_round_to_a_per_channel_int8_grid_and_pass_gradients_straight():
    w = torch.randn(6, 3, 3, 3, requires_grad=True)
    for reduce_range, qmax in ((False, 127), (True, 64)):
        q = FakeQuantize("weight", reduce_range)(w)
        scale = w.detach().abs().flatten(1).amax(1) / qmax
        steps = q.detach() / scale[:, None, None, None]
        assert torch.allclose(steps, steps.round(), atol=1e-3) and steps.abs().max() <= qmax + 1e-3
        assert (q - w).abs().max() <= scale.max() / 2 + 1e-6
    q.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


def test_activations_round_to_uint8_over_the_range_training_saw():
    fq = FakeQuantize("activation").train()
    x = torch.linspace(-1.0, 3.0, 101)
    fq(x)
    assert (fq.low.item(), fq.high.item()) == pytest.approx((-1.0, 3.0))
    fq(x * 2)  # a wider batch moves the range by 1%
    assert fq.high.item() == pytest.approx(3.0 + 0.01 * 3.0)
    fq.eval()
    fq(x * 100)  # eval does not move it
    assert fq.high.item() == pytest.approx(3.03)
    y = fq(torch.tensor([-5.0, 0.0, 1.3, 9.0]))
    scale = (3.03 + 1.01) / 255
    assert y[0].item() == pytest.approx(-1.01, abs=scale) and y[1].item() == 0.0  # clamped; zero exact
    assert y[2].item() == pytest.approx(1.3, abs=scale / 2) and y[3].item() == pytest.approx(3.03, abs=scale)


def test_strip_leaves_the_plain_graph_with_the_trained_weights(digits_net):
    model, x, train, _ = digits_net
    gm = capture(model, x)
    result = distill_int8(gm, model, [train[i] for i in range(64)], epochs=1, batch_size=32, progress=False)
    slim = result.student
    assert not fake_quant_nodes(slim) and not [k for k, _ in slim.named_children() if k.startswith(PREFIX)]
    plain = [(n.op, n.target) for n in gm.graph.nodes]
    assert [(n.op, n.target) for n in slim.graph.nodes] == plain
    assert not torch.equal(slim.state_dict()["stem.0.weight"], gm.state_dict()["stem.0.weight"])  # trained
    fresh = capture(model, x)
    fresh.load_state_dict(slim.state_dict())
    assert torch.allclose(fresh(x), slim(x), atol=1e-6)  # nothing but the weights differs


def test_int8_ready_distils_with_rounding_only_where_int8_loses_on_val(digits_net, monkeypatch, tmp_path):
    model, x, train, test = digits_net
    slim = prune(model, x, macs=0.5, steps=1)
    plan = Int8([torch.stack([train[i][0] for i in range(j, j + 32)]) for j in range(0, 128, 32)], method="minmax")
    val = [test[i] for i in range(200)]
    kept, same = int8_ready(model, slim, x, train, val, plan, "classification", epochs=0, progress=False)
    assert kept is slim and same.qat["epochs"] == 0 and not same.qat["kept"]
    assert same.qat["points_lost"] == pytest.approx(
        (same.qat["post_training"]["fp32"] - same.qat["post_training"]["int8"]) * 100)
    monkeypatch.setattr(pipeline, "QAT_TRIGGER", -100.0)  # every model "loses": the fine-tune runs
    out, plan = int8_ready(model, slim, x, train, val, plan, "classification", epochs=1, progress=False)
    q = plan.qat
    assert q["epochs"] == 1 and q["kept"] == (q["quantization_aware"]["int8"] > q["post_training"]["int8"])
    assert (out is not slim) == q["kept"]
    assert q["post_training"] == same.qat["post_training"]  # the same measurement, not a new draw


def test_compress_int8_reports_the_quantization_aware_step(tmp_path):
    out = tmp_path / "run"
    result = run("compress", "cli_models:small_digits_net", "--data", "digits", "--macs", "0.5", "--epochs", "1",
                 "--int8", "--method", "minmax", "--calibration-batches", "2", "--qat-epochs", "0",
                 "--allow-untrained-teacher", "--out", out)
    assert result.returncode == 0, result.stderr
    qat = json.loads((out / "report.json").read_text())["int8"]["qat"]
    assert qat["epochs"] == 0 and qat["trigger_points"] == pipeline.QAT_TRIGGER
    assert "post-training int8 on val" in result.stdout
    bad = run("compress", "cli_models:small_digits_net", "--data", "digits", "--macs", "0.5", "--int8",
              "--qat-epochs", "-1", "--out", tmp_path / "bad")
    assert bad.returncode == 2 and "--qat-epochs -1" in bad.stderr and not (tmp_path / "bad").exists()
