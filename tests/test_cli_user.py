"""What a new user of the cpdfx command found untrue in the README (issue 29):
factory modules in the working folder, outputs checked before the work, raw
tracebacks, shapes the model knows, the library's argument names in CLI
messages, gradient criteria scored without data. Each runs the CLI in-process
through main() but where the console script itself is what is tested."""
import json
import os
import re
import subprocess
import sys
import sysconfig

import onnx
import pytest

import cpdfx.cli
from cpdfx.bench import BenchResult
from cpdfx.cli import build_parser, main
from cpdfx.pipeline import _markdown

SHAPE = ["--input-shape", "2,3,16,16"]
FACTORY = """import torch.nn as nn
def cnn(in_channels=3, num_classes=10):
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))
"""


def cli(capsys, *args):
    """main(args) in this process: (exit code, stdout, stderr without progress bars)."""
    try:
        code = main([str(a) for a in args])
    except KeyboardInterrupt:  # not raised out of main, or pytest would stop the whole session
        pytest.fail("KeyboardInterrupt escaped cpdfx.cli.main")
    out, err = capsys.readouterr()
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and not re.search(r"\d+%\|", line)]
    return code, out, lines


def assert_refused(result, *words):
    """Exit 2, one line on stderr naming the words, nothing on stdout: refused before any work."""
    code, out, lines = result
    assert code == 2 and len(lines) == 1 and lines[0].startswith("cpdfx "), (code, lines)
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert out == "", out


def files_in(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A 3-channel vgg as a saved .pt2 (pruned, so its widths are its own) and as ONNX."""
    folder = tmp_path_factory.mktemp("models")
    assert main(["prune", "vgg", *SHAPE, "--macs", "0.5", "--importance", "l2", "--steps", "1",
                 "--out", str(folder / "slim.pt2")]) == 0
    assert main(["export", "vgg", *SHAPE, "--out", str(folder / "vgg.onnx")]) == 0
    return folder


# 1. a factory module in the working folder

def test_the_console_script_imports_a_factory_module_from_the_working_folder(tmp_path):
    """`python -m cpdfx` puts the working folder on sys.path; the console script must too."""
    script = os.path.join(sysconfig.get_path("scripts"), "cpdfx")
    if not os.path.isfile(script):
        pytest.skip("the cpdfx console script is not installed")
    (tmp_path / "mymodels.py").write_text(FACTORY)
    result = subprocess.run([script, "inspect", "mymodels:cnn", *SHAPE], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "prunable groups" in result.stdout


# 2. outputs checked before any work

@pytest.mark.parametrize("command", [
    ["prune", "vgg", *SHAPE, "--macs", "0.5", "--steps", "1", "--out", "{missing}/slim.pt2"],
    ["export", "vgg", *SHAPE, "--out", "{missing}/m.onnx"],
    ["bench", "{models}/vgg.onnx", "--batch-sizes", "1", "--repeats", "3", "--out", "{missing}/b.json"],
    ["bench", "{models}/vgg.onnx", "--batch-sizes", "1", "--repeats", "3", "--plot", "{missing}/p.png"],
])
def test_a_file_output_in_a_missing_folder_is_refused_before_the_work(command, models, tmp_path, capsys):
    missing = tmp_path / "no" / "such"
    command = [c.format(missing=missing, models=models) for c in command]
    assert_refused(cli(capsys, *command), "cannot write", str(missing), "does not exist")
    assert files_in(tmp_path) == []


# 3. raw tracebacks

@pytest.mark.parametrize("flags,words", [
    (["--input-shape", "1,1,16,16"], ["vgg.onnx", "--input-shape", "(batch, 3, 16, 16)"]),
    (["--input-shape", "1,3,16"], ["vgg.onnx", "--input-shape"]),
    (["--repeats", "0", "--min-seconds", "0"], ["--repeats 0"]),
    (["--threads", "-1"], ["--threads -1"]),
])
def test_bench_refuses_bad_settings_before_timing(flags, words, models, tmp_path, capsys):
    result = cli(capsys, "bench", models / "vgg.onnx", "--batch-sizes", "1", *flags, "--out", tmp_path / "b.json")
    assert_refused(result, *words)
    assert files_in(tmp_path) == []


def test_distill_refuses_a_model_that_does_not_take_the_data_before_training(models, tmp_path, capsys):
    """A 3-channel .pt2 on 1-channel digits, as student or teacher: refused before
    the first step, and no metrics.jsonl left."""
    out = tmp_path / "run"
    for student, teacher in [(models / "slim.pt2", "vgg"), ("vgg", models / "slim.pt2")]:
        result = cli(capsys, "distill", student, teacher, "--data", "digits", "--epochs", "1", "--out", out)
        assert_refused(result, str(models / "slim.pt2"), "(2, 1, 8, 8)")
        assert not out.exists() or files_in(out) == []


def test_ctrl_c_while_the_command_line_is_read_is_one_line_and_exit_130(capsys, monkeypatch):
    def interrupted():
        raise KeyboardInterrupt
    monkeypatch.setattr(cpdfx.cli, "build_parser", interrupted)
    code, out, lines = cli(capsys, "inspect", "vgg")
    assert code == 130 and lines == ["cpdfx: interrupted"], lines


# 4. shapes the model knows

def test_inspect_takes_an_hf_familys_own_image_size(capsys):
    pytest.importorskip("transformers")
    code, out, lines = cli(capsys, "inspect", "hf:vit")
    assert code == 0, lines
    assert "prunable groups" in out


def test_export_takes_the_input_shape_of_a_saved_model(models, tmp_path, capsys):
    code, out, lines = cli(capsys, "export", models / "slim.pt2", "--out", tmp_path / "slim.onnx")
    assert code == 0, lines
    dims = onnx.load(str(tmp_path / "slim.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[1:]] == [3, 16, 16]


@pytest.mark.parametrize("command", [["inspect", "cli_models:small_digits_net"],
                                     ["export", "cli_models:small_digits_net", "--out", "m.onnx"],
                                     ["export", "vgg", "--out", "m.onnx"]])
def test_a_model_that_does_not_know_its_shape_asks_for_input_shape(command, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_refused(cli(capsys, *command), "--input-shape")
    assert files_in(tmp_path) == []


# 5. the library's argument names as the CLI's flags

def test_library_messages_are_told_in_flags():
    in_flags = cpdfx.cli.in_flags
    assert in_flags("give a budget: macs=, params= or latency=") == "give a budget: --macs, --params or --speedup"
    assert in_flags("steps=0: give a positive number") == "--steps 0: give a positive number"
    assert in_flags("cannot reach macs=0.1, latency=0.25: ask for") == "cannot reach --macs 0.1, --speedup 4: ask for"
    assert in_flags("importance='learned' learns") == "--importance learned learns"
    assert (in_flags("use a smaller batch_size, fewer prune_steps or a larger prune_share") ==
            "use a smaller --batch-size, fewer --prune-steps or a larger --prune-share")
    assert in_flags("or give a new out_dir to start afresh") == "or give a new --out to start afresh"
    assert in_flags("3 pruning steps in the steps of /data/out_dir/x.pt") == "3 pruning steps in the steps of /data/out_dir/x.pt"


@pytest.mark.parametrize("command,words,not_words", [
    (["prune", "vgg", *SHAPE, "--macs", "0.5", "--steps", "0"], ["--steps 0"], ["steps="]),
    (["prune", "vgg", *SHAPE], ["--macs", "--params", "--speedup"], ["macs=", "latency"]),
    (["compress", "vgg", "--data", "digits", "--macs", "0.5", "--epochs", "1", "--prune-steps", "500",
      "--allow-untrained-teacher"],
     ["--prune-steps", "--batch-size", "--prune-share"], ["prune_steps", "batch_size", "prune_share"]),
])
def test_errors_from_the_library_name_the_flags(command, words, not_words, tmp_path, capsys):
    code, out, lines = cli(capsys, *command, "--out", tmp_path / "out")
    lines = [line for line in lines if ": warning: " not in line]  # fisher without --data says so first
    assert code == 2 and len(lines) == 1, lines
    for word in words:
        assert word in lines[0], (word, lines[0])
    for word in not_words:
        assert word not in lines[0], (word, lines[0])


# 6. gradient criteria without data; prune's default rounds

def test_prune_warns_when_a_gradient_criterion_scores_without_data(tmp_path, capsys):
    code, out, lines = cli(capsys, "prune", "vgg", *SHAPE, "--macs", "0.5", "--steps", "1",
                           "--out", tmp_path / "slim.pt2")
    assert code == 0
    assert len(lines) == 1 and "warning" in lines[0] and "--data" in lines[0] and "example input" in lines[0], lines
    code, out, lines = cli(capsys, "prune", "vgg", *SHAPE, "--macs", "0.5", "--steps", "1", "--importance", "l2",
                           "--out", tmp_path / "slim.pt2")
    assert code == 0 and lines == []


def test_prune_takes_five_rounds_by_default():
    assert build_parser().parse_args(["prune", "vgg", "--macs", "0.5"]).steps == 5


# 7. report.md's speed-up column

def test_report_md_says_what_its_speed_up_column_is():
    rows = [{"model": m, "runtime": "onnxruntime", "device": "cpu", "batch": 1, "median_ms": ms, "p90_ms": ms,
             "images_per_s": 1e3 / ms, "speedup": s, "repeats": 30, "samples": 1}
            for m, ms, s in [("original", 0.081, 1.0), ("slim", 0.059, 1.32)]]
    timing = BenchResult(rows, {"onnxruntime": "1", "cpu": "cpu", "cores": 2, "threads": None})
    summary = {"metric": "top1", "scores": {"original": 0.9, "slim": 0.89}, "macs": {"original": 2e6, "slim": 1e6},
               "params": {"original": 1e5, "slim": 5e4}, "training": []}
    text = _markdown("t", summary, timing, {})
    table_end = text.index("| slim |")
    note = text[table_end:].split("\n")[2]  # the line after the table's blank line
    assert "speed-up" in note and "median" in note and "ratio" in note, note


def test_ctrl_c_while_the_cli_loads_exits_130_with_one_line(monkeypatch, capsys):
    """The `cpdfx` script (bin/cpdfx, installed by setup.py) imports the CLI, and
    torch, inside its own try: Ctrl-C during those seconds is one line and exit
    130, not a traceback."""
    script = os.path.join(os.path.dirname(__file__), os.pardir, "bin", "cpdfx")
    real = __import__

    def interrupted(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "cpdfx.cli":
            raise KeyboardInterrupt
        return real(name, globals, locals, fromlist, level)

    monkeypatch.setattr("builtins.__import__", interrupted)
    with pytest.raises(SystemExit) as stop:
        exec(compile(open(script).read(), script, "exec"), {"__name__": "__main__"})
    assert stop.value.code == 130 and capsys.readouterr().err == "cpdfx: interrupted\n"
