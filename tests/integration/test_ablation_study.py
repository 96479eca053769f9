"""The shipped ablation study, shrunk to seconds (2 l sets x 2 seeds x 1 epoch on 300 molecules),
swept for real (local Ray, grid, SQLite MLflow) and analysed; and the published result of the full
run (results/ablation-cpu/) has the format that `analyze` writes."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from analysis.report.sections import STUDY_FIGURES
from tests.helpers.mlflow_trials import console_script

pytestmark = pytest.mark.slow  # trains the ablation space's every configuration and seed

ROOT = Path(__file__).resolve().parents[2]
PUBLISHED = ROOT / "results" / "ablation-cpu"
REANALYSED = {"ablation.csv", "correlations.csv"}


@pytest.fixture(scope="module")
def tiny_ablation(qm9, qm9_cache_dir, tmp_path_factory):
    """(sweep JSON, analyze JSON, analysis folder) of the shrunk ablation space."""
    space = yaml.safe_load((ROOT / "search_spaces" / "ablation.yaml").read_text())
    shipped = space["search"]["grid"]
    assert {"l_values": [0]} in shipped and {"l_values": [0, 1]} in shipped
    space["trial"].update(subset=300, epochs=1, hidden_dim=4, num_layers=1)
    space["search"]["grid"] = [{"l_values": [0, 1]}, {"l_values": [0]}]
    space["seeds"] = space["seeds"][:2]
    work = tmp_path_factory.mktemp("ablation-e2e")
    (work / "ablation.yaml").write_text(yaml.safe_dump(space))
    cli = console_script(work, qm9_cache_dir, threads=1)
    swept = cli("sweep", "ablation.yaml", "--num-cpus", "2")
    analysed = cli("analyze", "--experiment", "ablation", "--out", "analysis", "--bootstrap", "200", "--max-molecules", "30")
    return swept, analysed, work / "analysis"


def test_the_ablation_space_trains_every_configuration_and_seed_and_estimates_the_effect_of_l1(tiny_ablation):
    swept, analysed, out = tiny_ablation
    assert [t["status"] for t in swept["trials"]] == ["completed"] * 4  # no early stopping
    assert analysed["trials_analysed"] == 4 and analysed["configurations_compared"] == 2
    # One epoch on 240 molecules does not beat counting atoms, and the analysis says so first.
    assert any("do not clearly beat the composition fit" in note for note in analysed["notes"])
    effects = pd.read_csv(out / "ablation.csv")
    # [0, 1] and [0], nothing else varied: a 2^1 factorial, its seeds the replicates.
    main = effects[effects["kind"] == "main"].iloc[0]
    assert set(effects["method"]) == {"factorial"} and (main["l"], main["n_trials"]) == (1, 4)
    # 2 seed-level degrees of freedom, more once the test molecules' part (many of them) is added.
    assert main["df"] >= 2
    # Every trial's per-molecule errors are in the analysis, so the intervals carry the test set's sampling.
    assert main["interval"].startswith("seed residual + test-molecule sampling")
    assert (out / "findings.txt").read_text().startswith("The l sets form a 2^1 factorial: l=1 each in or out, always in: 0;")
    configurations = pd.read_csv(out / "configurations.csv")
    assert sorted(configurations["configuration"]) == ["l=0", "l=0,1"]
    assert (configurations["n_completed"] == 2).all()
    # Every configuration is read against the composition fit on the same split.
    assert (configurations["baseline_test_mae_meV_mean"] > 0).all() and (configurations["baseline_test_mae_meV_sd"] == 0).all()


def test_the_published_ablation_result_has_the_format_analyze_writes(tiny_ablation):
    _, _, out = tiny_ablation
    assert (PUBLISHED / "README.md").is_file(), "results/ablation-cpu/README.md is missing"
    tables = sorted(path.name for path in PUBLISHED.glob("*.csv"))
    assert {"ablation.csv", "configurations.csv", "correlations.csv", "scores.csv"} <= set(tables)
    for name in tables:
        published, written = pd.read_csv(PUBLISHED / name), pd.read_csv(out / name)
        if name in REANALYSED:
            # Rewritten by `irrep-study reanalyze` with the current statistics: the current format exactly.
            assert list(published.columns) == list(written.columns), name
        else:
            # Written by the analysis of 2026-11-26: every column it has is one analyze still writes
            # (later columns, such as epoch_seconds, need the MLflow runs to fill).
            assert [c for c in written.columns if c in published.columns] == list(published.columns), name
    # The pruning study was analysed by the current code: its tables have the current format exactly.
    for path in sorted((PUBLISHED.parent / "pruning-cpu").glob("*.csv")):
        if path.name == "molecules.csv":  # one column per trial, named by its run id
            continue
        assert list(pd.read_csv(path).columns) == list(pd.read_csv(out / path.name).columns), path.name
    # Every published figure is one the report shows (UMAP grids are named after their trials).
    written_figures = {path.name for path in out.glob("*.png") if not path.name.startswith("umap_")}
    assert "ablation_effects.png" in written_figures and written_figures <= set(STUDY_FIGURES)
    for figure in PUBLISHED.glob("*.png"):
        assert figure.name.startswith("umap_") or figure.name in STUDY_FIGURES, figure.name
    published = pd.read_csv(PUBLISHED / "configurations.csv")
    assert len(published) == 8 and (published["n_completed"] == 5).all()
    total = sum(path.stat().st_size for path in PUBLISHED.rglob("*") if path.is_file())
    assert total < 5e6, f"results/ablation-cpu is {total / 1e6:.1f} MB"
