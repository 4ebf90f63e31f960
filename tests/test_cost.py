"""MACs counted from the graph agree with torch's FlopCounterMode (FLOPs = 2 x MACs)."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import cpdfx
from cpdfx import zoo
from cpdfx.models import MODELS


def torch_macs(model, x):
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:  # MATH: attention counted as bmm
        model(x)
    return counter.get_total_flops() / 2


@pytest.mark.parametrize("build", [lambda: zoo.build("resnet"), lambda: zoo.build("vit"),
                                   lambda: zoo.build("segformer")] +
                         [MODELS["unet"], MODELS["grouped"], lambda: MODELS["vgg"](image_size=64)])
def test_macs_match_flop_counter(build):
    model = build().eval()
    x = torch.randn(3, 3, 64, 64)
    macs = cpdfx.cost(model, x).macs
    assert abs(macs - torch_macs(model, x)) <= 0.02 * macs


def test_cost_scales_with_batch_and_counts_params():
    model = MODELS["resnet"]().eval()
    one, four = cpdfx.cost(model, torch.randn(1, 3, 32, 32)), cpdfx.cost(model, torch.randn(4, 3, 32, 32))
    assert four.macs == 4 * one.macs
    assert one.params == sum(p.numel() for p in model.parameters())
    gm = cpdfx.capture(model, torch.randn(2, 3, 32, 32))
    assert cpdfx.cost(gm, torch.randn(4, 3, 32, 32)) == four  # a captured graph, other batch


def test_pruning_keeps_the_batch_symbolic_through_upsampling():
    """upsample_bilinear2d's meta kernel guards on the batch; re-propagating the
    slim graph's shapes must not specialise it (the cost at any batch would
    then be the example's), in the slim graph or in the one it came from."""
    x = torch.randn(2, 3, 16, 16)
    gm = cpdfx.capture(MODELS["unet"]().eval(), x)
    slim = cpdfx.prune(gm, x, macs=0.5)
    for g in (gm, slim):
        one, four = (cpdfx.cost(g, torch.randn(b, 3, 16, 16)).macs for b in (1, 4))
        assert four == 4 * one
    assert slim(torch.randn(3, 3, 16, 16)).shape[0] == 3
