"""Per model: channel groups found, share of parameters the prunable groups can remove,
seconds for capture, comb and eliminate, and MACs after pruning to 50% (l2).

    python benchmarks/comb_report.py            # built-in CNNs + small transformers configs
    python benchmarks/comb_report.py --full     # adds full-size ResNet-50, ViT-B/16, ... at 224
"""
from __future__ import annotations

import argparse
import time

import torch

import cpdfx
from cpdfx import passes
from cpdfx import zoo
from cpdfx.cost import CostModel
from cpdfx.models import MODELS
from cpdfx.budget import Target
from cpdfx.solve import plan


def measure(name, model, x):
    model.eval()
    t0 = time.perf_counter()
    gm = cpdfx.capture(model, x)
    t1 = time.perf_counter()
    comb = passes.comb(gm)
    t2 = time.perf_counter()
    chosen = plan(gm, comb, x, Target(macs=0.5), importance="l2")
    t3 = time.perf_counter()
    slim = passes.eliminate(gm, comb, chosen.keep)
    t4 = time.perf_counter()
    # the share of parameters the groups could remove if each shrank to one channel
    cost_model = CostModel(gm, comb, x)
    share = 1 - cost_model({g.id: 1 for g in comb.prunable}).params / cost_model().params
    with torch.no_grad():
        slim(x)
    macs = cpdfx.cost(slim, x).macs / cpdfx.cost(gm, x).macs
    return (f"| {name} | {tuple(x.shape[1:])} | {len(comb.groups)} | {len(comb.prunable)} | {share:.1%} "
            f"| {t1 - t0:.2f} | {t2 - t1:.2f} | {t4 - t3:.2f} | {t3 - t2:.2f} | {macs:.1%} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="also full-size transformers models at 224")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print("| model | input | groups | prunable | params removable by prunable groups | capture s | comb s "
          "| eliminate s | score+solve s | MACs after 50% target |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, cls in MODELS.items():
        torch.manual_seed(0)
        print(measure(name, cls(), torch.randn(2, 3, 16, 16)), flush=True)
    for family in zoo.FAMILIES:
        torch.manual_seed(0)
        print(measure(f"hf {family} (small)", zoo.build(family), torch.randn(2, 3, 64, 64)), flush=True)
    if args.full:
        for family in zoo.FAMILIES:
            torch.manual_seed(0)
            model = zoo.build(family, num_labels=1000, image_size=224, small=False)
            print(measure(f"hf {family} (full)", model, torch.randn(2, 3, 224, 224)), flush=True)


if __name__ == "__main__":
    main()
