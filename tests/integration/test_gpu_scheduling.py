"""GPU scheduling without a GPU: a Ray head on loopback with two logical GPUs hands trials GPU ids
(CUDA_VISIBLE_DEVICES) that torch cannot use; `device: auto` trains on the CPU with one warning,
and a trial asking for more GPUs than any node has is refused before anything starts."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import yaml

from study.errors import UserError
from study.tracking.store import ROLE_TAG, STATUS_TAG
from tests.helpers.services import RayCluster

# Four small configurations x one seed. Each trial must outlast the spread of the first three
# trials' start times (Ray starts their workers one after another: 2.3 s measured for all four),
# or more than two cannot be seen running at once: 500 steps each, several seconds with four
# trials on two cores.
TINY_TRIAL = {"hidden_dim": 4, "num_layers": 1, "subset": 2000, "epochs": 10, "device": "auto"}
GRID = [{"l_values": [0]}, {"l_values": [0, 1]}, {"l_values": [0], "hidden_dim": 5}, {"l_values": [0, 1], "hidden_dim": 5}]
FALLBACK = "device: auto: GPU(s) were assigned (CUDA_VISIBLE_DEVICES={}) but torch finds no usable CUDA device; training on the CPU"


def write_space(path: Path, name: str, gpus_per_trial: float) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "name": name,
                "trial": TINY_TRIAL,
                "search": {"method": "grid", "grid": GRID},
                "scheduler": {"type": "none"},
                "resources": {"cpus_per_trial": 1, "gpus_per_trial": gpus_per_trial, "max_concurrent": 4},
            },
            sort_keys=False,
        )
    )
    return path


# ---------------------------------------------------------------------------- select_device


@pytest.fixture
def no_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return monkeypatch


@pytest.mark.parametrize("visible", ["0", "1", "0,1"])
def test_auto_with_assigned_but_unusable_gpus_warns_once_and_uses_the_cpu(no_cuda, visible):
    from study.training.trial import select_device

    no_cuda.setenv("CUDA_VISIBLE_DEVICES", visible)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        device = select_device("auto")
    assert device.type == "cpu"
    assert [str(w.message) for w in caught] == [FALLBACK.format(visible)]


@pytest.mark.parametrize("visible", [None, "", "-1", " "])
def test_auto_without_assigned_gpus_uses_the_cpu_silently(no_cuda, visible):
    from study.training.trial import select_device

    if visible is not None:
        no_cuda.setenv("CUDA_VISIBLE_DEVICES", visible)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert select_device("auto").type == "cpu"
    assert caught == []


def test_auto_with_a_usable_gpu_takes_it_silently(no_cuda):
    import torch

    from study.training.trial import select_device

    no_cuda.setattr(torch.cuda, "is_available", lambda: True)
    no_cuda.setenv("CUDA_VISIBLE_DEVICES", "1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert select_device("auto").type == "cuda"
    assert caught == []


def test_cuda_without_a_gpu_keeps_its_one_line_error(no_cuda):
    from study.training.trial import select_device

    no_cuda.setenv("CUDA_VISIBLE_DEVICES", "0")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(UserError, match=r"^device: cuda was requested but no CUDA GPU is available$"):
            select_device("cuda")
    assert caught == []


# ---------------------------------------------------------------------------- a cluster with two logical GPUs


@pytest.fixture(scope="module")
def gpu_cluster():
    # 4 logical CPUs (on 2 real cores) so that four trials of 1 CPU and 0.5 GPU fit at once.
    ray_cluster = RayCluster(workers=0, cpus=4, gpus=2)
    yield ray_cluster
    ray_cluster.stop()


@pytest.mark.slow  # a Ray node with logical GPUs
def test_more_gpus_per_trial_than_the_cluster_has_is_refused_before_any_trial(gpu_cluster, mlflow_server, run_cli, tmp_path):
    from mlflow.tracking import MlflowClient

    space = write_space(tmp_path / "space.yaml", "too-many-gpus", gpus_per_trial=3)
    storage = tmp_path / "ray_results"
    result = run_cli(
        "sweep",
        str(space),
        "--address",
        gpu_cluster.address,
        "--tracking-uri",
        mlflow_server.uri,
        "--storage",
        str(storage),
        "--json",
        env=gpu_cluster.client_env,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: resources.gpus_per_trial: 3 GPUs per trial, but no node of the cluster has more than 2"], result.stderr[
        -3000:
    ]
    assert "Traceback" not in result.stderr and result.stdout == ""
    # Nothing started: no sweep folder, no MLflow experiment or run.
    assert not storage.exists() or not any(storage.iterdir())
    client = MlflowClient(mlflow_server.uri)
    assert client.get_experiment_by_name("too-many-gpus") is None


@pytest.mark.slow  # a Ray node with logical GPUs
def test_four_half_gpu_trials_share_two_gpus_at_once_and_fall_back_to_the_cpu(gpu_cluster, mlflow_server, run_cli, tmp_path):
    from mlflow.tracking import MlflowClient

    space = write_space(tmp_path / "space.yaml", "half-gpus", gpus_per_trial=0.5)
    result = run_cli(
        "sweep",
        str(space),
        "--address",
        gpu_cluster.address,
        "--tracking-uri",
        mlflow_server.uri,
        "--storage",
        str(tmp_path / "ray_results"),
        "--json",
        check_exit=0,
        env=gpu_cluster.client_env,
    )
    report = json.loads(result.stdout)
    assert len(report["trials"]) == 4
    assert all(t["status"] == "completed" for t in report["trials"]), report["trials"]

    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("half-gpus")
    children = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'trial'")
    assert len(children) == 4
    gpu_ids = []
    for run in children:
        assert run.data.tags[STATUS_TAG] == "completed" and run.info.status == "FINISHED"
        params = run.data.params
        # Each trial saw the GPU Ray gave it, in CUDA_VISIBLE_DEVICES too, and trained on the CPU.
        assert params["ray_gpu_ids"] in ("0", "1"), params
        assert params["device"] == "auto"
        assert params["device_warning"] == FALLBACK.format(params["ray_gpu_ids"])
        assert run.data.metrics["test_mae_meV"] > 0
        gpu_ids.append(params["ray_gpu_ids"])
    assert sorted(gpu_ids) == ["0", "0", "1", "1"]  # half a GPU each: both GPUs, two trials on each

    # More than two trials ran at the same time (each trial's run is open from its start to its
    # end), which only half-GPU sharing allows: with a whole GPU each, the third trial could start
    # only once one of the first two had ended. The third start is asked to precede the first
    # end, not the fourth: Ray starts workers one after another, so the fourth start is the one a
    # loaded machine can push past the quickest trial's end, while the behaviour is the same.
    starts = sorted(run.info.start_time for run in children)
    ends = [run.info.end_time for run in children]
    assert starts[2] < min(ends), sorted((run.info.start_time, run.info.end_time) for run in children)

    # The fallback warning was given once per trial, in the trial workers' logs (one worker each).
    logs = Path(gpu_cluster.temp_dir, "session_latest", "logs")
    warned = sum(path.read_text(errors="replace").count(FALLBACK.format("")[:40]) for path in logs.glob("worker-*.err"))
    assert warned == 4
