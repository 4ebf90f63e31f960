"""The `cpdfx` command."""
from __future__ import annotations

import argparse
import importlib
import sys
import time

import torch

from .capture import CaptureError
from .prune import BudgetError


class UsageError(Exception):
    """Bad input from the command line."""


def load_model(spec: str) -> torch.nn.Module:
    """A model from a spec: a built-in name (cpdfx.models), `hf:FAMILY` (a
    transformers model from a small config, see cpdfx.zoo), or
    `package.module:factory` (any importable callable returning a Module)."""
    from .models import MODELS
    if spec in MODELS:
        return MODELS[spec]()
    if spec.startswith("hf:"):
        from . import zoo
        try:
            return zoo.build(spec[3:])
        except ValueError as err:
            raise UsageError(str(err)) from None
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise UsageError(f"unknown model {spec!r}: give a built-in name ({', '.join(MODELS)}), "
                         f"hf:FAMILY, or package.module:factory")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise UsageError(f"cannot load model {spec!r}: {err}") from None
    model = factory()
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"{spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise UsageError(f"--input-shape {text!r}: write the sizes separated by commas, e.g. 2,3,32,32") from None
    if not shape or any(s <= 0 for s in shape):
        raise UsageError(f"--input-shape {text!r}: every size must be positive")
    return shape


def cmd_inspect(args) -> None:
    from . import capture
    from passes import comb
    model = load_model(args.model).eval()
    gm = capture(model, torch.randn(parse_shape(args.input_shape)))
    groups = comb(gm)
    print(groups.table())
    prunable = sum(g.size for g in groups.prunable)
    print(f"\n{len(groups.prunable)} prunable groups ({prunable} channels) of {len(groups.groups)}")


def cmd_demo(args) -> None:
    from . import prune
    from .cost import Cost
    from passes import comb
    from .models import ResNetTiny
    torch.manual_seed(0)
    model = ResNetTiny().eval()
    x = torch.randn(8, 3, 32, 32)
    start = time.perf_counter()
    slim = prune(model, x, macs=args.macs, importance=args.importance, round_to=args.round_to)
    seconds = time.perf_counter() - start
    report = slim.meta["cpdfx_report"]
    before, after = (Cost(macs, params) for macs, params in zip(report["macs"], report["params"]))
    with torch.no_grad():
        out = slim(x)
    print(comb(slim).table())
    print(f"\nResNetTiny, input {tuple(x.shape)}, importance {args.importance}, target {args.macs:.0%} MACs")
    print(f"  before: {before}")
    print(f"  after:  {after}  ({after.macs / before.macs:.1%} MACs, {after.params / before.params:.1%} params)")
    print(f"  slim output {tuple(out.shape)}; capture, comb, score, solve and eliminate took {seconds:.2f} s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cpdfx", description="Compile-time structured pruning of PyTorch vision models.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="print the channel groups of a model",
                       description="Capture a model and print its channel groups: size, whether "
                                   "prunable (or why not), and the parameter dims each one touches.")
    p.add_argument("model", help="built-in name (resnet, vit...), hf:FAMILY, or package.module:factory")
    p.add_argument("--input-shape", default="2,3,32,32", help="example input shape (default 2,3,32,32)")
    p.set_defaults(run=cmd_inspect)
    p = sub.add_parser("demo", help="prune a built-in ResNet and show before/after",
                       description="Prune the built-in ResNetTiny to a MACs budget and print its "
                                   "groups, MACs and parameters before and after.")
    p.add_argument("--macs", type=float, default=0.5, help="share of MACs to keep (default 0.5)")
    p.add_argument("--importance", default="l2", help="l1, l2 or random (default l2)")
    p.add_argument("--round-to", type=int, default=1, help="pruned channel counts a multiple of this")
    p.set_defaults(run=cmd_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (UsageError, CaptureError, BudgetError, ValueError) as err:
        print(f"cpdfx {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
