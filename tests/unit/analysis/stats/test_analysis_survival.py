"""Configurations from MLflow params, and survivorship: what did not finish is stated, and
comparisons across the study keep only configurations whose seeds all completed."""

from __future__ import annotations

import math

from analysis.stats.configurations import configuration_summary
from analysis.stats.survival import (
    complete_configurations,
    run_table,
    survival_notes,
    survival_table,
)
from study.config.configuration import configuration_params, label_configurations
from study.config.trial import TrialConfig


def params(**overrides) -> dict[str, str]:
    return TrialConfig(**{"hidden_dim": 8, "num_layers": 2, **overrides}).flat_params()


def record(run_id: str, status: str, metrics: dict | None = None, **overrides) -> dict:
    return {"run_id": run_id, "status": status, "params": params(**overrides), "metrics": metrics or {}}


def test_a_configuration_is_every_trial_parameter_but_the_seed_and_bookkeeping():
    a = {**params(seed=1, l_values=[0, 1]), "device": "cpu", "reference_intercept": "-1.5"}
    b = {**params(seed=2, l_values=[0, 1], backend="e3nn"), "device": "cuda", "reference_intercept": "-1.7"}
    c = params(seed=1, l_values=[0, 1], lr=3e-3)
    assert configuration_params(a) == configuration_params(b) != configuration_params(c)
    assert "seed" not in configuration_params(a) and "reference_intercept" not in configuration_params(a)
    table, context = label_configurations([a, b, c])
    assert context == ["lr"]
    assert table["configuration"].tolist() == ["l=0,1 lr=0.001", "l=0,1 lr=0.001", "l=0,1 lr=0.003"]
    assert table["lr"].tolist() == [1e-3, 1e-3, 3e-3]  # typed, for regressions and covariates


def test_labels_stay_distinct_when_rounding_would_merge_two_configurations():
    table, _ = label_configurations([params(lr=0.0031234), params(lr=0.0031236)])
    assert table["configuration"].nunique() == 2


def test_runs_without_a_newer_field_are_the_configuration_they_were_trained_as():
    old = {k: v for k, v in params(seed=1).items() if k not in ("target_reference", "lr_schedule")}
    new = params(seed=2, target_reference="mean", target_mean=-76.1, target_std=10.3)
    old.update(target_mean="-76.1", target_std="10.3")
    assert configuration_params(old) == configuration_params(new)


def test_configurations_with_a_seed_that_did_not_complete_are_left_out_and_named():
    runs, context = run_table(
        [
            record("a1", "completed", {"test_mae_meV": 50.0}, l_values=[0, 1], seed=1),
            record("a2", "completed", {"test_mae_meV": 54.0}, l_values=[0, 1], seed=2),
            record("b1", "completed", {"test_mae_meV": 40.0}, l_values=[0, 2], seed=1),
            record("b2", "stopped_early", l_values=[0, 2], seed=2),
            record("c1", "failed", l_values=[0, 3], seed=1),
            record("c2", "diverged", l_values=[0, 3], seed=2),
        ]
    )
    assert context == []
    assert runs["seed"].tolist() == ["1", "2", "1", "2", "1", "2"]
    assert math.isnan(runs.loc[runs["run_id"] == "b2", "test_mae_meV"].item())
    assert complete_configurations(runs) == {"l=0,1"}
    table = survival_table(runs).set_index("configuration")
    assert table.loc["l=0,2", "not_completed"] == "1 stopped_early" and table.loc["l=0,2", "n_completed"] == 1
    assert table.loc["l=0,3", "not_completed"] == "1 diverged, 1 failed" and not table.loc["l=0,3", "all_completed"]
    notes = survival_notes(runs, schedulers=["asha"])
    assert notes[0] == "3 of 6 trials did not complete (1 diverged, 1 failed, 1 stopped_early)."
    assert "1 configuration(s) with some but not all seeds completed are left out" in notes[1] and "l=0,2 (1 stopped_early)" in notes[1]
    assert notes[-1].startswith("WARNING: this study used early stopping (asha)")


def test_a_study_where_everything_completed_has_nothing_to_say_without_early_stopping():
    runs, _ = run_table([record("a1", "completed", l_values=[0, 1], seed=1), record("a2", "completed", l_values=[0, 1], seed=2)])
    assert survival_notes(runs, schedulers=["none"]) == []
    # ASHA that stopped nothing still selected what it let finish: the warning stays.
    assert survival_notes(runs, schedulers=["asha"])[0].startswith("WARNING")


def test_configuration_summary_shows_the_seed_to_seed_spread():
    runs, _ = run_table(
        [
            record("a1", "completed", {"test_mae_meV": 50.0, "baseline_test_mae_meV": 900.0}, seed=1),
            record("a2", "completed", {"test_mae_meV": 54.0, "baseline_test_mae_meV": 900.0}, seed=2),
        ]
    )
    summary = configuration_summary(runs, ["test_mae_meV", "baseline_test_mae_meV"]).iloc[0]
    assert summary["n_trials"] == 2 and summary["test_mae_meV_mean"] == 52.0
    assert summary["test_mae_meV_sd"] == 2**0.5 * 2 and summary["baseline_test_mae_meV_mean"] == 900.0
