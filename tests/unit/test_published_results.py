"""The published results folders say what the code computes from their own tables: re-analysing a
folder reproduces its ablation.csv, correlations.csv and findings.txt, and its README quotes the
factorial table as it is."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.reanalysis import reanalyse

RESULTS = Path(__file__).resolve().parents[2] / "results"
FACTORIAL_STUDIES = ["ablation-cpu", "pruning-cpu"]


def _same_table(published: Path, recomputed: Path) -> None:
    a, b = pd.read_csv(published), pd.read_csv(recomputed)
    assert list(a.columns) == list(b.columns), published
    assert len(a) == len(b), published
    for column in a.columns:
        if pd.api.types.is_numeric_dtype(b[column]) and not pd.api.types.is_bool_dtype(b[column]):
            assert np.allclose(a[column].to_numpy(dtype=float), b[column].to_numpy(dtype=float), rtol=1e-9, atol=1e-12, equal_nan=True), (
                published.name,
                column,
            )
        else:
            assert a[column].fillna("").astype(str).tolist() == b[column].fillna("").astype(str).tolist(), (published.name, column)


@pytest.mark.parametrize("study", FACTORIAL_STUDIES)
def test_reanalysing_a_published_folder_reproduces_its_statistics(study, tmp_path):
    folder = RESULTS / study
    result = reanalyse(folder, tmp_path, n_boot=2000, n_perm=2000, seed=0)
    for name in ("ablation.csv", "correlations.csv"):
        _same_table(folder / name, tmp_path / name)
    # The findings of `reanalyze` are the factorial's and the significance sentences: each in the published file.
    published = (folder / "findings.txt").read_text().splitlines()
    assert all(sentence in published for sentence in result.sentences), set(result.sentences) - set(published)


@pytest.mark.parametrize("study", FACTORIAL_STUDIES)
def test_the_results_readme_quotes_every_factorial_term_as_the_table_gives_it(study):
    folder = RESULTS / study
    table = pd.read_csv(folder / "ablation.csv")
    readme = (folder / "README.md").read_text()
    terms = table[table["kind"].isin(["main", "interaction"])]
    assert len(terms) >= 3
    for row in terms.itertuples():
        quoted = f"{row.effect_meV:+.1f} [{row.lo_meV:+.1f}, {row.hi_meV:+.1f}]"
        ratio = f"{row.ratio:.2f} [{row.ratio_lo:.2f}, {row.ratio_hi:.2f}]"
        assert quoted in readme and ratio in readme, (study, row.term, quoted, ratio)
    # Every README says how its intervals were made, in the words of the table.
    interval = terms["interval"].iloc[0]
    assert ("conditional on this test set" in readme) == ("conditional" in interval), (study, interval)
