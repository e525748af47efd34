"""Test-process settings: strict JAX, and hypothesis profiles.

Profiles: ``ci`` (few, derandomized examples; selected when ``CI`` is set), ``dev`` (the
default), ``thorough`` (many examples; ``HYPOTHESIS_PROFILE=thorough``).
"""

import importlib.util
import os
from pathlib import Path

import jax
import pytest
from hypothesis import HealthCheck, settings

jax.config.update("jax_numpy_rank_promotion", "raise")
# Strict dtype promotion is not enabled: NumPyro's own samplers mix Python ints with bools
# (Bernoulli.sample raises TypePromotionError under "strict").

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=4, derandomize=True, **_common)
settings.register_profile("dev", max_examples=8, derandomize=True, **_common)
settings.register_profile("thorough", max_examples=50, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "objectives"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    """The example objective files' data (``examples/objectives/make_data.py``), by name."""
    spec = importlib.util.spec_from_file_location("make_data", EXAMPLES / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write(str(tmp_path_factory.mktemp("data")))


# --- the quick subset: `python -m pytest -m quick` --------------------------------------------
# A few fast tests from every test module, so that every part of the package (language, passes,
# strategies, objectives, solvers, text front-end, command, runtime, testing helpers) runs in
# about two minutes on two cores. The full suite (what CI runs) is the reference.
QUICK = {
    "test_baselines.py": ["test_learned_baseline_mistakes"],
    "test_bilevel.py": ["test_ridge_hypergradient_matches_the_closed_form[default]", "test_errors_name_the_mistake"],
    "test_cli.py": ["test_check_prints_the_plan_and_certificate", "test_syntax_error_has_location_caret_and_expected",
                    "test_help_for_every_command"],
    "test_composition.py": ["test_eager_and_jit_agree", "test_tuple_argnums"],
    "test_constrained_solvers.py": ["test_known_optimum[sl-eq_qp]", "test_augmented_lagrangian_options_are_checked"],
    "test_constraints.py": ["test_explain_lists_constraints_kinds_and_multipliers", "test_malformed_constraints_are_named"],
    "test_differentiability.py": ["test_where_jump_default_is_mvd_and_right", "test_argument_compared_with_a_draw_is_biased",
                                  "test_a_site_inside_custom_jvp_is_refused_by_explain_as_by_the_estimator"],
    "test_docs.py": ["test_doctests"],
    "test_errors.py": None,  # the whole module: each test stages one small program
    "test_explain.py": ["test_plan_lists_sites_strategies_and_reasons", "test_nonlinear_plug_in_is_named"],
    "test_faults_inputs.py": ["test_a_module_outside_the_allow_list_is_refused_before_it_runs",
                              "test_deep_nesting_is_located_at_its_statement"],
    "test_faults_runs.py": ["test_a_damaged_latest_checkpoint_is_refused_and_the_previous_one_offered"],
    "test_fit.py": ["test_argument_errors", "test_history_partial_last_chunk_and_chunk_size"],
    "test_fit_average.py": ["test_average_from_errors_name_the_value", "test_without_averaging_and_before_it_starts"],
    "test_house.py": None,  # reads the sources only
    "test_lane_sites.py": ["test_enumeration_over_lanes_sharing_their_parameters_is_exact"],
    "test_locations.py": ["test_library_files_are_told_apart_by_package_not_by_name",
                          "test_if_on_a_random_value_is_a_program_error_at_the_users_line"],
    "test_marginal.py": ["test_marginal_errors_name_the_mistake", "test_explain_lists_the_reverse_model_draws"],
    "test_objectives.py": ["test_elbo_value_and_gradient_are_unbiased", "test_dreg_refuses_a_non_reparameterized_guide"],
    "test_programs.py": ["test_dependent_sites[reparam-mvd]", "test_enumeration_is_exact", "test_reinforce_inside_scan"],
    "test_progress.py": ["test_a_resumed_tqdm_bar_starts_at_its_step_without_a_rate",
                         "test_log_lines_are_plain_rare_and_end_with_the_state"],
    "test_public_surface.py": ["test_register_mvd_adds_an_unbiased_rule_for_a_new_family"],
    "test_relax.py": ["test_explain_certifies_biased_and_names_the_strategy", "test_bad_temperatures_are_refused"],
    "test_runtime.py": ["test_nonfinite_names_the_step_the_leaf_and_the_line"],
    "test_score.py": ["test_fdistill_certificates_and_errors"],
    "test_testing_helpers.py": ["test_seed_from_is_deterministic_and_input_sensitive",
                                "test_assert_unbiased_catches_a_small_bias"],
    "test_text.py": ["test_declarations_shapes_and_sizes", "test_golden_error[enum_on_normal]",
                     "test_golden_error[duplicate_name]", "test_sites_report_the_file_line"],
    "test_tracking.py": ["test_updates_equal_a_numpy_transcription", "test_tracking_errors_name_the_expectation"],
    "test_unbiased.py": ["test_gradient_unbiased[reparam-Normal]", "test_gradient_unbiased[reinforce-Bernoulli]",
                         "test_gradient_unbiased[mvd-Poisson]"],
}


def pytest_collection_modifyitems(config, items):
    matched: dict[str, set] = {}
    for item in items:
        names = QUICK.get(item.path.name, ())  # a test's name, or one parametrization of it
        hit = set(names or ()) & {item.originalname, item.name}
        matched.setdefault(item.path.name, set()).update(hit)
        if names is None or hit:
            item.add_marker(pytest.mark.quick)
    # a renamed test must not silently leave the quick subset
    stale = [f"{f}::{n}" for f, names in QUICK.items() if f in matched and names
             for n in names if n not in matched[f] and not config.getoption("-k")]
    if stale and len(matched) == len(QUICK):
        raise pytest.UsageError(f"tests/conftest.py QUICK names tests that do not exist: {stale}")
