"""What a configuration is: the thing seeds replicate, one definition for the whole tool.

A configuration is every trial parameter except the seed: the trials of one configuration differ
only by chance (initialisation, data order), so they are replicates of one measurement, and the
configuration, not the trial, is the unit every comparison counts: seed-aware scheduling groups
a configuration's seeds (study/sweep/seed_groups.py), `irrep-study best` ranks configurations by
the mean over their seeds, and `analyze` compares them. Bookkeeping fields that do not change
what is trained are left out too: the device and how the same function is computed (the
tensor-product backend, torch.compile); a search space may not search them (study/config/space.py).
MLflow params that are not trial-config fields (the fitted target reference, logged after
training) are derived from the data, not chosen: ignored.

Torch-free; pandas only for the labels.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from study.config.trial import EXECUTION_FIELDS, LEGACY_DEFAULTS, TrialConfig

REPLICATE_PARAM = "seed"
# What tells the replicates of one configuration apart inside a sweep: the seed itself, or the
# seed's index in the study's seed list (Ray's Repeater sets `__trial_index__`; a grid uses it as
# its seed axis).
REPLICATE_KEYS = (REPLICATE_PARAM, "__trial_index__")
BOOKKEEPING_PARAMS = ("device", *EXECUTION_FIELDS)
NOT_CONFIGURATION = frozenset({*REPLICATE_KEYS, *BOOKKEEPING_PARAMS})
# The trial-config fields that define a configuration, in the config's order.
CONFIGURATION_FIELDS = tuple(name for name in TrialConfig.model_fields if name not in NOT_CONFIGURATION)
# Short names in labels, in this order first; other varying parameters follow by name.
LABEL_NAMES = {"l_values": "l", "hidden_dim": "h", "num_layers": "layers", "lr": "lr"}


def configuration_key(config: Mapping[str, Any]) -> str:
    """A trial's configuration as one string (sorted JSON): its parameters without the replicate
    keys and the bookkeeping fields. Seeds of one configuration share it, and nothing else does."""
    return json.dumps({k: v for k, v in config.items() if k not in NOT_CONFIGURATION}, sort_keys=True, default=repr)


def configuration_params(params: dict[str, str]) -> dict[str, str]:
    """The run's parameters that define its configuration (strings, as MLflow holds them).

    A field missing from an older run gets the value it was trained with (LEGACY_DEFAULTS), so an
    old and a new run of the same setup are the same configuration.
    """
    known = {**{k: str(v) for k, v in LEGACY_DEFAULTS.items()}, **params}
    return {name: str(known.get(name, "")) for name in CONFIGURATION_FIELDS}


def _typed(values):
    """Numbers where every value is one (hidden_dim, lr, ...); the strings otherwise (l_values)."""
    import pandas as pd

    numeric = pd.to_numeric(values, errors="coerce")
    return numeric if numeric.notna().all() else values


def _label_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def label_configurations(params: Sequence[dict[str, str]]):
    """For each run's params: its ``configuration`` label and a typed column per varying parameter.

    Returns the table (one row per run, in order) and the names of the parameters that vary across
    the runs other than ``l_values`` (the context within which an l is added or removed). Labels
    name every varying parameter (``l=0,1 h=8 lr=0.003``), so different configurations get
    different labels; ``l`` is always named, since the l set is what the study is about.
    """
    import pandas as pd

    rows = [configuration_params(p) for p in params]
    frame = pd.DataFrame(rows, columns=list(CONFIGURATION_FIELDS))
    varying = [name for name in frame.columns if frame[name].nunique() > 1 and name != "l_values"]
    ordered = [n for n in LABEL_NAMES if n in varying] + sorted(n for n in varying if n not in LABEL_NAMES)
    table = pd.DataFrame({"l_values": frame["l_values"]})
    for name in ordered:
        table[name] = _typed(frame[name])
    key = frame.apply(lambda row: tuple(row), axis=1) if len(frame) else pd.Series([], dtype=object)
    labels = {}
    for index, row in table.iterrows():
        text = " ".join([f"l={row['l_values']}"] + [f"{LABEL_NAMES.get(n, n)}={_label_value(row[n])}" for n in ordered])
        labels[index] = text
    table.insert(0, "configuration", pd.Series(labels, dtype=object))
    # Rounding in labels could merge two configurations (lr 0.0031234 and 0.0031236): disambiguate.
    for text, group in table.groupby("configuration"):
        keys = key[group.index].unique()
        if len(keys) > 1:
            for k, value in enumerate(keys):
                table.loc[group.index[key[group.index] == value], "configuration"] = f"{text} #{k + 1}"
    return table, ordered
