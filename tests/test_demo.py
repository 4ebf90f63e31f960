"""The demo's code path on a tiny budget, on scikit-learn's digits (what the
demo falls back to without Fashion-MNIST): the report's MACs are per image,
its groups-pruned count is the groups that shrank, the teacher comes from the
cache on the second call, and the files the demo writes are 0644."""
import contextlib
import io
import json
import os
import types

import pytest
import torch

import cpdfx
from cpdfx import pipeline
from cpdfx.models import ResNetTiny

TINY = pipeline.DemoPlan(640, 1, 640, 1, 200, repeats=3)
WRITTEN = ("bench.json", "latency.png", "report.json", "report.md", "summary.json")


@pytest.fixture(scope="module")
def demo(tmp_path_factory, one_thread):
    """Train the teacher once through demo_teacher, then run the whole demo,
    counting the teacher trainings (compress trains through its own distill)."""
    folder = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CPDFX_CACHE", str(folder / "cache"))
        mp.setenv("CPDFX_FASHION_MNIST", str(folder / "no-fashion-mnist"))
        trainings = []
        real = pipeline.distill
        mp.setattr(pipeline, "distill", lambda *a, **k: trainings.append(1) or real(*a, **k))
        name, train, _, val = pipeline.demo_data(TINY)
        pipeline.demo_teacher(name, train, val, TINY)
        path = pipeline.teacher_path(name, len(train), TINY)
        before = path.stat().st_mtime_ns
        umask = os.umask(0o022)
        try:
            args = types.SimpleNamespace(quick=True, macs=0.5, importance="fisher", out=str(folder / "out"))
            with contextlib.redirect_stdout(io.StringIO()) as printed:
                summary = pipeline.run_demo(args, TINY)
        finally:
            os.umask(umask)
        print(printed.getvalue())
        yield types.SimpleNamespace(name=name, out=folder / "out", summary=summary, trainings=len(trainings),
                                    printed=printed.getvalue().splitlines(),
                                    teacher_unchanged=path.stat().st_mtime_ns == before,
                                    x1=train[0][0][None], path=path, train=train, val=val)


def test_shows_the_slim_model_in_int8_beside_the_fp32_ones(demo):
    """The demo quantizes the slim model, scores the three in onnxruntime and
    says in the report which to ship on this machine."""
    assert (demo.out / "slim.int8.onnx").is_file()
    int8 = json.loads((demo.out / "report.json").read_text())["int8"]
    assert set(demo.summary["scores"]) == {"original", "slim", "slim int8"} and int8["method"] == "minmax"
    assert int8["quantize"]["calibration"]["images"] == min(256, len(demo.train))
    assert int8["verdict"] in (demo.out / "report.md").read_text()


def test_falls_back_to_digits_and_reuses_the_cached_teacher(demo):
    assert demo.name == "digits"
    assert demo.trainings == 1 and demo.teacher_unchanged
    assert "loaded from the cache" in (demo.out / "report.md").read_text()


def test_says_which_data_and_how_long_before_it_starts(demo):
    """The data first, with how to get Fashion-MNIST; then an estimate for
    this data and this machine, in seconds for digits (not "10 minutes")."""
    data, estimate = demo.printed[:2]
    assert data.startswith("cpdfx demo: data: scikit-learn's 8x8 digits (1,347 training and 450 test images)")
    assert "apt-get install dataset-fashion-mnist" in data and "CPDFX_FASHION_MNIST" in data
    assert estimate.startswith("cpdfx demo: about ") and " seconds on this machine" in estimate
    assert "the teacher comes from the cache" in estimate


def test_the_estimate_follows_the_data_and_the_cache():
    """The full plan at a step of 50 ms (digits here) and 170 ms (Fashion-MNIST
    on a shared 2-core machine): under a minute on digits' 1,347 images, near
    twenty on Fashion-MNIST's 60,000 (runs there took 50 s and 17 min), and
    less with the teacher cached. The old fixed text said 10 minutes for both."""
    full = pipeline.PLANS["full"]
    digits = pipeline.demo_seconds(full, 1347, 1347, 450, cached=False, step=0.05)
    fashion = pipeline.demo_seconds(full, 60000, 60000, 10000, cached=False, step=0.17)
    cached = pipeline.demo_seconds(full, 60000, 60000, 10000, cached=True, step=0.17)
    assert pipeline.about(digits) == "about 40 seconds"
    assert pipeline.about(fashion) == "about 19 minutes" and pipeline.about(cached) == "about 8 minutes"


def test_report_macs_are_per_image(demo):
    report = json.loads((demo.out / "report.json").read_text())
    original = cpdfx.cost(ResNetTiny(10, 1, TINY.widths), demo.x1).macs
    slim = cpdfx.cost(cpdfx.load(demo.out / "slim.pt2"), demo.x1).macs
    assert report["macs"] == [original, slim] == [demo.summary["macs"]["original"], demo.summary["macs"]["slim"]]
    text = (demo.out / "report.md").read_text()
    assert f"MACs   {original / 1e6:,.2f} M -> {slim / 1e6:,.2f} M per image" in text
    assert f"| original | {demo.summary['scores']['original']:.2%} | {original / 1e6:.2f} M |" in text


def test_groups_pruned_counts_every_group_that_shrank(demo):
    report = json.loads((demo.out / "report.json").read_text())
    shrank = sum(g["size"][1] < g["size"][0] for g in report["groups"])
    assert len(report["steps"]) == TINY.prune_steps and shrank > 1
    assert report["groups_pruned"] == shrank
    assert f"groups pruned {shrank} of {report['groups_prunable']}" in (demo.out / "report.md").read_text()


def test_report_states_every_training_budget(demo):
    text = (demo.out / "report.md").read_text()
    assert f"{TINY.teacher_epochs} epoch(s) on {TINY.teacher_images:,} digits training images" in text
    assert "distilled from the teacher" in text and f"for {TINY.slim_epochs} epoch(s) on {TINY.slim_images:,}" in text
    assert f"{TINY.val_images:,} digits test images" in text


def test_written_files_are_0644_under_umask_022(demo):
    for name in WRITTEN:
        assert (demo.out / name).stat().st_mode & 0o777 == 0o644, name
    assert not [p.name for p in demo.out.iterdir() if ".tmp" in p.name]


def test_a_corrupt_cached_teacher_is_trained_again(demo, monkeypatch):
    monkeypatch.setenv("CPDFX_CACHE", str(demo.path.parent.parent))
    demo.path.write_bytes(b"not a checkpoint")
    teacher, cached = pipeline.demo_teacher("digits", demo.train, demo.val, TINY)
    assert not cached
    assert torch.load(demo.path, weights_only=True).keys() == teacher.state_dict().keys()
