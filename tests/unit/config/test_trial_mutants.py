"""Trial configs (study/config/trial.py): the guarantees the other tests left unpinned, written to
kill the mutants that survived them (docs/mutation.md)."""

from __future__ import annotations

import pydantic
import pytest
import yaml

from study.config.trial import (
    MAX_SEED,
    ConfigError,
    TrialConfig,
    _first_error,
    _safe_load,
    load_trial_config,
    parse_overrides,
    read_yaml,
    show_key,
)


def write(tmp_path, text: str, name: str = "trial.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def refusal(tmp_path, text: str) -> str:
    """The one-line ConfigError that loading `text` as a trial config raises, without the file's name."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_trial_config(path)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    return message.removeprefix(f"{path}: ")


# ---------------------------------------------------------------------------- l values


@pytest.mark.parametrize(
    "value, expected",
    [
        ("0,1,2", (0, 1, 2)),
        ("[0, 2]", (0, 2)),
        ("(2,0)", (0, 2)),
        (" 0 , 3 ,", (0, 3)),  # blanks around parts and a trailing comma are ignored
        ("0,,4", (0, 4)),
        ("0", (0,)),
        (0, (0,)),  # one order alone: `--set l_values=0` is YAML's integer 0
        ([3, 0], (0, 3)),
        ((0, 1), (0, 1)),
    ],
)
def test_l_values_come_as_comma_strings_single_integers_or_lists(value, expected):
    assert TrialConfig(l_values=value).l_values == expected


@pytest.mark.parametrize(
    "value, message",
    [
        ("0,x", "l values must be integers, got '0,x'"),
        ("0,1.5", "l values must be integers, got '0,1.5'"),
        (True, "l values must be a list of integers, got True"),
        (1.0, "l values must be a list of integers, got 1.0"),
        ({"a": 0}, "l values must be a list of integers, got {'a': 0}"),
        ([0, True], "l values must be integers, got [0, True]"),
        ([0, 1.0], "l values must be integers, got [0, 1.0]"),
        ((0, "1"), "l values must be integers, got [0, '1']"),
        ("", "l values must not be empty"),
    ],
)
def test_l_values_that_are_not_integers_are_refused_by_name(value, message):
    with pytest.raises(pydantic.ValidationError) as error:
        TrialConfig(l_values=value)
    field, text = _first_error(error.value)
    assert field == "l_values" and text.startswith(message)


def test_the_target_must_be_a_qm9_target():
    with pytest.raises(pydantic.ValidationError) as error:
        TrialConfig(target="u0_atom")
    field, message = _first_error(error.value)
    assert field == "target" and message.startswith("unknown target 'u0_atom'; choose one of mu, alpha, homo,")
    assert message.endswith(", A, B, C")
    assert TrialConfig(target="gap").target == "gap"


# ---------------------------------------------------------------------------- the split


def test_fractions_may_add_up_to_1_but_not_more():
    assert TrialConfig(train_fraction=0.7, val_fraction=0.2, test_fraction=0.1).split_fractions == (0.7, 0.2, 0.1)
    assert TrialConfig(train_fraction=1.0, val_fraction=0.0, test_fraction=0.0).split_fractions == (1.0, 0.0, 0.0)
    with pytest.raises(pydantic.ValidationError) as error:
        TrialConfig(train_fraction=0.8, val_fraction=0.15, test_fraction=0.1)
    assert _first_error(error.value) == ("(top level)", "train_fraction + val_fraction + test_fraction = 1.05 must be <= 1")
    with pytest.raises(pydantic.ValidationError):
        TrialConfig(train_fraction=0.8, val_fraction=0.1, test_fraction=0.1 + 1e-6)


@pytest.mark.parametrize("given", [{"val_size": 5}, {"test_size": 5}, {"train_size": 5, "val_size": 5}, {"val_size": 5, "test_size": 5}])
def test_split_sizes_are_all_given_or_none(given):
    with pytest.raises(pydantic.ValidationError) as error:
        TrialConfig(**given)
    assert _first_error(error.value) == ("(top level)", "give all of train_size, val_size and test_size, or none of them")


def test_split_sizes_replace_the_fractions_and_must_fit_in_the_subset():
    assert TrialConfig().split_sizes is None
    config = TrialConfig(train_size=6, val_size=3, test_size=1, subset=10)  # exactly the subset
    assert config.split_sizes == (6, 3, 1)
    assert TrialConfig(train_size=60, val_size=3, test_size=1).split_sizes == (60, 3, 1)  # no subset: the whole data set
    with pytest.raises(pydantic.ValidationError) as error:
        TrialConfig(train_size=6, val_size=3, test_size=2, subset=10)
    assert _first_error(error.value) == ("(top level)", "train_size + val_size + test_size = 11 exceeds subset = 10")


def test_a_target_normalisation_is_given_whole_and_with_the_mean_reference_only():
    both = "give both target_mean and target_std, or neither"
    for given in ({"target_mean": -76.0}, {"target_std": 10.0}):
        with pytest.raises(pydantic.ValidationError) as error:
            TrialConfig(target_reference="mean", **given)
        assert _first_error(error.value) == ("(top level)", both)
    with pytest.raises(pydantic.ValidationError) as error:
        TrialConfig(target_mean=-76.0, target_std=10.0)
    assert _first_error(error.value) == ("(top level)", "target_mean and target_std apply to target_reference: mean only")
    config = TrialConfig(target_reference="mean", target_mean=-76.116, target_std=10.3238)
    assert (config.target_mean, config.target_std) == (-76.116, 10.3238)


def test_seeds_are_ones_numpy_and_torch_take():
    assert TrialConfig(seed=MAX_SEED, split_seed=0).seed == 2**32 - 1
    for field in ("seed", "split_seed"):
        with pytest.raises(pydantic.ValidationError):
            TrialConfig(**{field: 2**32})
        with pytest.raises(pydantic.ValidationError):
            TrialConfig(**{field: -1})


def test_an_assignment_is_validated_too():
    config = TrialConfig()
    with pytest.raises(pydantic.ValidationError):
        config.hidden_dim = 0
    config.l_values = "0,2"
    assert config.l_values == (0, 2)


# ---------------------------------------------------------------------------- params and YAML


def test_flat_params_are_strings_with_none_as_empty_and_l_values_as_a_comma_list():
    params = TrialConfig(l_values=[0, 2], subset=100, compile=True).flat_params()
    assert list(params) == list(TrialConfig.model_fields)
    assert params["l_values"] == "0,2" and params["subset"] == "100" and params["train_size"] == ""
    assert params["compile"] == "True" and params["lr"] == "0.001" and params["target_mean"] == ""
    assert all(isinstance(v, str) for v in params.values())


def test_to_yaml_writes_every_field_in_order_with_l_values_as_a_list():
    text = TrialConfig(l_values=(0, 3)).to_yaml()
    data = yaml.safe_load(text)
    assert list(data) == list(TrialConfig.model_fields)
    assert data["l_values"] == [0, 3] and "!!python" not in text
    assert text.startswith("l_values:\n- 0\n- 3\nhidden_dim: 32\n")


# ---------------------------------------------------------------------------- one-line errors


def test_show_key_quotes_only_what_would_break_the_line():
    assert show_key("hidden_dim") == "hidden_dim"
    assert show_key(3) == "3"
    assert show_key("a b") == "a b"
    assert show_key("a\nb") == "'a\\nb'"
    assert show_key("\x00") == "'\\x00'"


def test_the_first_error_names_its_nested_field_and_says_unknown_key():
    class Inner(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid")
        x: int = 0

    class Outer(pydantic.BaseModel):
        inner: list[Inner]

    with pytest.raises(pydantic.ValidationError) as error:
        Outer(inner=[{}, {"x": 1, "a\nb": 2}])
    assert _first_error(error.value) == ("inner.1.'a\\nb'", "unknown key")
    with pytest.raises(pydantic.ValidationError) as error:
        Outer(inner=[{"x": "many"}])
    assert _first_error(error.value) == ("inner.0.x", "Input should be a valid integer, unable to parse string as an integer")


def test_the_first_error_keeps_one_line_of_a_validators_message():
    class Model(pydantic.BaseModel):
        x: int = 0

        @pydantic.field_validator("x")
        @classmethod
        def _check(cls, value):
            raise ValueError({"": "first line\nsecond line", "empty": ""}[("", "empty")[value]])

    with pytest.raises(pydantic.ValidationError) as error:
        Model(x=0)
    assert _first_error(error.value) == ("x", "first line")
    with pytest.raises(pydantic.ValidationError) as error:
        Model(x=1)
    assert _first_error(error.value) == ("x", "invalid value")


def test_safe_load_turns_what_pyyaml_lets_escape_into_one_line_value_errors():
    with pytest.raises(ValueError, match="^nested too deeply$"):
        _safe_load("[" * 1000)
    with pytest.raises(ValueError, match="^month must be in 1..12$"):
        _safe_load("2001-13-01")
    with pytest.raises(yaml.YAMLError):
        _safe_load("a: [1")
    assert _safe_load("a: [1, 2]") == {"a": [1, 2]}


def test_read_yaml_refuses_unreadable_files_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match=rf"^{tmp_path / 'nope.yaml'}: file not found$"):
        read_yaml(tmp_path / "nope.yaml")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"a: 1\n\xff")
    with pytest.raises(ConfigError, match=rf"^{binary}: not a UTF-8 text file \(byte 5\)$"):
        read_yaml(binary)
    with pytest.raises(ConfigError, match=rf"^{tmp_path}: cannot read \(Is a directory\)$"):
        read_yaml(tmp_path)


def test_an_os_error_without_a_reason_is_named_by_its_type(tmp_path, monkeypatch):
    path = write(tmp_path, "a: 1\n")

    def unreadable(self, encoding=None):
        raise PermissionError()

    monkeypatch.setattr(type(path), "read_text", unreadable)
    with pytest.raises(ConfigError, match=rf"^{path}: cannot read \(PermissionError\)$"):
        read_yaml(path)


def test_a_value_error_pyyaml_raises_without_a_message_is_an_invalid_value(monkeypatch):
    def failing(text):
        raise ValueError()

    monkeypatch.setattr(yaml, "safe_load", failing)
    with pytest.raises(ValueError, match="^invalid value$"):
        _safe_load("a: 1")


def test_read_yaml_says_where_the_yaml_is_broken(tmp_path):
    path = write(tmp_path, "a: 1\nb: [1\nc: 2\n")
    with pytest.raises(ConfigError) as error:
        read_yaml(path)
    # The flow list opened on line 2 meets `c:` on line 3 (PyYAML counts lines from 0).
    assert str(error.value) == f"{path}: invalid YAML at line 3: expected ',' or ']', but got ':'"
    # PyYAML's reader refuses control characters with an error that has no line and no problem.
    path = write(tmp_path, "a: \x07\n")
    with pytest.raises(ConfigError, match=rf"^{path}: invalid YAML: parse error$"):
        read_yaml(path)
    # A scanner error without a problem mark names no line.
    path = write(tmp_path, "a: 2001-13-01\n")
    with pytest.raises(ConfigError, match=rf"^{path}: invalid YAML: month must be in 1..12$"):
        read_yaml(path)
    path = write(tmp_path, "[" * 1000)
    with pytest.raises(ConfigError, match=rf"^{path}: invalid YAML: nested too deeply$"):
        read_yaml(path)


def test_read_yaml_takes_an_empty_file_as_no_keys_and_refuses_a_list(tmp_path):
    assert read_yaml(write(tmp_path, "")) == {}
    assert read_yaml(write(tmp_path, "# nothing\n")) == {}
    assert read_yaml(str(write(tmp_path, "a: 1\n"))) == {"a": 1}  # a string path too
    for text in ("- 1\n", "3\n", "text\n"):
        with pytest.raises(ConfigError, match="expected a mapping of keys to values at the top level$"):
            read_yaml(write(tmp_path, text))
    assert load_trial_config(write(tmp_path, "")) == TrialConfig()


# ---------------------------------------------------------------------------- --set overrides


def test_overrides_are_yaml_values_after_the_first_equals_sign():
    assert parse_overrides([" hidden_dim =16", "l_values=[0, 2]", "target=U0", "lr=1.0e-3", "subset=", "target_mean=  "]) == {
        "hidden_dim": 16,
        "l_values": [0, 2],
        "target": "U0",
        "lr": 1e-3,
        "subset": None,
        "target_mean": None,
    }
    assert parse_overrides(["name=a=b"]) == {"name": "a=b"}
    # Blanks of any kind unset a field; a tab alone would not even be valid YAML.
    assert parse_overrides(["subset=\t", "target_mean=\xa0"]) == {"subset": None, "target_mean": None}
    assert parse_overrides([]) == {}


@pytest.mark.parametrize("item", ["hidden_dim", "=3", " =3", ""])
def test_an_override_needs_a_key_and_an_equals_sign(item):
    with pytest.raises(ConfigError, match=f"^--set {item}: expected key=value$"):
        parse_overrides([item])


@pytest.mark.parametrize("item", ["l_values=[0, 1", "seed=2001-13-01", "a=" + "[" * 1000])
def test_an_override_that_is_not_yaml_is_refused_in_one_line(item):
    with pytest.raises(ConfigError) as error:
        parse_overrides([item])
    assert str(error.value) == f"--set {item}: value is not valid YAML"


def test_an_override_key_that_would_break_the_line_is_quoted():
    with pytest.raises(ConfigError, match=r"^--set 'a\\nb': expected key=value$"):
        parse_overrides(["a\nb"])


def test_an_error_names_the_override_or_the_file_it_comes_from(tmp_path):
    path = write(tmp_path, "hidden_dim: 0\nlr: 0.01\n")
    with pytest.raises(ConfigError, match=rf"^{path}: hidden_dim: Input should be greater than 0$"):
        load_trial_config(path, ["lr=0.1"])
    with pytest.raises(ConfigError, match=r"^--set: lr: Input should be greater than 0$"):
        load_trial_config(write(tmp_path, "lr: 0.01\n"), ["lr=0"])
    with pytest.raises(ConfigError, match=r"^config: \(top level\): give all of train_size"):
        load_trial_config(None, ["train_size=5"])
    with pytest.raises(ConfigError, match=r"^--set: colour: unknown key$"):
        load_trial_config(None, ["colour=blue"])
    assert load_trial_config(None) == TrialConfig()
    assert load_trial_config(None, ["hidden_dim=8"]).hidden_dim == 8


def test_an_error_in_an_override_names_the_override_whatever_its_key(tmp_path):
    # The message shows `a.b` and a quoted "a\\nb": still the keys of --set, not of the file.
    path = write(tmp_path, "lr: 0.01\n")
    with pytest.raises(ConfigError, match=r"^--set: a\.b: unknown key$"):
        load_trial_config(path, ["a.b=1"])
    with pytest.raises(ConfigError, match=r"^--set: 'a\\nb': unknown key$"):
        load_trial_config(path, ["a\nb=1"])
    with pytest.raises(ConfigError, match=rf"^{path}: a\.b: unknown key$"):
        load_trial_config(write(tmp_path, "a.b: 1\n"), ["lr=0.1"])
