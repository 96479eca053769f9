"""Property tests of the YAML loaders: whatever a trial config or search space file holds, loading
it returns a validated model or raises ConfigError with one line naming the file, never another
exception (which the CLI would show as a traceback instead of its one-line error and exit code 2)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from study.config.space import SearchSpace, load_search_space
from study.config.trial import ConfigError, TrialConfig, load_trial_config

# tmp_path is shared by the examples of one test: each example overwrites the same file.
PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

TRIAL_FIELDS = sorted(TrialConfig.model_fields)
HUGE = st.sampled_from([2**31, 2**32, 2**63, -(2**63) - 1, 10**30, -(10**30), 10**400])
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-3, max_value=40),
    st.integers(),
    HUGE,
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e-4, 0.1, 0.5, 1.0, 2.5]),
    st.text(max_size=8),
    st.sampled_from(
        [
            "",
            "0,1,2",
            "[0, 2]",
            "0,x",
            "fast",
            "e3nn",
            "U0_atom",
            "radius",
            "mean",
            "cosine",
            "grid",
            "optuna",
            "asha",
            "yes",
            "null",
            "1e-3",
            ".inf",
            "a\nb",
            "a\u2028b",
            "2001-13-01",
        ]
    ),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6) | st.integers(), inner, max_size=3),
    max_leaves=10,
)
ANY = st.one_of(VALUES, st.lists(st.integers(min_value=-2, max_value=12), max_size=6))
# Keys that no model knows, among them keys that are not strings or not printable.
UNKNOWN_KEYS = st.one_of(st.text(min_size=1, max_size=8), st.integers(), st.sampled_from(["a\nb", "colour", "\x00"]))


def _default(name: str):
    value = TrialConfig.model_fields[name].default
    return list(value) if isinstance(value, tuple) else value


def _trial_value(name: str) -> st.SearchStrategy:
    """A field's default (so that some mappings validate) or any value at all."""
    return st.one_of(st.just(_default(name)), ANY)


@st.composite
def _with_unknown_key(draw, mapping: st.SearchStrategy, known: set) -> dict:
    data = draw(mapping)
    if draw(st.integers(min_value=0, max_value=9)) == 0:  # one mapping in ten
        key = draw(UNKNOWN_KEYS.filter(lambda k: k not in known))
        data[key] = draw(VALUES)
    return data


TRIAL_MAPPINGS = _with_unknown_key(
    st.fixed_dictionaries({}, optional={name: _trial_value(name) for name in TRIAL_FIELDS}), set(TRIAL_FIELDS)
)
NUMBER_PAIRS = st.one_of(
    st.tuples(st.floats(allow_nan=True, allow_infinity=True), st.floats(allow_nan=True, allow_infinity=True)).map(list),
    st.tuples(st.integers(min_value=-5, max_value=50), st.integers(min_value=-5, max_value=50)).map(list),
    ANY,
)
L_LISTS = st.one_of(st.lists(st.integers(min_value=-1, max_value=12), max_size=5), ANY)
DIMENSIONS = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "choice": st.lists(ANY, max_size=3) | ANY,
            "uniform": NUMBER_PAIRS,
            "loguniform": NUMBER_PAIRS,
            "randint": NUMBER_PAIRS,
            "subsets_of": L_LISTS,
            "lmax": L_LISTS,
        },
    ),
    VALUES,
)
PARAMS = st.one_of(
    st.dictionaries(st.sampled_from([*TRIAL_FIELDS, "use_l1", "lmax"]) | UNKNOWN_KEYS, DIMENSIONS, max_size=3),
    VALUES,
)
SEARCHES = st.one_of(
    _with_unknown_key(
        st.fixed_dictionaries(
            {},
            optional={
                "method": st.sampled_from(["optuna", "grid"]) | VALUES,
                "sampler": st.sampled_from(["tpe", "random", "cmaes"]) | VALUES,
                "num_samples": ANY,
                "seed": ANY,
                "params": PARAMS,
                "grid": st.lists(TRIAL_MAPPINGS, max_size=3) | VALUES,
            },
        ),
        {"method", "sampler", "num_samples", "seed", "params", "grid"},
    ),
    VALUES,
)
SPACE_KEYS = {"name", "trial", "search", "seeds", "scheduler", "resources"}
SPACES = _with_unknown_key(
    st.fixed_dictionaries(
        {"name": st.sampled_from(["quick", "a b", "", "x" * 101]) | VALUES, "search": SEARCHES},
        optional={
            "trial": TRIAL_MAPPINGS | VALUES,
            "seeds": st.lists(st.integers(min_value=-2, max_value=5) | HUGE, max_size=4) | VALUES,
            "scheduler": st.fixed_dictionaries(
                {}, optional={"type": st.sampled_from(["asha", "none"]) | VALUES, "grace_period": ANY, "reduction_factor": ANY}
            )
            | VALUES,
            "resources": st.fixed_dictionaries(
                {},
                optional={
                    "cpus_per_trial": ANY,
                    "gpus_per_trial": ANY,
                    "max_concurrent": ANY,
                    "max_failures": ANY,
                },
            )
            | VALUES,
        },
    ),
    SPACE_KEYS,
)
# Text close to YAML (brackets, anchors, tags, timestamps, tabs) and arbitrary bytes.
RAW_TEXT = st.one_of(
    st.text(alphabet=st.sampled_from(list("[]{}:,-?!&*|>'\"#%@`\t\n 0123456789.eE+_abcl")), max_size=40),
    st.sampled_from(
        [
            "[" * 600,
            "{a: " * 600,
            "seed: 2001-13-01",
            "seed: 2001-02-30 10:00:00",
            "lr: !!float x",
            "l_values: !!binary AAAA",
            "!!python/object:os.system x",
            "&a [*a]",
            "a: &x 1\nb: *y",
        ]
    ),
    st.text(max_size=30),
)


def _outcome(load, path: Path, model: type) -> str:
    """'valid' or 'refused'; a refusal must be one ConfigError line that names the file."""
    try:
        result = load(path)
    except ConfigError as exc:
        message = str(exc)
        assert len(message.splitlines()) == 1 and message.strip() == message, repr(message)
        assert message.startswith(f"{path}: "), message
        return "refused"
    assert isinstance(result, model)
    return "valid"


def _write(path: Path, data) -> Path:
    # sort_keys=False: a mapping may mix string and integer keys, which cannot be sorted.
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def test_any_trial_config_validates_or_is_refused_in_one_line(tmp_path):
    seen = set()

    @PROPERTY
    @given(TRIAL_MAPPINGS)
    def check(data):
        seen.add(_outcome(load_trial_config, _write(tmp_path / "trial.yaml", data), TrialConfig))

    check()
    assert seen == {"valid", "refused"}  # the strategies reach both sides of the validation


def test_any_search_space_validates_or_is_refused_in_one_line(tmp_path):
    seen = set()

    @PROPERTY
    @given(SPACES)
    def check(data):
        seen.add(_outcome(load_search_space, _write(tmp_path / "space.yaml", data), SearchSpace))

    check()
    assert "refused" in seen  # valid spaces are rare at random; the fixed one below is valid
    valid = {"name": "ok", "search": {"params": {"hidden_dim": {"choice": [4, 8]}}}}
    assert _outcome(load_search_space, _write(tmp_path / "space.yaml", valid), SearchSpace) == "valid"


@PROPERTY
@given(text=RAW_TEXT, raw=st.binary(max_size=30))
def test_any_file_content_is_a_mapping_or_refused_in_one_line(tmp_path, text, raw):
    path = tmp_path / "raw.yaml"
    path.write_text(text, encoding="utf-8")
    _outcome(load_trial_config, path, TrialConfig)
    _outcome(load_search_space, path, SearchSpace)
    path.write_bytes(raw)
    _outcome(load_trial_config, path, TrialConfig)


@PROPERTY
@given(key=st.sampled_from(TRIAL_FIELDS) | UNKNOWN_KEYS.map(str), value=VALUES)
def test_any_set_override_validates_or_is_refused_in_one_line(key, value):
    dumped = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, sort_keys=False)
    item = f"{key}={dumped.strip().removesuffix('...').strip()}"
    try:
        assert isinstance(load_trial_config(None, [item]), TrialConfig)
    except ConfigError as exc:
        assert len(str(exc).splitlines()) == 1, repr(str(exc))


# Inputs that once ended in a traceback (an impossible date, bytes that are not UTF-8, deep
# nesting, a key holding a line break: a two-line message) or were accepted and failed only once
# training ran (an infinite learning rate, a seed beyond NumPy's and torch's range): each one is now
# the CLI's one line and exit code 2, before any work.
CLI_BAD_FILES = {
    "impossible-date.yaml": b"seed: 2001-13-01\n",
    "not-utf8.yaml": b"\xff\xfe l_values: [0]\n",
    "deep.yaml": b"[" * 600,
    "infinite-lr.yaml": b"lr: 1e400\n",
    "newline-key.yaml": b'"a\\nb": 1\n',
    "huge-seed.yaml": b"seed: 100000000000000000000\n",
}


@pytest.mark.parametrize("name", sorted(CLI_BAD_FILES))
def test_the_cli_refuses_a_bad_config_in_one_line(tmp_path, name):
    bad = tmp_path / name
    bad.write_bytes(CLI_BAD_FILES[name])
    result = subprocess.run(
        [sys.executable, "-m", "study.cli", "train", str(bad), "--out", str(tmp_path / "run")],
        cwd=tmp_path,
        env={**os.environ, "IRREP_STUDY_CACHE": str(tmp_path / "no-cache")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}: "), result.stderr
    assert result.stdout == "" and not (tmp_path / "run").exists()
