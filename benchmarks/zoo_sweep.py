"""Every transformers vision model class buildable from a small config, pruned
and exported: builds it (random weights, tiny sizes, nothing downloaded),
prunes it to 50% MACs (l2), checks the output's structure and shapes at two
batch sizes, exports it to ONNX and checks onnxruntime parity at a third.

    python benchmarks/zoo_sweep.py [--size 64] [--only resnet,vit] [--out benchmarks/results/zoo_sweep.md]

One row per (model type, task): groups, prunable share (prunable groups /
groups), MACs achieved, prune and export seconds, the parity error, or the
failure and its stage. A model torch.export cannot capture in its original form
is "not capturable"; one that needs a package cpdfx does not install, or a
config the generic shrinking cannot make small, is "not buildable".
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import transformers
from torch.utils import _pytree as pytree
from transformers.models.auto import configuration_auto, modeling_auto

import cpdfx
from cpdfx import passes
from cpdfx.capture import CaptureError

# task -> the auto mapping of model type -> model class
TASKS = {
    "classification": "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
    "segmentation": "MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES",
    "universal-seg": "MODEL_FOR_UNIVERSAL_SEGMENTATION_MAPPING_NAMES",
    "detection": "MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES",
    "depth": "MODEL_FOR_DEPTH_ESTIMATION_MAPPING_NAMES",
    "keypoints": "MODEL_FOR_KEYPOINT_DETECTION_MAPPING_NAMES",
    "super-resolution": "MODEL_FOR_IMAGE_TO_IMAGE_MAPPING_NAMES",
    "backbone": "MODEL_FOR_BACKBONE_MAPPING_NAMES",
}
# attribute -> its small value; a list attribute keeps its length (one entry per stage)
SMALL = {"num_hidden_layers": 2, "num_attention_heads": 2, "hidden_size": 32, "intermediate_size": 64,
         "embed_dim": 16, "embedding_size": 16, "num_layers": 2, "decoder_layers": 1, "encoder_layers": 1,
         "decoder_attention_heads": 2, "encoder_attention_heads": 2, "d_model": 32, "encoder_ffn_dim": 64,
         "decoder_ffn_dim": 64, "num_queries": 10, "decoder_hidden_size": 32, "fusion_hidden_size": 32,
         "neck_hidden_sizes": None, "reassemble_hidden_size": 32, "mlp_dim": 64, "num_channels": 3}
PER_STAGE = {"depths": 1, "num_heads": 2, "num_attention_heads": 2}
NOT_SMALL = ("timm_wrapper", "timm_backbone", "shieldgemma2", "perceiver", "imagegpt")  # extra packages, or text


def candidates(only=()):
    """(model type, task, model class name) for every vision model class."""
    for task, mapping in TASKS.items():
        for model_type, cls in sorted(getattr(modeling_auto, mapping, {}).items()):
            if (not only or model_type in only) and model_type not in NOT_SMALL:
                yield model_type, task, cls if isinstance(cls, str) else cls[0]


def shrink(config, size: int):
    """The config with tiny widths and depths, recursively into sub-configs."""
    for name, value in list(vars(config).items()):
        if isinstance(value, transformers.PretrainedConfig):
            shrink(value, size)
        elif name in ("image_size", "img_size") and isinstance(value, int):
            setattr(config, name, size)
        elif name == "num_groups" and isinstance(value, int):  # group norm: divides every width, 4 x 2^k
            setattr(config, name, math.gcd(value, 4))  # (a bottleneck's is a quarter of 16 x 2^k)
        elif name == "hidden_sizes" and isinstance(value, (list, tuple)):
            setattr(config, name, [16 * 2 ** min(i, 2) for i in range(len(value))])
            _follow_widths(config, value, config.hidden_sizes)
        elif name in PER_STAGE and isinstance(value, (list, tuple)):
            setattr(config, name, [PER_STAGE[name]] * len(value))
        elif name in SMALL and isinstance(value, int) and SMALL[name] is not None:
            setattr(config, name, min(value, SMALL[name]) if name != "num_channels" else value)
    for name in ("use_timm_backbone", "use_pretrained_backbone"):
        if getattr(config, name, None):
            setattr(config, name, False)
    if isinstance(getattr(config, "backbone", None), str) and getattr(config, "backbone_config", 0) is None:
        config.backbone, config.backbone_config = None, shrink(transformers.ResNetConfig(
            out_features=["stage2", "stage3", "stage4"]), size)  # a timm name otherwise: a small ResNet
    if isinstance(getattr(config, "backbone_out_indices", None), (list, tuple)):  # DPT reads these layers
        config.num_hidden_layers = len(config.backbone_out_indices)
        config.backbone_out_indices = list(range(len(config.backbone_out_indices)))
    if all(isinstance(getattr(config, k, None), t) for k, t in (("window_size", int), ("patch_size", int),
                                                                 ("depths", list))):
        # a hierarchical window transformer halves its map at each stage after the first; a window
        # larger than the smallest map is cut to the map at run time, away from its position bias
        # (one that keeps its map, as Swin2SR, gets a smaller window than it needs, which still fits)
        smallest = size // config.patch_size // 2 ** (len(config.depths) - 1)
        config.window_size = max(1, min(config.window_size, smallest))
    if getattr(config, "num_labels", None) is not None:
        config.num_labels = 10
    _restage(config)
    return config


def _follow_widths(config, old, new) -> None:
    """Per-stage channel lists beside hidden_sizes (stage_out_channels, a
    stem's out channels) that held its widths hold the shrunk ones: a width
    keeps the new value of its first stage."""
    widths = {}
    for a, b in zip(old, new):
        widths.setdefault(a, b)
    for name, value in list(vars(config).items()):
        if "channels" not in name or name == "num_channels":
            continue
        if isinstance(value, int):
            setattr(config, name, widths.get(value, value))
        elif isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
            setattr(config, name, type(value)(widths.get(v, v) for v in value))


def _restage(config) -> None:
    """A backbone config's stage names follow its shrunk depth (the config
    derived them from the depth it was built with); outputs named after stages
    that no longer exist move to as many of the last stages, and a depth of
    layers (num_hidden_layers) grows back to one stage per output asked for."""
    if not isinstance(getattr(config, "stage_names", None), list):
        return
    wanted = list(config.out_features or [])
    if isinstance(getattr(config, "num_hidden_layers", None), int) and not set(wanted) <= set(_stages(config)):
        config.num_hidden_layers = max(config.num_hidden_layers, len(wanted))
    stages = config.stage_names = _stages(config)
    if not set(wanted) <= set(stages):
        config.set_output_features_output_indices(stages[max(len(stages) - len(wanted), 0):], None)


def _stages(config) -> list:
    """The stage names the config derives from its current sizes."""
    derived = ("stage_names", "out_features", "out_indices")
    return type(config)(**{k: v for k, v in config.to_dict().items() if k not in derived}).stage_names


def build(model_type: str, cls_name: str, size: int):
    config = shrink(configuration_auto.CONFIG_MAPPING[model_type](), size)
    return getattr(transformers, cls_name)(config).eval()


def _tensors(out):
    return [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]


def _structure_matches(model, slim, x):
    """Same output structure and shapes as the original model, at this batch."""
    with torch.no_grad():
        want, have = model(x), slim(x)
    a, b = pytree.tree_flatten(want)[1], pytree.tree_flatten(have)[1]
    shapes = [tuple(t.shape) for t in _tensors(want)], [tuple(t.shape) for t in _tensors(have)]
    if a != b or shapes[0] != shapes[1]:
        raise AssertionError(f"outputs differ at batch {x.shape[0]}: {shapes[0]} vs {shapes[1]}")


def _parity(path, slim, x) -> float:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = [t.numpy() for t in _tensors(slim(x))]
    worst = 0.0
    for g, w in zip(got, want):
        if g.shape != w.shape:
            raise AssertionError(f"onnxruntime shape {g.shape} vs torch {w.shape} at batch {x.shape[0]}")
        err = np.abs(g.astype(np.float64) - w)
        if not np.all(err <= 1e-4 + 1e-3 * np.abs(w)):
            raise AssertionError(f"parity at batch {x.shape[0]}: error {err.max():.3g} over 1e-4 + 1e-3 x |y|")
        worst = max(worst, float(err.max()) if err.size else 0.0)
    return worst


def sweep_one(model_type, task, cls_name, size=64, folder=None) -> dict:
    """One row of the table; failures are recorded with their stage, not raised."""
    row = {"model": f"{model_type} ({cls_name})", "task": task}
    stage = "build"
    try:
        torch.manual_seed(0)
        model = build(model_type, cls_name, size)
        x = torch.randn(2, 3, size, size)
        stage = "run"
        with torch.no_grad():
            if not _tensors(model(x)):
                raise ValueError("the model returns no tensors")
        stage = "capture"
        try:
            gm = cpdfx.capture(model, x)
        except CaptureError as err:
            return {**row, "failure": f"not capturable: {str(err).split(': ', 2)[-1][:160]}"}
        comb = passes.comb(gm)
        row["groups"], row["prunable"] = len(comb.groups), len(comb.prunable) / max(len(comb.groups), 1)
        stage = "prune"
        start = time.perf_counter()
        slim = cpdfx.prune(gm, x, macs=0.5, importance="l2")
        row["prune_s"] = time.perf_counter() - start
        row["macs"] = cpdfx.cost(slim, x).macs / cpdfx.cost(gm, x).macs
        stage = "structure"
        for batch in (2, 3):
            _structure_matches(model, slim, torch.randn(batch, 3, size, size))
        stage = "export"
        path = Path(folder or tempfile.gettempdir()) / f"{model_type}-{task}.onnx"
        start = time.perf_counter()
        cpdfx.export_onnx(slim, x, path)
        row["export_s"] = time.perf_counter() - start
        stage = "parity"
        row["parity"] = _parity(path, slim, torch.randn(5, 3, size, size))
        os.remove(path)
    except Exception as err:  # a row per model: whatever failed, and where
        text = " ".join(str(err).split())
        row["failure"] = f"{stage}: {type(err).__name__}: {text[:200]}"
    return row


def markdown(rows, size: int) -> str:
    head = ("| model | task | groups | prunable | MACs | prune s | export s | parity error / failure |\n"
            "|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        f = lambda k, fmt: format(r[k], fmt) if k in r else ""  # noqa: E731
        last = f("parity", ".2g") if "failure" not in r else r["failure"].replace("|", "/")
        lines.append(f"| {r['model']} | {r['task']} | {r.get('groups', '')} | {f('prunable', '.0%')} | "
                     f"{f('macs', '.1%')} | {f('prune_s', '.1f')} | {f('export_s', '.1f')} | {last} |")
    ok = sum("parity" in r for r in rows)
    return (f"# Zoo sweep: transformers vision models pruned to 50% MACs (l2) and exported\n\n"
            f"{ok} of {len(rows)} exported with onnxruntime parity at batch 5 "
            f"(max abs error within 1e-4 + 1e-3 x |y|); inputs 3x{size}x{size}, batch 2 to prune.\n\n"
            + "\n".join(lines) + "\n")


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout("over the per-model time limit")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--only", default="", help="comma-separated model types")
    p.add_argument("--limit-s", type=int, default=600, help="time limit per model")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "zoo_sweep.md"))
    args = p.parse_args(argv)
    rows, out = [], Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGALRM, _alarm)
    with tempfile.TemporaryDirectory() as folder:
        for model_type, task, cls_name in candidates(set(filter(None, args.only.split(",")))):
            signal.alarm(args.limit_s)
            try:
                row = sweep_one(model_type, task, cls_name, args.size, folder)
            except _Timeout as err:
                row = {"model": f"{model_type} ({cls_name})", "task": task, "failure": f"timeout: {err}"}
            signal.alarm(0)
            rows.append(row)
            print(row, flush=True)
            out.write_text(markdown(rows, args.size))
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
