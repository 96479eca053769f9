"""Load: 8 trials at once, each logging every epoch to one MLflow server with a SQLite store.

(8, not 16: each trial is a Ray worker process that pays 6 s of imports on 2 cores, and the 16-trial
version spent most of its 166 s on those; 8 writers still interleave on the one server.)"""

from __future__ import annotations

import json

import pytest
import yaml

from study.tracking.store import ROLE_TAG, STATUS_TAG
from tests.helpers.services import MlflowServer

pytestmark = pytest.mark.slow  # 8 concurrent trials on one MLflow server

TRIALS = 8

EPOCHS = 3


def test_eight_concurrent_trials_lose_no_metric_point(run_cli, tmp_path):
    from mlflow.tracking import MlflowClient

    server = MlflowServer(tmp_path / "mlflow")
    try:
        space = tmp_path / "space.yaml"
        space.write_text(
            yaml.safe_dump(
                {
                    "name": "load",
                    "trial": {"l_values": [0, 1], "hidden_dim": 2, "num_layers": 0, "subset": 100, "epochs": EPOCHS, "batch_size": 16},
                    "search": {"method": "grid", "grid": [{"l_values": [0, 1]}]},
                    "seeds": list(range(1, TRIALS + 1)),
                    "scheduler": {"type": "none"},
                    # 8 trials share 2 CPUs: all run at once, so their writes to MLflow interleave.
                    "resources": {"cpus_per_trial": 0.25, "max_concurrent": TRIALS},
                }
            )
        )
        result = run_cli("sweep", str(space), "--num-cpus", "2", "--tracking-uri", server.uri, "--json", check_exit=0)
        report = json.loads(result.stdout)
        assert len(report["trials"]) == TRIALS and report["unsynced_trials"] == 0

        client = MlflowClient(server.uri)
        experiment = client.get_experiment_by_name("load")
        runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'trial'")
        assert len(runs) == TRIALS
        assert sorted(int(r.data.params["seed"]) for r in runs) == list(range(1, TRIALS + 1))
        # Concurrent: the trials' runs overlapped in time (each run is open from its trial's start
        # to its end), so their writes to the one server interleaved. At least two open at once
        # is what the name claims; trials run one after another would fail it. (All of them at once
        # is not asked: Ray starts workers one after another and a trial takes seconds.)
        events = sorted([(r.info.start_time, 1) for r in runs] + [(r.info.end_time, -1) for r in runs])
        open_runs, most_at_once = 0, 0
        for _, change in events:  # an end sorts before a start at the same millisecond: not an overlap
            open_runs += change
            most_at_once = max(most_at_once, open_runs)
        print(f"at most {most_at_once} of {TRIALS} trial runs open at once")
        assert most_at_once >= 2, sorted((r.info.start_time, r.info.end_time) for r in runs)
        for run in runs:
            assert run.data.tags[STATUS_TAG] == "completed"
            for metric in ("train_loss", "val_mae_meV", "norm_share_l0", "norm_share_l1"):
                steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, metric))
                assert steps == list(range(1, EPOCHS + 1)), (metric, steps)
    finally:
        server.stop()
