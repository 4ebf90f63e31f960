"""Every cpdfx command on input a user gets wrong: an output it cannot write, a
corrupt file of each kind it reads. Each must end with exit code 2 and one short
paragraph on stderr, before any work where the problem is visible up front, and
leave no file behind."""
import os
import re
import signal
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from test_cli import run

SHAPE = ["--input-shape", "2,3,16,16"]
UNWRITABLE = "/sys/cpdfx-test"  # sysfs: a folder that exists and refuses new files, even to root


def assert_refused(result, *words):
    """Exit 2, and one line on stderr besides the progress bars of the work done before."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    lines = [line for line in result.stderr.strip().splitlines() if not re.search(r"\d+%\|", line)]
    assert len(lines) == 1 and lines[0].startswith("cpdfx "), result.stderr[-3000:]
    assert len(lines[0]) < 800, lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])


def files_in(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    """A good ONNX model and three damaged ones: random bytes, a truncated file,
    and a well-formed file that onnxruntime cannot run (an unknown op)."""
    folder = tmp_path_factory.mktemp("onnx")
    good = folder / "good.onnx"
    assert run("export", "vgg", *SHAPE, "--out", str(good)).returncode == 0
    data = good.read_bytes()
    (folder / "junk.onnx").write_bytes(os.urandom(2000))
    (folder / "truncated.onnx").write_bytes(data[: len(data) // 2])
    proto = onnx.load(str(good))
    proto.graph.node[0].op_type = "NoSuchOp"
    onnx.save(proto, str(folder / "unknown_op.onnx"))
    return folder


@pytest.mark.parametrize("command", [
    ["prune", "vgg", *SHAPE, "--macs", "0.5", "--out"],
    ["export", "vgg", *SHAPE, "--out"],
    ["compress", "vgg", "--data", "digits", "--macs", "0.5", "--epochs", "1", "--out"],
    ["distill", "vgg", "vgg", "--data", "digits", "--epochs", "1", "--out"],
    ["demo", "--quick", "--out"],
])
@pytest.mark.parametrize("where", ["unwritable", "under_a_file"])
def test_an_output_that_cannot_be_written_is_refused_before_the_work(command, where, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = {"unwritable": f"{UNWRITABLE}/out", "under_a_file": str(blocker / "out")}[where]
    result = run(*command, out, cwd=tmp_path)
    assert_refused(result, "cannot write", out)
    assert result.stdout == ""  # refused before any work, not after it
    assert files_in(tmp_path) == ["a_file"]


def test_bench_refuses_an_output_in_an_unwritable_place(onnx_files, tmp_path):
    result = run("bench", str(onnx_files / "good.onnx"), "--plot", f"{UNWRITABLE}/p.png", cwd=tmp_path)
    assert_refused(result, "cannot write")
    assert result.stdout == ""


@pytest.mark.parametrize("command,words", [
    (["prune", "vgg", *SHAPE, "--macs", "0.5", "--out", "."], "it is a folder"),
    (["compress", "vgg", "--data", "digits", "--macs", "0.5", "--out", "a_file"], "it is a file"),
])
def test_an_output_of_the_wrong_kind_is_refused(command, words, tmp_path):
    (tmp_path / "a_file").write_text("x")
    assert_refused(run(*command, cwd=tmp_path), words)
    assert files_in(tmp_path) == ["a_file"]


@pytest.mark.parametrize("damaged", ["junk", "truncated", "unknown_op"])
@pytest.mark.parametrize("shape", [[], ["--input-shape", "1,3,16,16"]])
def test_bench_names_a_damaged_onnx_model_in_any_position(onnx_files, damaged, shape, tmp_path):
    bad = str(onnx_files / f"{damaged}.onnx")
    for models in ([bad, str(onnx_files / "good.onnx")], [str(onnx_files / "good.onnx"), bad]):
        result = run("bench", *models, *shape, "--out", "bench.json", cwd=tmp_path)
        assert_refused(result, "cannot read", bad)
    assert files_in(tmp_path) == []


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 not really a zip", "truncated"])
def test_a_damaged_saved_model_is_refused_by_every_command_that_reads_one(content, tmp_path):
    path = tmp_path / "model.pt2"
    if content == "truncated":
        assert run("prune", "vgg", *SHAPE, "--macs", "0.5", "--importance", "l2", "--steps", "1",
                   "--out", str(path)).returncode == 0
        data = path.read_bytes()
        content = data[: len(data) // 2]
    path.write_bytes(content)
    for command in (["inspect", str(path), *SHAPE],
                    ["export", str(path), *SHAPE, "--out", "m.onnx"],
                    ["prune", str(path), *SHAPE, "--macs", "0.5", "--out", "s.pt2"]):
        assert_refused(run(*command, cwd=tmp_path), "could not load", str(path))
    assert sorted(os.listdir(tmp_path)) == [p for p in ["model.pt2", "model.report.json"]
                                            if (tmp_path / p).exists()]


def _image_folder(root, corrupt: str):
    for label in ("a", "b"):
        os.makedirs(root / label)
        for i in range(6):
            pixels = np.random.default_rng(i).integers(0, 255, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.png")
    bad = root / "b" / "3.png"
    good = bad.read_bytes()
    bad.write_bytes({"junk": b"this is not an image", "truncated": good[: len(good) // 2]}[corrupt])
    return bad


@pytest.mark.parametrize("corrupt", ["junk", "truncated"])
def test_a_corrupt_image_in_a_data_folder_is_named(corrupt, tmp_path):
    data = tmp_path / "data"
    bad = _image_folder(data, corrupt)
    out = tmp_path / "out"
    out.mkdir()  # the folder of prune's --out file must exist
    for command in (["prune", "vgg", "--data", str(data), "--image-size", "16", "--macs", "0.5",
                     "--importance", "fisher", "--batch-size", "12", "--out", str(out / "slim.pt2")],
                    ["distill", "vgg", "vgg", "--data", str(data), "--image-size", "16", "--epochs", "1",
                     "--batch-size", "8", "--out", str(out)]):  # 11 images train, 1 validates
        assert_refused(run(*command), "cannot read the image", str(bad))
    assert not (out / "slim.pt2").exists()
    assert [f for f in files_in(tmp_path) if not f.startswith("data")] == []


def test_damaged_fashion_mnist_files_are_named(tmp_path):
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / name).write_bytes(b"\x00\x00\x08\x03" + bytes(10))
    env_run = run("prune", "vgg", "--data", "fashion-mnist", "--macs", "0.5", "--out", str(tmp_path / "s.pt2"),
                  env={"CPDFX_FASHION_MNIST": str(tmp_path)})
    assert_refused(env_run, str(tmp_path))
    assert not (tmp_path / "s.pt2").exists()


def test_a_model_spec_with_bad_arguments_is_one_paragraph(tmp_path):
    for spec, words in [("hf:ViTConfig(image_size=)", "cannot read the arguments"),
                        ("hf:NoSuchConfig", "hf:NoSuchConfig"),
                        ("vgg(width=3)", "vgg")]:
        assert_refused(run("inspect", spec, *SHAPE, cwd=tmp_path), words)


def test_a_model_whose_output_is_not_a_tensor_or_pytree_is_one_paragraph(tmp_path):
    torch.save({"not": "a model"}, tmp_path / "weights.pt2")
    assert_refused(run("inspect", str(tmp_path / "weights.pt2"), *SHAPE), "could not load")


def test_ctrl_c_stops_a_run_with_a_checkpoint_that_resumes(tmp_path):
    """SIGINT mid-epoch: exit 130, a short note naming --resume, no model file
    written; `--resume` then finishes the run."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "cpdfx.cli", "distill", "vgg", "vgg", "--data", "digits", "--epochs", "2",
               "--batch-size", "8", "--allow-untrained-teacher", "--out", str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    seen = ""
    while "epoch 1/2:" not in seen:  # training has started
        seen += process.stderr.read(1)
        assert process.poll() is None, seen
    process.send_signal(signal.SIGINT)
    rest = process.communicate(timeout=300)[1]
    assert process.returncode == 130, rest
    notes = [line for line in (seen + rest).replace("\r", "\n").splitlines()
             if line.strip() and not re.search(r"\d+%\|", line) and not line.startswith("epoch")]
    assert len(notes) <= 3 and any("--resume" in line for line in notes), notes
    assert "Traceback" not in rest
    assert files_in(out) == ["last.pt"]  # no metrics.jsonl before an epoch has ended
    resumed = run("distill", "vgg", "vgg", "--data", "digits", "--epochs", "2", "--batch-size", "8",
                  "--allow-untrained-teacher", "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (out / "student.pt2").is_file()
