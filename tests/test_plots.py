"""What the report's figures show: read back from the matplotlib figure before it is saved."""

from __future__ import annotations

import pandas as pd
import pytest

from analysis import plots


@pytest.fixture
def drawn(monkeypatch):
    """The figures a plotting function saves, kept open for inspection."""
    figures = []

    def keep(fig, path):
        figures.append(fig)
        return path

    monkeypatch.setattr(plots, "_save", keep)
    return figures


def test_heatmap_cells_say_rho_and_n_in_a_colour_that_reads_on_the_cell(drawn, tmp_path):
    correlations = pd.DataFrame([
        {"score": "utilization", "block": "l0", "rho": 0.9, "n_configurations": 8},
        {"score": "utilization", "block": "l1", "rho": -0.1, "n_configurations": 8},
        {"score": "structure", "block": "l0", "rho": -0.75, "n_configurations": 5},
        {"score": "structure", "block": "l1", "rho": float("nan"), "n_configurations": 5},
    ])
    plots.heatmap_figure(correlations, tmp_path / "heatmap.png")
    texts = {text.get_text(): text.get_color() for text in drawn[0].axes[0].texts}
    assert texts == {"0.90\nn=8": "white", "-0.10\nn=8": "black", "-0.75\nn=5": "white"}  # nothing on the undefined cell


def test_norm_share_panels_share_the_whole_zero_to_one_scale(drawn, tmp_path):
    history = {"norm_share_l0": [(1, 0.98), (2, 0.97)], "norm_share_l1": [(1, 0.01), (2, 0.03)]}
    plots.norm_share_figure([("l=0,1 seed=1", 100.0, history), ("l=0,1 seed=2", 120.0, history)], tmp_path / "share.png")
    panels = [ax for ax in drawn[0].axes if ax.get_title().startswith("l = ")]
    assert [ax.get_title() for ax in panels] == ["l = 0", "l = 1"]
    assert all(ax.get_ylim() == (0.0, 1.0) for ax in panels)  # a 1-3% share stays near the floor
