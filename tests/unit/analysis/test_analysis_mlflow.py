"""Loading trials back from a real MLflow store, and knockouts from the trials' own weights."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from torch_geometric.loader import DataLoader

from analysis.load import AnalysisError, load_study
from analysis.scoring.features import analysis_blocks
from analysis.scoring.knockout import trial_knockout, zeroed
from study.errors import UserError
from study.nn.model import build_model
from study.tracking.store import TrackingError
from study.training.trial import prepare_data
from tests.helpers.mlflow_trials import ANALYSIS_TRIALS, KNOCKOUT_TRIAL, log_trial

pytestmark = pytest.mark.usefixtures("one_torch_thread_per_test")  # tiny models: one thread, reproducible under load


def _load(logged_study, **kwargs):
    return load_study(logged_study.experiment, tracking_uri=logged_study.tracking_uri, **kwargs)


def test_load_study_returns_every_completed_trial_with_its_files(logged_study):
    study = _load(logged_study)
    assert [t.run_id for t in study.trials] == logged_study.trial_run_ids
    assert study.skipped == {"stopped_early": 1, "failed": 1}
    for trial in study.trials:
        config = logged_study.configs[trial.run_id]
        assert trial.config == config and trial.params["l_values"] == ",".join(map(str, config.l_values))
        assert trial.test_mae_meV == pytest.approx(logged_study.results[trial.run_id].test_mae_meV)
        assert trial.layout.l_values == config.l_values
        assert trial.embeddings.graph.shape == (len(trial.embeddings.target), trial.layout.dim)
        assert trial.weights_path.is_file()
        assert [epoch for epoch, _ in trial.history["val_mae_meV"]] == list(range(1, config.epochs + 1))
        # The logged per-epoch norm share covers every l of the trial.
        shares = [name for name in trial.history if name.startswith("norm_share_l")]
        assert sorted(shares) == sorted(f"norm_share_l{l}" for l in config.l_values)


def test_parent_filter_keeps_one_sweep(logged_study, tmp_path):
    client = MlflowClient(tracking_uri=logged_study.tracking_uri)
    other = client.create_run(logged_study.experiment_id, run_name="sweep 2", tags={"irrep_study.role": "sweep"}).info.run_id
    first = logged_study.trial_run_ids[0]
    copy = log_trial(
        client,
        logged_study.experiment_id,
        other,
        logged_study.configs[first],
        logged_study.trial_dirs[first],
        logged_study.results[first],
    )
    try:
        assert [t.run_id for t in _load(logged_study, parent_run_id=other).trials] == [copy]
        assert [t.run_id for t in _load(logged_study, parent_run_id=logged_study.parent_run_id).trials] == logged_study.trial_run_ids
        assert len(_load(logged_study).trials) == len(logged_study.trial_run_ids) + 1
    finally:
        client.delete_run(copy)  # the session's study stays as other tests expect it
        client.delete_run(other)
    with pytest.raises(TrackingError, match="--parent: no run 'nope'"):
        _load(logged_study, parent_run_id="nope")


def test_missing_experiment_is_a_one_line_user_error(logged_study):
    with pytest.raises(UserError) as caught:
        load_study("no-such-study", tracking_uri=logged_study.tracking_uri)
    message = str(caught.value)
    assert "no experiment named 'no-such-study'" in message and "\n" not in message


def _broken_experiment(logged_study, tmp_path, name: str, damage) -> str:
    """A new experiment holding one completed trial whose files were damaged by `damage(folder)`."""
    client = MlflowClient(tracking_uri=logged_study.tracking_uri)
    experiment_id = client.create_experiment(name, artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(experiment_id, run_name="sweep", tags={"irrep_study.role": "sweep"}).info.run_id
    source = logged_study.trial_run_ids[0]
    folder = tmp_path / "trial"
    shutil.copytree(logged_study.trial_dirs[source], folder)
    damage(folder)
    return log_trial(client, experiment_id, parent, logged_study.configs[source], folder, logged_study.results[source])


def test_a_completed_trial_without_embeddings_is_named_in_one_line(logged_study, tmp_path):
    run_id = _broken_experiment(logged_study, tmp_path, "no-embeddings", lambda folder: (folder / "test_embeddings.npz").unlink())
    with pytest.raises(AnalysisError) as caught:
        load_study("no-embeddings", tracking_uri=logged_study.tracking_uri)
    message = str(caught.value)
    assert run_id in message and "no test_embeddings.npz artifact" in message and "\n" not in message


def test_embeddings_of_an_unknown_format_version_are_refused(logged_study, tmp_path):
    def future_version(folder):
        path = folder / "test_embeddings.npz"
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
        meta = json.loads(str(arrays["meta"]))
        meta["version"] = 99
        arrays["meta"] = np.asarray(json.dumps(meta))
        np.savez_compressed(path, **arrays)

    run_id = _broken_experiment(logged_study, tmp_path, "future-embeddings", future_version)
    with pytest.raises(AnalysisError) as caught:
        load_study("future-embeddings", tracking_uri=logged_study.tracking_uri)
    message = str(caught.value)
    assert run_id in message and "version 99" in message and "not supported" in message and "\n" not in message


# ---------------------------------------------------------------------------- knockouts


@pytest.fixture(scope="module")
def knockout_trial(logged_study):
    run_id = logged_study.trial_run_ids[KNOCKOUT_TRIAL]
    return next(t for t in _load(logged_study).trials if t.run_id == run_id)


def test_zeroing_l_ge_1_after_the_last_block_changes_nothing_and_zeroing_l0_hurts(knockout_trial, qm9):
    assert knockout_trial.config.l_values == tuple(ANALYSIS_TRIALS[KNOCKOUT_TRIAL]["l_values"])
    result = trial_knockout(knockout_trial, qm9)
    # The recomputed test error is the logged one: same weights, same molecules.
    assert result.baseline_mae_meV == pytest.approx(knockout_trial.test_mae_meV, rel=1e-5)
    for name in ("l1", "l2", "lgt0"):
        # The readout (equivariant linear to 1x0e) has no path from l >= 1: bit-identical predictions.
        assert np.array_equal(result.predictions[(name, "last")], result.baseline), name
        assert result.deltas[name]["knockout_last_meV"] == 0.0
        # Through the tensor products of the blocks, l >= 1 does reach the scalars.
        assert not np.array_equal(result.predictions[(name, "all")], result.baseline), name
    # Without l = 0 the readout sees nothing: the model's output is a constant, so every
    # prediction is the composition fit (what the model adds to) shifted by that constant.
    composition = knockout_trial.embeddings.composition_baseline
    assert knockout_trial.embeddings.reference.kind == "composition"
    for where in ("all", "last"):
        offset = result.predictions[("l0", where)] - composition
        assert np.ptp(offset) < 1e-6 * np.abs(composition).max()
        assert result.deltas["l0"][f"knockout_{where}_meV"] > 0.5 * result.baseline_mae_meV


def test_knockouts_refuse_a_qm9_whose_molecules_sit_elsewhere(knockout_trial, qm9):
    import dataclasses

    from analysis.load import AnalysisError

    # The same molecules, numbered differently (as a differently processed QM9 would be).
    shuffled = dataclasses.replace(qm9, mol_id=qm9.mol_id.flip(0))
    with pytest.raises(AnalysisError, match="not at the same places in this QM9") as caught:
        trial_knockout(knockout_trial, shuffled)
    assert knockout_trial.run_id in str(caught.value) and "\n" not in str(caught.value)


def test_knockout_hooks_zero_exactly_the_block_they_name(knockout_trial, qm9):
    config = knockout_trial.config
    model = build_model(config)
    model.load_state_dict(torch.load(knockout_trial.weights_path, weights_only=True))
    batch = next(iter(DataLoader(prepare_data(config, qm9).test, batch_size=16)))
    units = {unit.name: unit for unit in analysis_blocks(model.layout)}
    l1 = units["l1"].members[0]
    seen = {}
    # Registered after the knockout's own hooks, these see what the next module receives.
    with zeroed(model, units["l1"].members, "all"):
        handles = [
            module.register_forward_hook(lambda m, i, out, k=k: seen.__setitem__(k, out.detach().clone()))
            for k, module in enumerate([model.input_block, *model.blocks])
        ]
        with torch.no_grad():
            embedding = model.embed(batch)
        for handle in handles:
            handle.remove()
    assert len(seen) == 1 + len(model.blocks)
    for features in [*seen.values(), *embedding.node_features]:
        assert torch.all(features[:, l1.start : l1.stop] == 0)
        assert torch.any(features[:, : l1.start] != 0) and torch.any(features[:, l1.stop :] != 0)

    readout_input = {}
    with zeroed(model, units["l1"].members, "last"):
        handle = model.readout.register_forward_pre_hook(lambda m, args: readout_input.__setitem__("x", args[0].clone()))
        with torch.no_grad():
            embedding = model.embed(batch)
        handle.remove()
    x = readout_input["x"]
    assert torch.all(x[:, l1.start : l1.stop] == 0)
    # Only the readout's input is touched: the stored last-block features still hold l = 1.
    assert torch.any(embedding.node_features[-1][:, l1.start : l1.stop] != 0)
    assert torch.equal(x[:, : l1.start], embedding.node_features[-1][:, : l1.start])


# ---------------------------------------------------------------------------- the analysis run


def _analysis_outcome(study, out_dir):
    """What `log_analysis_run` reads of an analysis: a hand-made ablation table (l=1 has pairs,
    l=2 only a regression) and correlations with q values 0.01, 0.2, NaN and 0.04."""
    import math

    import pandas as pd

    from analysis.pipeline import AnalysisOutcome

    nan = math.nan
    ablation = pd.DataFrame(
        [
            dict(l=1, method="paired", effect_meV=-30.0, lo_meV=-50.0, hi_meV=-10.0, n_pairs=2, n_configuration_pairs=1, note=""),
            dict(l=1, method="regression", effect_meV=-25.0, lo_meV=-60.0, hi_meV=5.0, n_pairs=nan, n_configuration_pairs=nan, note=""),
            dict(l=2, method="paired", effect_meV=nan, lo_meV=nan, hi_meV=nan, n_pairs=0, n_configuration_pairs=0, note=""),
            dict(l=2, method="regression", effect_meV=-5.0, lo_meV=-20.0, hi_meV=10.0, n_pairs=nan, n_configuration_pairs=nan, note=""),
        ]
    )
    correlations = pd.DataFrame(
        {"block": ["l0", "l1", "l1", "l2"], "score": ["a", "a", "b", "a"], "rho": [0.9, 0.3, nan, -0.8], "q_rho": [0.01, 0.2, nan, 0.04]}
    )
    trials = pd.DataFrame(
        {"run_id": [t.run_id for t in study.trials], "configuration": [t.label for t in study.trials], "in_comparisons": True}
    )
    out_dir.mkdir()
    files = {}
    for name, frame in {"ablation": ablation, "correlations": correlations, "trials": trials}.items():
        files[name] = out_dir / f"{name}.csv"
        frame.to_csv(files[name], index=False)
    return AnalysisOutcome(out_dir, study, trials, pd.DataFrame(), correlations, ablation, pd.DataFrame(), [], files, None)


def test_the_analysis_run_is_nested_under_its_sweep_with_a_few_metrics_and_is_never_a_trial(logged_study, tmp_path):
    from analysis.analysis_run import log_analysis_run
    from analysis.pipeline import AnalysisSettings
    from study.best import rank_configurations
    from study.tracking import store

    study = _load(logged_study)
    outcome = _analysis_outcome(study, tmp_path / "analysis")
    client = MlflowClient(tracking_uri=logged_study.tracking_uri)
    run_id = log_analysis_run(outcome, AnalysisSettings(), seconds=12.5)
    try:
        run = client.get_run(run_id)
        # Analysed all sweeps of the experiment, which here are one: nested under it.
        assert run.data.tags["mlflow.parentRunId"] == logged_study.parent_run_id
        assert store.ANALYZED_PARENT_TAG not in run.data.tags  # no --parent was given
        assert run.data.tags["irrep_study.role"] == "analysis" and run.info.status == "FINISHED"
        assert run.data.tags["mlflow.source.name"] == "irrep-study analyze"
        assert run.data.metrics == {
            "trials_analysed": len(study.trials),
            "configurations_compared": len(study.trials),
            "correlations_tested": 3,
            "significant_correlations": 2,
            "analysis_seconds": 12.5,
            "ablation_effect_meV/l1": -30.0,
            "ablation_lo_meV/l1": -50.0,
            "ablation_hi_meV/l1": -10.0,  # paired
            "ablation_effect_meV/l2": -5.0,
            "ablation_lo_meV/l2": -20.0,
            "ablation_hi_meV/l2": 10.0,  # regression
        }
        assert run.data.params["ablation_method/l1"] == "paired" and run.data.params["ablation_method/l2"] == "regression"
        assert {a.path for a in client.list_artifacts(run_id)} == {"ablation.csv", "correlations.csv", "trials.csv"}

        # Readers of trials do not take it for one.
        assert [t.run_id for t in _load(logged_study).trials] == logged_study.trial_run_ids
        children = store.child_runs(logged_study.tracking_uri, logged_study.experiment_id, logged_study.parent_run_id)
        assert run_id not in {r.info.run_id for r in children}
        assert set(store.sweep_runs(logged_study.tracking_uri, logged_study.experiment_id)) == {logged_study.parent_run_id}
        for parent in (None, logged_study.parent_run_id):
            ranked = rank_configurations(logged_study.tracking_uri, logged_study.experiment, parent=parent, top=100)
            run_ids = {i for c in ranked["configurations"] for i in c["run_ids"]}
            assert run_ids == set(logged_study.trial_run_ids)
            assert ranked["runs"] == len(logged_study.trial_run_ids) + len(logged_study.other_run_ids)
    finally:
        client.delete_run(run_id)  # the session's study stays as other tests expect it


def test_an_analysis_of_several_sweeps_stays_at_the_top_level():
    from types import SimpleNamespace

    from analysis.analysis_run import analysed_sweep
    from analysis.load import Study

    def study(parent, *trial_parents):
        return Study("uri", "e", "1", parent, [SimpleNamespace(parent_run_id=p) for p in trial_parents], {})

    assert analysed_sweep(study(None, "a", "a")) == "a"
    assert analysed_sweep(study(None, "a", "b")) is None  # MLflow gives a run one parent: none is chosen
    assert analysed_sweep(study("a", "a")) == "a"
    assert analysed_sweep(study(None)) is None
