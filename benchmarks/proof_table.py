"""The tables of benchmarks/results/distill_proof.json, with paired tests.

    python benchmarks/proof_table.py            # print the markdown
    python benchmarks/proof_table.py --write    # and replace the generated sections of RESULTS.md (the
                                                # tables) and README.md (one line per budget), one
                                                # pair of sections per task

Rows pair by (arch, budget, seed): the methods of one seed share the teacher,
the data, its order and the schedule. Each comparison gives the mean and std
of the paired differences in the test score (top-1 for classification, mIoU
for segmentation; points), the paired t-test's p and
the Wilcoxon signed-rank test's p (both two-sided; with 5 pairs the smallest
Wilcoxon p there is is 0.0625, so it cannot reach 0.05 whatever the gap).
A gap whose t-test p is 0.05 or more is reported as "the same".
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from scipy import stats

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "distill_proof.json"
METHODS = ("plain", "kd", "tp", "tp+kd", "learned")
COMPARISONS = (("kd", "plain", "the teacher term"), ("kd", "tp+kd", "the structure, both distilled"),
               ("tp+kd", "tp", "the teacher term on Torch-Pruning's structure"),
               ("learned", "kd", "learned gates against Fisher"))
SECTIONS = {"classification": "distill_proof", "segmentation": "seg_proof"}  # the generated sections' names
SCORES = {"classification": ("test_top1", "top-1"), "segmentation": ("test_miou", "mIoU")}


def markers(task: str = "classification") -> tuple[str, str]:
    """The generated section's markers: a task's (SECTIONS), or any section's by its name."""
    name = SECTIONS.get(task, task)
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def load(path: Path = RESULTS, task: str = "classification") -> list[dict]:
    """The rows of one task (rows without a task are classification), select rows left out."""
    return [r for r in json.loads(path.read_text())
            if r.get("stage", "row") == "row" and r.get("task", "classification") == task]


def score(r: dict) -> float:
    return r[SCORES[r.get("task", "classification")][0]]


def cells(rows) -> dict:
    """(arch, method, macs) -> {seed: row}."""
    out = defaultdict(dict)
    for r in rows:
        out[r["arch"], r["method"], r["macs"]][r["seed"]] = r
    return out


def mean_std(values) -> str:
    if not values:
        return "-"
    points = [100 * v for v in values]
    std = statistics.stdev(points) if len(points) > 1 else 0.0
    return f"{statistics.mean(points):.2f} ± {std:.2f}"


def paired(a: dict, b: dict) -> dict | None:
    """The paired differences a - b (points) over the seeds both have."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    diff = [100 * (score(a[s]) - score(b[s])) for s in seeds]
    t_p = float(stats.ttest_rel([score(a[s]) for s in seeds], [score(b[s]) for s in seeds]).pvalue) \
        if any(diff) else 1.0
    w_p = float(stats.wilcoxon(diff).pvalue) if any(diff) else 1.0
    return {"n": len(seeds), "mean": statistics.mean(diff), "std": statistics.stdev(diff), "t_p": t_p, "w_p": w_p}


def fmt_p(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def p_is(p: float) -> str:
    text = fmt_p(p)
    return f"p{text}" if text.startswith("<") else f"p={text}"


def verdict(c: dict, a: str, b: str) -> str:
    if c["t_p"] >= 0.05:
        return "the same"
    return f"{a} better" if c["mean"] > 0 else f"{b} better"


def accuracy_table(rows) -> str:
    by = cells(rows)
    lines = []
    for arch in sorted({r["arch"] for r in rows}):
        teacher = next((r for r in rows if r["arch"] == arch and r["method"] == "teacher"), None)
        budgets = sorted({r["macs"] for r in rows if r["arch"] == arch and r["method"] != "teacher"}, reverse=True)
        methods = [m for m in METHODS if any((arch, m, b) in by for b in budgets)]
        metric = SCORES[teacher.get("task", "classification")][1] if teacher else ""
        head = f"**{arch}**" + (f", teacher {100 * score(teacher):.2f}% test {metric} "
                                  f"(sha256 {teacher['teacher_sha256'][:12]})" if teacher else "")
        lines += [head, "", "| MACs asked | " + " | ".join(methods) + " |",
                  "|---|" + "---|" * len(methods)]
        for b in budgets:
            row = []
            for m in methods:
                got = by.get((arch, m, b), {})
                kept = statistics.mean(r["macs_kept"] for r in got.values()) if got else None
                row.append(f"{mean_std([score(r) for r in got.values()])} (n={len(got)}, "
                           f"{100 * kept:.1f}% MACs)" if got else "-")
            lines.append(f"| {100 * b:g}% | " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def comparison_table(rows, metric: str = "top-1") -> str:
    by = cells(rows)
    lines = [f"| arch | MACs | comparison | what it isolates | Δ test {metric} (points) | paired t p | Wilcoxon p | "
             f"verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for arch in sorted({r["arch"] for r in rows}):
        for b in sorted({r["macs"] for r in rows if r["arch"] == arch and r["method"] != "teacher"}, reverse=True):
            for a, z, what in COMPARISONS:
                c = paired(by.get((arch, a, b), {}), by.get((arch, z, b), {}))
                if c is None:
                    continue
                lines.append(f"| {arch} | {100 * b:g}% | {a} − {z} | {what} | {c['mean']:+.2f} ± {c['std']:.2f} "
                             f"(n={c['n']}) | {fmt_p(c['t_p'])} | {fmt_p(c['w_p'])} | {verdict(c, a, z)} |")
    return "\n".join(lines)


def readme_table(rows) -> str:
    """One line per (arch, budget): kd's mean test score, and each other method's
    with kd's paired gap over it and that gap's t-test p."""
    by, lines = cells(rows), []
    others = [m for m in METHODS if m != "kd" and any(r["method"] == m for r in rows)]
    lines += ["| model, MACs asked | teacher | kd | " + " | ".join(others) + " |", "|---|---|---|" + "---|" * len(others)]
    for arch in sorted({r["arch"] for r in rows}):
        teacher = next((r for r in rows if r["arch"] == arch and r["method"] == "teacher"), None)
        for b in sorted({r["macs"] for r in rows if r["arch"] == arch and r["method"] != "teacher"}, reverse=True):
            kd = by.get((arch, "kd", b), {})
            cell = [f"{100 * score(teacher):.2f}" if teacher else "-",
                    f"{100 * statistics.mean(score(r) for r in kd.values()):.2f}" if kd else "-"]
            for m in others:
                got = by.get((arch, m, b), {})
                c = paired(kd, got)
                mean = f"{100 * statistics.mean(score(r) for r in got.values()):.2f}" if got else "-"
                cell.append(mean if c is None else f"{mean} (kd {c['mean']:+.2f}, {p_is(c['t_p'])})")
            lines.append(f"| {arch}, {100 * b:g}% | " + " | ".join(cell) + " |")
    return "\n".join(lines)


def markdown(rows, task: str = "classification") -> str:
    metric = SCORES[task][1]
    return "\n".join([f"Test {metric}, mean ± std over seeds (each row's test split read once):", "",
                      accuracy_table(rows), comparison_table(rows, metric)])


def replace_section(path: Path, body: str, task: str = "classification") -> None:
    text = path.read_text()
    BEGIN, END = markers(task)
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{path} has no {BEGIN} ... {END} section to replace")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{BEGIN}\n{body}\n{END}{tail}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--write", action="store_true", help="replace the generated sections of README and RESULTS")
    args = parser.parse_args()
    for task in SECTIONS:
        rows = load(Path(args.results), task)
        if not rows:
            continue
        body = markdown(rows, task)
        print(f"## {task}\n\n{body}\n")
        if args.write:
            replace_section(HERE / "RESULTS.md", body, task)
            replace_section(HERE.parent / "README.md", readme_table(rows), task)


if __name__ == "__main__":
    main()
