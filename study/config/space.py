"""Search spaces: a study described in YAML, validated before any work starts.

A search space names the study, gives the base trial config, and says what varies:

    name: quick                      # MLflow experiment (and Ray run) name
    trial: {hidden_dim: 8, ...}      # base TrialConfig; every trial starts from it
    search:
      method: optuna                 # optuna (Ray Tune's OptunaSearch) or grid
      sampler: tpe                   # tpe | random | cmaes (optuna only)
      num_samples: 8                 # configurations Optuna proposes
      seed: 0                        # seeds the sampler
      params:                        # optuna dimensions, each one of:
        l_values: {subsets_of: [0, 1, 2, 3]}   # any subset holding 0
        # l_values: {lmax: [2, 4, 6]}          # lmax searched, then every l below it in or out
        hidden_dim: {choice: [8, 16]}
        lr: {loguniform: [1.0e-4, 1.0e-2]}
        num_layers: {randint: [1, 3]}
        weight_decay: {uniform: [0.0, 0.1]}
      grid:                          # grid: explicit configurations (trial overrides)
        - {l_values: [0, 1, 2], hidden_dim: 32}
      objectives:                    # optuna: what it minimises (default: val_mae_meV alone);
        - {metric: val_mae_meV}      # val_mae_meV first, then num_params and/or epoch_seconds
        - {metric: num_params}       # make it multi-objective (a Pareto front)
    seeds: [21616, 1, 2]             # every configuration repeated once per seed
    scheduler: {type: asha, grace_period: 2, reduction_factor: 2}   # or {type: none}
    resources: {cpus_per_trial: 1, gpus_per_trial: 0, max_concurrent: 2, max_failures: 2}

Nothing here imports Ray: sweep.py turns a `SearchSpace` into Tune objects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from study.config.configuration import BOOKKEEPING_PARAMS
from study.config.lvalues import MAX_L
from study.config.trial import (
    MAX_SEED,
    ConfigError,
    TrialConfig,
    _first_error,
    read_yaml,
    show_key,
)
from study.names import EPOCH_SECONDS, VAL_MAE


class _Strict(BaseModel):
    # .inf and .nan bounds or resources would only fail inside Optuna or Ray, after the sweep started.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Dimension(_Strict):
    """One searched trial field; exactly one of the keys is given."""

    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = Field(None, description="integers from low to high, both included")
    subsets_of: list[int] | None = Field(None, description="l_values only: any subset of these that holds 0")
    lmax: list[int] | None = Field(None, description="l_values only: lmax searched, each l below it in or out")

    @model_validator(mode="after")
    def _exactly_one(self) -> Dimension:
        given = [name for name in type(self).model_fields if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(type(self).model_fields)}; got {given or 'none'}")
        kind = given[0]
        if kind == "choice" and not self.choice:
            raise ValueError("choice needs at least one value")
        for bounds_kind in ("uniform", "loguniform", "randint"):
            bounds = getattr(self, bounds_kind)
            if bounds is not None and not bounds[0] <= bounds[1]:
                raise ValueError(f"{bounds_kind} bounds must be [low, high] with low <= high, got {list(bounds)}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError("loguniform bounds must be positive")
        if self.subsets_of is not None:
            if 0 not in self.subsets_of or any(not 0 <= l <= MAX_L for l in self.subsets_of):
                raise ValueError(f"subsets_of must hold 0 and orders within 0..{MAX_L}, got {self.subsets_of}")
            if len(set(self.subsets_of)) != len(self.subsets_of):
                raise ValueError(f"subsets_of repeats an order: {self.subsets_of}")
        if self.lmax is not None and (not self.lmax or any(not 0 <= l <= MAX_L for l in self.lmax)):
            raise ValueError(f"lmax values must lie within 0..{MAX_L}, got {self.lmax}")
        return self

    @property
    def kind(self) -> str:
        return next(name for name in type(self).model_fields if getattr(self, name) is not None)

    def bounding_values(self) -> list[Any]:
        """The values that bound what this dimension can produce: every choice, both ends of a
        range, and the smallest and largest l sets (what validation and `plan` look at)."""
        if self.choice is not None:
            return list(self.choice)
        for bounds in (self.uniform, self.loguniform, self.randint):
            if bounds is not None:
                return list(bounds)
        if self.subsets_of is not None:
            return [[0], sorted(self.subsets_of)]
        # lmax is always in the l set with 0; the orders below it are each in or out.
        values: list[list[int]] = []
        for lmax in sorted(set(self.lmax)):
            for l_set in (sorted({0, lmax}), list(range(lmax + 1))):
                if l_set not in values:
                    values.append(l_set)
        return values


# What a search may minimise: the validation MAE always comes first (ASHA stops on it, the
# searcher is told it); a second or third objective makes the search multi-objective (Optuna's
# Pareto front): the model's size, or the wall time of one training epoch.
class Objective(_Strict):
    metric: Literal[VAL_MAE, "num_params", EPOCH_SECONDS]
    mode: Literal["min"] = "min"


class Search(_Strict):
    method: Literal["optuna", "grid"] = "optuna"
    sampler: Literal["tpe", "random", "cmaes"] = "tpe"
    num_samples: int = Field(8, gt=0)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    params: dict[str, Dimension] = Field(default_factory=dict)
    grid: list[dict[str, Any]] = Field(default_factory=list)
    objectives: list[Objective] = Field(
        default_factory=lambda: [Objective(metric=VAL_MAE)],
        description="what Optuna minimises; val_mae_meV first, then optionally num_params and/or epoch_seconds",
    )

    @property
    def objective_metrics(self) -> list[str]:
        return [objective.metric for objective in self.objectives]

    @model_validator(mode="after")
    def _method_has_its_space(self) -> Search:
        metrics = self.objective_metrics
        if not metrics or metrics[0] != VAL_MAE:
            raise ValueError("objectives: the first objective must be val_mae_meV (early stopping and ranking use it)")
        if len(set(metrics)) != len(metrics):
            raise ValueError(f"objectives: a metric is named twice: {metrics}")
        if len(metrics) > 1 and self.method == "grid":
            raise ValueError(
                "objectives: only read with method: optuna (a grid trains every configuration; "
                "the report draws the Pareto front of any sweep)"
            )
        if len(metrics) > 1 and self.sampler == "cmaes":
            raise ValueError("objectives: sampler cmaes optimises one objective; use tpe or random")
        if self.method == "optuna" and not self.params:
            raise ValueError("optuna search needs at least one dimension under search.params")
        if self.method == "grid" and not self.grid:
            raise ValueError("grid search needs at least one configuration under search.grid")
        if self.method == "optuna" and self.grid:
            raise ValueError("search.grid is only read with method: grid")
        if self.method == "grid" and self.params:
            raise ValueError("search.params is only read with method: optuna")
        for name, dimension in self.params.items():
            if dimension.kind in ("subsets_of", "lmax") and name != "l_values":
                raise ValueError(f"params.{show_key(name)}: {dimension.kind} applies to l_values only")
            if name == "l_values" and dimension.kind not in ("subsets_of", "lmax", "choice"):
                raise ValueError("params.l_values: use subsets_of, lmax or choice")
        return self


class Scheduler(_Strict):
    type: Literal["asha", "none"] = "asha"
    grace_period: int = Field(1, gt=0, description="epochs before ASHA may stop a trial")
    reduction_factor: float = Field(2.0, gt=1)


class Resources(_Strict):
    cpus_per_trial: float = Field(1.0, gt=0)
    gpus_per_trial: float = Field(0.0, ge=0)
    max_concurrent: int | None = Field(
        None,
        gt=0,
        description="at most this many trials at once (default: as resources allow); with ASHA, at least the "
        "number of seeds, since a seed paused at a rung waits there for the other seeds of its configuration",
    )
    max_failures: int = Field(2, ge=0, description="retries of a trial whose worker died, from its last checkpoint")


class SearchSpace(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)
    trial: dict[str, Any] = Field(default_factory=dict)
    search: Search
    seeds: list[int] | None = Field(None, min_length=1)
    scheduler: Scheduler = Field(default_factory=Scheduler)
    resources: Resources = Field(default_factory=Resources)

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int] | None) -> list[int] | None:
        if seeds is not None and len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds repeat a value: {seeds}")
        return seeds

    @property
    def base(self) -> TrialConfig:
        return TrialConfig(**self.trial)

    @property
    def seed_list(self) -> list[int]:
        return self.seeds if self.seeds is not None else [self.base.seed]

    @property
    def total_trials(self) -> int:
        configurations = len(self.search.grid) if self.search.method == "grid" else self.search.num_samples
        return configurations * len(self.seed_list)

    def trial_config(self, overrides: dict[str, Any], seed: int) -> TrialConfig:
        """The trial config of one configuration and seed: base, then overrides, then the seed."""
        return TrialConfig(**{**self.trial, **overrides, "seed": seed})

    def summary_params(self) -> dict[str, str]:
        """Parameters of the sweep itself, for the parent MLflow run."""
        return {
            "space_name": self.name,
            "search_method": self.search.method,
            "search_sampler": self.search.sampler,
            "num_samples": str(self.search.num_samples),
            "search_seed": str(self.search.seed),
            "seeds": ",".join(str(s) for s in self.seed_list),
            "scheduler": self.scheduler.type,
            "objectives": ",".join(self.search.objective_metrics),
            "total_trials": str(self.total_trials),
        }


def _check_against_trial_config(space: SearchSpace, source: str) -> None:
    """Every configuration the space can produce must be a valid trial config: check them now."""

    def check(where: str, values: dict[str, Any]) -> None:
        try:
            TrialConfig(**{**space.trial, **values})
        except ValidationError as exc:
            field, message = _first_error(exc)
            raise ConfigError(f"{source}: {where}{field}: {message}") from None

    def not_bookkeeping(where: str, name: str) -> None:
        # A configuration leaves these out (study/config/configuration.py): searching them would
        # merge the trials of different values as seeds of one configuration.
        if name in BOOKKEEPING_PARAMS:
            raise ConfigError(
                f"{source}: {where}{show_key(name)}: how a trial is computed, not what is trained, "
                "cannot be searched; set it under `trial` (to compare backends: irrep-study bench)"
            )

    check("trial.", {})
    for k, entry in enumerate(space.search.grid):
        for name in entry:
            not_bookkeeping(f"search.grid[{k}].", name)
        check(f"search.grid[{k}].", entry)
    for name, dimension in space.search.params.items():
        not_bookkeeping("search.params.", name)
        if name not in TrialConfig.model_fields:
            raise ConfigError(f"{source}: search.params.{show_key(name)}: not a trial config field")
        if name == "seed":
            raise ConfigError(f"{source}: search.params.seed: list seeds under `seeds` instead")
        for value in dimension.bounding_values():
            check(f"search.params.{name}: value {value!r}: ", {name: value})
    for seed in space.seed_list:
        check("seeds: ", {"seed": seed})


def load_search_space(path: Path) -> SearchSpace:
    """Read and validate a search space; ConfigError with one line naming the file and field."""
    data = read_yaml(path)
    try:
        space = SearchSpace.model_validate(data)
    except ValidationError as exc:
        field, message = _first_error(exc)
        raise ConfigError(f"{path}: {field}: {message}") from None
    _check_against_trial_config(space, str(path))
    return space


# ---------------------------------------------------------------------------- optuna's view


def l_values_from_flags(params: dict[str, Any]) -> list[int]:
    """The l set of an Optuna proposal: 0, plus `lmax` if searched, plus every `use_l{l}` that is on."""
    chosen = {0}
    if "lmax" in params:
        chosen.add(int(params["lmax"]))
    chosen.update(int(key.removeprefix("use_l")) for key, on in params.items() if key.startswith("use_l") and on)
    return sorted(chosen)


class OptunaSpace:
    """Optuna's define-by-run space: l flags conditional on lmax, then the other dimensions.

    Optuna records the flags (`lmax`, `use_l1`, ...) as its parameters; calling returns the
    constants they imply (`l_values`). A class, not a closure, because Ray pickles the searcher
    with the standard pickle when it saves the experiment state."""

    def __init__(self, search: Search):
        self.search = search

    def __call__(self, trial) -> dict[str, Any]:
        constants: dict[str, Any] = {}
        for name, dimension in self.search.params.items():
            if dimension.subsets_of is not None:
                for l in sorted(set(dimension.subsets_of) - {0}):
                    trial.suggest_categorical(f"use_l{l}", [True, False])
                constants["l_values"] = ",".join(map(str, l_values_from_flags(trial.params)))
            elif dimension.lmax is not None:
                lmax = trial.suggest_categorical("lmax", sorted(set(dimension.lmax)))
                for l in range(1, lmax):
                    trial.suggest_categorical(f"use_l{l}", [True, False])
                constants["l_values"] = ",".join(map(str, l_values_from_flags(trial.params)))
            elif dimension.choice is not None:
                # Optuna's categorical values must be scalars: lists travel as comma strings.
                values = [",".join(map(str, v)) if isinstance(v, list) else v for v in dimension.choice]
                trial.suggest_categorical(name, values)
            elif dimension.uniform is not None:
                trial.suggest_float(name, *dimension.uniform)
            elif dimension.loguniform is not None:
                trial.suggest_float(name, *dimension.loguniform, log=True)
            elif dimension.randint is not None:
                trial.suggest_int(name, *dimension.randint)
        return constants


def trial_overrides(params: dict[str, Any]) -> dict[str, Any]:
    """The trial-config fields of a Tune config (drops Optuna's flags and Tune's bookkeeping)."""
    overrides = dict(params.get("grid_entry") or {})
    overrides.update({k: v for k, v in params.items() if k in TrialConfig.model_fields and k != "seed"})
    return overrides
