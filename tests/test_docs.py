"""Documented examples run: module doctests and the README's first code block."""

import doctest
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["estimax", "estimax.dsl._program", "estimax.testing.strategies"]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    assert result.attempted > 0, f"{name} has no doctest examples"


def test_readme_example_runs_and_prints_the_plan(capsys):
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    exec(compile(block, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "certificate: unbiased" in out
    # the plan printed in the README is the one the code prints
    shown = re.search(r"```\n(estimator plan for objective.*?)```", text, re.S).group(1)
    assert [line.split() for line in shown.strip().splitlines()] == [line.split() for line in out.strip().splitlines()]
