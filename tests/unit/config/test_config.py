"""Trial configs: valid YAML round-trips; every kind of bad input fails early, in one line, naming file and field."""

from __future__ import annotations

import pytest

from study.config.trial import ConfigError, TrialConfig, load_trial_config


def write(tmp_path, text: str):
    path = tmp_path / "trial.yaml"
    path.write_text(text)
    return path


def test_defaults_are_the_reference_setup():
    config = TrialConfig()
    assert config.l_values == (0, 1, 2)
    assert (config.atom_dim, config.edge_dim, config.cutoff) == (64, 20, 6.0)
    # The reference's literal constant (docs/science.md calls it sqrt(37); it differs in the 6th digit).
    assert config.degree_norm == 6.08275253
    assert config.split_fractions == (0.8, 0.1, 0.1) and config.split_seed == 21616
    assert (config.lr, config.weight_decay, config.target) == (1e-3, 0.0, "U0_atom")


def test_yaml_and_overrides(tmp_path):
    path = write(tmp_path, "l_values: [0, 6, 3, 4, 5]\nhidden_dim: 16\n")
    config = load_trial_config(path, ["hidden_dim=8", "l_values=0,1,2,10", "edges=radius"])
    assert config.l_values == (0, 1, 2, 10)
    assert config.hidden_dim == 8 and config.edges == "radius"
    assert load_trial_config(path).l_values == (0, 3, 4, 5, 6)


def test_flat_params_and_yaml_round_trip(tmp_path):
    config = TrialConfig(l_values=[0, 3, 4, 5, 6], hidden_dim=16, subset=500)
    params = config.flat_params()
    assert params["l_values"] == "0,3,4,5,6" and params["hidden_dim"] == "16" and params["seed"] == "21616"
    # MLflow params come back as strings; they must rebuild the same config.
    rebuilt = TrialConfig.model_validate({k: (None if v == "" else v) for k, v in params.items()})
    assert rebuilt == config
    path = write(tmp_path, config.to_yaml())
    assert load_trial_config(path) == config


BAD_INPUTS = [
    ("l_values: [0, -1, 2]", "l_values", "out of range"),
    ("l_values: [0, 1, 11]", "l_values", "out of range"),
    ("l_values: [0, 1, 1]", "l_values", "repeated"),
    ("l_values: [1, 2]", "l_values", "include 0"),
    ("l_values: [0, 1.5]", "l_values", "integer"),
    ("hidden_dim: 0", "hidden_dim", "greater than 0"),
    ("batch_size: -32", "batch_size", "greater than 0"),
    ("epochs: 0", "epochs", "greater than 0"),
    ("subset: -5", "subset", "greater than 0"),
    ("lr: 0", "lr", "greater than 0"),
    ("target: U0_atomization", "target", "unknown target"),
    ("hiden_dim: 16", "hiden_dim", "unknown key"),
    ("train_fraction: 0.9\nval_fraction: 0.1\ntest_fraction: 0.1", "(top level)", "must be <= 1"),
    ("hidden_dim: sixteen", "hidden_dim", "integer"),
    ("edges: knn", "edges", "'bonds' or 'radius'"),
    ("train_size: 100", "(top level)", "all of train_size"),
]


@pytest.mark.parametrize("text, field, fragment", BAD_INPUTS, ids=[b[0].split(":")[0] + b[0][-4:] for b in BAD_INPUTS])
def test_bad_input_names_file_and_field(tmp_path, text, field, fragment):
    path = write(tmp_path, text + "\n")
    with pytest.raises(ConfigError) as info:
        load_trial_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: {field}: "), message
    assert fragment in message


def test_bad_override_is_named_as_such(tmp_path):
    path = write(tmp_path, "hidden_dim: 8\n")
    with pytest.raises(ConfigError, match=r"^--set: hidden_dim: .*greater than 0"):
        load_trial_config(path, ["hidden_dim=0"])
    with pytest.raises(ConfigError, match=r"^--set hidden_dim: expected key=value"):
        load_trial_config(path, ["hidden_dim"])


def test_malformed_and_missing_files(tmp_path):
    with pytest.raises(ConfigError, match=r"invalid YAML at line 2"):
        load_trial_config(write(tmp_path, "l_values: [0, 1\nhidden_dim: 8\n"))
    with pytest.raises(ConfigError, match=r"expected a mapping"):
        load_trial_config(write(tmp_path, "- 0\n- 1\n"))
    with pytest.raises(ConfigError, match=r"nope.yaml: file not found"):
        load_trial_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "text, fragment",
    [("l_values: [0, 1, 1]\n", "l_values: l value 1 repeated"), ("colour: blue\n", "colour: unknown key")],
)
def test_cli_bad_config_exits_2_with_one_line(run_cli, tmp_path, text, fragment):
    path = write(tmp_path, text)
    result = run_cli("train", str(path), check_exit=2)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(path) in lines[0] and fragment in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()  # nothing started, nothing written


def test_cli_debug_shows_traceback(run_cli, tmp_path):
    path = write(tmp_path, "l_values: [1]\n")
    result = run_cli("--debug", "train", str(path))
    assert result.returncode != 0 and "Traceback" in result.stderr
