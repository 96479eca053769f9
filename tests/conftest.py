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


@pytest.fixture
def run_cli_in_process(qm9, qm9_cache_dir, tmp_path, capsys):
    """Run `irrep-study` as `main()` in this process, in a temp working folder: what `run_cli` does,
    without the subprocess's 5 s of imports. For commands that refuse before starting anything (no
    Ray, no server): the environment, the working folder, torch's thread count and the global
    options are restored afterwards."""
    import torch

    from study.cli import main
    from study.cli.app import OPTIONS

    def run(*args: str, check_exit: int | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
        saved_env, saved_threads = dict(os.environ), torch.get_num_threads()
        capsys.readouterr()  # what came before is not this command's output
        with pytest.MonkeyPatch.context() as patch:
            patch.chdir(tmp_path)
            patch.setattr(sys, "argv", ["irrep-study", *args])
            os.environ.update({"IRREP_STUDY_CACHE": str(qm9_cache_dir), **(env or {})})
            try:
                main()
                code = 0
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
            finally:
                os.environ.clear()
                os.environ.update(saved_env)
                torch.set_num_threads(saved_threads)
                OPTIONS.debug = OPTIONS.verbose = False
        out = capsys.readouterr()
        if check_exit is not None:
            assert code == check_exit, out.err
        return subprocess.CompletedProcess(["irrep-study", *args], code, out.out, out.err)

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
