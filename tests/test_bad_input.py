"""The bad-input table: each bad input gets one line naming the problem and the file or field,
exit code 2, no traceback, and leaves everything already written as it was."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from tests.services import free_port

GOOD_TRIAL = {"l_values": [0, 1], "hidden_dim": 4, "num_layers": 1, "subset": 300, "epochs": 1}
GOOD_SPACE = {"name": "bad-input", "trial": GOOD_TRIAL,
              "search": {"method": "grid", "grid": [{"l_values": [0]}]}, "scheduler": {"type": "none"}}


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
    ("corrupt checkpoint", lambda d: ["train", trial_file(d), "--out", corrupt_checkpoint(d), "--resume"],
     ["checkpoint.pt", "corrupt"]),
    ("existing run without --resume", lambda d: ["train", trial_file(d), "--out", corrupt_checkpoint(d)],
     ["--resume"]),
    ("empty search space", lambda d: ["sweep", space_file(d, search={"method": "optuna", "params": {}})],
     ["space.yaml", "search", "at least one dimension"]),
    ("space l without 0", lambda d: ["sweep", space_file(d, search={"method": "grid", "grid": [{"l_values": [1]}]})],
     ["space.yaml", "search.grid[0].l_values"]),
    ("space unknown key", lambda d: ["sweep", space_file(d, budget=3)], ["space.yaml", "budget", "unknown key"]),
    ("more GPUs than the cluster", lambda d: ["sweep", space_file(d, resources={"gpus_per_trial": 1}), "--num-cpus", "1"],
     ["resources.gpus_per_trial"]),
    ("unreachable Ray address", lambda d: ["sweep", space_file(d), "--address", f"127.0.0.1:{free_port()}"],
     ["--address", "no Ray cluster"]),
    ("malformed Ray address", lambda d: ["sweep", space_file(d), "--address", "nowhere"], ["--address", "host:port"]),
    ("resume with nothing to resume", lambda d: ["sweep", space_file(d), "--resume", "--num-cpus", "1"],
     ["--resume", "no unfinished sweep"]),
    ("best of a missing experiment", lambda d: ["best", "--experiment", "never-ran"], ["--experiment", "never-ran"]),
    ("best with a bad filter", lambda d: ["best", "--experiment", "Default", "--where", "params.x ==== 1"], ["--where"]),
    ("best --top 0", lambda d: ["best", "--experiment", "Default", "--top", "0"], ["--top"]),
    ("data unknown target", lambda d: ["data", "--target", "energy"], ["--target", "energy"]),
    ("data non-positive subset", lambda d: ["data", "--subset", "0"], ["--subset"]),
]


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.mark.parametrize("build, words", [(c[1], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line_with_exit_2_and_changes_nothing(run_cli, tmp_path, build, words):
    (tmp_path / "a-file").write_text("a file where a folder is expected")
    (tmp_path / "earlier-results.txt").write_text("results of an earlier run")
    args = build(tmp_path)
    before = snapshot(tmp_path)
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    for word in words:
        assert word in errors[0], errors[0]
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing already written changed
    assert result.stdout == ""


def test_there_are_at_least_twenty_cases():
    assert len(CASES) >= 20
