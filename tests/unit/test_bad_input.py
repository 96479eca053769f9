"""The bad-input table: each bad input gets one line naming the problem and the file or field,
exit code 2, no traceback, and leaves everything already written as it was."""

from __future__ import annotations

import errno
import hashlib
from pathlib import Path

import pytest
import yaml

from study.errors import UserError
from tests.helpers.services import empty_mlflow_store, free_port

GOOD_TRIAL = {"l_values": [0, 1], "hidden_dim": 4, "num_layers": 1, "subset": 300, "epochs": 1}
GOOD_SPACE = {
    "name": "bad-input",
    "trial": GOOD_TRIAL,
    "search": {"method": "grid", "grid": [{"l_values": [0]}]},
    "scheduler": {"type": "none"},
}


def trial_file(folder: Path, **changes) -> str:
    path = folder / "trial.yaml"
    path.write_text(yaml.safe_dump({**GOOD_TRIAL, **changes}))
    return str(path)


def space_file(folder: Path, **changes) -> str:
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump({**GOOD_SPACE, **changes}))
    return str(path)


def raw_file(folder: Path, text: str) -> str:
    path = folder / "raw.yaml"
    path.write_text(text)
    return str(path)


def with_tracking_store(folder: Path, *args: str) -> list[str]:
    """`args`, run where an MLflow store already exists: `folder`/mlflow.db (the commands'
    default), holding only MLflow's Default experiment."""
    empty_mlflow_store(folder / "mlflow.db")
    return list(args)


def a_folder(folder: Path) -> str:
    path = folder / "a-folder"
    path.mkdir(exist_ok=True)
    return str(path)


def analysis_folder(folder: Path, repeat_trial: bool = False, stray_score: bool = False) -> str:
    """A minimal analysis folder: two l sets x 3 seeds in trials.csv, one score per trial."""
    import pandas as pd

    path = folder / "analysis"
    path.mkdir(exist_ok=True)
    rows = [
        {
            "run_id": f"r{k}",
            "configuration": f"l={l}",
            "in_comparisons": True,
            "seed": k % 3,
            "l_values": l,
            "hidden_dim": 8,
            "num_params": 100.0,
            "test_mae_meV": 100.0 + k,
        }
        for k, l in enumerate(["0"] * 3 + ["0,1"] * 3)
    ]
    trials = pd.DataFrame(rows)
    if repeat_trial:
        trials = pd.concat([trials, trials.iloc[[0]]])
    trials.to_csv(path / "trials.csv", index=False)
    scores = pd.DataFrame(
        {"run_id": [*trials["run_id"].unique(), *(["stray"] if stray_score else [])], "block": "l0", "score": "norm_share", "value": 0.5}
    )
    scores.to_csv(path / "scores.csv", index=False)
    return str(path)


def corrupt_checkpoint(folder: Path) -> str:
    run = folder / "old-run"
    run.mkdir(exist_ok=True)
    (run / "checkpoint.pt").write_bytes(b"this is not a checkpoint")
    return str(run)


# (id, arguments built from the working folder, words the one-line message must contain)
CASES = [
    ("malformed yaml", lambda d: ["train", raw_file(d, "l_values: [0, 1\n")], ["raw.yaml", "invalid YAML"]),
    ("not a mapping", lambda d: ["train", raw_file(d, "- 1\n- 2\n")], ["raw.yaml", "mapping"]),
    ("missing file", lambda d: ["train", str(d / "nope.yaml")], ["nope.yaml", "not found"]),
    ("unknown key", lambda d: ["train", trial_file(d, colour="blue")], ["trial.yaml", "colour", "unknown key"]),
    ("wrong type", lambda d: ["train", trial_file(d, hidden_dim="big")], ["trial.yaml", "hidden_dim"]),
    ("l out of range", lambda d: ["train", trial_file(d, l_values=[0, 11])], ["l_values", "11", "0..10"]),
    ("negative l", lambda d: ["train", trial_file(d, l_values=[0, -1])], ["l_values", "-1"]),
    ("repeated l", lambda d: ["train", trial_file(d, l_values=[0, 2, 2])], ["l_values", "repeated"]),
    ("l without 0", lambda d: ["train", trial_file(d, l_values=[1, 2])], ["l_values", "include 0"]),
    ("non-positive size", lambda d: ["train", trial_file(d, batch_size=0)], ["batch_size"]),
    ("fractions over 1", lambda d: ["train", trial_file(d, train_fraction=0.9, val_fraction=0.2)], ["fraction"]),
    ("unknown target", lambda d: ["train", trial_file(d, target="energy")], ["target", "energy"]),
    ("bad --set", lambda d: ["train", trial_file(d), "--set", "hidden_dim"], ["--set", "key=value"]),
    ("--set unknown key", lambda d: ["train", trial_file(d), "--set", "depth=3"], ["--set", "depth"]),
    ("unwritable output", lambda d: ["train", trial_file(d), "--out", str(d / "a-file" / "run")], ["a-file"]),
    ("corrupt checkpoint", lambda d: ["train", trial_file(d), "--out", corrupt_checkpoint(d), "--resume"], ["checkpoint.pt", "corrupt"]),
    ("existing run without --resume", lambda d: ["train", trial_file(d), "--out", corrupt_checkpoint(d)], ["--resume"]),
    (
        "empty search space",
        lambda d: ["sweep", space_file(d, search={"method": "optuna", "params": {}})],
        ["space.yaml", "search", "at least one dimension"],
    ),
    (
        "space l without 0",
        lambda d: ["sweep", space_file(d, search={"method": "grid", "grid": [{"l_values": [1]}]})],
        ["space.yaml", "search.grid[0].l_values"],
    ),
    ("space unknown key", lambda d: ["sweep", space_file(d, budget=3)], ["space.yaml", "budget", "unknown key"]),
    (
        "more GPUs than the cluster",
        lambda d: ["sweep", space_file(d, resources={"gpus_per_trial": 1}), "--num-cpus", "1"],
        ["resources.gpus_per_trial"],
    ),
    (
        "unreachable Ray address",
        lambda d: ["sweep", space_file(d), "--address", f"127.0.0.1:{free_port()}"],
        ["--address", "no Ray cluster"],
    ),
    ("malformed Ray address", lambda d: ["sweep", space_file(d), "--address", "nowhere"], ["--address", "host:port"]),
    (
        "resume with nothing to resume",
        lambda d: ["sweep", space_file(d), "--resume", "--num-cpus", "1"],
        ["--resume", "no unfinished sweep"],
    ),
    (
        "Optuna storage Optuna cannot open",
        lambda d: [
            "sweep",
            space_file(d, search={"method": "optuna", "params": {"lr": {"loguniform": [1e-3, 1e-2]}}}),
            "--optuna-storage",
            "nosuchdb://host/optuna",
        ],
        ["--optuna-storage", "nosuchdb://host/optuna", "Optuna cannot open"],
    ),
    (
        "Optuna storage for a grid",
        lambda d: ["sweep", space_file(d), "--optuna-storage", f"sqlite:///{d / 'optuna.db'}"],
        ["--optuna-storage", "grid search"],
    ),
    (
        "Optuna storage on --resume",
        lambda d: [
            "sweep",
            space_file(d, search={"method": "optuna", "params": {"lr": {"loguniform": [1e-3, 1e-2]}}}),
            "--resume",
            "--optuna-storage",
            f"sqlite:///{d / 'optuna.db'}",
        ],
        ["--optuna-storage", "resumed sweep keeps"],
    ),
    (
        "best of a missing experiment",
        lambda d: with_tracking_store(d, "best", "--experiment", "never-ran"),
        ["--experiment", "no experiment named 'never-ran'"],
    ),
    ("best of a study never tracked here", lambda d: ["best", "--experiment", "never-ran"], ["--experiment", "no MLflow store at"]),
    (
        "best with a bad filter",
        lambda d: with_tracking_store(d, "best", "--experiment", "Default", "--where", "params.x ==== 1"),
        ["--where"],
    ),
    ("best --top 0", lambda d: ["best", "--experiment", "Default", "--top", "0"], ["--top"]),
    ("data unknown target", lambda d: ["data", "--target", "energy"], ["--target", "energy"]),
    ("data non-positive subset", lambda d: ["data", "--subset", "0"], ["--subset"]),
    # A model no machine here can hold: refused from its estimate, before it is built.
    (
        "model beyond the free memory",
        lambda d: ["train", trial_file(d), "--set", "hidden_dim=2048", "--set", "l_values=0,1,2,3,4,5,6,7,8"],
        ["train: l_values=", "needs an estimated", "--force"],
    ),
    (
        "sweep whose largest model is beyond the free memory",
        lambda d: [
            "sweep",
            space_file(d, search={"method": "grid", "grid": [{"l_values": [0]}, {"l_values": list(range(9)), "hidden_dim": 2048}]}),
        ],
        ["sweep: ", "trials at once of l_values=[0, 1, 2, 3, 4, 5, 6, 7, 8]", "needs an estimated", "--force"],
    ),
    # Output paths: refused before any training, Ray start, MLflow query or QM9 processing.
    (
        "train --out is a file",
        lambda d: ["train", trial_file(d), "--out", str(d / "a-file")],
        ["--out", "a-file", "exists and is not a folder"],
    ),
    (
        "analyze --out is a file",
        lambda d: ["analyze", "--experiment", "Default", "--out", str(d / "a-file")],
        ["--out", "a-file", "exists and is not a folder"],
    ),
    (
        "analyze --workers 0",
        lambda d: ["analyze", "--experiment", "Default", "--workers", "0"],
        ["--workers", "at least 1", "got 0"],
    ),
    (
        "analyze with both --workers and --address",
        lambda d: ["analyze", "--experiment", "Default", "--workers", "2", "--address", "127.0.0.1:1"],
        ["--workers and --address", "give one"],
    ),
    (
        "analyze --address where no Ray cluster answers",
        lambda d: ["analyze", "--experiment", "Default", "--address", "127.0.0.1:1"],
        ["--address 127.0.0.1:1", "no Ray cluster answers there"],
    ),
    (
        "analyze --out below a file",
        lambda d: ["analyze", "--experiment", "Default", "--out", str(d / "a-file" / "x")],
        ["--out", "a-file", "is a file, not a folder"],
    ),
    (
        "sweep --storage is a file",
        lambda d: ["sweep", space_file(d), "--storage", str(d / "a-file")],
        ["--storage", "a-file", "exists and is not a folder"],
    ),
    (
        "sweep --storage below a file",
        lambda d: ["sweep", space_file(d), "--storage", str(d / "a-file" / "ray")],
        ["--storage", "a-file", "is a file, not a folder"],
    ),
    (
        "best --export is a folder",
        lambda d: ["best", "--experiment", "Default", "--export", a_folder(d)],
        ["--export", "a-folder", "is a folder"],
    ),
    (
        "best --export below a file",
        lambda d: ["best", "--experiment", "Default", "--export", str(d / "a-file" / "best.yaml")],
        ["--export", "a-file", "is a file, not a folder"],
    ),
    (
        "best --export in a missing folder",
        lambda d: ["best", "--experiment", "Default", "--export", str(d / "no" / "best.yaml")],
        ["--export", "does not exist"],
    ),
    ("cache dir is a file", lambda d: ["data", "--cache-dir", str(d / "a-file")], ["--cache-dir", "a-file", "exists and is not a folder"]),
    (
        "train cache dir below a file",
        lambda d: ["train", trial_file(d), "--out", str(d / "run"), "--cache-dir", str(d / "a-file" / "qm9")],
        ["--cache-dir", "a-file", "is a file, not a folder"],
    ),
    (
        "sweep cache dir is a file",
        lambda d: ["sweep", space_file(d), "--cache-dir", str(d / "a-file")],
        ["--cache-dir", "a-file", "exists and is not a folder"],
    ),
    # reanalyze reads an analysis folder's tables: a folder that is not one, or tables that contradict themselves.
    ("reanalyze a missing folder", lambda d: ["reanalyze", str(d / "nope")], ["nope", "not a folder"]),
    ("reanalyze a folder without tables", lambda d: ["reanalyze", a_folder(d)], ["a-folder", "no trials.csv"]),
    (
        "reanalyze --out is a file",
        lambda d: ["reanalyze", analysis_folder(d), "--out", str(d / "a-file")],
        ["--out", "a-file", "exists and is not a folder"],
    ),
    (
        "reanalyze a trial listed twice",
        lambda d: ["reanalyze", analysis_folder(d, repeat_trial=True)],
        ["trials.csv", "2 rows repeat the same run_id", "run_id=r0"],
    ),
    (
        "reanalyze scores of an unknown trial",
        lambda d: ["reanalyze", analysis_folder(d, stray_score=True)],
        ["scores.csv", "not in trials.csv", "stray"],
    ),
]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file (by content) and folder under `folder`: what a refused command must leave as it was."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
        for p in sorted(folder.rglob("*"))
    }


# The cases whose command reaches Ray (it starts or joins one before it can refuse) run the real
# entry point in a subprocess; the others call it in this process (`run_cli_in_process`), which
# saves the 5 s of imports a subprocess pays per case. The exit code, stderr and stdout checked are
# the same; `test_a_cache_folder_from_the_environment_that_is_a_file_is_named` runs a subprocess too.
IN_A_SUBPROCESS = {"more GPUs than the cluster", "unreachable Ray address", "malformed Ray address", "resume with nothing to resume"}


def listing(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` by size and modification time: the QM9 cache's hundreds of MB are
    not hashed for each case, but a file written, replaced or touched shows."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("name, build, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line_with_exit_2_and_changes_nothing(request, monkeypatch, tmp_path, qm9_cache_dir, name, build, words):
    # The default tracking store is ./mlflow.db in the working folder (checked below), not a
    # store named by the developer's environment.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_cli = request.getfixturevalue("run_cli" if name in IN_A_SUBPROCESS else "run_cli_in_process")
    (tmp_path / "a-file").write_text("a file where a folder is expected")
    (tmp_path / "earlier-results.txt").write_text("results of an earlier run")
    args = build(tmp_path)
    before, cache_before = snapshot(tmp_path), listing(qm9_cache_dir)
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    for word in words:
        assert word in errors[0], errors[0]
    # Refused before any work: nothing written before changed, and nothing new was written (no
    # tracking store, no sweep or run folder, no output file).
    assert snapshot(tmp_path) == before
    assert listing(qm9_cache_dir) == cache_before  # nor the QM9 cache the commands read
    assert result.stdout == ""


def test_there_are_at_least_twenty_cases():
    assert len(CASES) >= 20
    assert IN_A_SUBPROCESS <= {c[0] for c in CASES}  # a renamed case would otherwise leave the subprocess silently


def test_a_cache_folder_from_the_environment_that_is_a_file_is_named(run_cli, tmp_path):
    (tmp_path / "a-file").write_text("a file where a folder is expected")
    result = run_cli("data", env={"IRREP_STUDY_CACHE": str(tmp_path / "a-file")})
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "error: IRREP_STUDY_CACHE " in result.stderr and "exists and is not a folder" in result.stderr


def test_unwritable_folders_are_refused_before_any_work(tmp_path, monkeypatch):
    # Tests run as root, where every folder is writable: os.access stands in for the permission bits.
    from study import paths

    (tmp_path / "old").mkdir()
    monkeypatch.setattr(paths.os, "access", lambda path, mode: False)
    with pytest.raises(UserError, match=r"^--out .*old: the folder is not writable$"):
        paths.writable_folder(tmp_path / "old", "--out")
    with pytest.raises(UserError, match=r"^--storage .*new/ray: its parent .*old is not writable$"):
        paths.writable_folder(tmp_path / "old" / "new" / "ray", "--storage")
    with pytest.raises(UserError, match=r"^--export .*best.yaml: folder .*old is not writable$"):
        paths.writable_file(tmp_path / "old" / "best.yaml", "--export")
    monkeypatch.undo()
    assert paths.writable_folder(tmp_path / "old" / "new", "--out") == tmp_path / "old" / "new"
    assert not (tmp_path / "old" / "new").exists()  # checking creates nothing
    assert paths.writable_file(tmp_path / "best.yaml", "--export") == tmp_path / "best.yaml"


def test_a_full_disk_mid_export_keeps_the_old_file_and_names_the_new_one(tmp_path, monkeypatch):
    from study.best import export_config

    target = tmp_path / "best.yaml"
    target.write_text("# the export of an earlier run\n")
    real_write_text = Path.write_text

    def half_then_full(self, text, *args, **kwargs):
        real_write_text(self, text[: len(text) // 2], *args, **kwargs)  # part of it reached the disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", half_then_full)
    row = {"run_id": "abc123", "params": {"l_values": "0,1", "hidden_dim": "8"}}
    with pytest.raises(UserError) as caught:
        export_config(row, target)
    monkeypatch.undo()
    message = str(caught.value)
    assert message == f"--export {target}: cannot write (No space left on device)"
    assert target.read_text() == "# the export of an earlier run\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.yaml"]  # no half-written temporary left


def test_a_full_disk_mid_sweep_state_keeps_the_old_state(tmp_path, monkeypatch):
    from study.config.space import SearchSpace
    from study.tracking import journal

    space = SearchSpace.model_validate(GOOD_SPACE)
    journal.write_state(journal.SweepRecord(tmp_path, "bad-input", "1", "parent"), space, "sqlite:///mlflow.db", finished=False)
    before = (tmp_path / journal.SWEEP_FILE).read_text()

    def full(self, text, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(UserError, match=r"irrep_study_sweep.json: cannot write \(No space left on device\)$"):
        journal.write_state(journal.SweepRecord(tmp_path, "bad-input", "1", "parent"), space, "sqlite:///mlflow.db", finished=True)
    monkeypatch.undo()
    assert (tmp_path / journal.SWEEP_FILE).read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == [journal.SWEEP_FILE]


def test_exporting_a_run_whose_params_todays_config_refuses_is_one_line(tmp_path):
    from study.best import export_config

    row = {"run_id": "old-run", "params": {"l_values": "0,1", "seed": "-5"}}  # seeds are 0..2**32-1 now
    with pytest.raises(UserError, match=r"^--export: run old-run has params that are not a valid trial config \(seed: "):
        export_config(row, tmp_path / "best.yaml")
    assert not (tmp_path / "best.yaml").exists()
