"""bench: interleaved onnxruntime (and torch) timings, table, plot and JSON.
Timings are only checked for sanity: this runs on shared CI machines."""
import importlib

import pytest
import torch
import torch.nn as nn

from cpdfx.bench import BenchResult, _median_rows, _round_count, _rows, bench
from cpdfx.export import export_onnx

bench_module = importlib.import_module("cpdfx.bench")  # the module: the attribute cpdfx.bench is the function

FIELDS = {"model", "runtime", "device", "batch", "median_ms", "p90_ms", "images_per_s", "speedup", "repeats",
          "samples"}


def tiny(width):
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(width * 64, 4))


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    x = torch.randn(2, 3, 8, 8)
    models = {name: export_onnx(tiny(w), x, folder / f"{name}.onnx") for name, w in [("wide", 16), ("narrow", 4)]}
    return bench(models, (3, 8, 8), batch_sizes=(1, 4), threads=1, warmup=1, repeats=3, min_seconds=0,
                 torch_models={"wide": tiny(16)}, progress=False)


def test_rows_have_every_field_and_sane_values(result):
    assert [(r["runtime"], r["batch"], r["model"]) for r in result.rows] == [
        ("onnxruntime", 1, "wide"), ("onnxruntime", 1, "narrow"), ("torch", 1, "wide"),
        ("onnxruntime", 4, "wide"), ("onnxruntime", 4, "narrow"), ("torch", 4, "wide")]
    for r in result.rows:
        assert set(r) == FIELDS
        assert r["device"] == "cpu" and r["repeats"] == 3 and r["samples"] == 1
        assert 0 < r["median_ms"] <= r["p90_ms"] and r["speedup"] > 0
        assert r["images_per_s"] == pytest.approx(r["batch"] / r["median_ms"] * 1e3)
        if r["model"] == "wide":  # the reference of its runtime and batch
            assert r["speedup"] == 1.0
    assert result.machine["threads"] == 1 and result.machine["cores"] >= 1
    assert "CPUExecutionProvider" in result.machine["providers"] and result.machine["cpu"]


def test_the_speedup_is_the_median_of_each_rounds_ratio():
    """Three rounds: in the second the slim model alone hits a spike, in the
    third the machine runs both 3x slow. Its ratio to the reference in the
    same round is 2, 0.67 and 2: the speed-up is 2, where the ratio of the two
    medians (the reference's from a fast round, the slim one's from a slow
    one) says 0.67."""
    rows = _rows({"original": [0.002, 0.002, 0.006], "slim": [0.001, 0.003, 0.003]}, "onnxruntime", "cpu", 8)
    assert [r["speedup"] for r in rows] == [1.0, 2.0]
    assert rows[0]["median_ms"] == pytest.approx(2.0) and rows[1]["median_ms"] == pytest.approx(3.0)


def test_samples_keep_the_median_of_each_number():
    """Three timings of the same pair: the second a stray one (x1.0 where the
    others say x2.0 and x2.1). Each number is the median of the three, and the
    fewest rounds a timing had is reported."""
    samples = [_rows({"original": [0.004] * n, "slim": [0.004 / s] * n}, "onnxruntime", "cpu", 8)
               for s, n in [(2.0, 10), (1.0, 12), (2.1, 11)]]
    rows = _median_rows(samples)
    assert [r["speedup"] for r in rows] == [1.0, pytest.approx(2.0)]
    assert rows[1]["median_ms"] == pytest.approx(2.0) and rows[1]["images_per_s"] == pytest.approx(4000)
    assert [(r["repeats"], r["samples"]) for r in rows] == [(10, 3), (10, 3)]


def test_each_sample_times_fresh_sessions(result, monkeypatch):
    opened = []
    real = bench_module._ort_run
    monkeypatch.setattr(bench_module, "_ort_run", lambda path, *a: opened.append(path) or real(path, *a))
    rows = bench(result.models, (3, 8, 8), batch_sizes=(1,), threads=1, warmup=1, repeats=3, min_seconds=0,
                 samples=2, progress=False).rows
    assert sorted(opened) == sorted([*result.models.values()] * 2)
    assert [(r["repeats"], r["samples"]) for r in rows] == [(3, 2), (3, 2)]
    assert "median of 2 such timings in fresh sessions" in BenchResult(rows, result.machine).markdown()


def test_round_count_fills_min_seconds_and_caps_at_max_seconds():
    assert _round_count(0.01, 10, 1.5, None) == 150  # fast: more rounds to fill 1.5 s
    assert _round_count(0.5, 10, 1.0, None) == 10  # repeats already fill it
    assert _round_count(2.0, 10, 1.5, 10.0) == 5  # slow: what fits in 10 s
    assert _round_count(6.0, 10, 1.5, 10.0) == 3  # never under 3
    assert _round_count(0.0, 7, 1.5, 10.0) == 7  # no warm-up to go by


def test_markdown_has_a_row_per_model_and_batch(result):
    lines = result.markdown().splitlines()
    assert lines[0].startswith("| model |")
    for r in result.rows:
        assert sum(line.startswith(f"| {r['model']} | {r['runtime']} | {r['device']} | {r['batch']} |")
                   for line in lines) == 1
    assert len([line for line in lines if line.startswith("| ") and "---" not in line]) == len(result.rows) + 1


def test_plot_writes_png_with_macs_from_onnx_metadata(result, tmp_path):
    path = result.plot(tmp_path / "bench.png", accuracy={"wide": 0.9, "narrow": 0.8})
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert result.plot(tmp_path / "latency.png", macs={"wide": 2e6, "narrow": 1e6}).endswith("latency.png")


def test_json_roundtrips(result, tmp_path):
    assert BenchResult.from_json(result.to_json(tmp_path / "bench.json")) == result


def test_inputs_as_an_array_or_a_shape_with_batch(result):
    models = result.models
    for inputs in (torch.randn(3, 3, 8, 8), (1, 3, 8, 8)):
        rows = bench(models, inputs, batch_sizes=(2,), warmup=0, repeats=1, progress=False).rows
        assert [r["batch"] for r in rows] == [2, 2]


def test_fast_models_are_timed_for_min_seconds_not_just_repeats(result):
    """A round of these two tiny models takes well under a millisecond: one
    repeat asked, a tenth of a second to fill, so many rounds are timed, the
    same number for each model (they run round-robin)."""
    rows = bench(result.models, (3, 8, 8), batch_sizes=(1,), threads=1, warmup=2, repeats=1, min_seconds=0.1,
                 progress=False).rows
    assert rows[0]["repeats"] == rows[1]["repeats"] > 10


def test_unknown_provider_is_refused(result):
    with pytest.raises(ValueError, match="no TensorrtExecutionProvider"):
        bench(result.models, (3, 8, 8), providers=["TensorrtExecutionProvider"], progress=False)
