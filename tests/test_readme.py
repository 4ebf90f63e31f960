"""The README and docs/ say what the code does: the README's Python example runs
as written, every option a CLI line in them shows is one the command takes, and
every page they link to exists."""
import glob
import os
import re
import subprocess
import sys

import pytest

from cpdfx.cli import build_parser

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)
README = os.path.join(ROOT, "README.md")
PAGES = [README, *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]


def blocks(language: str, page: str = README) -> list[str]:
    """A page's fenced code blocks tagged `language` ("" for untagged ones)."""
    found, current = [], None
    with open(page, encoding="utf-8") as f:
        for line in f:
            if line.startswith("```"):
                if current is None:
                    current, tag = [], line[3:].strip()
                else:
                    if tag == language:
                        found.append("".join(current))
                    current = None
            elif current is not None:
                current.append(line)
    return found


def test_the_python_example_runs_as_written(tmp_path, monkeypatch, one_thread):
    code = blocks("python")
    assert code, "the README has no Python example"
    monkeypatch.chdir(tmp_path)
    for block in code:
        exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
    for name in ("orig.onnx", "slim.onnx", "slim.pt2"):
        assert (tmp_path / name).is_file(), name


def synopsis() -> list[tuple[str, list[str]]]:
    """(command, options) of every CLI line in the pages' untagged blocks: `cpdfx
    ...`, and `torchrun ... -m cpdfx ...` (torchrun's own options are not the CLI's)."""
    lines = [line.split() for page in PAGES for b in blocks("", page) for line in b.splitlines()
             if line.startswith("cpdfx ") or line.startswith("torchrun ") and " -m cpdfx " in line]
    lines = [words[words.index("cpdfx"):] for words in lines]
    assert len(lines) > 1, "the README has no CLI synopsis"
    return [(words[1], [w.strip("[]|") for w in words if w.strip("[").startswith("--")]) for words in lines]


@pytest.mark.parametrize("command,options", synopsis())
def test_every_option_in_the_cli_synopsis_exists(command, options):
    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    parser = subparsers.choices[command]
    known = {s for action in parser._actions for s in action.option_strings}
    assert set(options) <= known, set(options) - known


def test_the_installed_package_is_found_from_any_folder(tmp_path):
    """A folder named cpdfx in the working directory (the checkout, seen from its
    parent) must not shadow the installed package, and no top-level `passes` is
    installed beside it."""
    (tmp_path / "cpdfx" / "passes").mkdir(parents=True)
    code = ("import importlib.util, cpdfx, cpdfx.passes\n"
            "print(callable(cpdfx.prune), callable(cpdfx.passes.comb), importlib.util.find_spec('passes'))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                            timeout=300)
    assert result.returncode == 0, (f"install cpdfx as the README says (editable_mode=strict):\n"
                                    f"{result.stderr[-2000:]}")
    assert result.stdout.split() == ["True", "True", "None"]


@pytest.mark.parametrize("page", PAGES, ids=os.path.basename)
def test_every_page_linked_exists(page):
    for target in re.findall(r"\]\(([^)#]+\.md)\)", open(page, encoding="utf-8").read()):
        assert os.path.isfile(os.path.join(os.path.dirname(page), target)), f"{page} links to {target}"
