"""`irrep-study reanalyze`: the study-level statistics again, from an analysis folder's tables.

An analysis folder (what `analyze` writes, or a published results/ folder) keeps every trial's
errors (``trials.csv``) and scores (``scores.csv``), and, when it was kept, each trial's error per
test molecule (``molecules.csv``). The statistics across the study (ablation effects, score-error
correlations) need nothing else, so they can be recomputed when the statistics change, without
MLflow, the models or the embeddings: ``ablation.csv``, ``correlations.csv``, the forest plot and
``findings.txt`` (the sentences the report's findings would say about them) are rewritten.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from analysis.load import AnalysisError
from analysis.report import findings as found
from analysis.report import plots
from analysis.report.findings import SIGNIFICANCE
from analysis.stats.ablation import (
    ablation_effects,
    factorial_terms,
    headline,
    headline_estimates,
)
from analysis.stats.correlate import correlate_scores
from study.names import TEST_MAE


def error_column(run_id: str) -> str:
    """The molecules.csv column of a trial's absolute test errors (meV), one row per molecule."""
    return f"abs_error_meV[{run_id}]"


ERROR_COLUMN = re.compile(re.escape(error_column("RUN")).replace("RUN", "(.+)"))  # and back to the run id


@dataclass
class Reanalysis:
    ablation: pd.DataFrame
    correlations: pd.DataFrame
    sentences: list[str]
    files: dict[str, Path]


def _read(folder: Path, name: str) -> pd.DataFrame:
    path = folder / name
    if not path.is_file():
        raise AnalysisError(f"{folder}: no {name} (an analysis folder written by `irrep-study analyze`)")
    return pd.read_csv(path, dtype={"l_values": str, "configuration": str})


TRIAL_COLUMNS = ("run_id", "configuration", "in_comparisons", "seed", "l_values", "num_params", TEST_MAE)
SCORE_COLUMNS = ("run_id", "block", "score", "value")


def _checked(table: pd.DataFrame, folder: Path, name: str, columns: tuple[str, ...], key: tuple[str, ...]) -> pd.DataFrame:
    """The table, or an AnalysisError naming the file and what is wrong: a missing column, or a row
    said twice (a trial counted twice would weigh twice in every statistic)."""
    missing = [column for column in columns if column not in table.columns]
    if missing:
        raise AnalysisError(f"{folder / name}: missing column(s) {', '.join(missing)}")
    repeated = table[table.duplicated(list(key), keep=False)]
    if len(repeated):
        first = ", ".join(f"{k}={repeated.iloc[0][k]}" for k in key)
        raise AnalysisError(f"{folder / name}: {len(repeated)} rows repeat the same {'/'.join(key)} (first: {first})")
    return table


def context_columns(trials: pd.DataFrame) -> list[str]:
    """The parameters other than the l set that vary across the trials: `analyze` writes them
    between ``l_values`` and ``num_params``."""
    columns = list(trials.columns)
    between = columns[columns.index("l_values") + 1 : columns.index("num_params")]
    return [name for name in between if trials[name].nunique() > 1]


def molecule_errors(folder: Path) -> dict[str, pd.Series] | None:
    """Each trial's |error| per test molecule from ``molecules.csv``, by run id; None without it."""
    path = folder / "molecules.csv"
    if not path.is_file():
        return None
    table = pd.read_csv(path).set_index("mol_id")
    return {match.group(1): table[column].dropna() for column in table.columns if (match := ERROR_COLUMN.fullmatch(column))}


def reanalyse(folder: Path, out: Path | None = None, n_boot: int = 2000, n_perm: int = 2000, seed: int = 0) -> Reanalysis:
    folder = Path(folder)
    out = Path(out) if out is not None else folder
    out.mkdir(parents=True, exist_ok=True)
    trials = _checked(_read(folder, "trials.csv"), folder, "trials.csv", TRIAL_COLUMNS, ("run_id",))
    scores = _checked(_read(folder, "scores.csv"), folder, "scores.csv", SCORE_COLUMNS, ("run_id", "block", "score"))
    unknown = set(scores["run_id"]) - set(trials["run_id"])
    if unknown:
        raise AnalysisError(f"{folder / 'scores.csv'}: scores of {len(unknown)} run(s) not in trials.csv (first: {sorted(unknown)[0]})")
    compared = trials[trials["in_comparisons"].astype(bool)]
    context = context_columns(trials)
    ablation = ablation_effects(compared, context, errors=molecule_errors(folder))
    correlations = correlate_scores(scores, compared, n_boot=n_boot, n_perm=n_perm, seed=seed)
    terms = factorial_terms(ablation)
    sentences = [s[0].upper() + s[1:] for s in headline(ablation)]
    sentences += [
        found.correlation_sentence(correlations, SIGNIFICANCE),
        found.ablation_significance_sentence(headline_estimates(ablation), terms),
    ]
    files = {"ablation": out / "ablation.csv", "correlations": out / "correlations.csv", "findings": out / "findings.txt"}
    ablation.to_csv(files["ablation"], index=False)
    correlations.to_csv(files["correlations"], index=False)
    files["findings"].write_text("\n".join(sentences) + "\n")
    figure = plots.ablation_figure(ablation, out / "ablation_effects.png")
    if figure:
        files["ablation_effects"] = figure
    return Reanalysis(ablation, correlations, sentences, files)
