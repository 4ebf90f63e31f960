"""The cpdfx command: subcommands end to end, and errors as one paragraph with exit 2."""
import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout

import onnx
import pytest

from helpers import fake_onnxruntime

from cpdfx.cli import main

HERE = os.path.dirname(__file__)


def run(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    """The cpdfx command on args, run in this process as the script runs it
    (main()), from the folder cwd with the variables env set: its exit code and
    what it printed. A fresh process would spend seconds importing torch on
    every call; the tests of what only a process shows (the script's start,
    signals) start one themselves."""
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, redirect_stdout(out), redirect_stderr(err):
        for name, value in (env or {}).items():
            patch.setenv(name, value)
        if cwd is not None:
            patch.chdir(cwd)
        patch.setattr(sys, "path", list(sys.path))  # a factory spec puts the working folder on it
        try:
            code = main([str(a) for a in args])
        except SystemExit as stop:  # --help, and argparse's own usage errors
            code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def test_inspect_prints_the_groups_table():
    result = run("inspect", "resnet", "--input-shape", "2,3,16,16")
    assert result.returncode == 0, result.stderr
    assert "prunable" in result.stdout and "stem.0.weight:0" in result.stdout
    assert "no: model output" in result.stdout


def test_prune_export_bench_chain(tmp_path):
    slim = tmp_path / "slim.pt2"
    result = run("prune", "resnet", "--input-shape", "2,3,16,16", "--macs", "0.5", "--importance", "l2",
                 "--steps", "1", "--out", str(slim))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "slim.report.json").read_text())
    assert 0.48 <= report["achieved"]["macs"] <= 0.5
    assert "target macs 50%" in result.stdout
    for model, name in [(str(slim), "slim.onnx"), ("resnet", "original.onnx")]:
        result = run("export", model, "--input-shape", "2,3,16,16", "--out", str(tmp_path / name))
        assert result.returncode == 0, result.stderr
    onnx.checker.check_model(str(tmp_path / "slim.onnx"))
    result = run("bench", f"original={tmp_path / 'original.onnx'}", f"slim={tmp_path / 'slim.onnx'}",
                 "--batch-sizes", "2", "--repeats", "3", "--min-seconds", "0", "--samples", "2", "--out", str(tmp_path / "bench.json"))
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["original", "slim"] and rows[0]["speedup"] == 1.0
    assert [(r["repeats"], r["samples"]) for r in rows] == [(3, 2)] * 2  # no more rounds than asked
    assert "| slim | onnxruntime | cpu | 2 |" in result.stdout


def test_prune_with_data_calibrates_on_it(tmp_path):
    result = run("prune", "cli_models:small_digits_net", "--data", "digits", "--macs", "0.5",
                 "--calibration-batches", "2", "--steps", "2", "--out", str(tmp_path / "slim.pt2"))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "slim.report.json").read_text())
    assert report["criterion"] == "fisher" and len(report["steps"]) == 2
    assert report["batch_norm_reestimated_on"] == 2 * 32  # --calibration-batches x --batch-size


def test_compress_to_a_speedup_times_every_step(tmp_path, monkeypatch):
    """--speedup 1.5 is latency=2/3: both pruning steps are solved on the tables
    and measured, and the report holds what each measured. In-process, with
    onnxruntime's timings replaced (how fast is for benchmarks/): the tables
    cost a layer its input width, and the pruned models measure 0.8, then 0.66."""
    fake_onnxruntime(monkeypatch, [0.8, 0.66])
    assert main(["compress", "resnet", "--data", "digits", "--speedup", "1.5", "--epochs", "2",
                 "--prune-steps", "2", "--allow-untrained-teacher", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["target"] == {"latency": pytest.approx(2 / 3)}
    assert [e["latency"] for e in report["pruning"]] == [0.8, 0.66] and report["achieved"]["latency"] == 0.66
    assert report["achieved"]["macs"] < 1 and (tmp_path / "slim.onnx").exists()


def test_help_reads_well():
    result = run("--help")
    assert result.returncode == 0
    for command in ("compress", "prune", "distill", "export", "bench", "inspect", "demo"):
        assert command in result.stdout
        sub = run(command, "--help")
        assert sub.returncode == 0 and "usage: cpdfx " + command in sub.stdout


@pytest.mark.parametrize("args,words", [
    (["inspect", "no.such.module:f"], "cannot load model"),
    (["inspect", "resnet", "--input-shape", "a,b"], "--input-shape"),
    (["inspect", "cli_models:data_dependent", "--input-shape", "2,3"], "could not capture DataDependent"),
    (["prune", "resnet", "--input-shape", "2,3,16,16", "--macs", "0"], "in (0, 1]"),
    (["prune", "resnet", "--input-shape", "2,3,16,16", "--macs", "1.5"], "in (0, 1]"),
    (["prune", "resnet", "--input-shape", "2,3,16,16"], "give a budget"),
    (["prune", "resnet", "--input-shape", "2,3,16,16", "--macs", "0.5", "--steps", "0"], "--steps 0"),
    (["prune", "resnet", "--input-shape", "2,3,16,16", "--speedup", "0.5"], "a number above 1"),
    (["compress", "resnet", "--data", "/no/such/folder", "--macs", "0.5"], "unknown dataset"),
    (["export", "missing.pt2", "--input-shape", "2,3,16,16", "--out", "x.onnx"], "no such file"),
    (["bench", "README.md"], "cannot read README.md as an ONNX model"),
    (["bench", "nothing.onnx"], "no ONNX file"),
])
def test_bad_input_is_one_paragraph_and_exit_two(args, words, tmp_path):
    result = run(*args, cwd=os.path.dirname(HERE))
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert words in result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if ": warning: " not in line]  # fisher without data
    assert len(lines) == 1 or result.stderr.startswith("usage:")


def test_demo_quick_leaves_the_onnx_models_and_report(tmp_path):
    out = tmp_path / "demo"
    result = run("demo", "--quick", "--out", str(out),  # on digits: fast, whether Fashion-MNIST is installed or not
                 env={"CPDFX_FASHION_MNIST": str(tmp_path / "no-fashion-mnist")})
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("original.onnx", "slim.onnx", "slim.pt2", "report.md", "bench.json", "latency.png"):
        assert (out / name).is_file(), name
    onnx.checker.check_model(str(out / "slim.onnx"))
    report = (out / "report.md").read_text()
    assert "| original |" in report and "| slim |" in report and "speed-up" in report
    summary = json.loads((out / "summary.json").read_text())
    assert 0.48 <= summary["macs"]["slim"] / summary["macs"]["original"] <= 0.5
