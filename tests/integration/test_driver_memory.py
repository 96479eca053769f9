"""Load: the sweep's driver keeps a flat memory footprint over 200 short trials.

A driver that holds on to something per trial (results, tracking clients, progress rows) grows
for days on a long study; this measures the real `irrep-study sweep` process from outside."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import time

import psutil
import pytest
import yaml

from study.tracking.store import ROLE_TAG

TRIALS = 200


@pytest.mark.slow
def test_driver_memory_stays_flat_over_200_short_trials(qm9, qm9_cache_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    space = tmp_path / "space.yaml"
    space.write_text(
        yaml.safe_dump(
            {
                "name": "memory",
                "trial": {"l_values": [0, 1], "hidden_dim": 2, "num_layers": 0, "subset": 40, "epochs": 1, "batch_size": 16},
                "search": {"method": "grid", "grid": [{"l_values": [0, 1]}]},
                "seeds": list(range(1, TRIALS + 1)),
                "scheduler": {"type": "none"},
                "resources": {"cpus_per_trial": 0.5, "max_concurrent": 4},
            }
        )
    )
    env = {**os.environ, "IRREP_STUDY_CACHE": str(qm9_cache_dir)}
    # stdout to a file, not a pipe: the JSON of 200 trials outgrows a pipe's buffer, and the driver
    # would block writing it while this loop only polls.
    driver = subprocess.Popen(
        [sys.executable, "-m", "study.cli", "sweep", str(space), "--num-cpus", "2", "--json"],
        cwd=tmp_path,
        env=env,
        stdout=open(tmp_path / "sweep.json", "w"),
        stderr=open(tmp_path / "sweep.log", "w"),
    )
    # (trials finished so far, resident set size in MiB of the driver process alone)
    samples: list[tuple[int, float]] = []
    started = time.monotonic()
    process = psutil.Process(driver.pid)
    try:
        while driver.poll() is None:
            try:
                samples.append((finished_runs(tmp_path / "mlflow.db"), process.memory_info().rss / 2**20))
            except psutil.NoSuchProcess:
                break
            if time.monotonic() - started > 1500:
                pytest.fail("200 short trials took more than 25 minutes")
            time.sleep(0.5)
        driver.wait(timeout=60)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, (tmp_path / "sweep.log").read_text()[-3000:]
    trials = json.loads((tmp_path / "sweep.json").read_text())["trials"]
    assert len(trials) == TRIALS and all(t["status"] == "completed" for t in trials)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("memory")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'trial'", max_results=1000)
    assert len(runs) == TRIALS

    # Compare the driver while trials 40-60 finish (past start-up: Ray, the dataset, the first
    # trials) with trials 170-195 (before the end of the sweep, which reads every result back):
    # a per-trial leak of even 0.2 MiB would add about 25 MiB in between.
    early = [rss for done, rss in samples if 40 <= done < 60]
    late = [rss for done, rss in samples if 170 <= done < 195]
    assert early and late, samples[::20]
    growth = max(late) - max(early)
    print(
        f"driver RSS over {TRIALS} trials: {max(early):.0f} MiB around trial 50, {max(late):.0f} MiB "
        f"around trial 180, growth {growth:+.1f} MiB"
    )
    assert growth < 20, f"driver memory grew by {growth:.1f} MiB between trial 50 and trial 180"


def finished_runs(database) -> int:
    """Runs the sweep has ended so far, read without locking out the sweep's writers."""
    if not database.exists():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=1)) as connection:
            return connection.execute("select count(*) from runs where status = 'FINISHED'").fetchone()[0]
    except sqlite3.OperationalError:  # tables not created yet, or a writer holds the lock
        return -1
