"""What the report's figures show: read back from the matplotlib figure before it is saved."""

from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd
import pytest

from analysis.report import plots


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
    correlations = pd.DataFrame(
        [
            {"score": "utilization", "block": "l0", "rho": 0.9, "n_configurations": 8},
            {"score": "utilization", "block": "l1", "rho": -0.1, "n_configurations": 8},
            {"score": "structure", "block": "l0", "rho": -0.75, "n_configurations": 5},
            {"score": "structure", "block": "l1", "rho": float("nan"), "n_configurations": 5},
        ]
    )
    plots.heatmap_figure(correlations, tmp_path / "heatmap.png")
    texts = {text.get_text(): text.get_color() for text in drawn[0].axes[0].texts}
    assert texts == {"0.90\nn=8": "white", "-0.10\nn=8": "black", "-0.75\nn=5": "white"}  # nothing on the undefined cell


def test_norm_share_panels_share_the_whole_zero_to_one_scale(drawn, tmp_path):
    history = {"norm_share_l0": [(1, 0.98), (2, 0.97)], "norm_share_l1": [(1, 0.01), (2, 0.03)]}
    plots.norm_share_figure([("l=0,1 seed=1", 100.0, history), ("l=0,1 seed=2", 120.0, history)], tmp_path / "share.png")
    panels = [ax for ax in drawn[0].axes if ax.get_title().startswith("l = ")]
    assert [ax.get_title() for ax in panels] == ["l = 0", "l = 1"]
    assert all(ax.get_ylim() == (0.0, 1.0) for ax in panels)  # a 1-3% share stays near the floor


def _two_seed_scores() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Four configurations of two seeds each (the last of one seed), a score that rises with the error."""
    trials = [
        ("a", 0.1, 100.0),
        ("a", 0.3, 110.0),
        ("b", 0.5, 130.0),
        ("b", 0.7, 150.0),
        ("c", 0.9, 160.0),
        ("c", 1.1, 160.0),
        ("d", 2.0, 200.0),
    ]
    scores = pd.DataFrame(
        [
            {"run_id": f"r{k}", "configuration": c, "block": "l1", "score": "utilization", "value": v, "test_mae_meV": mae}
            for k, (c, v, mae) in enumerate(trials)
        ]
    )
    correlations = pd.DataFrame(
        [
            {
                "block": "l1",
                "score": "utilization",
                "rho": 1.0,
                "rho_lo": float("nan"),
                "rho_hi": float("nan"),
                "p_rho": 0.042,
                "n_configurations": 4,
            }
        ]
    )
    return scores, correlations


def test_score_scatter_shows_configuration_means_in_their_units_with_seed_sd(drawn, tmp_path):
    scores, correlations = _two_seed_scores()
    plots.score_scatter_figure(scores, correlations, tmp_path / "scatter.png")
    ax = drawn[0].axes[0]
    assert "meV" in ax.get_ylabel() and "rank" not in ax.get_ylabel()
    assert "utilization" in ax.get_xlabel() and "rank" not in ax.get_xlabel()
    # One point per configuration at its means, not the ranks 1..4.
    points = np.asarray(sorted(map(tuple, ax.collections[-1].get_offsets().tolist())))
    np.testing.assert_allclose(points, [(0.2, 105.0), (0.6, 140.0), (1.0, 160.0), (2.0, 200.0)])
    # Bars of the seed sd for a, b and c (c's is zero); none for d, which has one seed.
    bars = [segment for collection in ax.collections[:-1] for segment in collection.get_segments()]
    spans = np.asarray(sorted((s[0][0], abs(s[1][1] - s[0][1]) / 2) for s in bars))
    np.testing.assert_allclose(spans, [(0.2, 50**0.5), (0.6, 200**0.5), (1.0, 0.0)], atol=1e-9)
    # The rank statistic stays: rho in the title, rho, p and n on the panel.
    assert "rho=1.00" in ax.get_title()
    assert ax.get_legend().get_title().get_text() == "Spearman rho = 1.00\np = 0.042\nn = 4"


def _rising_share(mae: float) -> dict:
    return {"norm_share_l0": [(1, 0.9), (2, 0.8)], "norm_share_l1": [(1, 0.1), (2, mae / 1000.0)]}


def test_norm_share_legend_names_each_configuration_once_with_its_mean_mae(drawn, tmp_path):
    trials = [("l=0,1 h=8", 120.0), ("l=0 h=8", 100.0), ("l=0,1 h=8", 140.0), ("l=0 h=8", 104.0)]
    plots.norm_share_figure([(label, mae, _rising_share(mae)) for label, mae in trials], tmp_path / "share.png")
    fig = drawn[0]
    (legend,) = fig.legends
    assert [text.get_text() for text in legend.get_texts()] == ["l=0 h=8: 102.0 meV", "l=0,1 h=8: 130.0 meV"]  # best first
    # The seeds of a configuration share colour and line style; the configurations differ.
    panel = fig.axes[0]
    styles = [(line.get_color(), line.get_linestyle()) for line in panel.get_lines()]
    assert styles[0] == styles[2] and styles[1] == styles[3] and styles[0] != styles[1]
    # The legend's handles are drawn as the lines they name.
    handle_styles = [(h.get_color(), h.get_linestyle()) for h in legend.legend_handles]
    assert handle_styles == [styles[1], styles[0]]


def test_norm_share_legend_of_many_configurations_names_the_best_and_worst_few(drawn, tmp_path):
    histories = [(f"h={k}", 100.0 + k, _rising_share(100.0 + k)) for k in range(14)]
    plots.norm_share_figure(histories, tmp_path / "share.png")
    (legend,) = drawn[0].legends
    names = [text.get_text().split(":")[0] for text in legend.get_texts()]
    assert names == ["h=0", "h=1", "h=2", "h=3", "h=4", "h=9", "h=10", "h=11", "h=12", "h=13"]
    assert "the other 4" in legend.get_title().get_text()
    # Outside the panels: it covers none of them (drawn first: constrained layout places it then).
    drawn[0].canvas.draw()
    renderer = drawn[0].canvas.get_renderer()
    box = legend.get_window_extent(renderer)
    assert not any(box.overlaps(ax.get_window_extent(renderer)) for ax in drawn[0].axes)


def test_umap_titles_do_not_overlap_and_fit_the_figure(drawn, tmp_path):
    rng = np.random.default_rng(0)
    blocks = ["l0", "l1", "l2", "lgt0", "joint"]  # a tall figure: tight_layout left the suptitle too little room
    title = "l=0,1,2 h=16 layers=3 lr=0.003 seed=3 (test MAE 123.4 meV, rank 1/48; run 0123456789abcdef0123456789abcdef)"
    plots.umap_figure(
        title, {b: rng.normal(size=(50, 2)) for b in blocks}, rng.normal(size=50), rng.uniform(0.1, 100.0, size=50), tmp_path / "umap.png"
    )
    fig = drawn[0]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = list(fig.texts) + [ax.title for ax in fig.axes if ax.title.get_text()]  # fig.texts: the suptitle
    assert len(texts) == 1 + 2 * len(blocks)
    boxes = [text.get_window_extent(renderer) for text in texts]
    clashes = [
        (a.get_text(), b.get_text()) for i, a in enumerate(texts) for j, b in enumerate(texts) if i < j and boxes[i].overlaps(boxes[j])
    ]
    assert clashes == []
    # The whole title on the figure: not cut at its edges.
    assert fig.bbox.contains(boxes[0].x0, boxes[0].y0) and fig.bbox.contains(boxes[0].x1, boxes[0].y1)


def test_a_umap_column_has_one_colour_scale_for_every_block(drawn, tmp_path):
    """Every row shows the same molecules: in each column a colour means the same value in every
    block, on one colour bar spanning the finite values (a molecule without nSPS is grey)."""
    rng = np.random.default_rng(1)
    blocks = ["l0", "l1", "lgt0"]
    nsps = rng.normal(size=40)
    nsps[3] = np.nan
    error = rng.uniform(0.5, 300.0, size=40)
    plots.umap_figure("t", {b: rng.normal(size=(40, 2)) for b in blocks}, nsps, error, tmp_path / "umap.png")
    fig = drawn[0]
    panels = [ax for ax in fig.axes if ax.get_title()]
    colour_bars = [ax for ax in fig.axes if not ax.get_title()]
    assert len(panels) == 2 * len(blocks) and len(colour_bars) == 2
    assert sorted(ax.get_ylabel() for ax in colour_bars) == ["nSPS", "|error| (meV)"]
    for column, (values, log) in enumerate([(nsps, False), (error, True)]):
        coloured = [c for ax in panels[column::2] for c in ax.collections if c.get_array() is not None]
        assert len(coloured) == len(blocks)
        for collection in coloured:
            norm = collection.norm
            assert isinstance(norm, matplotlib.colors.LogNorm) == log
            assert (norm.vmin, norm.vmax) == (np.nanmin(values), np.nanmax(values))
    greys = [c for ax in panels[0::2] for c in ax.collections if c.get_array() is None]
    assert [len(c.get_offsets()) for c in greys] == [1] * len(blocks)


def _trial_table() -> pd.DataFrame:
    """Trials of three configurations: a (two seeds, largest l 2), b (one seed, best on validation,
    largest l 1) and c (a seed missing, largest l 0); the composition fit at 900 meV."""
    rows = [
        ("a", "0,1,2", 1, 100.0, 90.0, 20_000, 2.0),
        ("a", "0,1,2", 2, 110.0, 92.0, 20_000, 3.0),
        ("b", "0,1", 1, 130.0, 80.0, 9_000, 1.0),
        ("c", "0", 1, 200.0, 150.0, 4_000, 0.5),
    ]
    return pd.DataFrame(
        [
            {
                "configuration": c,
                "l_values": l,
                "seed": seed,
                "test_mae_meV": test,
                "best_val_mae_meV": val,
                "num_params": size,
                "epoch_seconds": seconds,
                "baseline_test_mae_meV": 900.0,
                "in_comparisons": c != "c",
            }
            for c, l, seed, test, val, size, seconds in rows
        ]
    )


def _errorbars(ax) -> list[tuple[tuple[float, float], str]]:
    """Each errorbar's (x, y) and colour."""
    return [(tuple(container.lines[0].get_xydata()[0]), container.lines[0].get_color()) for container in ax.containers]


def test_one_colour_per_l_in_every_figure():
    assert plots.l_colour(1) != plots.l_colour(2) and plots.l_colour(0) != plots.l_colour(3)
    assert plots.largest_l("0,1,3") == 3 and plots.largest_l("0") == 0


def test_errors_per_configuration_are_ranked_on_validation_with_seed_spread_against_the_composition_fit(drawn, tmp_path):
    plots.configuration_errors_figure(_trial_table(), tmp_path / "errors.png")
    ax = drawn[0].axes[0]
    # Best on validation at the top (b: 80 meV), whatever the test MAE; c is marked as incomplete.
    assert [label.get_text() for label in ax.get_yticklabels()] == ["b", "a", "c (not every seed)"]
    # Mean test MAE per configuration, coloured by its largest l.
    assert _errorbars(ax) == [((130.0, 0.0), plots.l_colour(1)), ((105.0, 1.0), plots.l_colour(2)), ((200.0, 2.0), plots.l_colour(0))]
    # The seed sd as a bar where there are seeds to spread (a), none for one seed.
    bars = [container.lines[2] for container in ax.containers]
    assert [len(b) for b in bars] == [0, 1, 0]
    (segment,) = bars[1][0].get_segments()
    np.testing.assert_allclose(segment[:, 0], [105.0 - 50**0.5, 105.0 + 50**0.5])
    # Every seed as a dot; the composition fit as a vertical line at its MAE.
    seeds = sorted(
        tuple(p)
        for c in ax.collections
        if len(c.get_offsets())
        for p in c.get_offsets().tolist()
        if c not in {b for bar in bars for b in bar}
    )
    assert seeds == [(100.0, 1.0), (110.0, 1.0), (130.0, 0.0), (200.0, 2.0)]
    assert [line.get_xdata()[0] for line in ax.lines if line.get_linestyle() == "--"] == [900.0]


def test_accuracy_is_drawn_against_parameters_and_seconds_per_epoch(drawn, tmp_path):
    plots.cost_figure(_trial_table(), tmp_path / "cost.png")
    size, seconds = drawn[0].axes
    assert size.get_xscale() == "log" and "parameters" in size.get_xlabel() and "seconds" in seconds.get_xlabel()
    assert sorted(_errorbars(size)) == sorted(
        [((20_000.0, 105.0), plots.l_colour(2)), ((9_000.0, 130.0), plots.l_colour(1)), ((4_000.0, 200.0), plots.l_colour(0))]
    )
    assert ((2.5, 105.0), plots.l_colour(2)) in _errorbars(seconds)
    # Tick labels are plain numbers, as the tables print them (not 10^4).
    drawn[0].canvas.draw()
    labels = [t.get_text() for t in size.get_xticklabels() if t.get_text()]
    assert labels and not any("10^" in t or "$" in t for t in labels)
    # Trials that never logged their epoch time: the parameters panel alone.
    plots.cost_figure(_trial_table().assign(epoch_seconds=float("nan")), tmp_path / "cost.png")
    assert len(drawn[1].axes) == 1
