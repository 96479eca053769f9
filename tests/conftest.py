"""Shared fixtures: the full QM9 set is processed once per test session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from study.data.qm9 import load_qm9


@pytest.fixture(scope="session")
def qm9_cache_dir(tmp_path_factory) -> Path:
    # IRREP_STUDY_CACHE lets a developer reuse a processed cache between sessions;
    # CI starts empty and processes QM9 once here.
    preset = os.environ.get("IRREP_STUDY_CACHE")
    return Path(preset) if preset else tmp_path_factory.mktemp("qm9-cache")


@pytest.fixture(scope="session")
def qm9(qm9_cache_dir):
    return load_qm9(qm9_cache_dir)


@pytest.fixture
def run_cli(qm9, qm9_cache_dir, tmp_path):
    """Run the real `irrep-study` entry point in a subprocess, in a temp working folder."""

    def run(*args: str, check_exit: int | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
        env = {**os.environ, "IRREP_STUDY_CACHE": str(qm9_cache_dir), **(env or {})}
        result = subprocess.run(
            [sys.executable, "-m", "study.cli", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if check_exit is not None:
            assert result.returncode == check_exit, result.stderr
        return result

    return run


@pytest.fixture(scope="session")
def logged_study(qm9, tmp_path_factory):
    """Tiny real trials (and two that never finished) logged to a real SQLite MLflow store as one sweep."""
    from tests.helpers.mlflow_trials import ANALYSIS_TRIALS, make_logged_study

    root = tmp_path_factory.mktemp("mlflow-study")
    return make_logged_study(root, qm9, ANALYSIS_TRIALS, unfinished=("stopped_early", "failed"))


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` with a SQLite store on 127.0.0.1, one per test module (a server, not
    a SQLite file, because concurrent trials write at the same time)."""
    from tests.helpers.services import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    yield server
    server.stop()


@pytest.fixture
def one_torch_thread_per_test():
    """A test module's `pytestmark = pytest.mark.usefixtures("one_torch_thread_per_test")` runs its
    tests with one torch thread."""
    from tests.helpers.mlflow_trials import one_torch_thread

    with one_torch_thread():
        yield
