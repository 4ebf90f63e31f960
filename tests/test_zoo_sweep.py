"""The CI subset of benchmarks/zoo_sweep.py: diverse transformers vision models
(classifiers, a backbone, segmentation, depth, super-resolution) prune to 50%
MACs, keep their output structure at two batch sizes, and export to ONNX with
onnxruntime parity at a third."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import zoo_sweep  # noqa: E402

SUBSET = [("resnet", "classification", "ResNetForImageClassification"),
          ("vit", "classification", "ViTForImageClassification"),
          ("mobilevit", "classification", "MobileViTForImageClassification"),
          ("dinov2", "classification", "Dinov2ForImageClassification"),
          ("convnext", "backbone", "ConvNextBackbone"),
          ("vitdet", "backbone", "VitDetBackbone"),
          ("segformer", "segmentation", "SegformerForSemanticSegmentation"),
          ("dpt", "depth", "DPTForDepthEstimation"),
          ("swin2sr", "super-resolution", "Swin2SRForImageSuperResolution")]


@pytest.mark.parametrize("model_type, task, cls_name", SUBSET, ids=[s[0] for s in SUBSET])
def test_model_prunes_to_half_and_exports_with_parity(tmp_path, model_type, task, cls_name):
    row = zoo_sweep.sweep_one(model_type, task, cls_name, size=64, folder=tmp_path)
    assert "failure" not in row, row["failure"]
    assert 0.45 <= row["macs"] <= 0.5 + 1e-6
    assert row["parity"] <= 1e-3


def test_a_shrunk_backbone_outputs_stages_it_has():
    """A ViT backbone's stages are its layers: shrinking the depth renames them,
    and the default output (the last stage) follows."""
    config = zoo_sweep.shrink(zoo_sweep.configuration_auto.CONFIG_MAPPING["dinov2"](), 64)
    assert config.stage_names == ["stem", "stage1", "stage2"] and config.out_features == ["stage2"]
    assert config.out_indices == [2]


def test_a_shrunk_backbone_keeps_a_stage_per_output_asked_for():
    """A depth head reads four stages: its ViT backbone keeps four layers."""
    config = zoo_sweep.shrink(zoo_sweep.configuration_auto.CONFIG_MAPPING["depth_anything"](), 64).backbone_config
    assert config.num_hidden_layers == 4 and config.out_features == ["stage1", "stage2", "stage3", "stage4"]


def test_a_shrunk_group_norm_count_divides_the_widths():
    config = zoo_sweep.shrink(zoo_sweep.configuration_auto.CONFIG_MAPPING["bit"](), 64)
    assert all(w % config.num_groups == 0 for w in [*config.hidden_sizes, config.embedding_size])


def test_shrunk_stage_channels_follow_the_shrunk_widths():
    """HGNetV2 builds its stages from stage_*_channels, its head from hidden_sizes."""
    config = zoo_sweep.shrink(zoo_sweep.configuration_auto.CONFIG_MAPPING["hgnet_v2"](), 64)
    out, into = config.stage_out_channels, config.stage_in_channels
    assert out[-1] == config.hidden_sizes[-1] and list(into[1:]) == list(out[:-1])


@pytest.mark.parametrize("model_type", ["swin", "donut-swin", "swinv2"])
def test_a_shrunk_window_fits_the_smallest_feature_map(model_type):
    """Swin's maps at 64 x 64 (patch 4, four stages) are 16, 8, 4 and 2 wide."""
    assert zoo_sweep.shrink(zoo_sweep.configuration_auto.CONFIG_MAPPING[model_type](), 64).window_size == 2


def test_every_task_has_candidates():
    tasks = {task for _, task, _ in zoo_sweep.candidates()}
    assert tasks == set(zoo_sweep.TASKS)
