"""ONNX export matches onnxruntime at a new batch size, carries cost and report,
and fails cleanly; .pt2 save/load keeps outputs, meta and the mode switch."""
import copy
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils import _pytree as pytree

import cpdfx
from cpdfx import passes
from cpdfx import export as export_module
from cpdfx import zoo
from cpdfx.capture import is_captured
from cpdfx.export import ExportError, LoadError, export_onnx, load, save
from cpdfx.models import MODELS
from helpers import assert_vgg_trains


def run_onnx(path, *inputs):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {n: x.numpy() for n, x in zip(names, inputs)})


def assert_matches(path, model, x):
    with torch.no_grad():
        expected = pytree.tree_leaves(model(x))
    got = run_onnx(path, x)
    assert len(got) == len(expected)
    for have, want in zip(got, expected):
        np.testing.assert_allclose(have, want.numpy(), atol=1e-4, rtol=1e-3)


def props(path) -> dict:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_pruned_builtin_model_matches_onnxruntime_at_a_new_batch(tmp_path, name):
    model = MODELS[name]().eval()
    slim = cpdfx.prune(model, torch.randn(2, 3, 16, 16), macs=0.5)
    path = export_onnx(slim, torch.randn(2, 3, 16, 16), tmp_path / f"{name}.onnx")
    assert_matches(path, slim, torch.randn(3, 3, 16, 16))
    graph = onnx.load(path).graph
    assert all(v.type.tensor_type.shape.dim[0].dim_param == "batch" for v in [*graph.input, *graph.output])
    if name == "fpn":
        assert [o.name for o in graph.output] == ["classes", "boxes"]


@pytest.mark.parametrize("family", ["vit", "segformer"])
def test_pruned_transformers_model_exports_with_named_outputs(tmp_path, family):
    model = zoo.build(family).eval()
    slim = cpdfx.prune(model, torch.randn(2, 3, 64, 64), macs=0.5)
    path = export_onnx(slim, torch.randn(2, 3, 64, 64), tmp_path / "m.onnx")
    assert [o.name for o in onnx.load(path).graph.output] == ["logits"]
    for batch in (1, 5):  # the batch read inside the graph (ViT's class token, reshapes) is dynamic
        assert_matches(path, slim, torch.randn(batch, 3, 64, 64))


def test_plain_module_exports_its_eval_behaviour_and_is_not_changed(tmp_path):
    model = MODELS["vgg"]().train()  # dropout and batch norm
    state = copy.deepcopy(model.state_dict())
    path = export_onnx(model, torch.randn(2, 3, 16, 16), tmp_path / "vgg.onnx")
    assert model.training
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert_matches(path, copy.deepcopy(model).eval(), torch.randn(4, 3, 16, 16))


def test_metadata_holds_cost_report_version_and_user_entries(tmp_path):
    x = torch.randn(2, 3, 16, 16)
    slim = cpdfx.prune(MODELS["resnet"]().eval(), x, macs=0.5)
    meta = props(export_onnx(slim, x, tmp_path / "r.onnx", metadata={"dataset": "cifar10", "top1": 0.91}))
    per_sample = cpdfx.cost(slim, x[:1])
    assert int(meta["cpdfx.macs"]) == per_sample.macs > 0
    assert int(meta["cpdfx.params"]) == per_sample.params
    assert json.loads(meta["cpdfx.report"]) == json.loads(json.dumps(slim.meta["cpdfx_report"]))
    assert meta["cpdfx.version"] == cpdfx.__version__
    assert meta["dataset"] == "cifar10" and json.loads(meta["top1"]) == 0.91


def test_mismatch_raises_with_the_error_and_writes_nothing(tmp_path, monkeypatch):
    forward = export_module._Leaves.forward
    monkeypatch.setattr(export_module._Leaves, "forward",  # what gets exported is off by one
                        lambda self, *args: tuple(t + 1 for t in forward(self, *args)))
    path = tmp_path / "off.onnx"
    with pytest.raises(ExportError, match=r"differs by up to 1 .*atol=0.0001") as info:
        export_onnx(MODELS["se"]().eval(), torch.randn(2, 3, 16, 16), path)
    assert "\n" not in str(info.value)
    assert os.listdir(tmp_path) == []


class RunningMax(nn.Module):
    def forward(self, x):
        return torch.cummax(x, -1).values  # no ONNX translation in torch's exporter


class WithHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(8, 8)
        self.head = nn.Sequential(nn.ReLU(), RunningMax())

    def forward(self, x):
        return self.head(self.stem(x))


def test_exporter_failure_is_short_names_op_node_and_part_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "head.onnx"
    path.write_bytes(b"previous")
    with pytest.raises(ExportError, match="could not export WithHead to ONNX") as info:
        export_onnx(WithHead(), torch.randn(2, 3, 8), path)
    message = str(info.value)
    assert len(message.splitlines()) <= 20
    assert "aten.cummax.default" in message and "node:  cummax = " in message
    assert "part:  head.1 (RunningMax)" in message
    log = message.split("full log is in ")[1].split()[0].rstrip(".")
    assert "DispatchError" in open(log).read()  # the traceback the message leaves out
    os.remove(log)
    assert path.read_bytes() == b"previous" and os.listdir(tmp_path) == ["head.onnx"]


def test_static_batch_graph_exports_at_its_batch_only(tmp_path):
    model = MODELS["resnet"]().eval()
    gm = cpdfx.capture(model, torch.randn(3, 3, 16, 16), dynamic_batch=False)
    path = export_onnx(gm, torch.randn(3, 3, 16, 16), tmp_path / "static.onnx")
    assert [d.dim_value for d in onnx.load(path).graph.input[0].type.tensor_type.shape.dim] == [3, 3, 16, 16]
    assert_matches(path, model, torch.randn(3, 3, 16, 16))
    assert int(props(path)["cpdfx.macs"]) == cpdfx.cost(model, torch.randn(1, 3, 16, 16)).macs
    with pytest.raises(ExportError, match=r"captured with dynamic_batch=False") as info:
        export_onnx(gm, torch.randn(2, 3, 16, 16), tmp_path / "other.onnx")
    assert "(3, 3, 16, 16)" in str(info.value) and os.listdir(tmp_path) == ["static.onnx"]


class NoTensors(nn.Module):
    """A backbone asked for features at stages it does not have: it computes, and returns none."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        features = {"stage1": self.conv(x)}
        return tuple(features[name] for name in ("stage12",) if name in features)


def test_a_model_that_returns_no_tensors_is_refused_in_words(tmp_path):
    with pytest.raises(ExportError, match=r"its output \(tuple\) holds no tensors") as info:
        export_onnx(NoTensors().eval(), torch.randn(2, 3, 8, 8), tmp_path / "none.onnx")
    assert "\n" not in str(info.value) and os.listdir(tmp_path) == []


class Ops(nn.Module):
    """Ops the TorchScript exporter could not take with a dynamic batch (or at all)."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(3, 12, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        if self.kind == "fold":  # aten.col2im
            return F.fold(F.unfold(y, 2, stride=2), y.shape[-2:], 2, stride=2)
        if self.kind == "pyramid":  # output sizes that do not divide the input (PSP heads)
            return torch.cat([F.adaptive_avg_pool2d(y, s).flatten(1) for s in (1, 2, 3, 6)], 1)
        return y.flatten()[torch.nonzero(y.flatten() > 0).squeeze(1)]  # a length from the data


@pytest.mark.parametrize("kind", ["fold", "pyramid", "nonzero"])
def test_ops_the_old_exporter_refused_export_with_a_dynamic_batch(tmp_path, kind):
    model = Ops(kind).eval()
    path = export_onnx(model, torch.randn(2, 3, 7, 7), tmp_path / "m.onnx")
    for batch in (1, 4):
        assert_matches(path, model, torch.randn(batch, 3, 7, 7))


class LogEpsilon(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return torch.log(F.relu(self.conv(x)) + 1e-8)  # log(0) where the epsilon is lost


def test_a_tiny_epsilon_is_not_optimised_away(tmp_path):
    """onnxscript's rules take `x + c` with |c| <= 1e-8 for `x + 0`."""
    torch.manual_seed(0)
    model, x = LogEpsilon().eval(), torch.randn(2, 3, 8, 8)
    path = export_onnx(model, x, tmp_path / "eps.onnx")
    assert_matches(path, model, torch.randn(3, 3, 8, 8))
    assert "Add" in [n.op_type for n in onnx.load(path).graph.node]


class BiasedAttention(nn.Module):
    """Window attention as in Swin: a learned position bias as the mask, the
    heads put back with transpose, contiguous and reshape."""

    def __init__(self, dim=32, heads=2, tokens=9):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.bias = nn.Parameter(torch.randn(heads, tokens, tokens))

    def forward(self, x):
        split = lambda t: t.view(*x.shape[:-1], self.heads, -1).transpose(1, 2)  # noqa: E731
        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)),
                                           attn_mask=self.bias.unsqueeze(0))
        return self.o(y.transpose(1, 2).contiguous().reshape(*x.shape[:-1], -1))


@pytest.mark.parametrize("pruned", [False, True], ids=["whole", "pruned"])
def test_attention_with_a_learned_bias_exports(tmp_path, pruned):
    """The mask requires grad, which decides sdpa's kernel and output layout
    in some of the exporter's traces and not in others, where the kernel could
    be the fused one: q/k and v head dims equal, whole or pruned alike."""
    torch.manual_seed(0)
    model, x = BiasedAttention().eval(), torch.randn(2, 9, 32)
    if pruned:
        gm = cpdfx.capture(model, x)
        comb = passes.comb(gm)
        model = passes.eliminate(gm, comb, {g.id: range(12) for g in comb.prunable if g.size == 16})
    path = export_onnx(model, x, tmp_path / "attention.onnx")
    assert_matches(path, model, torch.randn(3, 9, 32))
    assert all(p.requires_grad for p in model.parameters())  # the caller's model is not changed


@pytest.fixture(scope="module")
def vgg():
    """VGGTiny (batch norm and dropout) in train mode, captured and pruned."""
    torch.manual_seed(0)
    model = MODELS["vgg"]().train()
    return model, cpdfx.prune(model, torch.randn(4, 3, 16, 16), macs=0.5)


def test_save_load_roundtrip_keeps_outputs_and_meta(tmp_path, vgg):
    _, slim = vgg
    slim = passes.set_mode(copy.deepcopy(slim), False)
    loaded = load(save(slim, tmp_path / "slim.pt2"))
    assert is_captured(loaded) and not loaded.training
    assert loaded.meta["cpdfx_kept"] == slim.meta["cpdfx_kept"]
    assert loaded.meta["cpdfx_report"] == json.loads(json.dumps(slim.meta["cpdfx_report"]))
    x = torch.randn(5, 3, 16, 16)  # the graph was captured at batch 4
    with torch.no_grad():
        assert torch.equal(loaded(x), slim(x))
    again = load(save(loaded, tmp_path / "again.pt2"))
    with torch.no_grad():
        assert torch.equal(again(x), slim(x))


def test_loaded_graph_switches_batch_norm_and_dropout_both_ways(tmp_path):
    model = MODELS["vgg"]().train()
    gm = cpdfx.capture(model, torch.randn(4, 3, 16, 16)).eval()  # saved in eval mode
    loaded = load(save(gm, tmp_path / "vgg.pt2"))
    x = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model.eval()(x), atol=1e-6)  # running statistics, no dropout
    before = assert_vgg_trains(loaded, x)
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), loaded(x))
    assert int(loaded.get_submodule("features.0.1").num_batches_tracked) == before + 2


def test_graph_captured_in_eval_loads_and_can_train(tmp_path):
    model = MODELS["resnet"]().eval()
    loaded = load(save(cpdfx.capture(model, torch.randn(2, 3, 16, 16)), tmp_path / "r.pt2"))
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-6)
        assert torch.allclose(loaded.train()(x), model.train()(x), atol=1e-5)  # batch statistics


def test_save_failure_leaves_nothing(tmp_path, monkeypatch, vgg):
    def broken(program, path, **kwargs):
        open(path, "wb").write(b"half")
        raise OSError("disk full")
    monkeypatch.setattr(torch.export, "save", broken)
    with pytest.raises(OSError):
        save(vgg[1], tmp_path / "slim.pt2")
    assert os.listdir(tmp_path) == []
    with pytest.raises(TypeError, match="capture it first"):
        save(vgg[0], tmp_path / "module.pt2")


def test_load_errors_are_one_paragraph(tmp_path):
    junk = tmp_path / "junk.pt2"
    junk.write_text("hello")
    plain = tmp_path / "plain.pt2"
    torch.export.save(torch.export.export(nn.Linear(2, 2), (torch.randn(3, 2),)), plain)
    for path, message in [(tmp_path / "missing.pt2", "no such file"), (junk, "not a .pt2 file"),
                          (plain, "not one cpdfx.save wrote")]:
        with pytest.raises(LoadError, match=message) as info:
            load(path)
        assert "\n" not in str(info.value)


def _fresh_python(code: str, tmp_path, extra_path=()) -> subprocess.CompletedProcess:
    """Run code in a new interpreter: nothing the test process imported is registered there."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*map(str, extra_path), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env=env, cwd=tmp_path)


def test_pruned_transformers_model_loads_exports_and_prunes_again_in_a_fresh_process(tmp_path):
    model = zoo.build("resnet").eval()
    x = torch.randn(2, 3, 64, 64)
    save(cpdfx.prune(model, x, macs=0.5, importance="l2"), tmp_path / "slim.pt2")
    result = _fresh_python(
        "import torch, cpdfx\n"
        "gm = cpdfx.load('slim.pt2')\n"
        "x = torch.randn(2, 3, 64, 64)\n"
        "print(type(gm(x)).__name__)\n"
        "cpdfx.export_onnx(gm, x, 'slim.onnx')\n"
        "again = cpdfx.prune(gm, x, macs=0.5, importance='l2')\n"
        "print(round(cpdfx.cost(again, x).macs / cpdfx.cost(gm, x).macs, 2))\n", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    kind, share = result.stdout.split()
    assert kind == "ImageClassifierOutputWithNoAttention" and 0.48 <= float(share) <= 0.5
    assert (tmp_path / "slim.onnx").is_file()


OUTPUT_MODULE = '''
import dataclasses
import torch
from torch.utils import _pytree as pytree

@dataclasses.dataclass
class Scores:
    logits: torch.Tensor

pytree.register_dataclass(Scores, serialized_type_name="my_outputs.Scores")

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
    def forward(self, x):
        return Scores(self.conv(x).mean((2, 3)))
'''


def test_a_missing_output_class_is_named_when_loading(tmp_path):
    (tmp_path / "my_outputs.py").write_text(OUTPUT_MODULE)
    saved = _fresh_python("import torch, cpdfx, my_outputs\n"
                          "cpdfx.save(cpdfx.capture(my_outputs.Net(), torch.randn(2, 3, 8, 8)), 'net.pt2')\n",
                          tmp_path, [tmp_path])
    assert saved.returncode == 0, saved.stderr[-3000:]
    loads = "import cpdfx, torch\nprint(type(cpdfx.load('net.pt2')(torch.randn(1, 3, 8, 8))).__name__)\n"
    fresh = _fresh_python(loads, tmp_path, [tmp_path])  # imports my_outputs itself, from the record
    assert fresh.returncode == 0 and fresh.stdout.strip() == "Scores", fresh.stderr[-3000:]
    (tmp_path / "my_outputs.py").unlink()
    missing = _fresh_python(loads, tmp_path)
    assert missing.returncode == 1
    message = missing.stderr.strip().splitlines()[-1]
    assert "my_outputs.Scores" in message and "importing my_outputs failed" in message
