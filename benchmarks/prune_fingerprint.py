"""A fingerprint of what `cpdfx.prune` decides, one line per case: the kept
indices (hashed), the achieved MACs and parameter shares and the slim model's
output, over the built-in models and three transformers families, five
criteria and three budgets (one round, three rounds, round_to=4). A refactor
that should not change behaviour must print the same lines:

    python benchmarks/prune_fingerprint.py > after.txt     # in each checkout
    diff before.txt after.txt

Runs on one thread, seeded; CPUs of another kind may differ in the last digits.
"""
import hashlib
import json

import torch

import cpdfx
from cpdfx import zoo
from cpdfx.models import MODELS

CRITERIA = ("l1", "l2", "bn_scale", "fisher", "taylor")
BUDGETS = (({"macs": 0.5}, 1, 1), ({"params": 0.4}, 3, 1), ({"macs": 0.6}, 2, 4))  # budget, steps, round_to


def cases():
    for name, build in MODELS.items():
        yield name, build, (2, 3, 16, 16)
    for family in ("resnet", "vit", "convnext"):
        yield f"hf:{family}", lambda family=family: zoo.build(family), (2, 3, 64, 64)


def fingerprint(slim, x) -> str:
    kept = json.dumps({name: {str(d): [int(i) for i in idx] for d, idx in dims.items()}
                       for name, dims in sorted(slim.meta["cpdfx_kept"].items())}, sort_keys=True)
    achieved = slim.meta["cpdfx_report"]["achieved"]
    out = slim(x)
    out = out if isinstance(out, torch.Tensor) else next(iter(out.values()))
    return (f"kept {hashlib.md5(kept.encode()).hexdigest()[:12]} achieved {achieved['macs']:.6f}/"
            f"{achieved['params']:.6f} out {float(out.double().abs().sum()):.6f}")


def main():
    torch.set_num_threads(1)
    for name, build, shape in cases():
        for importance in CRITERIA:
            for budget, steps, round_to in BUDGETS:
                torch.manual_seed(0)
                model = build().eval()
                g = torch.Generator().manual_seed(1)
                x = torch.randn(*shape, generator=g)
                calibration = [(torch.randn(4, *shape[1:], generator=g),) for _ in range(2)]
                try:
                    slim = cpdfx.prune(model, x, importance=importance, calibration=calibration, steps=steps,
                                       round_to=round_to, **budget)
                    line = fingerprint(slim, x)
                except Exception as err:  # a case that fails is part of the fingerprint
                    line = type(err).__name__
                print(f"{name} {importance} {budget} {steps} {round_to}: {line}", flush=True)


if __name__ == "__main__":
    main()
