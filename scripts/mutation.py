"""Mutation testing of the modules that carry the study's guarantees and statistics (mutmut 3).

    python scripts/mutation.py seed_groups          # one module (names: see MODULES, or --list)
    python scripts/mutation.py all                  # every module, one after another
    python scripts/mutation.py journal --survivors  # and print the diff of every surviving mutant

Each module is mutated alone, against only the unit tests that exercise it, with one mutmut worker
(2 cores are enough; nothing here starts Ray or MLflow). mutmut copies the code and the tests into
./mutants/ and runs pytest there, with ./mutants/ first on sys.path so the mutated copy, not the
editable install, is imported. The folder is rebuilt for every module and removed at the end
(--keep keeps it, for `mutmut show NAME` and `mutmut browse`). Slow: not run in CI.
Scores and the surviving mutants that are equivalent: docs/mutation.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# module name -> (the file mutated, the unit tests run against its mutants: files or pytest node ids)
MODULES: dict[str, tuple[str, list[str]]] = {
    "seed_groups": ("study/sweep/seed_groups.py", ["tests/unit/sweep/test_seed_groups.py", "tests/unit/sweep/test_seed_groups_mutants.py"]),
    # Not the two tests of test_tracking.py that start a real MLflow server behind a proxy (40 s a
    # mutant); they run in the normal suite.
    "journal": (
        "study/tracking/journal.py",
        [
            *(
                f"tests/unit/tracking/test_tracking.py::{test}"
                for test in (
                    "test_resume_finds_only_the_unfinished_sweeps_of_its_own_study",
                    "test_the_parent_run_charts_the_best_trial_so_far_and_a_resume_goes_on_counting",
                    "test_best_so_far_is_skipped_with_one_line_when_the_server_is_down",
                    "test_a_finished_sweep_ends_the_trial_runs_its_killed_driver_left_running_and_only_those",
                )
            ),
            "tests/unit/tracking/test_journal_mutants.py",
        ],
    ),
    # Not test_space.py's CLI test nor test_config_properties.py's: they run `irrep-study` in a
    # subprocess, which imports the editable install, not ./mutants/, so they kill no mutant (about
    # 16 s each). Nor test_config_properties.py's hypothesis tests (200 examples each, measured on
    # 2 shared cores: the search space one 4.9 s, the file content one 1.7 s, for every mutant they
    # reach); they run in the normal suite.
    "space": (
        "study/config/space.py",
        [
            *(
                f"tests/unit/config/test_space.py::{test}"
                for test in (
                    "test_shipped_spaces_validate",
                    "test_every_shipped_space_is_tested",
                    "test_the_pruning_space_is_the_papers_contrast_as_a_2x2_factorial",
                    "test_bad_spaces_fail_in_one_line_naming_file_and_field",
                    "test_a_grid_may_not_vary_a_bookkeeping_field",
                    "test_grid_without_entries_and_missing_search",
                    "test_optuna_space_keeps_0_and_makes_l_flags_conditional_on_lmax",
                    "test_credentials_never_leave_the_uri",
                )
            ),
            "tests/unit/config/test_space_mutants.py",
        ],
    ),
    # Not test_intervals_cover_the_planted_effects_in_about_95_percent_of_studies (a simulation of many
    # studies: about 40 s since its 360 studies per method, on every mutant); it runs in the normal suite.
    "ablation": (
        "analysis/stats/ablation.py",
        [
            *(
                f"tests/unit/analysis/stats/test_analysis_ablation.py::{test}"
                for test in (
                    "test_balanced_study_recovers_planted_effects_within_the_paired_and_regression_intervals",
                    "test_unbalanced_optuna_like_study_has_no_pairs_and_the_regression_recovers_the_effects",
                    "test_pairing_gives_narrower_intervals_than_comparing_unpaired_configurations",
                    "test_pairs_share_every_other_parameter_and_the_seed",
                    "test_headline_sentences_name_effect_interval_and_number_of_pairs",
                    "test_a_single_configuration_pair_says_its_interval_is_seed_noise_only",
                    "test_two_l_sets_and_nothing_else_varied_are_analysed_as_a_factorial",
                    "test_configurations_that_do_not_clearly_beat_the_composition_fit_are_named",
                )
            ),
            "tests/unit/analysis/stats/test_ablation_mutants.py",
        ],
    ),
    # Not test_planted_null_intervals_cover_zero_and_p_values_are_not_small (a simulation of many
    # null studies: 12.2 s measured, on every mutant); it runs in the normal suite.
    "correlate": (
        "analysis/stats/correlate.py",
        [
            *(
                f"tests/unit/analysis/stats/test_analysis_correlate.py::{test}"
                for test in (
                    "test_vectorised_rank_correlations_match_scipy_with_ties",
                    "test_planted_monotone_relation_gives_rho_near_one_with_ci_excluding_zero",
                    "test_partial_correlation_on_size_removes_a_relation_that_only_goes_through_model_size",
                    "test_a_covariate_with_few_levels_is_removed_whatever_the_shape_of_its_effect",
                    "test_too_few_or_constant_values_give_no_invented_numbers",
                    "test_correlate_scores_makes_one_row_per_block_and_score_over_configuration_means",
                    "test_a_score_that_is_not_finite_in_any_trial_gives_an_empty_row_not_a_crash",
                    "test_fdr_is_benjamini_hochberg_by_hand",
                    "test_small_n_permutation_p_values_are_exact_and_never_below_the_floor",
                    "test_bootstrap_intervals_are_scipys_percentile_intervals_without_constant_resamples",
                    "test_fdr_runs_only_over_rows_whose_design_can_reach_significance",
                    "test_molecule_correlations_find_a_planted_descriptor",
                )
            ),
            "tests/unit/analysis/stats/test_correlate_mutants.py",
        ],
    ),
    # The resume logic around the journal: a sweep's folder claimed, reopened by --resume, its Optuna
    # storage checked and its orphaned Optuna trials failed.
    "folder": (
        "study/sweep/folder.py",
        [
            "tests/unit/sweep/test_seed_groups.py::test_optuna_trials_a_killed_driver_asked_for_are_failed_with_the_reason_when_the_sweep_ends",
            "tests/unit/sweep/test_folder_mutants.py",
        ],
    ),
    # Not test_config.py's two CLI tests nor test_config_properties.py's: they run `irrep-study` in
    # a subprocess, which imports the editable install, not ./mutants/, so they kill no mutant (about
    # 16 s each). Nor test_config_properties.py's hypothesis tests (200 examples each, measured on
    # 2 shared cores: the trial config one 6.6 s, the search space one 4.9 s, the file content one
    # 1.7 s, the override one 0.7 s, for every mutant they reach); they run in the normal suite.
    "trial": (
        "study/config/trial.py",
        [
            *(
                f"tests/unit/config/test_config.py::{test}"
                for test in (
                    "test_defaults_are_the_reference_setup",
                    "test_yaml_and_overrides",
                    "test_flat_params_and_yaml_round_trip",
                    "test_bad_input_names_file_and_field",
                    "test_bad_override_is_named_as_such",
                    "test_malformed_and_missing_files",
                )
            ),
            "tests/unit/config/test_trial_mutants.py",
        ],
    ),
}


def _tests(name: str, baseline: bool) -> list[str]:
    """The module's test files that exist; `baseline`: without the tests written to kill its mutants."""
    return [t for t in MODULES[name][1] if (ROOT / t.split("::")[0]).exists() and not (baseline and t.endswith("_mutants.py"))]


def _worker(name: str, mutant_names: list[str], baseline: bool) -> None:
    """In a fresh process: mutmut's settings for this module, then `mutmut run --max-children 1`."""
    import mutmut.configuration as configuration

    source = MODULES[name][0]
    settings = configuration._load_config()  # [tool.mutmut] in pyproject.toml: what all modules share
    settings.only_mutate = [source]
    settings.pytest_add_cli_args_test_selection = _tests(name, baseline)
    configuration._config = settings
    from mutmut.__main__ import cli

    cli(["run", "--max-children", "1", *mutant_names], standalone_mode=False)


def _score(name: str, survivors: bool, quiet: bool = False) -> tuple[int, int, list[str]]:
    from mutmut.mutation.diff_apply import get_diff_for_mutant
    from mutmut.stats import status_by_exit_code

    source, _ = MODULES[name]
    meta = json.loads((ROOT / "mutants" / (source + ".meta")).read_text())
    status = {key: status_by_exit_code[code] for key, code in meta["exit_code_by_key"].items()}
    killed = sum(s in ("killed", "timeout", "caught by type check") for s in status.values())
    alive = sorted(k for k, s in status.items() if s not in ("killed", "timeout", "caught by type check"))
    for key in [] if quiet else alive:
        print(f"    {key}: {status[key]}")
        if survivors:
            print(get_diff_for_mutant(key, path=source))
    return killed, len(status), alive


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("module", nargs="?", help="a module name from MODULES, or all")
    parser.add_argument("--list", action="store_true", help="the module names and their tests")
    parser.add_argument("--survivors", action="store_true", help="print the diff of every surviving mutant")
    parser.add_argument("--keep", action="store_true", help="keep ./mutants/ after the run")
    parser.add_argument(
        "--again",
        action="store_true",
        help="after a run with --keep: copy the module's tests into ./mutants/ again and rerun only its surviving mutants",
    )
    parser.add_argument("--baseline", action="store_true", help="leave out the tests/**/test_*_mutants.py files (the score before them)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("mutants", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.chdir(ROOT)  # mutmut reads pyproject.toml and writes ./mutants/ in the working folder
    if args.worker:
        _worker(args.worker, args.mutants, args.baseline)
        return 0
    if args.list or not args.module:
        for name, (source, tests) in MODULES.items():
            print(f"{name}: {source} <- {' '.join(tests)}")
        return 0
    names = list(MODULES) if args.module == "all" else [args.module]
    if any(n not in MODULES for n in names):
        parser.error(f"unknown module {args.module!r}; one of: all, {', '.join(MODULES)}")
    mutants = ROOT / "mutants"
    lines = []
    for name in names:
        again: list[str] = []
        meta = mutants / (MODULES[name][0] + ".meta")
        earlier = json.loads(meta.read_text())["exit_code_by_key"] if args.again and meta.exists() else {}
        if earlier:
            # Tests only added since: what they killed stays killed; the survivors are run again.
            for test in {t.split("::")[0] for t in _tests(name, args.baseline)}:
                shutil.copy2(ROOT / test, mutants / test)
            again = _score(name, survivors=False, quiet=True)[2]
        else:
            shutil.rmtree(mutants, ignore_errors=True)  # fresh: tests added since the last run are copied
        start = time.monotonic()
        code = (
            0
            if earlier and not again
            else subprocess.call([sys.executable, __file__, "--worker", name, *(["--baseline"] if args.baseline else []), *again], cwd=ROOT)
        )
        if code == 0:
            # mutmut 3.8 can leave a mutant of a run "not checked"; run each of those alone.
            unchecked = [
                k for k, c in json.loads(meta.read_text())["exit_code_by_key"].items() if c is None and (k in again or not earlier)
            ]
            for key in unchecked:
                code = code or subprocess.call(
                    [sys.executable, __file__, "--worker", name, *(["--baseline"] if args.baseline else []), key], cwd=ROOT
                )
        took = time.monotonic() - start
        if code != 0:
            print(f"mutmut failed on {name} (exit code {code})")
            return code
        if earlier:
            # mutmut forgets every verdict when the test selection changes; those not run again stand.
            data = json.loads(meta.read_text())
            codes = data["exit_code_by_key"]
            for key, before in earlier.items():
                if key not in again and codes.get(key) is None:
                    codes[key] = before
            meta.write_text(json.dumps(data))
        killed, total, _ = _score(name, args.survivors)
        lines.append(f"{name}: {killed}/{total} killed ({100 * killed / max(total, 1):.0f}%) in {took:.0f} s")
        print(lines[-1])
    if not args.keep:
        shutil.rmtree(mutants, ignore_errors=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
