"""Search spaces (study/config/space.py): the guarantees the other tests left unpinned, written to
kill the mutants that survived them (docs/mutation.md). mutmut does not mutate decorated functions
(the validators, the properties); the refusals of those are pinned here too, message by message."""

from __future__ import annotations

import pytest
import yaml

from study.config.space import (
    Dimension,
    OptunaSpace,
    Resources,
    Scheduler,
    Search,
    SearchSpace,
    l_values_from_flags,
    load_search_space,
    trial_overrides,
)
from study.config.trial import MAX_SEED, ConfigError, TrialConfig

OPTUNA = {"params": {"hidden_dim": {"choice": [4, 8]}}}


def space(**changes) -> dict:
    """A valid search space (an Optuna search of hidden_dim), with top-level keys replaced."""
    return {"name": "s", "search": OPTUNA, **changes}


def refusal(tmp_path, data) -> str:
    """The one-line ConfigError that loading `data` as a space file raises, without the file's name."""
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ConfigError) as error:
        load_search_space(path)
    text = str(error.value)
    assert text.startswith(f"{path}: ") and "\n" not in text
    return text.removeprefix(f"{path}: ")


def loads(tmp_path, data) -> SearchSpace:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_search_space(path)


# ---------------------------------------------------------------------------- dimensions


def test_a_dimension_names_every_kind_when_it_gets_none_or_two():
    kinds = "choice, uniform, loguniform, randint, subsets_of, lmax"
    with pytest.raises(ValueError, match=f"give exactly one of {kinds}; got none"):
        Dimension()
    with pytest.raises(ValueError, match=rf"give exactly one of {kinds}; got \['choice', 'randint'\]"):
        Dimension(choice=[1], randint=(1, 2))


def test_a_choice_needs_a_value():
    with pytest.raises(ValueError, match="choice needs at least one value"):
        Dimension(choice=[])
    assert Dimension(choice=[0]).choice == [0]  # a single falsy value is a value


@pytest.mark.parametrize("kind", ["uniform", "loguniform", "randint"])
def test_bounds_must_not_be_reversed_but_may_be_equal(kind):
    with pytest.raises(ValueError, match=rf"{kind} bounds must be \[low, high\] with low <= high, got \[3(\.0)?, 2(\.0)?\]"):
        Dimension(**{kind: (3, 2)})
    assert Dimension(**{kind: (2, 2)}).bounding_values() == [2, 2]


@pytest.mark.parametrize("low", [0, -1e-3])
def test_loguniform_bounds_must_be_positive(low):
    with pytest.raises(ValueError, match="loguniform bounds must be positive"):
        Dimension(loguniform=(low, 1))
    assert Dimension(loguniform=(1e-6, 1)).kind == "loguniform"


@pytest.mark.parametrize("subsets", [[1, 2], [0, 11], [0, -1]])
def test_subsets_of_holds_0_and_orders_within_range(subsets):
    with pytest.raises(ValueError, match=rf"subsets_of must hold 0 and orders within 0..10, got \{subsets}"):
        Dimension(subsets_of=subsets)


def test_subsets_of_may_reach_the_highest_order_but_not_repeat_one():
    assert Dimension(subsets_of=[0, 10]).bounding_values() == [[0], [0, 10]]
    with pytest.raises(ValueError, match=r"subsets_of repeats an order: \[0, 2, 2\]"):
        Dimension(subsets_of=[0, 2, 2])


@pytest.mark.parametrize("lmax", [[], [11], [-1], [2, 11]])
def test_lmax_values_must_lie_within_range(lmax):
    with pytest.raises(ValueError, match=rf"lmax values must lie within 0..10, got \{lmax}"):
        Dimension(lmax=lmax)


def test_lmax_may_be_0_or_the_highest_order():
    assert Dimension(lmax=[0]).bounding_values() == [[0]]
    assert Dimension(lmax=[10]).bounding_values() == [[0, 10], list(range(11))]


def test_the_kind_is_the_key_given():
    for kind, value in [("choice", [1]), ("uniform", (0, 1)), ("randint", (1, 2)), ("subsets_of", [0]), ("lmax", [1])]:
        assert Dimension(**{kind: value}).kind == kind


def test_bounding_values_are_every_choice_both_ends_and_the_extreme_l_sets():
    assert Dimension(choice=[8, 16, 4]).bounding_values() == [8, 16, 4]
    assert Dimension(uniform=(0.0, 0.1)).bounding_values() == [0.0, 0.1]
    assert Dimension(loguniform=(1e-4, 1e-2)).bounding_values() == [1e-4, 1e-2]
    assert Dimension(randint=(1, 3)).bounding_values() == [1, 3]
    assert Dimension(subsets_of=[3, 0, 1]).bounding_values() == [[0], [0, 1, 3]]
    # lmax 1: {0, 1} is both the smallest and the largest set, listed once; then lmax 3's two.
    assert Dimension(lmax=[3, 1, 3]).bounding_values() == [[0, 1], [0, 3], [0, 1, 2, 3]]


def test_every_bounding_value_is_checked_against_the_trial_config(tmp_path):
    # The low end of a range, the high end, and a choice that is not the first.
    assert refusal(tmp_path, space(search={"params": {"hidden_dim": {"randint": [0, 4]}}})) == (
        "search.params.hidden_dim: value 0: hidden_dim: Input should be greater than 0"
    )
    assert refusal(tmp_path, space(search={"params": {"train_fraction": {"uniform": [0.5, 1.5]}}})) == (
        "search.params.train_fraction: value 1.5: train_fraction: Input should be less than or equal to 1"
    )
    assert refusal(tmp_path, space(search={"params": {"hidden_dim": {"choice": [4, 8, -2]}}})).startswith(
        "search.params.hidden_dim: value -2: hidden_dim: "
    )
    # Each value is checked together with the base trial config: a subset too small for it.
    trial = {"subset": 10, "train_size": 5, "val_size": 2, "test_size": 2}
    assert refusal(tmp_path, space(trial=trial, search={"params": {"train_size": {"choice": [5, 7]}}})) == (
        "search.params.train_size: value 7: (top level): train_size + val_size + test_size = 11 exceeds subset = 10"
    )


# ---------------------------------------------------------------------------- search


def test_search_defaults_are_eight_tpe_samples_seeded_0_minimising_the_validation_mae():
    search = Search(params={"hidden_dim": Dimension(choice=[4])})
    assert (search.method, search.sampler, search.num_samples, search.seed) == ("optuna", "tpe", 8, 0)
    assert search.grid == [] and search.objective_metrics == ["val_mae_meV"]
    assert search.objectives[0].mode == "min"


@pytest.mark.parametrize("seed", [-1, MAX_SEED + 1])
def test_the_sampler_seed_is_one_numpy_and_torch_take(tmp_path, seed):
    assert refusal(tmp_path, space(search={**OPTUNA, "seed": seed})).startswith("search.seed: Input should be")
    assert loads(tmp_path, space(search={**OPTUNA, "seed": MAX_SEED})).search.seed == MAX_SEED


@pytest.mark.parametrize(
    "objectives, message",
    [
        ([], "objectives: the first objective must be val_mae_meV (early stopping and ranking use it)"),
        ([{"metric": "num_params"}, {"metric": "val_mae_meV"}], "objectives: the first objective must be val_mae_meV"),
        (
            [{"metric": "val_mae_meV"}, {"metric": "num_params"}, {"metric": "num_params"}],
            "objectives: a metric is named twice: ['val_mae_meV', 'num_params', 'num_params']",
        ),
        ([{"metric": "val_mae_meV", "mode": "max"}], "search.objectives.0.mode: Input should be 'min'"),
    ],
)
def test_objectives_start_with_the_validation_mae_and_name_each_metric_once(tmp_path, objectives, message):
    assert message in refusal(tmp_path, space(search={**OPTUNA, "objectives": objectives}))


def test_several_objectives_need_optuna_and_a_sampler_that_takes_them(tmp_path):
    two = [{"metric": "val_mae_meV"}, {"metric": "epoch_seconds"}]
    grid = {"method": "grid", "grid": [{"hidden_dim": 4}], "objectives": two}
    assert refusal(tmp_path, space(search=grid)) == (
        "search: objectives: only read with method: optuna (a grid trains every configuration; "
        "the report draws the Pareto front of any sweep)"
    )
    assert refusal(tmp_path, space(search={**OPTUNA, "sampler": "cmaes", "objectives": two})) == (
        "search: objectives: sampler cmaes optimises one objective; use tpe or random"
    )
    for sampler in ("tpe", "random"):
        assert loads(tmp_path, space(search={**OPTUNA, "sampler": sampler, "objectives": two})).search.objective_metrics == [
            "val_mae_meV",
            "epoch_seconds",
        ]
    # One objective goes with a grid and with cmaes.
    one = [{"metric": "val_mae_meV"}]
    assert loads(tmp_path, space(search={"method": "grid", "grid": [{"hidden_dim": 4}], "objectives": one})).total_trials == 1
    assert loads(tmp_path, space(search={**OPTUNA, "sampler": "cmaes"})).search.sampler == "cmaes"


def test_each_method_reads_only_its_own_space(tmp_path):
    assert refusal(tmp_path, space(search={"params": {}})) == "search: optuna search needs at least one dimension under search.params"
    assert refusal(tmp_path, space(search={"method": "grid"})) == "search: grid search needs at least one configuration under search.grid"
    assert refusal(tmp_path, space(search={**OPTUNA, "grid": [{"hidden_dim": 4}]})) == "search: search.grid is only read with method: grid"
    grid_with_params = {"method": "grid", "grid": [{"hidden_dim": 4}], **OPTUNA}
    assert refusal(tmp_path, space(search=grid_with_params)) == "search: search.params is only read with method: optuna"


@pytest.mark.parametrize("kind, value", [("subsets_of", [0, 1]), ("lmax", [2])])
def test_l_set_dimensions_apply_to_l_values_only(tmp_path, kind, value):
    assert refusal(tmp_path, space(search={"params": {"hidden_dim": {kind: value}}})) == (
        f"search: params.hidden_dim: {kind} applies to l_values only"
    )
    assert loads(tmp_path, space(search={"params": {"l_values": {kind: value}}})).search.params["l_values"].kind == kind


def test_l_values_may_be_a_choice_of_sets_but_not_a_range(tmp_path):
    chosen = loads(tmp_path, space(search={"params": {"l_values": {"choice": [[0], [0, 2]]}}}))
    assert chosen.search.params["l_values"].choice == [[0], [0, 2]]
    for kind in ("randint", "uniform"):
        assert refusal(tmp_path, space(search={"params": {"l_values": {kind: [0, 2]}}})) == (
            "search: params.l_values: use subsets_of, lmax or choice"
        )


# ---------------------------------------------------------------------------- scheduler, resources


def test_scheduler_and_resources_defaults():
    scheduler, resources = Scheduler(), Resources()
    assert (scheduler.type, scheduler.grace_period, scheduler.reduction_factor) == ("asha", 1, 2.0)
    assert (resources.cpus_per_trial, resources.gpus_per_trial, resources.max_concurrent, resources.max_failures) == (1.0, 0.0, None, 2)
    default = SearchSpace(name="d", search=Search(params={"hidden_dim": Dimension(choice=[4])}))
    assert default.scheduler == scheduler and default.resources == resources and default.trial == {} and default.seeds is None


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("scheduler", {"grace_period": 0}, "scheduler.grace_period: Input should be greater than 0"),
        ("scheduler", {"reduction_factor": 1}, "scheduler.reduction_factor: Input should be greater than 1"),
        ("resources", {"gpus_per_trial": -0.5}, "resources.gpus_per_trial: Input should be greater than or equal to 0"),
        ("resources", {"max_concurrent": 0}, "resources.max_concurrent: Input should be greater than 0"),
        ("resources", {"max_failures": -1}, "resources.max_failures: Input should be greater than or equal to 0"),
        ("resources", {"cpus_per_trial": float("inf")}, "resources.cpus_per_trial: Input should be a finite number"),
        (
            "search",
            {**OPTUNA, "params": {"lr": {"uniform": [0.0, float("inf")]}}},
            "search.params.lr.uniform.1: Input should be a finite number",
        ),
    ],
)
def test_scheduler_and_resources_refuse_values_ray_would_fail_on(tmp_path, key, value, message):
    assert refusal(tmp_path, space(**{key: value})).startswith(message)


def test_scheduler_and_resources_accept_their_boundary_values(tmp_path):
    loaded = loads(
        tmp_path,
        space(
            scheduler={"type": "none", "grace_period": 1, "reduction_factor": 1.5},
            resources={"gpus_per_trial": 0, "max_failures": 0, "max_concurrent": 1},
        ),
    )
    assert loaded.scheduler.type == "none" and loaded.resources.max_failures == 0 and loaded.resources.max_concurrent == 1


# ---------------------------------------------------------------------------- the space


@pytest.mark.parametrize("name", ["", "_x", "a b", "a/b", "x" * 101])
def test_the_name_is_a_plain_experiment_name_of_at_most_100_characters(tmp_path, name):
    assert refusal(tmp_path, space(name=name)).startswith("name: String should")


@pytest.mark.parametrize("name", ["a", "Q9", "x" * 100, "sweep_1.2-b"])
def test_plain_names_are_accepted(tmp_path, name):
    assert loads(tmp_path, space(name=name)).name == name


def test_seeds_are_distinct_and_not_empty(tmp_path):
    assert refusal(tmp_path, space(seeds=[3, 1, 3])) == "seeds: seeds repeat a value: [3, 1, 3]"
    assert refusal(tmp_path, space(seeds=[])).startswith("seeds: List should have at least 1 item")
    assert refusal(tmp_path, space(seeds=[1, MAX_SEED + 1])).startswith("seeds: seed: Input should be less than or equal to")


def test_without_seeds_every_configuration_runs_once_with_the_base_seed(tmp_path):
    loaded = loads(tmp_path, space(trial={"seed": 5}))
    assert loaded.seed_list == [5] and loaded.base == TrialConfig(seed=5)
    assert loaded.total_trials == 8
    assert loads(tmp_path, space()).seed_list == [TrialConfig().seed]


def test_total_trials_are_configurations_times_seeds(tmp_path):
    optuna_space = loads(tmp_path, space(search={**OPTUNA, "num_samples": 3}, seeds=[1, 2]))
    assert optuna_space.total_trials == 6
    grid = loads(
        tmp_path, space(search={"method": "grid", "num_samples": 3, "grid": [{"hidden_dim": 4}, {"hidden_dim": 8}]}, seeds=[1, 2, 3, 4, 5])
    )
    assert grid.total_trials == 10  # the grid's entries, not num_samples


def test_a_trial_config_is_the_base_then_the_overrides_then_the_seed(tmp_path):
    loaded = loads(tmp_path, space(trial={"hidden_dim": 4, "lr": 0.01, "seed": 9}))
    config = loaded.trial_config({"hidden_dim": 16, "seed": 3}, seed=7)
    assert (config.hidden_dim, config.lr, config.seed) == (16, 0.01, 7)


def test_the_summary_params_describe_the_sweep(tmp_path):
    loaded = loads(
        tmp_path,
        space(
            name="q",
            search={
                **OPTUNA,
                "sampler": "random",
                "num_samples": 3,
                "seed": 4,
                "objectives": [{"metric": "val_mae_meV"}, {"metric": "num_params"}],
            },
            seeds=[7, 1],
            scheduler={"type": "none"},
        ),
    )
    assert loaded.summary_params() == {
        "space_name": "q",
        "search_method": "optuna",
        "search_sampler": "random",
        "num_samples": "3",
        "search_seed": "4",
        "seeds": "7,1",
        "scheduler": "none",
        "objectives": "val_mae_meV,num_params",
        "total_trials": "6",
    }


# ---------------------------------------------------------------------------- checked against the trial config


def test_the_base_trial_config_is_checked_and_named(tmp_path):
    assert refusal(tmp_path, space(trial={"hidden_dim": 0})) == "trial.hidden_dim: Input should be greater than 0"
    assert refusal(tmp_path, space(trial={"colour": 1})) == "trial.colour: unknown key"


def test_a_grid_entry_is_checked_and_named_by_its_index(tmp_path):
    grid = {"method": "grid", "grid": [{"hidden_dim": 4}, {"hidden_dim": 0}]}
    assert refusal(tmp_path, space(search=grid)) == "search.grid[1].hidden_dim: Input should be greater than 0"
    device = {"method": "grid", "grid": [{"hidden_dim": 4}, {"device": "cpu"}]}
    assert refusal(tmp_path, space(search=device)) == (
        "search.grid[1].device: how a trial is computed, not what is trained, cannot be searched; "
        "set it under `trial` (to compare backends: irrep-study bench)"
    )


def test_searched_fields_must_be_trial_fields_other_than_the_seed(tmp_path):
    assert refusal(tmp_path, space(search={"params": {"compile": {"choice": [True, False]}}})) == (
        "search.params.compile: how a trial is computed, not what is trained, cannot be searched; "
        "set it under `trial` (to compare backends: irrep-study bench)"
    )
    assert refusal(tmp_path, space(search={"params": {"use_l1": {"choice": [True]}}})) == "search.params.use_l1: not a trial config field"
    assert (
        refusal(tmp_path, space(search={"params": {"seed": {"randint": [1, 3]}}})) == "search.params.seed: list seeds under `seeds` instead"
    )


def test_the_seeds_are_checked_against_the_trial_config(tmp_path):
    assert refusal(tmp_path, space(seeds=[-1])).startswith("seeds: seed: Input should be greater than or equal to 0")


# ---------------------------------------------------------------------------- optuna's view


def test_l_values_from_flags_are_0_lmax_and_the_flags_that_are_on():
    assert l_values_from_flags({}) == [0]
    assert l_values_from_flags({"lmax": 4, "use_l1": True, "use_l2": False, "use_l3": True, "hidden_dim": 8}) == [0, 1, 3, 4]
    assert l_values_from_flags({"use_l5": True, "use_l2": 1, "xuse_l3": True}) == [0, 2, 5]
    assert l_values_from_flags({"lmax": "2"}) == [0, 2]


class FakeTrial:
    """An Optuna trial that answers each suggestion with what `answers` says (else the first choice or low end)."""

    def __init__(self, **answers):
        self.answers = answers
        self.params: dict = {}
        self.calls: list = []

    def _answer(self, name, default):
        self.params[name] = self.answers.get(name, default)
        return self.params[name]

    def suggest_categorical(self, name, choices):
        self.calls.append(("categorical", name, list(choices)))
        return self._answer(name, choices[0])

    def suggest_float(self, name, low, high, log=False):
        self.calls.append(("float", name, low, high, log))
        return self._answer(name, low)

    def suggest_int(self, name, low, high):
        self.calls.append(("int", name, low, high))
        return self._answer(name, low)


def test_optuna_space_suggests_each_dimension_as_its_kind():
    search = Search(
        params={
            "hidden_dim": Dimension(choice=[8, 16]),
            "lr": Dimension(loguniform=(1e-4, 1e-2)),
            "weight_decay": Dimension(uniform=(0.0, 0.1)),
            "num_layers": Dimension(randint=(1, 3)),
        }
    )
    trial = FakeTrial()
    assert OptunaSpace(search)(trial) == {}
    assert trial.calls == [
        ("categorical", "hidden_dim", [8, 16]),
        ("float", "lr", 1e-4, 1e-2, True),
        ("float", "weight_decay", 0.0, 0.1, False),
        ("int", "num_layers", 1, 3),
    ]


def test_optuna_space_passes_l_sets_of_a_choice_as_comma_strings():
    trial = FakeTrial()
    OptunaSpace(Search(params={"l_values": Dimension(choice=[[0, 1], [0, 2, 4]])}))(trial)
    assert trial.calls == [("categorical", "l_values", ["0,1", "0,2,4"])]


def test_optuna_space_flags_each_order_of_subsets_of_but_0():
    trial = FakeTrial(use_l1=False, use_l3=True)
    constants = OptunaSpace(Search(params={"l_values": Dimension(subsets_of=[3, 0, 1])}))(trial)
    assert trial.calls == [("categorical", "use_l1", [True, False]), ("categorical", "use_l3", [True, False])]
    assert constants == {"l_values": "0,3"}


def test_optuna_space_flags_each_order_below_lmax():
    trial = FakeTrial(lmax=4, use_l1=False, use_l2=True, use_l3=False)
    constants = OptunaSpace(Search(params={"l_values": Dimension(lmax=[4, 2, 4])}))(trial)
    assert trial.calls[0] == ("categorical", "lmax", [2, 4])
    assert trial.calls[1:] == [("categorical", f"use_l{l}", [True, False]) for l in (1, 2, 3)]
    assert constants == {"l_values": "0,2,4"}


def test_trial_overrides_are_the_grid_entry_then_the_searched_fields_without_the_seed():
    params = {"grid_entry": {"hidden_dim": 4, "lr": 0.1}, "hidden_dim": 8, "seed": 3, "use_l1": True, "__trial_index__": 1}
    assert trial_overrides(params) == {"hidden_dim": 8, "lr": 0.1}
    assert trial_overrides({"grid_entry": None, "l_values": "0,2"}) == {"l_values": "0,2"}
    assert trial_overrides({}) == {}
