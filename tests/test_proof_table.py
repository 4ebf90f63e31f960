"""benchmarks/proof_table.py: rows pair by seed, the p-values are scipy's paired
tests of those pairs, a gap inside the noise reads "the same", and the
generated sections of README and RESULTS are replaced, never appended."""
import json
import sys
from pathlib import Path

import pytest
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import int8  # noqa: E402
import proof_table  # noqa: E402
import qat_proof  # noqa: E402

KEYS = {"arch", "method", "macs", "seed", "val_curve", "macs_kept", "params_kept", "widths", "teacher_sha256", "epochs",
        "command"}  # and the task's test and val score


def row(method, seed, top1, macs=0.25, arch="a"):
    return {"arch": arch, "method": method, "macs": macs, "seed": seed, "test_top1": top1, "macs_kept": macs,
            "stage": "row"}


def test_pairs_by_seed_and_uses_the_paired_tests():
    kd = {s: row("kd", s, 0.80 + 0.01 * s) for s in range(5)}
    plain = {s: row("plain", s, 0.78 + 0.01 * s + (0.004 if s == 2 else -0.003 if s == 4 else 0)) for s in reversed(range(5))}
    c = proof_table.paired(kd, plain)
    a, b = [kd[s]["test_top1"] for s in range(5)], [plain[s]["test_top1"] for s in range(5)]
    assert c["n"] == 5
    assert c["mean"] == pytest.approx(100 * (sum(a) - sum(b)) / 5)
    assert c["t_p"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert c["t_p"] < 1e-4  # a steady 2-point gap, seed by seed, though the seeds spread 4 points
    assert proof_table.verdict(c, "kd", "plain") == "kd better"


def test_a_gap_inside_the_noise_is_the_same():
    kd = {s: row("kd", s, 0.80 + (0.01 if s % 2 else -0.01)) for s in range(5)}
    plain = {s: row("plain", s, 0.80) for s in range(5)}
    c = proof_table.paired(kd, plain)
    assert c["t_p"] > 0.05 and proof_table.verdict(c, "kd", "plain") == "the same"


def test_tables_skip_select_rows_and_name_every_comparison(tmp_path):
    rows = [row(m, s, 0.8 + 0.001 * s + (0.02 + 0.003 * (s % 2) if m == "kd" else 0)) for m in ("kd", "plain") for s in range(5)]
    rows.append({**row("kd", 100, 0.99), "stage": "select"})
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    loaded = proof_table.load(path)
    assert len(loaded) == 10  # the select row chose something on validation; it is not a result
    text = proof_table.markdown(loaded)
    assert "| a | 25% | kd − plain |" in text and "kd better" in text


def test_sections_are_replaced(tmp_path):
    page = tmp_path / "page.md"
    (b1, e1), (b2, e2) = proof_table.markers("classification"), proof_table.markers("segmentation")
    page.write_text(f"intro\n{b1}\nold\n{e1}\nmid\n{b2}\nold\n{e2}\nafter\n")
    proof_table.replace_section(page, "new")
    proof_table.replace_section(page, "newer")
    proof_table.replace_section(page, "seg", "segmentation")
    assert page.read_text() == f"intro\n{b1}\nnewer\n{e1}\nmid\n{b2}\nseg\n{e2}\nafter\n"


def test_each_task_reads_its_own_rows_and_score(tmp_path):
    seg = [{**row(m, s, None, macs=0.5), "task": "segmentation", "test_miou": 0.6 + 0.01 * s + (0.03 + 0.001 * (s % 2) if m == "kd" else 0)}
           for m in ("kd", "plain") for s in range(5)]
    cls = [row(m, s, 0.9) for m in ("kd", "plain") for s in range(5)]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(cls + seg))
    assert len(proof_table.load(path)) == 10 and len(proof_table.load(path, "segmentation")) == 10
    text = proof_table.markdown(proof_table.load(path, "segmentation"), "segmentation")
    assert text.startswith("Test mIoU") and "Δ test mIoU" in text and "| a | 50% | kd − plain |" in text
    assert proof_table.paired(*(
        {r["seed"]: r for r in proof_table.load(path, "segmentation") if r["method"] == m} for m in ("kd", "plain")
    ))["mean"] == pytest.approx(3.04)


def test_committed_rows_hold_what_reproduces_them():
    path = ROOT / "benchmarks" / "results" / "distill_proof.json"
    if not path.is_file():
        pytest.skip("no distill_proof.json committed yet")
    rows = json.loads(path.read_text())
    assert {r.get("task", "classification") for r in rows} <= set(proof_table.SCORES)
    for r in rows:
        test = proof_table.SCORES[r.get("task", "classification")][0]  # test_top1 or test_miou
        assert KEYS | {test, test.replace("test_", "val_")} <= set(r), KEYS - set(r)
        assert r["method"] in ("teacher",) + proof_table.METHODS
        if r.get("stage", "row") == "select":
            assert r[test] is None  # a choice made on validation never read the test split
        else:
            assert r[test] is not None and len(r["teacher_sha256"]) == 64


def test_int8_rows_hold_what_reproduces_them_and_the_tables_are_theirs():
    """benchmarks/results/int8.json: every row carries its command, commit and
    machine (with the CPU's flags, which int8 speed depends on), and README's
    and RESULTS' int8 sections are what int8.py --table generates from them."""
    path = ROOT / "benchmarks" / "results" / "int8.json"
    if not path.is_file():
        pytest.skip("no int8.json committed yet")
    rows = json.loads(path.read_text())["rows"]
    for r in rows:
        assert {"command", "commit", "machine", "variant", "batch", "speedup", "model"} <= set(r)
        assert r["command"].startswith("python benchmarks/int8.py") and "cpu_flags" in r["machine"]
    for page, body in ((ROOT / "benchmarks" / "RESULTS.md", int8.results_table(rows)),
                       (ROOT / "README.md", int8.readme_table(rows))):
        begin, end = proof_table.markers("int8")
        assert page.read_text().split(begin)[1].split(end)[0].strip() == body.strip(), page.name


def test_qat_rows_pair_by_seed_and_their_section_is_generated():
    path = ROOT / "benchmarks" / "results" / "qat_proof.json"
    if not path.is_file():
        pytest.skip("no qat_proof.json committed yet")
    rows = json.loads(path.read_text())
    for r in rows:
        assert {"arm", "seed", "command", "commit", "machine", "teacher_sha256", "test_int8", "val_int8"} <= set(r)
    assert {(r["seed"], r["reduce_range"]) for r in rows if r["arm"] == "qat"} == \
        {(r["seed"], r["reduce_range"]) for r in rows if r["arm"] == "fp32"}
    begin, end = proof_table.markers("qat_proof")
    page = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    assert page.split(begin)[1].split(end)[0].strip() == qat_proof.markdown(rows)
