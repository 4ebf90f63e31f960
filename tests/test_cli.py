"""The cpdfx command: inspect, demo, and errors as one paragraph with exit 2."""
import subprocess
import sys


def run(*args):
    return subprocess.run([sys.executable, "-m", "cpdfx.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_inspect_prints_the_groups_table():
    result = run("inspect", "resnet", "--input-shape", "2,3,16,16")
    assert result.returncode == 0, result.stderr
    assert "prunable" in result.stdout and "stem.0.weight:0" in result.stdout
    assert "no: model output" in result.stdout


def test_demo_prunes_to_half_the_macs():
    result = run("demo")
    assert result.returncode == 0, result.stderr
    assert "(50.0% MACs" in result.stdout or "(49." in result.stdout


def test_errors_are_one_paragraph_and_exit_two():
    for args, words in [(["inspect", "no.such.module:f"], "cannot load model"),
                        (["inspect", "resnet", "--input-shape", "a,b"], "--input-shape"),
                        (["demo", "--macs", "0"], "in (0, 1]")]:
        result = run(*args)
        assert result.returncode == 2
        assert words in result.stderr
        assert "Traceback" not in result.stderr
