"""Scores without built-in artefacts: no block wins by its size, molecule size is not chemistry,
and no score that is a function of the test MAE is correlated with it."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.scoring.features import (
    analysis_blocks,
    channel_magnitudes,
    standardized_features,
)
from analysis.scoring.scores import (
    ALL_SCORES,
    DETERMINED_BY_ERROR,
    FUNCTIONAL_SCORES,
    ScoreSettings,
    knockout_shares,
    local_utilization,
    probe_r2,
    score_embedding,
)
from analysis.stats.correlate import correlate_scores
from study.data.reference import fit_composition
from study.nn.irreps import IrrepsLayout

ELEMENTS = [1, 6, 7, 8, 9]


def molecules(rng, n: int):
    """QM9-like element counts and a target that is mostly composition plus a little chemistry."""
    # Like QM9: up to 9 heavy atoms, mostly carbon, hydrogens following the carbons, so that the
    # atom count alone explains most of the target.
    heavy = rng.integers(3, 10, n)
    nitrogen, oxygen, fluorine = rng.binomial(heavy, 0.12), rng.binomial(heavy, 0.15), rng.binomial(heavy, 0.02)
    carbon = np.maximum(heavy - nitrogen - oxygen - fluorine, 1)
    hydrogen = np.maximum(2 * carbon + 2 - fluorine + rng.integers(-3, 2, n), 0)
    counts = np.column_stack([hydrogen, carbon, nitrogen, oxygen, fluorine]).astype(np.float64)
    per_atom = np.array([-2.4, -7.4, -5.6, -4.9, -4.1])  # eV, about what each atom adds to U0_atom
    chemistry = rng.normal(scale=0.4, size=n)  # what the residual should hold: not a function of counts
    return counts, counts @ per_atom + chemistry, chemistry


def test_a_size_only_feature_has_probe_r2_near_zero_on_the_residual_target():
    rng = np.random.default_rng(0)
    train_counts, train_y, _ = molecules(rng, 3000)
    reference = fit_composition(train_counts, train_y, ELEMENTS)
    counts, y, chemistry = molecules(rng, 1500)
    residual = y - reference.baseline_from_counts(counts, ELEMENTS)
    size = counts.sum(axis=1)
    # An l = 0 block whose 8 channels only know the atom count (scaled, squashed, a little noise).
    features = np.column_stack([np.tanh(size / s) for s in range(20, 60, 5)]) + rng.normal(scale=1e-3, size=(1500, 8))
    assert probe_r2(features, y, folds=5, seed=0) > 0.8  # the raw target: size alone looks like a rich block
    assert abs(probe_r2(features, residual, folds=5, seed=0)) < 0.02  # the residual: nothing
    # A block that holds the chemistry does show up on the residual.
    informed = np.column_stack([features, chemistry + rng.normal(scale=0.1, size=1500)])
    assert probe_r2(informed, residual, folds=5, seed=0) > 0.8


def test_every_block_is_probed_with_as_many_features_as_it_has_channels():
    layout = IrrepsLayout.from_irreps("8x0e+8x1o+8x2e+8x3o")
    x = np.random.default_rng(1).normal(size=(50, layout.dim))
    units = {unit.name: unit for unit in analysis_blocks(layout)}
    assert [standardized_features(x, units[f"l{l}"]).shape[1] for l in range(4)] == [8, 8, 8, 8]
    assert standardized_features(x, units["lgt0"]).shape[1] == 24


def test_participation_ratio_and_effective_rank_are_shares_of_the_channels():
    # Independent channels use all their directions, whatever the multiplicity: ~1 for 16 and 32.
    rng = np.random.default_rng(2)
    for m in (16, 32):
        layout = IrrepsLayout.from_irreps(f"{m}x0e")
        unit = analysis_blocks(layout)[0]
        scores = local_utilization(rng.normal(size=(4000, m)), unit, 1.0, 1e-3)
        assert scores["participation_ratio"] == pytest.approx(1.0, abs=0.05)
        assert scores["effective_rank"] == pytest.approx(1.0, abs=0.02)
    # One live channel of 32 uses 1/32 of them.
    x = np.zeros((500, 32))
    x[:, 0] = rng.normal(size=500)
    assert local_utilization(x, unit, 1.0, 1e-3)["participation_ratio"] == pytest.approx(1 / 32)


def test_blocks_with_the_same_channel_magnitudes_get_the_same_utilization_whatever_their_l():
    # An l = 0 block and an l = 2 block whose channels have the same magnitudes per molecule (the
    # l = 2 channels pointing anywhere): computed the same way, their moments must agree.
    rng = np.random.default_rng(3)
    n, m = 300, 6
    magnitudes = np.abs(rng.normal(size=(n, m)) @ rng.normal(size=(m, m))) + 0.1
    directions = rng.normal(size=(n, m, 5))
    directions /= np.linalg.norm(directions, axis=-1, keepdims=True)
    layout = IrrepsLayout.from_irreps(f"{m}x0e+{m}x2e")
    x = np.concatenate([magnitudes, (magnitudes[..., None] * directions).reshape(n, -1)], axis=1)
    l0, l2 = analysis_blocks(layout)[:2]
    assert np.allclose(channel_magnitudes(x, l0.members[0]), channel_magnitudes(x, l2.members[0]))
    assert local_utilization(x, l0, 1.0, 1e-3) == pytest.approx(local_utilization(x, l2, 1.0, 1e-3))
    scores = score_embedding(x, layout, rng.normal(size=n), rng.normal(size=n), ScoreSettings(umap=False)).values
    for score in ("participation_ratio", "effective_rank", "variance_share", "probe_r2_residual", "knn_residual"):
        assert scores["l0"][score] == pytest.approx(scores["l2"][score]), score


def test_knockouts_are_shares_of_the_gain_over_the_composition_baseline():
    shares = knockout_shares({"knockout_all_meV": 30.0, "knockout_last_meV": 0.0}, model_mae_meV=40.0, baseline_mae_meV=100.0)
    assert shares == {"knockout_all_share": pytest.approx(0.5), "knockout_last_share": 0.0}
    # No gain over counting atoms: no share to speak of.
    assert all(math.isnan(v) for v in knockout_shares({"knockout_all_meV": 5.0}, 120.0, 100.0).values())


def test_l0_and_joint_knockouts_are_not_correlated_with_the_test_mae():
    rng = np.random.default_rng(4)
    mae = rng.uniform(50, 90, size=10)
    trials = pd.DataFrame(
        {
            "run_id": [f"r{k}" for k in range(10)],
            "configuration": [f"c{k}" for k in range(10)],
            "test_mae_meV": mae,
            "num_params": 1e4,
            "hidden_dim": 8,
            "num_layers": 2,
            "lr": 1e-3,
        }
    )
    rows = []
    for k in range(10):
        for block in ("l0", "l1", "joint"):
            for score in FUNCTIONAL_SCORES:
                # Zeroing l0 leaves the bias: a knocked-out MAE of ~8000 meV whatever the model,
                # so the share is (8000 - MAE) / (100 - MAE)... a function of the MAE alone.
                value = (8000 - mae[k]) / (100 - mae[k]) if block != "l1" else rng.uniform()
                rows.append({"run_id": f"r{k}", "block": block, "score": score, "value": value})
    table = correlate_scores(pd.DataFrame(rows), trials, n_boot=200, n_perm=200)
    assert set(zip(table["block"], table["score"])) == {("l1", score) for score in FUNCTIONAL_SCORES}
    assert {("l0", "knockout_all_share"), ("joint", "knockout_last_share")} <= DETERMINED_BY_ERROR


def test_scores_that_recover_the_models_own_prediction_are_not_correlated_with_the_test_mae():
    # The model's prediction is a linear map of the summed l = 0 embedding (an equivariant linear
    # readout to 1x0e per atom, summed over atoms, then nn.Linear(1, 1)), so the graph embedding's
    # l0 scalars hold the prediction as one linear direction. Here: the same molecules in every
    # trial, a model whose error grows from trial to trial, and an l0 block holding its prediction
    # of the residual target (standardized: the embedding's scale says nothing about the error)
    # plus one unrelated feature; l1 is noise of a fixed scale.
    rng = np.random.default_rng(6)
    n, m, trials_count = 300, 8, 10
    layout = IrrepsLayout.from_irreps(f"{m}x0e+{m}x1o")
    residual = rng.normal(size=n)
    nsps = rng.uniform(size=n)
    mixing = rng.normal(size=(2, m))
    settings = ScoreSettings(umap=False, max_molecules=None)
    maes, values = [], {}
    for error_scale in np.linspace(0.1, 1.0, trials_count):
        error = rng.normal(scale=error_scale, size=n)
        prediction = residual + error
        latent = np.column_stack([stats.zscore(prediction), rng.normal(size=n)])
        l0 = latent @ mixing + 0.01 * rng.normal(size=(n, m))
        l1 = rng.normal(size=(n, m * 3))
        scores = score_embedding(np.concatenate([l0, l1], axis=1), layout, residual, nsps, settings).values
        maes.append(1000.0 * np.abs(error).mean())
        for block, block_scores in scores.items():
            for score, value in block_scores.items():
                values.setdefault((block, score), []).append(value)
    tracking = {
        key
        for key, series in values.items()
        if np.isfinite(series).all() and np.ptp(series) > 0 and abs(stats.spearmanr(series, maes).statistic) > 0.95
    }
    # Not vacuous: the probe and the neighbours of the l0 (and joint) features find the model's own error.
    assert {("l0", "probe_r2_residual"), ("l0", "knn_residual"), ("joint", "probe_r2_residual")} <= tracking
    assert tracking <= DETERMINED_BY_ERROR, sorted(tracking - DETERMINED_BY_ERROR)
    assert {(block, score) for block in ("l0", "joint") for score in ("probe_r2_residual", "knn_residual")} <= DETERMINED_BY_ERROR

    trials = pd.DataFrame(
        {
            "run_id": [f"r{k}" for k in range(trials_count)],
            "configuration": [f"c{k}" for k in range(trials_count)],
            "test_mae_meV": maes,
            "num_params": 1e4,
            "hidden_dim": 8,
            "num_layers": 2,
            "lr": 1e-3,
        }
    )
    rows = [
        {"run_id": f"r{k}", "block": block, "score": score, "value": value}
        for (block, score), series in values.items()
        for k, value in enumerate(series)
    ]
    table = correlate_scores(pd.DataFrame(rows), trials, n_boot=0, n_perm=200, mixed=False)
    tested = set(zip(table["block"], table["score"]))
    assert not tested & DETERMINED_BY_ERROR
    assert tested == set(values) - DETERMINED_BY_ERROR
    assert set(ALL_SCORES) - set(FUNCTIONAL_SCORES) == {score for _, score in values}
