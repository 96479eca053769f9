"""The report's findings: Optuna's importance over every configuration (early-stopped ones too),
the Pareto front of validation MAE against size, and the sentences that say what holds."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from analysis.report import findings
from analysis.stats.survival import run_table


def _runs(rng: np.random.Generator) -> tuple[pd.DataFrame, list[str]]:
    """12 configurations x 2 seeds: the validation MAE follows lr strongly, l=1 not at all; a third
    of the configurations were stopped early (their last validation MAE is all they have)."""
    records = []
    for k in range(12):
        lr = float(10 ** rng.uniform(-3.5, -1.5))
        l_values = "0,1" if k % 2 else "0"
        for seed in (1, 2):
            val = 100.0 + 400.0 * (math.log10(lr) + 3.5) + rng.normal(0, 2.0)
            status = "stopped_early" if k % 3 == 0 else "completed"
            metrics = {"val_mae_meV": val, "num_params": 1000.0 + 500 * (k % 2)}
            if status == "completed":
                metrics.update(best_val_mae_meV=val, test_mae_meV=val * 1.05, baseline_test_mae_meV=900.0)
            records.append(
                {
                    "run_id": f"r{k}-{seed}",
                    "status": status,
                    "params": {"l_values": l_values, "lr": str(lr), "seed": str(seed), "hidden_dim": "8"},
                    "metrics": metrics,
                }
            )
    records.append(
        {
            "run_id": "diverged",
            "status": "diverged",
            "params": {"l_values": "0,1", "lr": "0.5", "seed": "1", "hidden_dim": "8"},
            "metrics": {},
        }
    )
    return run_table(records)


def test_importance_covers_every_configuration_and_finds_the_parameter_that_matters():
    runs, context = _runs(np.random.default_rng(0))
    values, unvalued = findings.configuration_values(runs, context)
    assert len(values) == 12 and unvalued == 1  # early-stopped ones in, the one without any value counted
    assert set(values.columns) >= {"include_l1", "lr", "n_seeds", "val_mae_meV"}
    study = findings.importance_study(values)
    assert len(study.trials) == 12  # one Optuna trial per configuration, not per seed
    first = values.iloc[0]
    assert study.trials[0].value == pytest.approx(first["val_mae_meV"])
    assert study.trials[0].params == {"include_l1": bool(first["include_l1"]), "lr": pytest.approx(first["lr"])}
    importance = findings.parameter_importance(study)
    assert list(importance["parameter"]) == ["lr", "include_l1"]
    assert importance["importance"].sum() == pytest.approx(1.0) and importance["importance"].iloc[0] > 0.9
    assert importance["first_in_seeds"].tolist() == [findings.FOREST_SEEDS, 0]  # first with every forest seed
    assert (importance["importance_min"] <= importance["importance"]).all() and (
        importance["importance"] <= importance["importance_max"]
    ).all()
    sentence = findings.finding_sentences([], {}, importance, 12, _configurations(), pd.DataFrame(columns=["q_rho"]), 0.05)[1]
    assert sentence.startswith("Of the 2 varied parameters, lr explains most of the validation MAE across 12 configurations")


def test_an_importance_ranking_that_changes_with_the_forest_seed_is_not_called_a_finding():
    unstable = pd.DataFrame(
        {
            "parameter": ["lr", "include_l3"],
            "importance": [0.34, 0.30],
            "importance_min": [0.2, 0.25],
            "importance_max": [0.4, 0.36],
            "first_in_seeds": [3, 2],
        }
    )
    sentence = findings.finding_sentences([], {}, unstable, 10, _configurations(), pd.DataFrame(columns=["q_rho"]), 0.05)[1]
    assert sentence.startswith("No varied parameter consistently explains most of the validation MAE across 10 configurations")
    assert "first lr in 3, include_l3 in 2 of 5 seeds" in sentence and "explains most" not in sentence.replace(
        "consistently explains most", ""
    )


def test_the_pareto_front_holds_exactly_the_configurations_nothing_beats_on_both():
    table = pd.DataFrame(
        {
            "configuration": list("abcde"),
            "l_values": ["0", "0,1", "0,1,2", "0,2", "0,1,2,3"],
            "num_params": [100, 200, 400, 400, 800],
            "best_val_mae_meV_mean": [90.0, 70.0, 60.0, 75.0, 65.0],
        }
    )
    front = findings.pareto_front(table)
    assert set(front.loc[front["on_front"], "configuration"]) == {"a", "b", "c"}
    for row in front.itertuples():
        beaten = ((front["num_params"] <= row.num_params) & (front["best_val_mae_meV_mean"] < row.best_val_mae_meV_mean)).any()
        assert row.on_front == (not beaten)


def _configurations() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "configuration": ["l=0", "l=0,1"],
            "n_completed": [2, 2],
            "best_val_mae_meV_mean": [50.0, 40.0],
            "best_val_mae_meV_sd": [1.0, 2.0],
            "test_mae_meV_mean": [45.0, 55.0],
            "test_mae_meV_sd": [1.5, math.nan],
            "baseline_test_mae_meV_mean": [900.0, 900.0],
            "test_over_baseline_mean": [0.05, 0.061],
        }
    )


def test_findings_say_nothing_is_significant_when_nothing_is():
    # The second score did not vary (no rho, no q): it was not tested and is not counted as tested.
    correlations = pd.DataFrame(
        {"block": ["l1", "l2"], "score": ["norm_share", "dead_fraction"], "rho": [0.4, math.nan], "q_rho": [0.3, math.nan]}
    )
    estimate = pd.Series({"effect_meV": 2.0, "lo_meV": -3.0, "hi_meV": 7.0})
    sentences = findings.finding_sentences(
        ["including l=1 changed test MAE by +2.0 meV"],
        {1: ("paired", estimate)},
        pd.DataFrame({"parameter": ["include_l1"], "importance": [1.0]}),
        2,
        _configurations(),
        correlations,
        0.05,
    )
    assert sentences[0].startswith("Including l=1")
    # The validation winner is named with its (worse) test MAE.
    assert any(s.startswith("Best on validation: l=0,1 (val MAE 40.0 meV") and "test MAE 55.0 meV" in s for s in sentences)
    # Two families, two sentences, each with its own correction: correlations (BH q) and ablation (unadjusted here).
    assert sentences[-2] == "Correlations: no score correlates with test MAE at Benjamini-Hochberg q < 0.05 (1 tested)."
    assert sentences[-1] == "Ablation: no effect's 95% interval excludes zero (per l, unadjusted for the 1 orders tested)."


def test_findings_name_what_is_significant_after_correction():
    correlations = pd.DataFrame({"block": ["l1", "l2"], "score": ["norm_share", "knn_nsps"], "rho": [0.9, 0.2], "q_rho": [0.01, 0.4]})
    clear = pd.Series({"effect_meV": 9.0, "lo_meV": 4.0, "hi_meV": 14.0})
    sentences = findings.finding_sentences(
        [], {1: ("regression", clear)}, pd.DataFrame(columns=["parameter", "importance"]), 0, _configurations(), correlations, 0.05
    )
    text = " ".join(sentences)
    assert "1 of 2 score-error correlations are significant" in text and "l1/norm_share (rho +0.90)" in text
    assert "l=1 (regression)" in text and "not adjusted" in text
    # The corrected correlations and the unadjusted ablation intervals are never one claim.
    (correlation,) = [s for s in sentences if "correlations are significant" in s]
    assert "ablation" not in correlation.lower() and "interval" not in correlation


def test_factorial_terms_are_reported_with_their_holm_adjustment_apart_from_the_correlations():
    correlations = pd.DataFrame(
        {
            "block": ["l1"],
            "score": ["norm_share"],
            "rho": [0.9],
            "q_rho": [0.01],
            "p_rho": [0.001],
            "in_fdr_family": [True],
            "fdr_method": ["bh"],
        }
    )
    terms = pd.DataFrame({"term": ["l1", "l2", "l1:l2"], "p_holm": [0.001, 0.2, 0.03]})
    sentences = findings.finding_sentences(
        [], {}, pd.DataFrame(columns=["parameter", "importance"]), 0, _configurations(), correlations, 0.05, terms
    )
    assert sentences[-1] == "Ablation: 2 of 3 factorial terms have Holm-adjusted p < 0.05: l1, l1:l2."
    assert sentences[-2].startswith("Correlations: 1 of 1 score-error correlations are significant after Benjamini-Hochberg")


def test_the_correlation_sentence_counts_rows_left_out_of_the_correction():
    # Rows of 4 configurations cannot reach p < 0.05 by permutation (2/4! = 0.083): they are not in the family.
    correlations = pd.DataFrame(
        {
            "block": ["l1", "l3"],
            "score": ["norm_share", "norm_share"],
            "rho": [0.5, 1.0],
            "p_rho": [0.2, 0.083],
            "q_rho": [0.2, math.nan],
            "in_fdr_family": [True, False],
        }
    )
    sentence = findings.correlation_sentence(correlations, 0.05)
    assert sentence == (
        "Correlations: no score correlates with test MAE at Benjamini-Hochberg q < 0.05 (1 tested; 1 more "
        "with too few configurations to reach p < 0.05 by permutation were left out of the correction)."
    )


def test_configuration_errors_show_mean_sd_and_n_ranked_on_validation():
    table = findings.configuration_errors(_configurations())
    assert list(table["configuration"]) == ["l=0,1", "l=0"]
    assert list(table["n"]) == [2, 2]
    assert list(table["val MAE (meV)"]) == ["40.0 ± 2.0", "50.0 ± 1.0"]
    assert list(table["test MAE (meV)"]) == ["55.0", "45.0 ± 1.5"]  # no sd where seeds did not give one


def test_the_importance_finding_stands_beside_a_figure_of_the_numbers_it_quotes(tmp_path):
    from analysis.report.sections import _finding_groups

    importance = pd.DataFrame(
        {
            "parameter": ["lr", "include_l2"],
            "importance": [0.6, 0.4],
            "importance_min": [0.5, 0.3],
            "importance_max": [0.7, 0.5],
            "first_in_seeds": [4, 1],
        }
    )
    path = findings.importance_figure(importance, tmp_path / "importance.png")
    assert path == tmp_path / "importance.png" and path.stat().st_size > 0
    assert findings.importance_figure(importance.iloc[:0], tmp_path / "none.png") is None
    # Optuna's own plot shows one forest seed: the sentence quotes the mean over several, so the
    # figure beside it is the one drawn from the same table.
    sentences = ["l=1 helps.", "No varied parameter consistently explains ...", "Best on validation: ...", "corr", "abl"]
    groups = dict(_finding_groups(sentences, 1))
    assert groups["importance"] == ["No varied parameter consistently explains ..."]
    assert "optuna_importance" not in groups
