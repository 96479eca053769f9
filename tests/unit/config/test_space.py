"""Search spaces: the shipped ones validate, bad ones fail in one line, Optuna's space is right."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml

from study.config.space import OptunaSpace, load_search_space, trial_overrides
from study.config.trial import ConfigError
from study.tracking.store import redact

SPACES = Path(__file__).resolve().parents[3] / "search_spaces"
GOOD = {
    "name": "t",
    "trial": {"hidden_dim": 4},
    "search": {"method": "optuna", "num_samples": 2, "params": {"l_values": {"subsets_of": [0, 1, 2]}}},
}


@pytest.mark.parametrize(
    "name, trials", [("quick", 20), ("paper", 36), ("lsubsets", 120), ("ablation", 40), ("tradeoff", 20), ("pruning", 20)]
)
def test_shipped_spaces_validate(name, trials):
    space = load_search_space(SPACES / f"{name}.yaml")
    assert space.name == name and space.total_trials == trials


def test_every_shipped_space_is_tested():
    tested = {"quick", "paper", "lsubsets", "ablation", "tradeoff", "pruning"}
    assert {path.stem for path in SPACES.glob("*.yaml")} == tested


def test_the_pruning_space_is_the_papers_contrast_as_a_2x2_factorial():
    import pandas as pd

    from analysis.stats.factorial import factorial_design

    space = load_search_space(SPACES / "pruning.yaml")
    l_sets = [",".join(map(str, entry["l_values"])) for entry in space.search.grid]
    assert sorted(l_sets) == ["0,1,2,3,4,5,6", "0,1,3,4,5,6", "0,2,3,4,5,6", "0,3,4,5,6"]
    assert space.scheduler.type == "none" and len(space.seeds) == 5  # every seed trains the full budget
    trials = pd.DataFrame([{"configuration": v, "l_values": v, "seed": s} for v in l_sets for s in space.seeds])
    design = factorial_design(trials, [])
    assert design.factors == (1, 2) and design.fixed == (0, 3, 4, 5, 6)


def with_change(path: str, value):
    """GOOD with one key (dotted path) replaced; value None deletes it."""
    data = yaml.safe_load(yaml.safe_dump(GOOD))
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node.setdefault(key, {})
    if value is None:
        node.pop(last, None)
    else:
        node[last] = value
    return data


BAD = [
    ("colour", "blue", "colour: unknown key"),
    ("name", "has space", "name: String should match pattern"),
    ("search.method", "bayes", "search.method: Input should be 'optuna' or 'grid'"),
    ("search.num_samples", 0, "search.num_samples: Input should be greater than 0"),
    ("search.params", {}, "needs at least one dimension"),
    ("search.params.l_values", {"subsets_of": [1, 2]}, "subsets_of must hold 0"),
    ("search.params.l_values", {"lmax": [11]}, "lmax values must lie within 0..10"),
    ("search.params.l_values", {"uniform": [0, 2]}, "use subsets_of, lmax or choice"),
    ("search.params.hidden_dim", {"choice": [8, -1]}, "search.params.hidden_dim: value -1: hidden_dim: Input should be greater than 0"),
    ("search.params.hidden_dim", {"choice": [8], "randint": [1, 2]}, "give exactly one of"),
    ("search.params.lr", {"loguniform": [0, 1]}, "loguniform bounds must be positive"),
    ("search.params.depth", {"randint": [1, 3]}, "search.params.depth: not a trial config field"),
    ("search.params.seed", {"choice": [1, 2]}, "list seeds under `seeds`"),
    # Left out of a configuration: searched, their trials would be merged as seeds of one.
    ("search.params.backend", {"choice": ["fast", "e3nn"]}, "search.params.backend: how a trial is computed"),
    ("search.params.device", {"choice": ["cpu", "cuda"]}, "search.params.device: how a trial is computed"),
    ("search.grid", [{"l_values": [0]}], "search.grid is only read with method: grid"),
    ("trial.l_values", [0, 0], "trial.l_values: l value 0 repeated"),
    ("trial.target", "energy", "trial.target"),
    ("seeds", [1, 1], "seeds repeat a value"),
    ("resources.cpus_per_trial", 0, "resources.cpus_per_trial: Input should be greater than 0"),
    ("scheduler.type", "hyperband", "scheduler.type"),
]


@pytest.mark.parametrize("path, value, message", BAD, ids=[b[0] + ":" + str(b[1])[:20] for b in BAD])
def test_bad_spaces_fail_in_one_line_naming_file_and_field(tmp_path, path, value, message):
    file = tmp_path / "space.yaml"
    file.write_text(yaml.safe_dump(with_change(path, value)))
    with pytest.raises(ConfigError) as error:
        load_search_space(file)
    text = str(error.value)
    assert text.startswith(f"{file}: ") and message in text and "\n" not in text


def test_a_grid_may_not_vary_a_bookkeeping_field(tmp_path):
    file = tmp_path / "space.yaml"
    file.write_text(yaml.safe_dump({"name": "g", "search": {"method": "grid", "grid": [{"l_values": [0], "compile": True}]}}))
    with pytest.raises(ConfigError, match=r"search.grid\[0\].compile: how a trial is computed"):
        load_search_space(file)


def test_grid_without_entries_and_missing_search(tmp_path):
    file = tmp_path / "space.yaml"
    file.write_text(yaml.safe_dump({"name": "g", "search": {"method": "grid"}}))
    with pytest.raises(ConfigError, match="grid search needs at least one configuration"):
        load_search_space(file)
    file.write_text(yaml.safe_dump({"name": "g"}))
    with pytest.raises(ConfigError, match="search: Field required"):
        load_search_space(file)


def test_cli_sweep_refuses_a_bad_space_before_starting_anything(run_cli, tmp_path):
    file = tmp_path / "space.yaml"
    file.write_text(yaml.safe_dump(with_change("search.params.l_values", {"subsets_of": [0, 11]})))
    result = run_cli("sweep", str(file))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "within 0..10" in result.stderr
    assert not (tmp_path / "ray_results").exists() and not (tmp_path / "mlflow.db").exists()


def test_optuna_space_keeps_0_and_makes_l_flags_conditional_on_lmax(tmp_path):
    file = tmp_path / "space.yaml"
    file.write_text(
        yaml.safe_dump(
            with_change(
                "search.params",
                {
                    "l_values": {"lmax": [2, 4]},
                    "hidden_dim": {"choice": [4, 8]},
                    "lr": {"loguniform": [1e-4, 1e-2]},
                },
            )
        )
    )
    space = load_search_space(file)
    define = OptunaSpace(space.search)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(40):
        trial = study.ask()
        constants = define(trial)
        l_values = [int(l) for l in constants["l_values"].split(",")]
        lmax = trial.params["lmax"]
        assert l_values[0] == 0 and l_values[-1] == lmax
        assert {k for k in trial.params if k.startswith("use_l")} == {f"use_l{l}" for l in range(1, lmax)}
        config = space.trial_config(trial_overrides({**trial.params, **constants}), seed=7)
        assert list(config.l_values) == l_values and config.seed == 7 and config.hidden_dim in (4, 8)
        assert 1e-4 <= config.lr <= 1e-2
        seen.add(constants["l_values"])
        study.tell(trial, 1.0)
    assert len(seen) > 4  # the space is really explored


def test_credentials_never_leave_the_uri():
    assert redact("http://alice:secret@mlflow.example:5000/x") == "http://mlflow.example:5000/x"
    assert redact("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"
