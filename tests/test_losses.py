"""Distillation losses: values against their formulas, zero at agreement,
gradients to the student only, resolution handling, label-free mode."""
import pytest
import torch
import torch.nn.functional as F

from cpdfx import losses
from cpdfx.losses import DistillLoss


def test_logits_of_finds_the_logits():
    from transformers.modeling_outputs import SemanticSegmenterOutput

    t = torch.randn(2, 3)
    assert losses.logits_of(t) is t
    assert losses.logits_of({"hidden": torch.randn(2), "logits": t}) is t
    assert losses.logits_of(SemanticSegmenterOutput(loss=None, logits=t)) is t
    assert losses.logits_of((t, {"aux": torch.randn(2)})) is t
    assert losses.logits_of({"classes": t, "boxes": torch.randn(2, 4)}) is t  # the first tensor
    with pytest.raises(TypeError, match="no tensor"):
        losses.logits_of({"a": 1})


def test_kd_matches_its_formula_and_scales_with_t_squared():
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    T = 3.0
    p_t = F.softmax(t / T, 1)
    expected = (p_t * (p_t.log() - F.log_softmax(s / T, 1))).sum(1).mean() * T ** 2
    torch.testing.assert_close(losses.kd_loss(s, t, T), expected)


@pytest.mark.parametrize("fn, shape", [(losses.kd_loss, (6, 10)), (losses.dist_loss, (6, 10)),
                                       (losses.kd_loss, (2, 5, 4, 4)), (losses.cwd_loss, (2, 5, 4, 4))],
                         ids=["kd", "dist", "pixel-kd", "cwd"])
def test_zero_at_agreement_positive_otherwise_and_gradients_flow(fn, shape):
    teacher = torch.randn(shape) * 3
    assert float(fn(teacher.clone(), teacher)) == pytest.approx(0, abs=1e-5)
    student = torch.randn(shape, requires_grad=True)
    value = fn(student, teacher)
    assert float(value) > 1e-3
    value.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_cwd_is_a_spatial_distribution_per_channel():
    s, t = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    T = 2.0
    p_t = F.softmax(t.flatten(2) / T, -1)
    kl = (p_t * (p_t.log() - F.log_softmax(s.flatten(2) / T, -1))).sum(-1)  # (N, C)
    torch.testing.assert_close(losses.cwd_loss(s, t, T), kl.mean() * T ** 2)
    # moving every channel's mass by the same constant changes nothing (softmax over positions)
    torch.testing.assert_close(losses.cwd_loss(s + 5.0, t, T), losses.cwd_loss(s, t, T))


def test_dense_logits_at_lower_resolution():
    """A SegFormer-like student gives H/4 logits: upsampled to the masks for CE,
    to the teacher's resolution for KD and CWD."""
    coarse = torch.randn(2, 4, 8, 8, requires_grad=True)
    teacher = F.interpolate(coarse.detach(), size=(32, 32), mode="bilinear", align_corners=False)
    assert float(losses.cwd_loss(coarse, teacher)) == pytest.approx(0, abs=1e-5)
    assert float(losses.kd_loss(coarse, teacher)) == pytest.approx(0, abs=1e-5)
    assert float(losses.kd_loss(teacher, coarse.detach())) == pytest.approx(0, abs=1e-5)
    masks = teacher.argmax(1)
    ce = losses.cross_entropy(coarse, masks)
    torch.testing.assert_close(ce, F.cross_entropy(teacher, masks))
    ce.backward()
    assert coarse.grad.abs().sum() > 0


def test_cross_entropy_skips_ignored_pixels():
    logits, masks = torch.randn(1, 3, 4, 4), torch.randint(0, 3, (1, 4, 4))
    ignored = masks.clone()
    ignored[0, :2] = 255
    expected = F.cross_entropy(logits.movedim(1, -1)[0, 2:].reshape(-1, 3), masks[0, 2:].reshape(-1))
    torch.testing.assert_close(losses.cross_entropy(logits, ignored), expected)


def test_cwd_leaves_out_the_pixels_the_labels_ignore():
    """A crop pads the mask with the ignore index: CE skips those pixels, and so
    does CWD, as if the image ended where its labels do."""
    s, t = torch.randn(2, 3, 4, 4, requires_grad=True), torch.randn(2, 3, 4, 4)
    masks = torch.randint(0, 3, (2, 4, 4))
    masks[:, 3] = 255  # the last row is padding
    value = DistillLoss("segmentation", alpha=1.0, temperature=1.0).terms(s, t, masks)["cwd"]
    torch.testing.assert_close(value, losses.cwd_loss(s[:, :, :3], t[:, :, :3], 1.0))
    value.backward()
    assert s.grad[:, :, 3].abs().max() == 0 and s.grad[:, :, :3].abs().max() > 0
    everywhere = losses.cwd_loss(s, t, 1.0, valid=torch.ones(2, 4, 4, dtype=torch.bool))
    torch.testing.assert_close(everywhere, losses.cwd_loss(s, t, 1.0))


def test_distill_loss_adds_the_teacher_term_to_the_full_label_loss():
    s, t, y = torch.randn(4, 10), torch.randn(4, 10), torch.randint(0, 10, (4,))
    loss = DistillLoss("classification", alpha=0.3, temperature=2.0)
    terms = loss.terms(s, t, y)
    torch.testing.assert_close(terms["ce"], F.cross_entropy(s, y))  # CPD: CE at weight 1, whatever alpha
    torch.testing.assert_close(terms["kd"], 0.3 * losses.kd_loss(s, t, 2.0))
    plain = DistillLoss("classification", alpha=0.0)(s, t, y)
    torch.testing.assert_close(plain, F.cross_entropy(s, y))  # alpha 0 is plain training, exactly
    torch.testing.assert_close(loss(s, t, y), terms["ce"] + terms["kd"])
    seg = DistillLoss("segmentation")  # CWD's defaults were chosen on validation apart from KD's
    assert (seg.kind, seg.alpha, seg.temperature, loss.alpha) == ("cwd", 3.0, 4.0, 0.3)
    assert DistillLoss("classification").alpha == 1.0
    assert set(DistillLoss("segmentation").terms(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4),
                                                 torch.zeros(2, 4, 4, dtype=torch.long))) == {"ce", "cwd"}


def test_label_free_needs_no_targets():
    s = torch.randn(4, 10, requires_grad=True)
    t = torch.randn(4, 10)
    free = DistillLoss("classification", kind="dist", labels=False)
    assert set(free.terms({"logits": s}, {"logits": t})) == {"dist"}
    free({"logits": s}, {"logits": t}).backward()
    assert s.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="labels=False"):
        DistillLoss("classification")(s, t)


def test_teacher_gets_no_gradient():
    s, t = torch.randn(3, 5, requires_grad=True), torch.randn(3, 5, requires_grad=True)
    DistillLoss(labels=False)(s, t).backward()
    assert t.grad is None and s.grad is not None


def test_invalid_options_are_explained():
    with pytest.raises(ValueError, match="does not fit classification"):
        DistillLoss("classification", kind="cwd")
    with pytest.raises(ValueError, match="task must be"):
        DistillLoss("detection")
    with pytest.raises(ValueError, match=">= 0"):
        DistillLoss(alpha=-0.5)
