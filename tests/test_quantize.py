"""INT8: cpdfx.quantize and choose_method, the ONNX scoring, ship's int8 report,
and the CLI's quantize, export --int8 and compress --int8 on good and bad input."""
import json
import logging
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnxruntime.quantization import QuantFormat, QuantType, calibrate, quant_pre_process, quantize_static

from test_cli import run
from test_cli_bad_input import assert_refused

from cpdfx import data, evaluate, export_onnx, prune
from cpdfx.distill import distill
from cpdfx.models import ResNetTiny, UNetTiny
from cpdfx.onnxmodel import OnnxModel
from cpdfx.pipeline import INT8, Int8, int8_summary, ship
from cpdfx.quantize import (Agreement, CalibrationReader, QuantizeError, best_method, choose_method, prepare,
                            quantize)


@pytest.fixture(scope="module")
def digits_net(tmp_path_factory, one_thread):
    """A ResNetTiny for digits' 1x8x8 images, trained a little (so that int8
    rounding can change its answers), exported; with labelled batches."""
    train, test = data.digits("train"), data.digits("test")
    torch.manual_seed(0)
    model = ResNetTiny(in_channels=1, widths=(8, 16, 32), blocks=(1, 1, 1))
    distill(model, None, train, epochs=1, batch_size=32, lr=3e-3, progress=False)
    model.eval()
    folder = tmp_path_factory.mktemp("int8")
    x = torch.stack([train[0][0], train[1][0]])
    path = export_onnx(model, x, folder / "net.onnx")
    labelled = lambda d, n: [(torch.stack([d[i][0] for i in range(j, j + 32)]),  # noqa: E731
                              torch.tensor([d[i][1] for i in range(j, j + 32)])) for j in range(0, n, 32)]
    return {"model": model, "x": x, "path": path, "folder": folder, "train": train, "test": test,
            "calibration": labelled(train, 128), "validation": labelled(test, 256)}


def ops(path):
    return [n.op_type for n in onnx.load(path).graph.node]


def test_quantize_writes_a_qdq_model_that_runs_at_another_batch(digits_net, tmp_path):
    out = tmp_path / "net.int8.onnx"
    result = quantize(digits_net["path"], out, [x for x, _ in digits_net["calibration"]])  # bare tensors
    assert result.path == str(out) and out.is_file()
    assert {"QuantizeLinear", "DequantizeLinear"} <= set(ops(out))
    weights = [t for t in onnx.load(out).graph.initializer if t.data_type == onnx.TensorProto.INT8]
    compute = sum(op in ("Conv", "Gemm") for op in ops(digits_net["path"]))
    assert len(weights) >= compute == 10  # 9 convs' and the linear's weights stored in int8
    assert result.int8_ops == compute and result.float_ops == 0  # all run in onnxruntime's int8 kernels
    assert (result.method, result.activations, result.weights, result.per_channel) == ("minmax", "uint8", "int8", True)
    assert result.checked_batch == 33 and result.calibration.images == 128
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": np.zeros((3, 1, 8, 8), np.float32)})[0].shape == (3, 10)
    props = {p.key: p.value for p in onnx.load(out).metadata_props}
    assert json.loads(props["cpdfx.int8"])["method"] == "minmax" and "cpdfx.macs" in props  # the export's kept


def test_reported_agreement_is_what_the_two_files_compute(digits_net, tmp_path):
    out = tmp_path / "net.int8.onnx"
    result = quantize(digits_net["path"], out, digits_net["calibration"], method="entropy")
    fp32, int8 = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (digits_net["path"], out))
    xs = [x.numpy() for x, _ in digits_net["calibration"]]
    want = np.concatenate([fp32.run(None, {"x": x})[0] for x in xs])
    have = np.concatenate([int8.run(None, {"x": x})[0] for x in xs])
    a = result.calibration
    assert a.max_abs_error == pytest.approx(np.abs(have - want).max(), rel=1e-5)
    assert a.mean_abs_error == pytest.approx(np.abs(have - want).mean(), rel=1e-4)
    assert a.argmax == pytest.approx((have.argmax(1) == want.argmax(1)).mean())
    labels = torch.cat([y for _, y in digits_net["calibration"]]).numpy()
    assert a.top1["int8"] == pytest.approx((have.argmax(1) == labels).mean())
    assert 0 < a.mean_abs_error < 0.1 * a.mean_abs_output  # int8, not a broken model
    assert result.within_tolerance == (a.argmax >= result.tolerance)


def test_calibration_holds_one_batch_at_a_time(digits_net, tmp_path, monkeypatch):
    """The calibrators see the batches one by one (memory of one batch's
    activations), and MinMax's ranges are those of all the batches at once."""
    seen = []
    for cls in (calibrate.MinMaxCalibrater, calibrate.HistogramCalibrater):
        def counting(self, reader, _collect=cls.collect_data):
            items = list(iter(reader.get_next, None))
            seen.append(len(items))
            return _collect(self, CalibrationReader(items))
        monkeypatch.setattr(cls, "collect_data", counting)
    feeds = [x for x, _ in digits_net["calibration"]]
    for method in ("minmax", "percentile"):
        seen.clear()
        quantize(digits_net["path"], tmp_path / f"{method}.onnx", feeds, method=method, reduce_range=False)
        assert seen == [1] * len(feeds), method
    monkeypatch.undo()
    whole = tmp_path / "whole.onnx"
    prepared = prepare(digits_net["path"], tmp_path / "prepared.onnx")
    quantize_static(prepared, str(whole), CalibrationReader([{"x": x.numpy()} for x in feeds]),
                    quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    scales = lambda p: {t.name: onnx.numpy_helper.to_array(t).tolist()  # noqa: E731
                        for t in onnx.load(p).graph.initializer if t.name.endswith("_scale")}
    assert scales(tmp_path / "minmax.onnx") == scales(whole) != {}


def test_preprocessing_passes_where_symbolic_shape_inference_fails(digits_net, tmp_path, caplog):
    """onnxruntime's default pre-process still fails on the dynamo exporter's
    graphs; cpdfx's replacement runs, and the quantizer has nothing to warn of."""
    with pytest.raises(AttributeError, match="HasField"):
        quant_pre_process(digits_net["path"], str(tmp_path / "pre.onnx"))
    with caplog.at_level(logging.WARNING):
        result = quantize(digits_net["path"], tmp_path / "q.onnx", digits_net["calibration"])
    assert not [r for r in caplog.records if "pre-process" in r.getMessage()]
    assert not [n for n in result.notes if "pre-process" in n], result.notes
    assert "without symbolic shape inference" in result.preprocess
    assert "BatchNormalization" not in ops(tmp_path / "q.onnx")  # folded into the convs by the optimisation


def test_choose_method_keeps_the_best_on_validation(digits_net, tmp_path):
    result = choose_method(digits_net["path"], tmp_path / "q.onnx", digits_net["calibration"],
                           digits_net["validation"])
    assert set(result.methods) == {"minmax", "entropy", "percentile"}
    assert result.method == best_method(result.methods)
    assert all(a.images == 256 and a.top1 is not None for a in result.methods.values())
    assert json.loads({p.key: p.value for p in onnx.load(tmp_path / "q.onnx").metadata_props}["cpdfx.int8"]
                      )["method"] == result.method


def test_best_method_ranks_labels_then_agreement_then_error():
    def a(top1, agree, err):
        return Agreement(10, agree, 1.0, err, 1.0, None if top1 is None else {"fp32": 0.9, "int8": top1})
    assert best_method({"minmax": a(0.80, 0.99, 0.1), "entropy": a(0.82, 0.90, 0.3)}) == "entropy"
    assert best_method({"minmax": a(0.80, 0.95, 0.1), "entropy": a(0.80, 0.97, 0.3)}) == "entropy"
    assert best_method({"minmax": a(None, 0.97, 0.2), "percentile": a(None, 0.97, 0.1)}) == "percentile"
    assert best_method({"minmax": a(None, 0.97, 0.1), "percentile": a(None, 0.97, 0.1)}) == "minmax"


def test_segmentation_reports_pixel_agreement(tmp_path, one_thread):
    torch.manual_seed(0)
    model = UNetTiny(num_classes=3, in_channels=3).eval()
    path = export_onnx(model, torch.randn(2, 3, 16, 16), tmp_path / "unet.onnx")
    result = quantize(path, tmp_path / "unet.int8.onnx", [torch.randn(4, 3, 16, 16) for _ in range(3)],
                      task="segmentation")
    assert result.calibration.images == 12 and result.calibration.top1 is None
    assert 0 < result.calibration.argmax <= 1 and result.tolerance == 0.95


def test_onnx_model_scores_as_the_torch_model_does(digits_net):
    want = evaluate(digits_net["model"], digits_net["test"])
    assert evaluate(OnnxModel(digits_net["path"]), digits_net["test"]) == pytest.approx(want)


# -- bad input: one error, nothing written ----------------------------------------------------

def test_bad_input_raises_and_writes_nothing(digits_net, tmp_path):
    out = tmp_path / "q.onnx"
    (tmp_path / "notes.onnx").write_text("not a model")
    with pytest.raises(QuantizeError, match="not an ONNX model"):
        quantize(tmp_path / "notes.onnx", out, digits_net["calibration"])
    with pytest.raises(QuantizeError, match=r"has shape \(4, 1, 16, 16\), and the model takes \(batch, 1, 8, 8\)"):
        quantize(digits_net["path"], out, [torch.randn(4, 1, 16, 16)])
    with pytest.raises(QuantizeError, match="no int8 kernels"):
        quantize(digits_net["path"], out, digits_net["calibration"], runtime="cuda")
    with pytest.raises(QuantizeError, match="empty"):
        quantize(digits_net["path"], out, [])
    assert list(tmp_path.iterdir()) == [tmp_path / "notes.onnx"]


class ElementWise(torch.nn.Module):
    def forward(self, x):
        return torch.relu(x) + x * 2


def test_a_model_without_int8_work_is_refused(tmp_path):
    path = export_onnx(ElementWise(), torch.randn(2, 4), tmp_path / "ew.onnx")
    with pytest.raises(QuantizeError, match="none of its convolutions or matrix products"):
        quantize(path, tmp_path / "ew.int8.onnx", [torch.randn(8, 4)])
    assert not (tmp_path / "ew.int8.onnx").exists()


# -- ship: the three models side by side -----------------------------------------------------

def test_ship_times_and_scores_the_int8_model_beside_the_fp32_ones(digits_net, tmp_path):
    model, x = digits_net["model"], digits_net["x"]
    slim = prune(model, x, macs=0.5, steps=1)
    summary = ship(model, slim, x, digits_net["test"], "classification", tmp_path, title="t", repeats=3,
                   threads=1, int8=Int8([b for b, _ in digits_net["calibration"]], method="minmax"))
    assert (tmp_path / "slim.int8.onnx").is_file()
    report = json.loads((tmp_path / "report.json").read_text())["int8"]
    assert set(report["scores_onnxruntime"]) == {"images", "original", "slim", INT8}
    assert report["scores_onnxruntime"]["slim"] == pytest.approx(evaluate(slim, digits_net["test"])["top1"])
    assert set(report["speedup"][INT8]) == {"1", "8"} and report["ship"] in ("slim.onnx", "slim.int8.onnx")
    assert {(r["model"], r["batch"]) for r in summary["bench"]} == {(m, b) for m in ("original", "slim", INT8)
                                                                    for b in (1, 8)}
    assert f"| {INT8} |" in (tmp_path / "report.md").read_text()
    assert report["verdict"] in (tmp_path / "report.md").read_text()


def rows(slim, int8):
    return [{"model": m, "batch": b, "device": "cpu", "speedup": s}
            for b in (1, 8) for m, s in (("original", 1.0), ("slim", slim[b]), (INT8, int8[b]))]


@pytest.fixture
def quantized(digits_net, tmp_path):
    return quantize(digits_net["path"], tmp_path / "q.onnx", digits_net["calibration"])


@pytest.mark.parametrize("slim, int8, scores, ship_name, words", [
    ({1: 1.5, 8: 2.0}, {1: 2.0, 8: 3.0}, (0.90, 0.895), "slim.int8.onnx", "int8 pays on this machine"),
    ({1: 1.5, 8: 2.0}, {1: 1.4, 8: 1.9}, (0.90, 0.90), "slim.onnx", "is written anyway"),
    ({1: 1.5, 8: 2.0}, {1: 2.0, 8: 3.0}, (0.90, 0.88), "slim.onnx", "loses more than 1 point"),
])
def test_int8_verdict(quantized, slim, int8, scores, ship_name, words):
    summary = int8_summary(quantized, rows(slim, int8), {"original": 0.9, "slim": scores[0], INT8: scores[1]},
                           "top1", 100)
    assert summary["ship"] == ship_name and words in summary["verdict"]
    assert summary["int8_over_slim"][8] == pytest.approx(int8[8] / slim[8])


# -- the command line --------------------------------------------------------------------------

def test_cli_quantize_chooses_a_method_and_prints_the_agreement(digits_net, tmp_path):
    out = tmp_path / "net.int8.onnx"
    result = run("quantize", digits_net["path"], "--data", "digits", "--calibration-batches", "2", "--out", out)
    assert result.returncode == 0, result.stderr
    assert out.is_file() and "<- chosen" in result.stdout and "arg-max agrees" in result.stdout


def test_cli_export_int8_writes_both_files(tmp_path):
    out = tmp_path / "net.onnx"
    result = run("export", "cli_models:small_digits_net", "--data", "digits", "--int8", "--method", "minmax",
                 "--calibration-batches", "2", "--out", out)
    assert result.returncode == 0, result.stderr
    assert out.is_file() and (tmp_path / "net.int8.onnx").is_file()
    timed = run("bench", out, tmp_path / "net.int8.onnx", "--batch-sizes", "1,2", "--repeats", "3",
                "--min-seconds", "0")
    assert timed.returncode == 0, timed.stderr
    verdict = next(line for line in timed.stdout.splitlines() if line.startswith("net.int8 against net:"))
    ratios = [float(v) for v in re.findall(r"x([0-9.]+) at batch", verdict)]
    pays = verdict.endswith(": int8 pays on this machine")
    assert len(ratios) == 2 and (pays or verdict.endswith("does not pay on this machine (ship the fp32 file)"))
    assert pays if min(ratios) >= 1.01 else not pays if min(ratios) <= 0.99 else True  # x1.00: rounded either way


@pytest.fixture(scope="module")
def wide_net(tmp_path_factory):
    """A model exported for 1x16x16 inputs: digits' 8x8 images do not fit it."""
    return export_onnx(ResNetTiny(in_channels=1), torch.randn(2, 1, 16, 16),
                       tmp_path_factory.mktemp("wide") / "wide.onnx")


@pytest.mark.parametrize("args, words", [
    (["quantize", "{text}", "--data", "digits"], "not an ONNX model"),
    (["quantize", "{16x16}", "--data", "digits"], "does not fit"),
    (["quantize", "{8x8}", "--data", "digits", "--runtime", "cuda"], "no int8 kernels"),
    (["export", "resnet", "--input-shape", "2,3,16,16", "--int8"], "give --data"),
    (["export", "cli_models:small_digits_net", "--input-shape", "2,1,16,16", "--data", "digits", "--int8"],
     "does not fit"),
    (["compress", "resnet", "--data", "digits", "--macs", "0.5", "--int8", "--runtime", "cuda"], "--runtime cuda"),
    (["prune", "resnet", "--input-shape", "2,3,16,16", "--macs", "0.5", "--int8"], "give --speedup"),
    (["prune", "resnet", "--input-shape", "2,3,16,16", "--speedup", "2", "--int8", "--runtime", "cuda"],
     "--runtime cuda"),
])
def test_cli_bad_int8_input_is_one_paragraph_and_writes_nothing(args, words, digits_net, wide_net, tmp_path):
    (tmp_path / "notes.onnx").write_text("not a model")
    before = sorted(tmp_path.iterdir())
    files = {"{16x16}": wide_net, "{8x8}": digits_net["path"], "{text}": tmp_path / "notes.onnx"}
    out = tmp_path / ("out" if args[0] == "compress" else "out.onnx")
    result = run(*[files.get(a, a) for a in args], "--out", out)
    assert_refused(result, words)
    assert sorted(tmp_path.iterdir()) == before  # no model, no int8 model, no folder
