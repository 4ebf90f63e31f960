"""transformers vision models from small configs, random-initialised (nothing is
downloaded). Needs the `transformers` extra; used by tests and benchmarks."""
from __future__ import annotations


def _hf():
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("cpdfx.zoo needs transformers: pip install -e '.[test]'") from err
    return transformers


def build(name: str, num_labels: int = 10, image_size: int = 64, small: bool = True, **config):
    """A random-initialised transformers model by family name (see FAMILIES);
    `config` overrides the family's settings (e.g. num_channels=1)."""
    t = _hf()
    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}; choose one of {', '.join(FAMILIES)}")
    config_cls, model_cls, small_kwargs, full_kwargs = FAMILIES[name]
    kwargs = dict(small_kwargs if small else full_kwargs)
    if name in ("vit", "mobilenet_v2"):
        kwargs["image_size"] = image_size
    config = getattr(t, config_cls)(num_labels=num_labels, **{**kwargs, **config})
    return getattr(t, model_cls)(config)


FAMILIES = {
    # name: (config class, model class, small config, full-size config)
    "resnet": ("ResNetConfig", "ResNetForImageClassification",
               dict(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                    layer_type="bottleneck"),
               dict()),
    "resnet18": ("ResNetConfig", "ResNetForImageClassification",
                 dict(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], layer_type="basic"),
                 dict(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2], layer_type="basic")),
    "mobilenet_v2": ("MobileNetV2Config", "MobileNetV2ForImageClassification",
                     dict(depth_multiplier=0.35), dict()),
    "convnext": ("ConvNextConfig", "ConvNextForImageClassification",
                 dict(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1]), dict()),
    "vit": ("ViTConfig", "ViTForImageClassification",
            dict(patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=128), dict()),
    "segformer": ("SegformerConfig", "SegformerForSemanticSegmentation",
                  dict(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
                       num_attention_heads=[1, 2], decoder_hidden_size=32, strides=[4, 2],
                       patch_sizes=[7, 3], mlp_ratios=[2, 2]), dict()),
}
