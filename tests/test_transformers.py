"""transformers vision models from small configs: pruned to 50% MACs."""
import pytest
import torch
from torch.utils import _pytree as pytree

import cpdfx
from cpdfx import passes
from cpdfx import zoo

FAMILIES = sorted(zoo.FAMILIES)


@pytest.fixture(scope="module")
def pruned():
    """family -> (model, slim), pruned once for all tests of this module."""
    out = {}
    for name in FAMILIES:
        torch.manual_seed(0)
        model = zoo.build(name).eval()
        out[name] = model, cpdfx.prune(model, torch.randn(2, 3, 64, 64), macs=0.5)
    return out


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("batch", [1, 3])
def test_structure_and_shapes_kept(pruned, name, batch):
    model, slim = pruned[name]
    x = torch.randn(batch, 3, 64, 64)
    with torch.no_grad():
        ref, out = model(x), slim(x)
    assert type(out) is type(ref)
    (ref_leaves, ref_spec), (leaves, spec) = pytree.tree_flatten(ref), pytree.tree_flatten(out)
    assert spec == ref_spec
    assert [tuple(t.shape) for t in leaves] == [tuple(t.shape) for t in ref_leaves]
    assert all(torch.isfinite(t).all() for t in leaves)


@pytest.mark.parametrize("name", FAMILIES)
def test_macs_budget_met(pruned, name):
    model, slim = pruned[name]
    x = torch.randn(2, 3, 64, 64)
    ratio = cpdfx.cost(slim, x).macs / cpdfx.cost(model, x).macs
    assert 0.47 <= ratio <= 0.5 + 1e-9, ratio


def _is_product_set(rows, head_dim):
    """rows = {h * head_dim + d : h in H, d in D} for some sets H and D."""
    rows = set(rows)
    heads, dims = {r // head_dim for r in rows}, {r % head_dim for r in rows}
    return rows == {h * head_dim + d for h in heads for d in dims}


@pytest.mark.parametrize("name,head_dim", [("vit", 16), ("segformer", 16)])
def test_attention_heads_whole_or_head_dim_uniform(pruned, name, head_dim):
    _, slim = pruned[name]
    kept = slim.meta["cpdfx_kept"]
    projections = [n for n in kept if n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight"))]
    assert projections, "no attention projection was pruned"
    for proj in projections:
        if 0 in kept[proj]:
            assert _is_product_set(kept[proj][0], head_dim), proj
        q = proj.replace("k_proj", "q_proj")
        if "k_proj" in proj:  # queries and keys lose the same rows
            assert kept.get(q, {}).get(0) == kept[proj].get(0)


def test_vit_heads_and_head_dims_are_separate_groups():
    model = zoo.build("vit").eval()
    comb = passes.comb(cpdfx.capture(model, torch.randn(2, 3, 64, 64)))
    q = "vit.layers.0.attention.q_proj.weight"
    touching = [g for g in comb.prunable if (q, 0) in g.params]
    assert sorted(g.size for g in touching) == [4, 16]  # 4 heads x 16 dims
    hidden = next(g for g in comb.prunable if ("vit.embeddings.cls_token", 2) in g.params)
    assert ("vit.embeddings.position_embeddings", 2) in hidden.params
    assert hidden.size == 64
