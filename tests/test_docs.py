"""Documented examples run: module doctests, every Python block of the README and of the docs."""

import doctest
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["estimax", "estimax.transforms._estimate", "estimax.testing.strategies"]


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


def test_every_readme_block_runs_in_order_and_says_what_it_claims(capsys):
    """The README's Python blocks build on each other (the first defines ``key``, the model's
    block ``model`` and ``guide``): run in order in one namespace, each claim checked."""
    import jax
    import jax.numpy as jnp

    from estimax.testing import mean_and_se

    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 5
    ns: dict = {"__name__": "__main__"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i}", "exec"), ns)
    capsys.readouterr()
    import estimax as ex

    x, params = ns["x"], ns["params"]
    # the hierarchical guide's IWHVI: a program with a finite, unbiasedly estimated value
    hier = {"A": jnp.array([0.5, -0.3]), "log_s": jnp.float32(-0.5), "B": jnp.array([0.2, 0.1])}
    assert ex.explain(ns["objective"], hier, x).certificate.kind == "unbiased"
    assert jnp.isfinite(ns["objective"].estimate(jax.random.PRNGKey(1), hier, x))
    # the hand-written IWELBO estimates what the library's does
    mine, mine_se = mean_and_se(ns["my_iwelbo"].estimate, jax.random.PRNGKey(2), 4000, args=(params, x))
    lib, lib_se = mean_and_se(ex.objectives.iwelbo(ns["model"], ns["guide"], 8).estimate, jax.random.PRNGKey(3),
                              4000, args=(params, x))
    assert abs(mine - lib) < 5 * (mine_se**2 + lib_se**2) ** 0.5, (mine, lib, mine_se, lib_se)


def _run_doc_blocks(doc: str, tmp_path) -> list[str]:
    """Run every ```python block of ``doc`` in one subprocess (imports paid once), each in a
    fresh namespace; blocks that leave float32 on run before those that enable float64.
    Returns each block's output."""
    import json
    import subprocess
    import sys

    text = (ROOT / "docs" / doc).read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    order = sorted(range(len(blocks)), key=lambda i: "enable_x64" in blocks[i])
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import json, sys\n"
        f"blocks = json.loads({json.dumps(json.dumps([blocks[i] for i in order]))})\n"
        f"order = {order!r}\n"
        "for i, block in zip(order, blocks):\n"
        "    print(f'=== block {i}', flush=True)\n"
        f"    exec(compile(block, f'{doc} example {{i}}', 'exec'), {{'__name__': '__main__'}})\n"
        "    sys.stdout.flush()\n"
    )
    done = subprocess.run([sys.executable, str(driver)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"docs/{doc}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    outputs = [""] * len(blocks)
    for part in done.stdout.split("=== block ")[1:]:
        head, _, body = part.partition("\n")
        outputs[int(head)] = body
    return outputs


def test_constrained_doc_examples_run(tmp_path):
    """Every Python example of docs/constrained.md runs."""
    outputs = _run_doc_blocks("constrained.md", tmp_path)
    assert len(outputs) >= 2
    for out in outputs:
        assert "successful" in out or "Solution(" in out, out


def test_bilevel_doc_examples_run(tmp_path):
    """Every Python example of docs/bilevel.md runs."""
    outputs = _run_doc_blocks("bilevel.md", tmp_path)
    assert len(outputs) >= 2
    assert "inner problems (ex.argmin)" in outputs[0] and "Solution(successful" in outputs[0], outputs[0]


def test_compositional_doc_examples_run(tmp_path):
    """The Python examples of docs/compositional.md run (the asserts in them check the
    results the text states)."""
    outputs = _run_doc_blocks("compositional.md", tmp_path)
    assert len(outputs) == 3
    assert "SCGD" in outputs[0] and "optimum" in outputs[1] and "SOX" in outputs[2], outputs


def test_score_doc_example_runs(capsys):
    text = (ROOT / "docs" / "score.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 1
    exec(compile(blocks[0], "docs/score.md", "exec"), {})
    out = capsys.readouterr().out
    assert out.startswith("unbiased")


def test_runtime_doc_examples_run(tmp_path):
    """The Python examples of docs/runtime.md run (8 forced CPU devices in the first; the
    asserts in them check what the text states)."""
    outputs = _run_doc_blocks("runtime.md", tmp_path)
    assert len(outputs) == 5
    assert "8 devices against 1: largest difference" in outputs[0]
    assert "stopped: stopped by signal 2" in outputs[1] and "resumed at step 300" in outputs[1]
    assert "non-finite gradient at step 0" in outputs[2] and "in params['a'], first produced by" in outputs[2]
    assert "`sqrt` at runtime.md example 2:" in outputs[2]  # the operation and the example's line
    assert "raised, with the result attached at step 0" in outputs[2]
    assert outputs[3].strip().endswith("[250, 500, 750, 1000]")
    assert "last iterate 1.1674 (6.9% off); mean of the last 1000 iterates 1.2575 (0.3% off)" in outputs[4]


def test_unbiased_doc_examples_run(tmp_path):
    """The examples of docs/unbiased.md print what the page shows."""
    outputs = _run_doc_blocks("unbiased.md", tmp_path)
    assert len(outputs) == 3
    text = (ROOT / "docs" / "unbiased.md").read_text()
    shown = re.search(r"```\n(estimator plan for above.*?)```", text, re.S).group(1)
    assert [line.split() for line in shown.strip().splitlines()] == [line.split() for line in outputs[0].strip().splitlines()]
    assert "misses the jump at `z > 0`" in outputs[1]
    assert outputs[2].strip() == "biased"
