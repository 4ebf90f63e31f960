"""A user's own trained model in: --weights (state dicts in .pt/.pth/.safetensors,
loaded strictly), hf:PATH (a save_pretrained folder), and the teacher check that
refuses to distil from a teacher at chance level unless it is trained first
(--train-teacher) or the user insists (--allow-untrained-teacher), on the val
split held out of the training data; the test split is read once, at the end."""
import json
import re

import pytest
import torch
from safetensors.torch import save_file

from cpdfx import cli, zoo
from cpdfx.cli import main
from cpdfx.data import digits, resolve_data
from cpdfx.distill import evaluate
from cpdfx.export import load
from cpdfx.models import ResNetTiny
from cpdfx.teacher import TeacherCheck, chance_score, check_teacher

X = torch.rand(2, 1, 8, 8)
COMPRESS = ["compress", "resnet", "--data", "digits", "--macs", "0.5", "--epochs", "1", "--prune-steps", "1"]


def error_line(capsys) -> str:
    """stderr's one line besides progress bars (the one-paragraph user error)."""
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if not re.search(r"\d+%\|", line)]
    assert len(lines) == 1 and lines[0].startswith("cpdfx "), lines
    return lines[0]


def trained_elsewhere(spec_model):
    """A model like the spec's with other weights than the spec builds (seed 0)."""
    torch.manual_seed(123)
    return spec_model()


SPECS = {"resnet": lambda: ResNetTiny(num_classes=10, in_channels=1),
         "cli_models:small_digits_net": lambda: ResNetTiny(10, 1, widths=(8, 16, 32), blocks=(1, 1, 1)),
         "hf:resnet(num_channels=1)": lambda: zoo.build("resnet", num_channels=1)}  # 64x64 inputs


def saved_as(model, path, form):
    state = model.state_dict()
    if form == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"plain": state, "checkpoint": {"epoch": 3, "state_dict": state, "optimizer": {}},
                    "ddp": {f"module.{k}": v for k, v in state.items()}}[form], path)
    return path


@pytest.mark.parametrize("form,suffix", [("plain", ".pt"), ("checkpoint", ".pth"), ("ddp", ".pt"),
                                         ("safetensors", ".safetensors")])
@pytest.mark.parametrize("spec", SPECS)
def test_weights_load_into_every_kind_of_spec(spec, form, suffix, tmp_path):
    trained = trained_elsewhere(SPECS[spec]).eval()
    path = saved_as(trained, tmp_path / f"w{suffix}", form)
    model = cli.load_model(spec, x=X, data=digits("test"), weights=path).eval()
    built = cli.load_model(spec, x=X, data=digits("test")).eval()  # the spec alone: other weights
    x = torch.rand(2, 1, 64, 64) if spec.startswith("hf:") else X
    with torch.no_grad():
        assert torch.equal(logits(model(x)), logits(trained(x)))
        assert not torch.equal(logits(built(x)), logits(trained(x)))


def logits(out):
    return out.logits if hasattr(out, "logits") else out


def test_weights_that_do_not_fit_are_one_paragraph_naming_keys_and_shapes(tmp_path, capsys):
    state = ResNetTiny(num_classes=5, in_channels=1).state_dict()
    state["extra.weight"] = torch.zeros(3)
    del state["stem.1.running_mean"]
    torch.save(state, tmp_path / "w.pt")
    assert main(["inspect", "resnet", "--input-shape", "2,1,8,8", "--weights", str(tmp_path / "w.pt")]) == 2
    line = error_line(capsys)
    for words in ("do not fit the model", "1 missing from the file (stem.1.running_mean)",
                  "1 not in the model (extra.weight)", "fc.weight (5, 64) in the file, (10, 64) in the model"):
        assert words in line, (words, line)


@pytest.mark.parametrize("case,words", [
    ("whole model", "save model.state_dict() instead"),
    ("not a dict", "holds a list, not a state dict"),
    ("junk", "cannot read"),
    ("junk safetensors", "cannot read"),
    ("pt2 weights", "give it as the model"),
    ("pt2 model", "carries its own weights"),
    ("missing", "no weights file"),
])
def test_unreadable_weights_are_one_paragraph(case, words, tmp_path, capsys):
    model, weights = "resnet", tmp_path / "w.pt"
    if case == "whole model":
        torch.save(ResNetTiny(10, 1), weights)
    elif case == "not a dict":
        torch.save([torch.zeros(1)], weights)
    elif case == "junk":
        weights.write_bytes(b"not a torch file at all")
    elif case == "junk safetensors":
        weights = tmp_path / "w.safetensors"
        weights.write_bytes(b"\x00" * 40)
    elif case == "pt2 weights":
        weights = tmp_path / "w.pt2"
    elif case == "pt2 model":
        model = str(tmp_path / "slim.pt2")
    else:
        weights = tmp_path / "absent.pt"
    assert main(["inspect", model, "--input-shape", "2,1,8,8", "--weights", str(weights)]) == 2
    assert words in error_line(capsys)


def test_every_command_that_takes_a_model_takes_its_weights():
    commands = next(a for a in cli.build_parser()._actions if a.dest == "command").choices
    for name in ("compress", "prune", "distill", "export", "inspect"):
        assert "--weights" in commands[name]._option_string_actions, name
    assert "--teacher-weights" in commands["distill"]._option_string_actions
    for name in ("compress", "distill"):
        assert {"--train-teacher", "--allow-untrained-teacher"} <= set(commands[name]._option_string_actions)


# -- hf:PATH ----------------------------------------------------------------------------


@pytest.mark.parametrize("family,task", [("resnet", "classification"), ("segformer", "segmentation")])
def test_hf_path_loads_a_save_pretrained_folder(family, task, tmp_path):
    torch.manual_seed(7)
    model = zoo.build(family, num_channels=1).eval()
    model.save_pretrained(tmp_path / "trained")
    loaded = cli.load_model(f"hf:{tmp_path / 'trained'}", task)
    assert type(loaded) is type(model) and not loaded.training
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_hf_path_refuses_a_folder_without_the_head(tmp_path, capsys):
    import transformers
    backbone = transformers.ResNetModel(zoo.build("resnet", num_channels=1).config)
    backbone.save_pretrained(tmp_path / "backbone")
    assert main(["inspect", f"hf:{tmp_path / 'backbone'}", "--input-shape", "2,1,64,64"]) == 2
    line = error_line(capsys)
    assert "missing from the file (classifier.1.bias; classifier.1.weight)" in line, line


@pytest.mark.parametrize("spec,words", [("hf:/no/such/folder", "there is no folder"),
                                        ("hf:org/model-on-the-hub", "never downloads")])
def test_hf_path_that_is_not_a_local_folder_is_refused(spec, words, tmp_path, capsys):
    assert main(["inspect", spec, "--input-shape", "2,1,64,64"]) == 2
    assert words in error_line(capsys)


# -- the teacher check ------------------------------------------------------------------


class LabelReader(torch.nn.Module):
    """Logits that read the label off the image (whose pixels hold it), or one
    class always: a perfect and a constant classifier."""

    def __init__(self, constant=None):
        super().__init__()
        self.constant, self.w = constant, torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        label = x.mean((1, 2, 3)).round().long() if self.constant is None else torch.full((len(x),), self.constant)
        return torch.nn.functional.one_hot(label, 3).float() + self.w


def test_chance_is_the_most_frequent_class():
    labels = [0] * 6 + [1] * 3 + [2]
    items = [(torch.full((1, 2, 2), float(y)), torch.tensor(y)) for y in labels]
    assert chance_score(items, "classification") == pytest.approx(0.6)
    mask = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 2], [255, 255, 255, 255]])  # 255: no label
    assert chance_score([(torch.zeros(1, 4, 4), mask)], "segmentation") == pytest.approx(10 / 12 / 3)
    constant, perfect = check_teacher(LabelReader(0), items), check_teacher(LabelReader(), items)
    assert constant.score == pytest.approx(0.6) and not constant.trained
    assert perfect.score == 1.0 and perfect.trained


def test_the_bar_is_half_again_chance_at_most_ten_points_above_it():
    assert TeacherCheck("top1", 0.15, 0.10, 0.15, 1000).trained
    ten = check_teacher(LabelReader(0), [(torch.zeros(1, 2, 2), torch.tensor(i % 10)) for i in range(1000)])
    assert ten.chance == pytest.approx(0.1) and ten.bar == pytest.approx(0.15)
    two = check_teacher(LabelReader(0), [(torch.zeros(1, 2, 2), torch.tensor(i % 2)) for i in range(1000)])
    assert two.chance == pytest.approx(0.5) and two.bar == pytest.approx(0.6)
    assert "top-1 50.0% on 1,000 validation images (chance 50.0%" in two.describe()


def test_compress_refuses_an_untrained_teacher_before_writing_anything(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*COMPRESS, "--out", str(out)]) == 2
    line = error_line(capsys)
    for words in ("at chance level", "--weights PATH", "--train-teacher EPOCHS", "--allow-untrained-teacher"):
        assert words in line, (words, line)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, one_thread):
    """compress with --train-teacher 3: the teacher is trained, saved and checked first."""
    out = tmp_path_factory.mktemp("train-teacher") / "run"
    assert main([*COMPRESS, "--train-teacher", "3", "--out", str(out)]) == 0
    return out


def test_train_teacher_reports_a_real_teacher_and_saves_it(trained_run):
    report = json.loads((trained_run / "report.json").read_text())
    summary = json.loads((trained_run / "summary.json").read_text())
    assert report["teacher"]["top1"] > 0.5 and summary["scores"]["original"] == report["test"]["teacher"]["top1"]
    assert "trained here on the labels for 3 epoch(s) on 1,212 training images" in summary["training"][0]
    assert "teacher.pt" in (trained_run / "report.md").read_text()
    ResNetTiny(10, 1).load_state_dict(torch.load(trained_run / "teacher.pt", weights_only=True))


def test_compress_validates_on_val_and_reads_test_once_at_the_end(trained_run):
    """digits' 1347 training images less the 135 (10%) held out as val: the
    teacher check and the epochs' validation score those 135; the report's
    "test" and the table score the 450 test images."""
    report = json.loads((trained_run / "report.json").read_text())
    summary = json.loads((trained_run / "summary.json").read_text())
    assert "on 135 validation images" in summary["training"][0]
    assert summary["training"][-1].startswith("Val: 135 images (held out of the training data by --val-share 0.1)")
    assert report["test"]["images"] == 450 and report["test"]["teacher"]["top1"] > 0.5
    assert summary["scores"] == {"original": report["test"]["teacher"]["top1"],
                                 "slim": report["test"]["student"]["top1"]}
    slim = load(trained_run / "slim.pt2").eval()
    val, test = resolve_data("digits", split="val"), resolve_data("digits", split="test")
    assert report["student"]["top1"] == pytest.approx(evaluate(slim, val)["top1"])  # the last epoch's validation
    assert report["test"]["student"]["top1"] == pytest.approx(evaluate(slim, test)["top1"])
    assert "Test: 450 images, read once, after training" in (trained_run / "report.md").read_text()


def test_val_share_zero_on_data_without_a_val_folder_is_refused(tmp_path, capsys):
    assert main([*COMPRESS, "--val-share", "0", "--out", str(tmp_path / "run")]) == 2
    assert "no 'val' split with --val-share 0: give a --val-share above 0" in error_line(capsys)
    with pytest.raises(SystemExit) as stop:  # argparse's own usage error
        main([*COMPRESS, "--val-share", "1", "--out", str(tmp_path / "run")])
    assert stop.value.code == 2 and "--val-share: 1: the share of the training data to hold out, in [0, 1)" in \
        capsys.readouterr().err


def test_compress_runs_from_trained_weights(trained_run, tmp_path):
    out = tmp_path / "run"
    assert main([*COMPRESS, "--weights", str(trained_run / "teacher.pt"), "--out", str(out)]) == 0
    report, trained = (json.loads((d / "report.json").read_text()) for d in (out, trained_run))
    assert report["teacher"] == trained["teacher"]  # the same teacher, read back
    assert not (out / "teacher.pt").exists()


def test_distill_checks_its_teacher_too(trained_run, tmp_path, capsys):
    command = ["distill", "cli_models:small_digits_net", "resnet", "--data", "digits", "--epochs", "1"]
    assert main([*command, "--out", str(tmp_path / "refused")]) == 2
    assert "--teacher-weights PATH" in error_line(capsys) and not (tmp_path / "refused").exists()
    assert main([*command, "--teacher-weights", str(trained_run / "teacher.pt"), "--out", str(tmp_path / "ok")]) == 0
    assert (tmp_path / "ok" / "student.pt2").is_file()


def test_a_resumed_run_reads_its_trained_teacher_back(tmp_path, monkeypatch, one_thread):
    """--resume with --train-teacher takes the teacher from --out/teacher.pt,
    not a second training (which the resumed run's checkpoint would not match)."""
    command = ["distill", "cli_models:small_digits_net", "cli_models:small_digits_net", "--data", "digits",
               "--epochs", "1", "--train-teacher", "2", "--out", str(tmp_path)]
    assert main(command) == 0
    saved = torch.load(tmp_path / "teacher.pt", weights_only=True)

    def trained_again(*args, **kwargs):
        raise AssertionError("the teacher was trained again")

    monkeypatch.setattr(cli, "train_teacher", trained_again)
    assert main([*command, "--resume"]) == 0
    again = torch.load(tmp_path / "teacher.pt", weights_only=True)
    assert again.keys() == saved.keys() and all(torch.equal(again[k], v) for k, v in saved.items())


def test_distill_validates_on_the_val_share_and_reports_test(trained_run, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["distill", "cli_models:small_digits_net", "resnet", "--data", "digits", "--epochs", "1",
                 "--val-share", "0.2", "--teacher-weights", str(trained_run / "teacher.pt"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["val"]["images"] == 269 and report["test"]["images"] == 450  # 20% of 1347 held out
    compressed = json.loads((trained_run / "report.json").read_text())
    assert report["test"]["teacher"] == compressed["test"]["teacher"]  # the same teacher on the same test images
    student = load(out / "student.pt2").eval()
    val, test = resolve_data("digits", split="val", val_share=0.2), resolve_data("digits", split="test")
    assert report["val"]["student"]["top1"] == pytest.approx(evaluate(student, val)["top1"])
    assert report["test"]["student"]["top1"] == pytest.approx(evaluate(student, test)["top1"])
    assert "its val_ scores on 269 val images" in printed and "test, 450 images: teacher top-1" in printed
    assert "on 269 validation images" in printed  # the teacher check
