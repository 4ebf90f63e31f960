"""What a distillation step costs against a plain step on the same model.

    python benchmarks/kd_step_cost.py                       # ResNetTiny and an HF ResNet-18, CPU
    python benchmarks/kd_step_cost.py --models resnet_tiny --rounds 4 --device cuda

The student is the teacher's capture (cpdfx.capture), so a KD step is a plain
step (student forward, backward, optimizer step) plus one teacher forward in
eval mode without autograd: about 1 + 1/3 of a plain step (a backward costs
about two forwards), which is the bound 1.35 leaves room for. Both steps go
through cpdfx.distill itself (teacher=None for the plain one), on the same
batches (1-channel 28x28, --batch 64). The runs are interleaved, a short plain
run, then a short KD run, for --rounds rounds, so that load from other
processes falls on both alike; each run's first step is dropped (it builds the
optimizer's state), the others are timed between the callback's calls, which
come after each optimizer step. Prints the mean step times and their ratio
(and the ratio of the medians, steadier on a loaded machine), with the machine,
and writes one row per model, with its command and machine, to --out
(benchmarks/results/kd_step_cost.json by default).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

import cpdfx
from cpdfx import zoo
from cpdfx.distill import Callback, distill
from cpdfx.models import ResNetTiny


def resnet_tiny():
    return ResNetTiny(in_channels=1)


def hf_resnet18():
    """benchmarks/accuracy.py's teacher: transformers' ResNet-18, one input channel."""
    return zoo.build("resnet18", small=False, num_channels=1)


OUT = Path(__file__).parent / "results" / "kd_step_cost.json"
MODELS = {"resnet_tiny": resnet_tiny, "hf_resnet18": hf_resnet18}


class StepClock(Callback):
    """The time between successive optimizer steps (the first step is not timed)."""

    def __init__(self):
        self.last, self.times = None, []

    def on_step_end(self, step, student, optimizer):
        now = time.perf_counter()
        if self.last is not None:
            self.times.append(now - self.last)
        self.last = now
        return None


def measure(name: str, rounds: int, steps: int, batch: int, device: str) -> dict:
    torch.manual_seed(0)
    teacher = MODELS[name]().eval()
    x = torch.rand(batch * steps, 1, 28, 28)
    data = TensorDataset(x, torch.randint(0, 10, (len(x),)))
    students = {"plain": cpdfx.capture(teacher, x[:2]), "kd": cpdfx.capture(teacher, x[:2])}
    times = {"plain": [], "kd": []}
    for _ in range(rounds):
        for kind in ("plain", "kd"):
            clock = StepClock()
            distill(students[kind], teacher if kind == "kd" else None, data, epochs=1, batch_size=batch,
                    callback=clock, progress=False, device=device)
            times[kind] += clock.times
    plain, kd = statistics.mean(times["plain"]), statistics.mean(times["kd"])
    median = statistics.median(times["kd"]) / statistics.median(times["plain"])
    return {"model": name, "plain_ms": 1e3 * plain, "kd_ms": 1e3 * kd, "ratio": kd / plain, "median_ratio": median,
            "steps_each": len(times["plain"])}


def machine(device: str) -> str:
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else "no GPU"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {gpu}, load average {os.getloadavg()[0]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--rounds", type=int, default=3, help="interleaved plain / KD runs (default 3)")
    parser.add_argument("--steps", type=int, default=5, help="steps per run, the first not timed (default 5)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default=str(OUT), help="the JSON rows (default %(default)s)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine(args.device))
    print("| model | plain step ms (mean) | KD step ms (mean) | KD / plain (means) | KD / plain (medians) | "
          "timed steps each |")
    print("|---|---:|---:|---:|---:|---:|")
    rows = []
    for name in args.models:
        r = measure(name, args.rounds, args.steps, args.batch, args.device)
        rows.append({**r, "batch": args.batch, "device": args.device, "machine": machine(args.device),
                     "command": " ".join(["python", *sys.argv])})
        print(f"| {r['model']} | {r['plain_ms']:.1f} | {r['kd_ms']:.1f} | {r['ratio']:.3f} | {r['median_ratio']:.3f} | "
              f"{r['steps_each']} |",
              flush=True)
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
