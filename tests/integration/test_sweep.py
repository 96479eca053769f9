"""Sweeps on real Ray (a two-node cluster on loopback, or a local Ray) with real MLflow tracking."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import yaml

from study.tracking.store import PARENT_TAG, ROLE_TAG, STATUS_TAG
from study.training.embeddings import load_embeddings
from tests.helpers.services import RayCluster, empty_mlflow_store

pytestmark = pytest.mark.slow  # real sweeps on Ray clusters

TINY_TRIAL = {"hidden_dim": 4, "num_layers": 1, "subset": 300, "epochs": 2}


def write_space(path, **space):
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def cluster():
    ray_cluster = RayCluster(workers=1, cpus=1)
    yield ray_cluster
    ray_cluster.stop()


def test_four_trial_sweep_on_a_two_node_cluster_is_tracked_in_mlflow(cluster, mlflow_server, run_cli, tmp_path):
    from mlflow.tracking import MlflowClient
    from ray.tune import ExperimentAnalysis

    space = write_space(
        tmp_path / "space.yaml",
        name="two-nodes",
        trial=TINY_TRIAL,
        search={"method": "optuna", "num_samples": 4, "seed": 1, "params": {"l_values": {"subsets_of": [0, 1, 2]}}},
        scheduler={"type": "none"},
        resources={"cpus_per_trial": 1, "max_concurrent": 2},
    )
    # One Optuna database for the cluster's sweeps (here a SQLite file outside the sweep's folder).
    shared_optuna = f"sqlite:///{tmp_path / 'shared-optuna.db'}"
    result = run_cli(
        "sweep",
        str(space),
        "--address",
        cluster.address,
        "--tracking-uri",
        mlflow_server.uri,
        "--storage",
        str(tmp_path / "ray_results"),
        "--optuna-storage",
        shared_optuna,
        "--json",
        check_exit=0,
        env=cluster.client_env,
    )
    report = json.loads(result.stdout)
    assert len(report["trials"]) == 4
    assert all(t["status"] == "completed" for t in report["trials"]), report["trials"]
    # The sweep's best is chosen on validation; its test MAE is only reported.
    assert report["best"]["best_val_mae_meV"] == min(t["best_val_mae_meV"] for t in report["trials"])
    assert report["best"]["baseline_test_mae_meV"] > 0

    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("two-nodes")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get(ROLE_TAG) == "sweep"]
    children = [r for r in runs if r.data.tags.get(ROLE_TAG) == "trial"]
    assert len(parents) == 1 and parents[0].info.run_id == report["parent_run_id"]
    assert parents[0].info.status == "FINISHED"
    assert len(children) == 4
    for run in children:
        assert run.data.tags[PARENT_TAG] == report["parent_run_id"]
        assert run.data.tags[STATUS_TAG] == "completed" and run.info.status == "FINISHED"
        params = run.data.params
        assert params["hidden_dim"] == "4" and params["seed"] == "21616" and params["l_values"].startswith("0")
        # The fitted reference, logged when the trial ends, reaches the run as well.
        assert params["reference_kind"] == "composition" and "reference_intercept" in params
        history = client.get_metric_history(run.info.run_id, "val_mae_meV")
        assert sorted(m.step for m in history) == [1, 2]
        assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 2
        l_values = [int(l) for l in params["l_values"].split(",")]
        shares = [client.get_metric_history(run.info.run_id, f"norm_share_l{l}") for l in l_values]
        assert all(len(s) == 2 for s in shares)
        assert sum(s[-1].value for s in shares) == pytest.approx(1.0, abs=1e-6)
        assert math.isfinite(run.data.metrics["test_mae_meV"]) and run.data.metrics["num_params"] > 0
        assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {
            "config.yaml",
            "best_model.pt",
            "test_embeddings.npz",
            "result.json",
        }
        local = client.download_artifacts(run.info.run_id, "test_embeddings.npz", str(tmp_path / run.info.run_id))
        embeddings = load_embeddings(local)
        assert list(embeddings.layout.l_values) == l_values
        assert len(embeddings.mol_id) == 30  # 10% of the 300-molecule subset
        for l in l_values:
            assert embeddings.layout.slice(embeddings.graph, l).shape == (30, (2 * l + 1) * 4)
        assert embeddings.graph.shape[1] == sum((2 * l + 1) * 4 for l in l_values)

    # Ray Tune's own API reads the same study.
    analysis = ExperimentAnalysis(report["path"])
    assert len(analysis.trials) == 4
    frame = analysis.dataframe()
    assert set(frame["mlflow_run_id"]) == {r.info.run_id for r in children}
    best = analysis.get_best_trial("val_mae_meV", "min", scope="last")
    assert best.last_result["val_mae_meV"] == min(frame["val_mae_meV"])
    # So does Optuna's: one trial per configuration (one seed here), told its last validation MAE.
    import optuna

    assert report["optuna_storage"] == shared_optuna and report["optuna_study"] == Path(report["path"]).name
    assert not (Path(report["path"]) / "optuna.db").exists()
    study = optuna.load_study(study_name=report["optuna_study"], storage=shared_optuna)
    assert sorted(t.value for t in study.trials) == pytest.approx(sorted(frame["val_mae_meV"]))
    assert parents[0].data.tags["irrep_study.optuna_study"] == report["optuna_study"]

    # The parent run's contract, as the real sweep wrote it: the validated space as an artifact,
    # the sweep's params, source and version tags, and the best trial so far after each completion.
    from study.config.space import SearchSpace, load_search_space
    from study.tracking import store

    parent = parents[0]
    assert parent.data.params == load_search_space(space).summary_params()
    written = client.download_artifacts(parent.info.run_id, store.SEARCH_SPACE_ARTIFACT, str(tmp_path / "parent"))
    assert SearchSpace.model_validate(yaml.safe_load(Path(written).read_text())) == load_search_space(space)
    assert parent.data.tags["mlflow.source.name"] == "irrep-study sweep"
    assert parent.data.tags[store.VERSION_TAG] == store.package_version()
    best_so_far = sorted(client.get_metric_history(parent.info.run_id, "best_val_mae_meV"), key=lambda m: m.step)
    assert [m.step for m in best_so_far] == [1, 2, 3, 4]  # one point per completed trial
    values = [m.value for m in best_so_far]
    assert values == sorted(values, reverse=True) and values[-1] == pytest.approx(report["best"]["best_val_mae_meV"])
    finished = client.get_metric_history(parent.info.run_id, "trials_finished")
    assert sorted((m.step, m.value) for m in finished) == [(k, float(k)) for k in (1, 2, 3, 4)]

    # `best` ranks the same runs and exports a config that `train` accepts.
    ranked = run_cli(
        "best",
        "--experiment",
        "two-nodes",
        "--tracking-uri",
        mlflow_server.uri,
        "--top",
        "3",
        "--export",
        str(tmp_path / "winner.yaml"),
        "--json",
        check_exit=0,
    )
    rows = json.loads(ranked.stdout)["configurations"]
    # One row per configuration (Optuna may propose an l set twice; one seed here), ranked on the
    # mean validation MAE, never on test (issue: no selection on the test set).
    by_l_values: dict[str, list[float]] = {}
    for run in children:
        by_l_values.setdefault(run.data.params["l_values"], []).append(run.data.metrics["best_val_mae_meV"])
    means = sorted(sum(values) / len(values) for values in by_l_values.values())
    assert len(rows) == min(3, len(by_l_values))
    assert [r["metrics"]["best_val_mae_meV"]["mean"] for r in rows] == pytest.approx(means[: len(rows)])
    assert all(r["metrics"]["baseline_test_mae_meV"]["mean"] > 0 and r["test_over_baseline"] > 0 for r in rows)
    from study.config.trial import load_trial_config

    exported = load_trial_config(tmp_path / "winner.yaml")
    best_run = rows[0]["best_run"]
    assert exported.flat_params() == {k: v for k, v in best_run["params"].items() if k in exported.flat_params()}


def test_grid_with_seeds_and_asha_on_a_local_ray(run_cli, tmp_path):
    from mlflow.tracking import MlflowClient

    space = write_space(
        tmp_path / "grid.yaml",
        name="grid-asha",
        trial={**TINY_TRIAL, "epochs": 3},
        search={"method": "grid", "grid": [{"l_values": [0, 1]}, {"l_values": [0, 2], "hidden_dim": 2}]},
        seeds=[1, 2],
        scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2},
        resources={"cpus_per_trial": 1, "max_concurrent": 1},
    )
    empty_mlflow_store(tmp_path / "mlflow.db")  # tracked here (the default); MLflow's tables made once per session
    result = run_cli("sweep", str(space), "--num-cpus", "1", "--json", check_exit=0)
    report = json.loads(result.stdout)
    trials = report["trials"]
    assert sorted((t["l_values"], t["seed"]) for t in trials) == [("0,1", 1), ("0,1", 2), ("0,2", 1), ("0,2", 2)]
    statuses = {t["status"] for t in trials}
    assert statuses <= {"completed", "stopped_early"} and "completed" in statuses
    # The sweep's status on stderr (not a terminal here: printed blocks), its final state last:
    # all trials done, the best validation MAE with its grid entry's values and seed.
    assert re.search(r"grid-asha \d\d:\d\d:\d\d: 4/4 trials done \(.+\) \| 0 running", result.stderr), result.stderr
    assert re.search(r"best val MAE: \d+\.\d meV  l_values=0,[12] hidden_dim=[42] seed=[12] ", result.stderr), result.stderr
    for l_values in ("0,1", "0,2"):  # the seeds of a grid entry continue or stop together
        assert len({(t["status"], t["epochs"]) for t in trials if t["l_values"] == l_values}) == 1, trials

    # No --tracking-uri: a SQLite store in the working directory.
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("grid-asha")
    children = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'trial'")
    assert len(children) == 4
    by_run = {t["mlflow_run_id"]: t for t in trials}
    for run in children:
        trial = by_run[run.info.run_id]
        assert run.data.tags[STATUS_TAG] == trial["status"]
        assert run.info.status == "FINISHED"
        assert run.data.params["seed"] == str(trial["seed"])
        epochs = len(client.get_metric_history(run.info.run_id, "val_mae_meV"))
        assert epochs == trial["epochs"]
        if trial["status"] == "stopped_early":
            assert epochs < 3 and "test_mae_meV" not in run.data.metrics
        else:
            assert epochs == 3 and "test_mae_meV" in run.data.metrics

    # Every trial logs val_mae_meV, stopped early or not: rank by it within one configuration.
    narrowed = run_cli(
        "best",
        "--experiment",
        "grid-asha",
        "--metric",
        "val_mae_meV",
        "--where",
        "params.hidden_dim = '2'",
        "--json",
        check_exit=0,
    )
    # Both seeds of the hidden_dim 2 grid entry are one configuration, ranked by their mean last val_mae_meV.
    rows = json.loads(narrowed.stdout)["configurations"]
    assert len(rows) == 1 and rows[0]["params"]["hidden_dim"] == "2" and rows[0]["n"] == 2
    last = [run.data.metrics["val_mae_meV"] for run in children if run.data.params["hidden_dim"] == "2"]
    assert rows[0]["metrics"]["val_mae_meV"]["mean"] == pytest.approx(sum(last) / len(last))
    missing = run_cli("best", "--experiment", "no-such-study")
    assert missing.returncode == 2 and "no experiment named 'no-such-study'" in missing.stderr


def test_seeds_of_a_configuration_continue_or_stop_together(run_cli, tmp_path):
    """Seed-aware ASHA: 3 Optuna proposals x 2 seeds on one CPU, so the first seed of each
    configuration always waits (paused) at a rung for the second, and resumes in its own run.
    Two objectives (validation MAE, parameters): the Optuna study in the sweep's folder holds one
    trial per configuration with both values and a Pareto front."""
    import optuna
    from mlflow.tracking import MlflowClient

    from study.config.trial import TrialConfig
    from study.training.resources import num_params

    epochs = 4
    space = write_space(
        tmp_path / "seeds.yaml",
        name="seed-asha",
        trial={**TINY_TRIAL, "epochs": epochs},
        search={
            "method": "optuna",
            "sampler": "random",
            "num_samples": 3,
            "seed": 2,
            "params": {"l_values": {"subsets_of": [0, 1, 2]}, "lr": {"loguniform": [1.0e-4, 3.0e-2]}},
            "objectives": [{"metric": "val_mae_meV"}, {"metric": "num_params"}],
        },
        seeds=[1, 2],
        scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2},
        resources={"cpus_per_trial": 1, "max_concurrent": 2},
    )
    empty_mlflow_store(tmp_path / "mlflow.db")
    report = json.loads(run_cli("sweep", str(space), "--num-cpus", "1", "--json", check_exit=0).stdout)
    assert len(report["trials"]) == 6

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("seed-asha")
    children = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'trial'")
    assert len(children) == 6  # one run per seed, paused and resumed or not
    configurations: dict[tuple, list] = {}
    for run in children:
        configurations.setdefault((run.data.params["l_values"], run.data.params["lr"]), []).append(run)
    assert len(configurations) == 3 and all(len(runs) == 2 for runs in configurations.values())
    by_run = {t["mlflow_run_id"]: t for t in report["trials"]}
    outcomes, seed_means = [], []
    for runs in configurations.values():
        statuses = {run.data.tags[STATUS_TAG] for run in runs}
        assert len(statuses) == 1, statuses  # never one seed stopped and the other completed
        status = statuses.pop()
        assert status in ("completed", "stopped_early") and all(run.info.status == "FINISHED" for run in runs)
        histories = [client.get_metric_history(run.info.run_id, "val_mae_meV") for run in runs]
        steps = [sorted(m.step for m in history) for history in histories]
        assert steps[0] == steps[1] == list(range(1, len(steps[0]) + 1))  # same epochs, each logged once
        if status == "stopped_early":
            assert len(steps[0]) < epochs and all("test_mae_meV" not in run.data.metrics for run in runs)
        else:
            assert len(steps[0]) == epochs and all("test_mae_meV" in run.data.metrics for run in runs)
        assert {by_run[run.info.run_id]["status"] for run in runs} == {status}
        outcomes.append(status)
        size = num_params(TrialConfig(**TINY_TRIAL, l_values=runs[0].data.params["l_values"], lr=float(runs[0].data.params["lr"])))
        seed_means.append((sum(max(history, key=lambda m: m.step).value for history in histories) / 2, size))
    assert "completed" in outcomes and "stopped_early" in outcomes, outcomes

    # Optuna was told, per proposal, the mean of its two seeds at the epoch where both ended, and
    # the model's size; its study lives in the sweep's folder, readable with Optuna's own API.
    assert report["optuna_storage"] == f"sqlite:///{report['path']}/optuna.db"
    study = optuna.load_study(study_name=report["optuna_study"], storage=report["optuna_storage"])
    assert len(study.trials) == 3 and all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    told = sorted(tuple(t.values) for t in study.trials)
    assert [v for pair in told for v in pair] == pytest.approx([v for pair in sorted(seed_means) for v in pair])
    front = study.best_trials
    assert front and all(t in study.trials for t in front)
    # The front is what Optuna says it is: no trial of the study is better on both objectives.
    for chosen in front:
        assert not any(t.values[0] < chosen.values[0] and t.values[1] < chosen.values[1] for t in study.trials)


def test_a_local_sweep_starts_its_own_ray_beside_one_started_with_ray_start(run_cli, tmp_path):
    """Without --address a sweep starts a Ray of its own, as its help says, even where someone ran
    `ray start --head` on the machine (ray.init without an address joins that one, and refuses
    when given --num-cpus). Last in this module: stopping that Ray stops every Ray here."""
    import subprocess

    from tests.helpers.services import BIN

    subprocess.run(
        [str(BIN / "ray"), "start", "--head", "--num-cpus", "1", "--include-dashboard", "false"],
        check=True,
        capture_output=True,
        timeout=180,
    )
    try:
        space = write_space(
            tmp_path / "local.yaml",
            name="beside-ray-start",
            trial={**TINY_TRIAL, "epochs": 1},
            search={"method": "grid", "grid": [{"l_values": [0, 1]}]},
            scheduler={"type": "none"},
        )
        empty_mlflow_store(tmp_path / "mlflow.db")
        result = run_cli("sweep", str(space), "--num-cpus", "1", "--json")
        assert result.returncode == 0, result.stderr[-2000:]
        assert [t["status"] for t in json.loads(result.stdout)["trials"]] == ["completed"]
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], capture_output=True, timeout=120)
