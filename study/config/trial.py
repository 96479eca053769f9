"""Validated trial configuration, loaded from YAML.

Every field of a trial lives in one flat model so that MLflow params, `--set key=value`
overrides and the YAML file all use the same names (`l_values`, `hidden_dim`, `seed`, ...).
Invalid input raises `ConfigError` with one line that names the file and the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from study.config.lvalues import validate_l_values
from study.config.targets import TARGETS
from study.errors import UserError

# The reference normalisation of the paper (docs/science.md): mean and standard deviation of U0_atom over QM9, in eV.
REFERENCE_U0_ATOM_MEAN = -76.1160
REFERENCE_U0_ATOM_STD = 10.3238


# Fields that choose how the trial's function is evaluated, not which function: a trial resumes
# under other values, and analysis does not tell configurations apart by them.
EXECUTION_FIELDS = ("backend", "compile")
# Seeds go to NumPy's and torch's generators, which take 0 .. 2**32 - 1 (NumPy refuses negative
# seeds and torch overflows on large ones, both only once training starts).
MAX_SEED = 2**32 - 1

# Configs, checkpoints and MLflow params written before these fields existed trained this way.
LEGACY_DEFAULTS = {"target_reference": "mean", "lr_schedule": "constant"}


class ConfigError(UserError):
    """A config file or override that does not validate."""


class TrialConfig(BaseModel):
    """One training run of the reference model. Defaults are the reference setup of the paper (docs/science.md)."""

    # allow_inf_nan=False: YAML's .inf, .nan and 1e400 are refused here, not as a diverged or
    # crashed run (lr: .inf, cutoff: .inf and target_mean: .nan would otherwise validate).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    # model
    l_values: tuple[int, ...] = (0, 1, 2)
    hidden_dim: int = Field(32, gt=0)
    num_layers: int = Field(3, ge=0)
    atom_dim: int = Field(64, gt=0)
    edge_dim: int = Field(20, gt=0)
    cutoff: float = Field(6.0, gt=0, description="radial basis cutoff, and the radius of `radius` edges (Angstrom)")
    degree_norm: float = Field(6.08275253, gt=0)
    # Same function and parameters either way (checkpoints load in both); "fast" is study/nn/fast_tp.py.
    backend: Literal["e3nn", "fast"] = "fast"
    # Train through torch.compile (the same function; falls back to eager with a warning where
    # compilation is unavailable). What it gains is measured in docs/performance.md.
    compile: bool = False
    # data
    target: str = "U0_atom"
    edges: Literal["bonds", "radius"] = "bonds"
    split_seed: int = Field(21616, ge=0, le=MAX_SEED)
    train_fraction: float = Field(0.8, ge=0, le=1)
    val_fraction: float = Field(0.1, ge=0, le=1)
    test_fraction: float = Field(0.1, ge=0, le=1)
    train_size: int | None = Field(None, gt=0, description="absolute split sizes; when given they replace the fractions")
    val_size: int | None = Field(None, gt=0)
    test_size: int | None = Field(None, gt=0)
    subset: int | None = Field(None, gt=0, description="use a seeded random subset of this many molecules")
    # What the model does not learn (study/data/reference.py): `composition` fits the target on per-element
    # atom counts on the training split and the model learns the residual; `mean` is the seed's
    # global standardisation, kept for reproducing its table.
    target_reference: Literal["composition", "mean"] = "composition"
    target_mean: float | None = Field(None, description="`mean` reference only; None: computed on the training split")
    target_std: float | None = Field(None, gt=0)
    # optimisation
    seed: int = Field(21616, ge=0, le=MAX_SEED)
    epochs: int = Field(30, gt=0)
    batch_size: int = Field(32, gt=0)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    # `constant` is the reference; `cosine` decays to 0 over all training steps; `plateau` halves
    # the rate when the validation MAE has not improved for 2 epochs (as NequIP and MACE do).
    lr_schedule: Literal["constant", "cosine", "plateau"] = "constant"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "float64"] = "float32"

    @field_validator("l_values", mode="before")
    @classmethod
    def _parse_l_values(cls, value: Any) -> tuple[int, ...]:
        # MLflow params and `--set` carry l values as "0,3,4,5,6"; YAML carries a list.
        if isinstance(value, str):
            parts = [p.strip() for p in value.strip("[]()").split(",") if p.strip()]
            try:
                value = [int(p) for p in parts]
            except ValueError:
                raise ValueError(f"l values must be integers, got {value!r}") from None
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"l values must be a list of integers, got {value!r}")
        if any(isinstance(v, bool) or not isinstance(v, int) for v in value):
            raise ValueError(f"l values must be integers, got {list(value)!r}")
        return validate_l_values(value)

    @field_validator("target")
    @classmethod
    def _known_target(cls, value: str) -> str:
        if value not in TARGETS:
            raise ValueError(f"unknown target {value!r}; choose one of {', '.join(TARGETS)}")
        return value

    @model_validator(mode="after")
    def _consistent_split(self) -> TrialConfig:
        total = self.train_fraction + self.val_fraction + self.test_fraction
        if total > 1 + 1e-9:
            raise ValueError(f"train_fraction + val_fraction + test_fraction = {total:g} must be <= 1")
        sizes = (self.train_size, self.val_size, self.test_size)
        if any(s is not None for s in sizes) and any(s is None for s in sizes):
            raise ValueError("give all of train_size, val_size and test_size, or none of them")
        if self.subset is not None and self.train_size is not None:
            needed = self.train_size + self.val_size + self.test_size
            if needed > self.subset:
                raise ValueError(f"train_size + val_size + test_size = {needed} exceeds subset = {self.subset}")
        if (self.target_mean is None) != (self.target_std is None):
            raise ValueError("give both target_mean and target_std, or neither")
        if self.target_mean is not None and self.target_reference != "mean":
            raise ValueError("target_mean and target_std apply to target_reference: mean only")
        return self

    @property
    def split_sizes(self) -> tuple[int, int, int] | None:
        if self.train_size is None:
            return None
        return (self.train_size, self.val_size, self.test_size)  # type: ignore[return-value]

    @property
    def split_fractions(self) -> tuple[float, float, float]:
        return (self.train_fraction, self.val_fraction, self.test_fraction)

    def flat_params(self) -> dict[str, str]:
        """The config as MLflow-style string params, `l_values` as a comma list."""
        params = {}
        for key, value in self.model_dump().items():
            if key == "l_values":
                value = ",".join(str(v) for v in value)
            params[key] = "" if value is None else str(value)
        return params

    def to_yaml(self) -> str:
        data = self.model_dump()
        data["l_values"] = list(data["l_values"])
        return yaml.safe_dump(data, sort_keys=False)


def show_key(key: Any) -> str:
    """A key from a YAML file as it can be shown in a one-line message: as is when printable, else
    quoted (a key such as "a\\nb" must not break the CLI's one-line error)."""
    text = str(key)
    return text if text.isprintable() else repr(text)


def _first_error(error: ValidationError) -> tuple[str, str]:
    """The field path and message of the first validation error, fit for one line."""
    first = error.errors()[0]
    field = ".".join(show_key(part) for part in first["loc"]) or "(top level)"
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    # pydantic prefixes messages raised from validators with "Value error, ".
    message = message.removeprefix("Value error, ")
    return field, (message.splitlines() or ["invalid value"])[0]


def _safe_load(text: str) -> Any:
    """yaml.safe_load; ValueError on what PyYAML lets escape as other errors."""
    try:
        return yaml.safe_load(text)
    except RecursionError:
        # PyYAML composes recursively: thousands of nested brackets exhaust the stack.
        raise ValueError("nested too deeply") from None
    except yaml.YAMLError:
        raise
    except ValueError as exc:
        # PyYAML builds timestamps with datetime: `2001-13-01` raises "month must be in 1..12".
        raise ValueError(str(exc).splitlines()[0] if str(exc) else "invalid value") from None


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping from `path`, loaded safely; ConfigError on a missing file or bad YAML."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or type(exc).__name__})") from None
    try:
        data = _safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "parse error"
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    except ValueError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
    return data


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`key=value` strings from `--set`; values are parsed as YAML scalars or lists."""
    parsed: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {show_key(item)}: expected key=value")
        try:
            parsed[key] = _safe_load(raw) if raw.strip() else None
        except (yaml.YAMLError, ValueError):
            raise ConfigError(f"--set {show_key(item)}: value is not valid YAML") from None
    return parsed


def load_trial_config(path: Path | None, overrides: list[str] | None = None) -> TrialConfig:
    """Read and validate a trial config; `--set` overrides win over the file."""
    data = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "config"
    override_values = parse_overrides(overrides or [])
    data.update(override_values)
    try:
        return TrialConfig.model_validate(data)
    except ValidationError as exc:
        field, message = _first_error(exc)
        # The key itself, not `field` (dotted, unprintable keys quoted): `--set a.b=1` is not the file's.
        loc = exc.errors()[0]["loc"]
        origin = "--set" if loc and loc[0] in override_values else source
        raise ConfigError(f"{origin}: {field}: {message}") from None
