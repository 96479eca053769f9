"""Load: the sweep's driver keeps a flat memory footprint over 200 short trials.

A driver that holds on to something per trial (results, tracking clients, progress rows) grows
for days on a long study; this measures the real `irrep-study sweep` process from outside."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import psutil
import pytest
import yaml

from study.tracking import ROLE_TAG

TRIALS = 200


@pytest.mark.slow
def test_driver_memory_stays_flat_over_200_short_trials(qm9, qm9_cache_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({
        "name": "memory",
        "trial": {"l_values": [0, 1], "hidden_dim": 2, "num_layers": 0, "subset": 40, "epochs": 1,
                  "batch_size": 16, "target_mean": -76.1160, "target_std": 10.3238},
        "search": {"method": "grid", "grid": [{"l_values": [0, 1]}]},
        "seeds": list(range(1, TRIALS + 1)),
        "scheduler": {"type": "none"},
        "resources": {"cpus_per_trial": 0.5, "max_concurrent": 4},
    }))
    env = {**os.environ, "IRREP_STUDY_CACHE": str(qm9_cache_dir)}
    driver = subprocess.Popen(
        [sys.executable, "-m", "study.cli", "sweep", str(space), "--num-cpus", "2", "--json"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=open(tmp_path / "sweep.log", "w"), text=True,
    )
    samples = []  # (seconds since start, resident set size in MiB) of the driver process alone
    started = time.monotonic()
    process = psutil.Process(driver.pid)
    try:
        while driver.poll() is None:
            try:
                samples.append((time.monotonic() - started, process.memory_info().rss / 2**20))
            except psutil.NoSuchProcess:
                break
            if time.monotonic() - started > 1500:
                pytest.fail("200 short trials took more than 25 minutes")
            time.sleep(0.5)
        stdout, _ = driver.communicate(timeout=60)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, (tmp_path / "sweep.log").read_text()[-3000:]
    trials = json.loads(stdout)["trials"]
    assert len(trials) == TRIALS and all(t["status"] == "completed" for t in trials)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("memory")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'trial'", max_results=1000)
    assert len(runs) == TRIALS

    # Compare the second quarter of the run (past start-up: Ray, the dataset, the first trials)
    # with the last quarter: a per-trial leak of even 0.3 MiB would add 30 MiB in between.
    duration = samples[-1][0]
    second = [rss for t, rss in samples if duration * 0.25 <= t < duration * 0.5]
    last = [rss for t, rss in samples if t >= duration * 0.75]
    growth = max(last) - max(second)
    print(f"driver RSS over {TRIALS} trials in {duration:.0f} s: 2nd quarter peak {max(second):.0f} MiB, "
          f"last quarter peak {max(last):.0f} MiB, growth {growth:+.1f} MiB")
    assert growth < 30, f"driver memory grew by {growth:.1f} MiB between the 2nd and the last quarter"
