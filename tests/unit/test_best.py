"""`irrep-study best` chooses on validation error and says so; the test error is reported beside
the composition baseline, never used to choose unless asked for. The seeds of a configuration are
one row (mean and sd over them), sweeps of one study stay apart, and runs without the ranking
metric are counted, not dropped silently."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from importlib.metadata import version
from types import SimpleNamespace

import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from study.best import rank_configurations
from study.cli import app, main
from study.config.trial import TrialConfig, load_trial_config
from study.training.trial import EpochMetrics
from tests.helpers.mlflow_trials import log_trial, log_unfinished_trial, tracking_store

# (validation MAE, test MAE) per trial: the best on validation is not the best on test.
TRIALS = {"a": (30.0, 60.0), "b": (40.0, 35.0), "c": (50.0, 45.0)}
BASELINE = 900.0


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("best")
    uri = tracking_store(root)
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("picks", artifact_location=(root / "artifacts").resolve().as_uri())
    parent = client.create_run(experiment_id, run_name="sweep", tags={"irrep_study.role": "sweep"}).info.run_id
    for seed, (name, (val, test)) in enumerate(TRIALS.items(), start=1):
        tags = {"mlflow.parentRunId": parent, "irrep_study.role": "trial", "irrep_study.status": "completed"}
        run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
        config = TrialConfig(hidden_dim=8, seed=seed, lr=1e-3 * seed)  # three configurations of one seed each
        metrics = {"best_val_mae_meV": val, "test_mae_meV": test, "baseline_test_mae_meV": BASELINE, "num_params": 1000.0}
        client.log_batch(
            run_id, params=[Param(k, v) for k, v in config.flat_params().items()], metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()]
        )
        client.set_terminated(run_id, "FINISHED")
    return uri


def test_best_ranks_by_validation_mae_by_default(store):
    rows = rank_configurations(store, "picks")["configurations"]
    assert [row["metrics"]["best_val_mae_meV"]["mean"] for row in rows] == [30.0, 40.0, 50.0]
    assert rows[0]["metrics"]["test_mae_meV"]["mean"] == 60.0  # the validation winner keeps its (worse) test MAE
    assert rows[0]["metrics"]["baseline_test_mae_meV"]["mean"] == BASELINE
    assert rows[0]["test_over_baseline"] == pytest.approx(60.0 / BASELINE)
    assert all(row["n"] == 1 and row["metrics"]["best_val_mae_meV"]["sd"] is None for row in rows)


def test_best_cli_says_which_metric_chose_and_exports_the_validation_winner(store, tmp_path):
    winner = tmp_path / "winner.yaml"
    result = CliRunner().invoke(app, ["best", "--experiment", "picks", "--tracking-uri", store, "--json", "--export", str(winner)])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["metric"] == "best_val_mae_meV" and "ranked by the mean best_val_mae_meV" in document["ranked_by"]
    assert "ranked by the mean best_val_mae_meV" in result.stderr
    assert "seed: 1" in winner.read_text()  # trial "a", the best on validation

    table = CliRunner().invoke(app, ["best", "--experiment", "picks", "--tracking-uri", store])
    assert table.exit_code == 0 and "ranked by the mean best_val_mae_meV" in table.stdout
    assert "baseline test MAE" in table.stdout and "900.0" in table.stdout and "0.07" in table.stdout


def test_ranking_by_the_test_metric_is_possible_and_flagged(store):
    result = CliRunner().invoke(app, ["best", "--experiment", "picks", "--tracking-uri", store, "--by", "test_mae_meV", "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert [row["metrics"]["test_mae_meV"]["mean"] for row in document["configurations"]] == [35.0, 45.0, 60.0]
    assert "chosen on the test set" in document["ranked_by"]


def test_a_run_logged_before_the_reference_field_exports_the_setup_it_was_trained_with():
    from study.best import config_from_params

    params = {
        k: v
        for k, v in TrialConfig(target_reference="mean", lr_schedule="constant").flat_params().items()
        if k not in ("target_reference", "lr_schedule")
    }
    old = config_from_params(params)
    assert (old.target_reference, old.lr_schedule) == ("mean", "constant")
    new = config_from_params(TrialConfig().flat_params())
    assert new.target_reference == TrialConfig().target_reference


# Two sweeps of one study. Per seed: (validation MAE per epoch, best validation MAE, test MAE).
# In sweep A, configuration "wide" has the single best run (seed 1) but the worse mean, so ranking
# runs and ranking configurations disagree; the last epoch is not always the best one, so ranking by
# val_mae_meV (the last epoch) and by best_val_mae_meV disagree as well.
WIDE = dict(l_values=[0, 1, 2], hidden_dim=8)
NARROW = dict(l_values=[0, 1], hidden_dim=8)
SWEEPS = {
    "sweep-a": [
        (WIDE, 1, [25.0, 20.0], 20.0, 41.0),
        (WIDE, 2, [60.0, 80.0], 60.0, 70.0),
        (WIDE, 3, [61.0, 90.0], 61.0, 72.0),
        (NARROW, 1, [40.0, 40.0], 40.0, 50.0),
        (NARROW, 2, [41.0, 44.0], 41.0, 52.0),
        (NARROW, 3, [45.0, 42.0], 42.0, 55.0),
    ],
    "sweep-b": [
        (WIDE, 1, [35.0, 30.0], 30.0, 40.0),
        (WIDE, 2, [38.0, 33.0], 33.0, 44.0),
    ],
}
SWEEP_BASELINE = 800.0
NUM_PARAMS = {"0,1,2": 5000, "0,1": 3000}


@pytest.fixture(scope="module")
def two_sweeps(tmp_path_factory) -> SimpleNamespace:
    """The trials of SWEEPS logged the way a sweep logs them (tests/mlflow_trials.py), plus, in
    sweep A, a stopped-early seed of "wide" and a failed one of "narrow": neither has final metrics."""
    root = tmp_path_factory.mktemp("two-sweeps")
    uri = tracking_store(root)
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("seeds", artifact_location=(root / "artifacts").resolve().as_uri())
    parents, run_ids, unfinished = {}, {}, {}
    for name, trials in SWEEPS.items():
        parent = client.create_run(experiment_id, run_name=name, tags={"irrep_study.role": "sweep"}).info.run_id
        parents[name] = parent
        for overrides, seed, history, best_val, test in trials:
            config = TrialConfig(**overrides, seed=seed)
            result = SimpleNamespace(
                history=[EpochMetrics(epoch=k, train_loss=1.0 / k, val_mae_meV=v) for k, v in enumerate(history, start=1)],
                test_mae_meV=test,
                best_val_mae_meV=best_val,
                baseline_val_mae_meV=SWEEP_BASELINE,
                baseline_test_mae_meV=SWEEP_BASELINE,
                num_params=NUM_PARAMS[config.flat_params()["l_values"]],
                train_seconds=1.0,
            )
            run_ids[(name, config.flat_params()["l_values"], seed)] = log_trial(
                client, experiment_id, parent, config, root / "no-files", result
            )
    parent_a = parents["sweep-a"]
    unfinished["stopped_early"] = log_unfinished_trial(client, experiment_id, parent_a, "stopped_early", TrialConfig(**WIDE, seed=4))
    unfinished["failed"] = log_unfinished_trial(client, experiment_id, parent_a, "failed", TrialConfig(**NARROW, seed=4))
    other = client.create_experiment("another-study", artifact_location=(root / "artifacts").resolve().as_uri())
    foreign = client.create_run(other, run_name="elsewhere", tags={"irrep_study.role": "sweep"}).info.run_id
    return SimpleNamespace(uri=uri, parents=parents, run_ids=run_ids, unfinished=unfinished, foreign_parent=foreign)


def expected(sweep: str, l_values: str, column: int) -> list[float]:
    """The values logged for one configuration of one sweep (column 3: best val, 4: test)."""
    return [trial[column] for trial in SWEEPS[sweep] if ",".join(map(str, trial[0]["l_values"])) == l_values]


def best_json(two_sweeps, *args: str) -> dict:
    result = CliRunner().invoke(app, ["best", "--experiment", "seeds", "--tracking-uri", two_sweeps.uri, "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_the_seeds_of_a_configuration_are_one_row_with_their_mean_and_sd(two_sweeps):
    document = best_json(two_sweeps, "--parent", two_sweeps.parents["sweep-a"])
    rows = document["configurations"]
    assert [row["params"]["l_values"] for row in rows] == ["0,1", "0,1,2"]  # narrow wins on the mean
    for row in rows:
        l_values = row["params"]["l_values"]
        val, test = expected("sweep-a", l_values, 3), expected("sweep-a", l_values, 4)
        assert row["n"] == 3 and sorted(int(seed) for seed in row["seeds"]) == [1, 2, 3]
        assert row["metrics"]["best_val_mae_meV"]["mean"] == pytest.approx(statistics.fmean(val))
        assert row["metrics"]["best_val_mae_meV"]["sd"] == pytest.approx(statistics.stdev(val))
        assert row["metrics"]["test_mae_meV"]["mean"] == pytest.approx(statistics.fmean(test))
        assert row["metrics"]["test_mae_meV"]["sd"] == pytest.approx(statistics.stdev(test))
        assert row["metrics"]["baseline_test_mae_meV"]["mean"] == SWEEP_BASELINE
        assert row["test_over_baseline"] == pytest.approx(statistics.fmean(t / SWEEP_BASELINE for t in test))
        assert row["num_params"] == NUM_PARAMS[l_values]
        assert set(row["run_ids"]) == {two_sweeps.run_ids[("sweep-a", l_values, seed)] for seed in (1, 2, 3)}
        assert "seed" not in row["params"] and "seed=" not in row["configuration"]
    # The seeds that never reached their final metrics are counted, by status, not dropped silently.
    wide, narrow = rows[1], rows[0]
    assert wide["statuses"] == {"completed": 3, "stopped_early": 1}
    assert wide["left_out_run_ids"] == [two_sweeps.unfinished["stopped_early"]]
    assert narrow["statuses"] == {"completed": 3, "failed": 1}
    assert document["left_out"]["missing"] == {"failed": 1, "stopped_early": 1}
    assert document["left_out"]["note"] == ("left out of the ranking: 2 of 8 runs without best_val_mae_meV (1 failed, 1 stopped_early)")

    table = CliRunner().invoke(
        app, ["best", "--experiment", "seeds", "--tracking-uri", two_sweeps.uri, "--parent", two_sweeps.parents["sweep-a"]]
    )
    assert table.exit_code == 0, table.output
    assert "left out of the ranking: 2 of 8 runs" in table.stdout


def logged_values(two_sweeps, sweep: str, l_values: str, metric: str) -> list[float]:
    """`metric` of every trial run of one sweep with these l values, as MLflow holds it (a run's
    val_mae_meV is its last epoch's), found here without study/best.py."""
    client = MlflowClient(tracking_uri=two_sweeps.uri)
    runs = client.search_runs(
        [client.get_experiment_by_name("seeds").experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{two_sweeps.parents[sweep]}' and params.l_values = '{l_values}'",
    )
    return [run.data.metrics[metric] for run in runs if metric in run.data.metrics]


def test_the_column_shown_first_is_the_metric_that_ranks(two_sweeps):
    parent = two_sweeps.parents["sweep-a"]
    for metric in ("best_val_mae_meV", "val_mae_meV"):
        rows = best_json(two_sweeps, "--parent", parent, "--metric", metric)["configurations"]
        means = {l_values: statistics.fmean(logged_values(two_sweeps, "sweep-a", l_values, metric)) for l_values in ("0,1", "0,1,2")}
        assert [row["params"]["l_values"] for row in rows] == sorted(means, key=means.get)
        assert [row["metrics"][metric]["mean"] for row in rows] == pytest.approx(sorted(means.values()))
    # By the last epoch the unfinished seeds, which logged a val_mae_meV, are ranked too.
    assert [row["n"] for row in rows] == [4, 4]

    table = CliRunner().invoke(
        app, ["best", "--experiment", "seeds", "--tracking-uri", two_sweeps.uri, "--parent", parent, "--metric", "val_mae_meV"]
    )
    assert table.exit_code == 0, table.output
    header = next(line for line in table.stdout.splitlines() if line.startswith("┃ rank"))
    assert header.index("val_mae_meV") < header.index("best val MAE") < header.index("test MAE")
    winner = next(line for line in table.stdout.splitlines() if line.startswith("│ 1 "))
    values = logged_values(two_sweeps, "sweep-a", rows[0]["params"]["l_values"], "val_mae_meV")
    cells = [cell.strip() for cell in winner.split("│")]
    assert cells[5] == f"{statistics.fmean(values):.1f} ± {statistics.stdev(values):.1f}"


def test_two_sweeps_of_one_study_stay_apart_and_parent_picks_one(two_sweeps):
    rows = best_json(two_sweeps)["configurations"]
    assert len(rows) == 3
    wide = [row for row in rows if row["params"]["l_values"] == "0,1,2"]
    assert sorted((row["sweep"], row["n"]) for row in wide) == [("sweep-a", 3), ("sweep-b", 2)]
    assert {row["parent_run_id"] for row in wide} == {two_sweeps.parents["sweep-a"], two_sweeps.parents["sweep-b"]}
    b_values = expected("sweep-b", "0,1,2", 3)
    assert rows[0]["sweep"] == "sweep-b" and rows[0]["metrics"]["best_val_mae_meV"]["mean"] == pytest.approx(statistics.fmean(b_values))

    only_b = best_json(two_sweeps, "--parent", two_sweeps.parents["sweep-b"])
    assert [(row["sweep"], row["n"]) for row in only_b["configurations"]] == [("sweep-b", 2)]
    assert only_b["left_out"]["runs"] == 0 and only_b["left_out"]["note"] is None

    table = CliRunner().invoke(app, ["best", "--experiment", "seeds", "--tracking-uri", two_sweeps.uri, "--top", "2"])
    assert table.exit_code == 0, table.output
    assert "sweep-b" in table.stdout and "the best 2 of 3 configurations" in table.stdout


def test_export_writes_the_best_seed_of_the_winning_configuration(two_sweeps, tmp_path):
    target = tmp_path / "winner.yaml"
    best_json(two_sweeps, "--parent", two_sweeps.parents["sweep-a"], "--export", str(target))
    exported = load_trial_config(target)  # what `irrep-study train` reads
    narrow = [trial for trial in SWEEPS["sweep-a"] if trial[0] is NARROW]
    best_seed = min(narrow, key=lambda trial: trial[3])[1]
    assert list(exported.l_values) == NARROW["l_values"] and exported.seed == best_seed
    assert "irrep-study best" in target.read_text().splitlines()[0]


@pytest.mark.parametrize(
    "parent, words",
    [
        ("0123456789abcdef0123456789abcdef", ["--parent", "no run"]),
        ("foreign", ["--parent", "another experiment", "'seeds'"]),
        ("a trial", ["--parent", "not a sweep"]),
    ],
)
def test_a_bad_parent_is_one_line_and_exit_2(two_sweeps, monkeypatch, capsys, parent, words):
    run_id = {"foreign": two_sweeps.foreign_parent, "a trial": two_sweeps.unfinished["failed"]}.get(parent, parent)
    monkeypatch.setattr(sys, "argv", ["irrep-study", "best", "--experiment", "seeds", "--tracking-uri", two_sweeps.uri, "--parent", run_id])
    with pytest.raises(SystemExit) as ended:
        main()
    assert ended.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --parent"), lines
    for word in words:
        assert word in lines[0]


COMMANDS = ("data", "train", "sweep", "sync", "best", "analyze", "plan", "bench")


def test_version_and_short_help():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout == f"irrep-study {version('irrep-study')}\n"
    top = CliRunner().invoke(app, ["-h"])
    assert top.exit_code == 0 and "--version" in top.stdout
    assert all(command in top.stdout for command in COMMANDS)
    for command in COMMANDS:
        short, long = (CliRunner().invoke(app, [command, flag]) for flag in ("-h", "--help"))
        assert short.exit_code == 0 and short.stdout == long.stdout
        assert short.stdout.startswith("Usage: ") and f" {command} [OPTIONS]" in short.stdout.splitlines()[0]
        # On/off flags take no value: their help must not show one.
        assert "<bool>" not in short.stdout and "--json <" not in short.stdout


def test_export_help_says_what_it_writes():
    text = " ".join(CliRunner().invoke(app, ["best", "-h"]).stdout.split())
    assert "trial config YAML" in text and "irrep-study train" in text


def test_the_left_out_line_names_each_reason_with_its_statuses():
    from collections import Counter

    from study.best import left_out_note

    assert left_out_note("best_val_mae_meV", 9, Counter(), Counter()) is None
    both = left_out_note("best_val_mae_meV", 9, Counter(stopped_early=2, failed=1), Counter(diverged=1))
    assert both == (
        "left out of the ranking: 4 of 9 runs: 3 without best_val_mae_meV (1 failed, 2 stopped_early); "
        "1 with a non-finite best_val_mae_meV (1 diverged)"
    )


def test_library_log_lines_show_only_with_verbose(tmp_path):
    # An empty SQLite file: MLflow logs creating its tables in it at INFO. (`best` creates no store
    # where there is none.)
    def best(*flags: str) -> subprocess.CompletedProcess:
        store = tmp_path / f"store{len(flags)}"
        store.mkdir()
        (store / "mlflow.db").touch()
        return subprocess.run(
            [sys.executable, "-m", "study.cli", *flags, "best", "--experiment", "nope", "--tracking-uri", f"sqlite:///{store}/mlflow.db"],
            capture_output=True,
            text=True,
            timeout=120,
            env={k: v for k, v in os.environ.items() if k != "MLFLOW_LOGGING_LEVEL"},
        )

    quiet, verbose = best(), best("--verbose")
    assert quiet.returncode == verbose.returncode == 2
    assert quiet.stderr.splitlines() == ["error: --experiment: no experiment named 'nope' in " + f"sqlite:///{tmp_path}/store0/mlflow.db"]
    assert "Creating initial MLflow database tables" in verbose.stderr
    assert verbose.stderr.splitlines()[-1] == quiet.stderr.splitlines()[-1].replace("store0", "store1")
