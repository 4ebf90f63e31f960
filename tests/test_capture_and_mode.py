"""capture keeps outputs, mode and a dynamic batch; set_mode switches behaviour."""
import numpy as np
import pytest
import torch
import torch.nn as nn

import cpdfx
from cpdfx import passes
from cpdfx import zoo
from cpdfx.models import MODELS
from helpers import assert_same_outputs, assert_vgg_trains


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # Python control flow on a tensor value
            return x * 2
        return x


class TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y.mean((2, 3)), {"map": y}


def test_uncapturable_model_raises_capture_error():
    with pytest.raises(cpdfx.CaptureError, match="could not capture DataDependent") as info:
        cpdfx.capture(DataDependent(), torch.randn(2, 3))
    assert "\n" not in str(info.value)  # one readable paragraph


@pytest.mark.parametrize("model", [TupleOut(), zoo.build("vit"), MODELS["fpn"]()],
                         ids=["tuple-dict", "ModelOutput", "dict"])
def test_outputs_keep_their_structure(model):
    model.eval()
    gm = cpdfx.capture(model, torch.randn(2, 3, 64, 64))
    x = torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        assert_same_outputs(gm(x), model(x))


def test_batch_one_example_still_gives_a_dynamic_batch():
    model = MODELS["resnet"]().eval()
    gm = cpdfx.capture(model, torch.randn(1, 3, 16, 16))
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert_same_outputs(gm(x), model(x))


def test_mode_is_kept_and_switchable():
    model = MODELS["vgg"]()  # batch norm and dropout
    gm = cpdfx.capture(model.train(), torch.randn(4, 3, 16, 16))
    assert gm.training
    x = torch.randn(6, 3, 16, 16)
    gm.eval()
    assert not gm.training
    model.eval()
    with torch.no_grad():
        assert_same_outputs(gm(x), model(x))  # running statistics, no dropout
        assert_same_outputs(gm(x), gm(x))
    assert_vgg_trains(gm, x)  # batch counting and dropout are back


def test_graph_captured_in_eval_can_train():
    model = MODELS["resnet"]().eval()
    gm = cpdfx.capture(model, torch.randn(2, 3, 16, 16))
    passes.set_mode(gm, True)
    x = torch.randn(8, 3, 16, 16)
    model.train()
    assert_same_outputs(gm(x), model(x))  # batch statistics in both


def test_slim_graph_switches_mode_too():
    model = MODELS["se"]().train()
    gm = cpdfx.capture(model, torch.randn(2, 3, 16, 16))
    comb = passes.comb(gm)
    slim = passes.eliminate(gm, comb, {g.id: np.arange(g.size // 2) for g in comb.prunable})
    slim.eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert_same_outputs(slim(x), slim(x))
    assert not slim.training


def test_slim_graph_drops_dropout_in_eval():
    """eliminate copies the graph: the copy's train()/eval() must switch the copy."""
    gm = cpdfx.capture(MODELS["vgg"]().train(), torch.randn(2, 3, 16, 16))
    comb = passes.comb(gm)
    slim = passes.eliminate(gm, comb, {g.id: np.arange(g.size // 2) for g in comb.prunable})
    x = torch.randn(3, 3, 16, 16)
    slim.eval()
    with torch.no_grad():
        assert_same_outputs(slim(x), slim(x))
    assert gm.training  # the original was not switched
    slim.train()
    torch.manual_seed(1)
    a = slim(x)
    torch.manual_seed(2)
    assert not torch.allclose(a, slim(x))
