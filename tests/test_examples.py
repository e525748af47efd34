"""Every example runs (at smoke size) in CI."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(args, tmp_path, timeout=600):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_fit_mixed_latents_quick(tmp_path):
    out = run([str(ROOT / "examples" / "fit_mixed_latents.py"), "--quick", "--out", str(tmp_path / "o")], tmp_path)
    assert "certificate: unbiased" in out
    assert (tmp_path / "o" / "objective.png").stat().st_size > 1000


@pytest.mark.parametrize(
    "script, figure, summary",
    [
        ("vae_digits.py", "vae_digits.png", "on all 1797 digits"),
        ("iwae_digits.py", "iwae_digits.png", "on all 1797 digits"),
        ("sigmoid_belief_net.py", "sigmoid_belief_net.png", "on all 1797 digits"),
        ("hierarchical_vi.py", "hierarchical_vi.png", "IW bound"),
    ],
)
def test_vi_example_quick(script, figure, summary, tmp_path):
    out = run([str(ROOT / "examples" / script), "--quick", "--out", str(tmp_path / "o")], tmp_path)
    assert "certificate: unbiased" in out  # the estimator plan was printed
    assert summary in out  # the final summary was printed
    assert (tmp_path / "o" / figure).stat().st_size > 1000


@pytest.mark.slow
def test_bench_core_quick(tmp_path):
    out = run([str(ROOT / "bench" / "bench_core.py"), "--quick"], tmp_path)  # exit 1 when a check fails
    assert "estimax" in out and "hand-written" in out
    assert "agreement check: ok" in out and "FAIL" not in out


def test_constrained_classification_quick(tmp_path):
    out = run([str(ROOT / "examples" / "constrained_classification.py"), "--steps", "300", "--out", str(tmp_path / "o")],
              tmp_path)
    assert "full data, AugmentedLagrangian: Solution(successful" in out
    assert "relative distance to the full-data solution" in out
    assert (tmp_path / "o" / "constrained_classification.png").stat().st_size > 1000


def test_hyper_cleaning_quick(tmp_path):
    out = run([str(ROOT / "examples" / "hyper_cleaning.py"), "--steps", "8", "--train", "300", "--val", "100",
               "--out", str(tmp_path / "o")], tmp_path)
    assert "inner problems (ex.argmin)" in out and "test accuracy, hyper-cleaned weights" in out
    assert "F1" in out and (tmp_path / "o" / "hyper_cleaning.png").stat().st_size > 1000


def test_ebm_ring_quick(tmp_path):
    """In process (the example keeps float32 and changes no global setting)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ebm_ring", ROOT / "examples" / "ebm_ring.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    best, truth = module.main(["--quick", "--out", str(tmp_path / "o")])
    assert set(best) == {"compositional (SCGD)", "NCE"}
    start = module.exact_nll(module.init_mlp(module.jax.random.key(0)), module.ring(5000, 1))[0]
    # 300 steps: both have closed most of the gap between the initial network and the truth
    assert all(truth < v < truth + 0.5 * (start - truth) for v in best.values()), (best, start, truth)
    assert (tmp_path / "o" / "ebm_ring.png").stat().st_size > 1000


def test_distill_mixture_quick(tmp_path):
    """In process (float32, no global setting changed)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("distill_mixture", ROOT / "examples" / "distill_mixture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    distances, floor, timing = module.main(["--quick", "--out", str(tmp_path / "o")])
    assert set(distances) == {"reverse_kl", "jensen_shannon"} and set(timing) == {"estimax", "hand-written"}
    # the untrained generator (an MLP of a standard normal) is far from the ring
    start = module.energy_distance(
        np.asarray(module.generator(module.mlp_init(module.jax.random.key(2), (2, 128, 128, 2)),
                                    module.jax.random.normal(module.jax.random.key(99), (2000, 2)))),
        module.mixture(2000, 1))
    assert all(floor < d < 0.5 * start for d in distances.values()), (distances, start, floor)
    assert (tmp_path / "o" / "distill_mixture.png").stat().st_size > 1000


def test_iwae_devices_quick(tmp_path):
    # (the example's own 1-device against N-device check is skipped: tests/test_runtime.py makes it)
    args = [str(ROOT / "examples" / "iwae_devices.py"), "--devices", "2", "--steps", "40", "--every", "20",
            "--out", str(tmp_path / "o"), "--skip-check"]
    out = run(args, tmp_path)
    assert "2 device(s): cpu" in out
    assert "step     20: IWELBO-8 estimate" in out and "40 steps in all" in out
    assert (tmp_path / "o" / "iwae_devices_2" / "checkpoint" / "40").is_dir()  # resumable (tests/test_runtime.py)
