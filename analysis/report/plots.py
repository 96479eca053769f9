"""The analysis figures, as PNG files (matplotlib, headless Agg backend).

Pictures complement the numbers of correlations.csv; none of them is the evidence on its own.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import matplotlib
import matplotlib.ticker

from study.names import BASELINE_TEST_MAE, BEST_VAL_MAE, EPOCH_SECONDS, TEST_MAE

matplotlib.use("Agg")  # before pyplot: analysis runs on servers and in CI without a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

DPI = 110
# Characters per line of a UMAP figure's title: about what 10 pt text fits across its 8 inches.
UMAP_TITLE_WIDTH = 90


# One colour per l, the same in every figure that colours by l or by a configuration's largest l:
# Okabe and Ito's colour-blind-safe palette (its yellow left out: too pale on white), l = 0 grey.
L_COLOURS = ("#555555", "#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9")


def l_colour(l: int) -> str:
    """The colour of order l (past the palette's seven, the colours repeat)."""
    return L_COLOURS[int(l) % len(L_COLOURS)]


def largest_l(l_values: str) -> int:
    """The largest order of a comma list of l values, as MLflow logs it ("0,1,2" -> 2)."""
    return max(int(part) for part in str(l_values).split(",") if part.strip())


def _block_l(name: str) -> int | None:
    """The order of an irrep block named l0, l1, ...; None for lgt0 and joint."""
    return int(name[1:]) if name.startswith("l") and name[1:].isdigit() else None


def block_order(names) -> list[str]:
    """l0, l1, ... by order, then the pseudo-blocks lgt0 and joint."""

    def key(name: str):
        if name.startswith("l") and name[1:].isdigit():
            return (0, int(name[1:]))
        return (1, 0 if name == "lgt0" else 1)

    return sorted(set(names), key=key)


def _save(fig, path: Path) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def umap_figure(title: str, projections: dict[str, np.ndarray], nsps: np.ndarray, abs_error_meV: np.ndarray, path: Path) -> Path:
    """One row per block: its 2D UMAP coloured by nSPS (left) and by absolute error (right).

    Every row shows the same molecules, so a column has one colour scale and one colour bar: a
    colour means the same nSPS (or error) in every block. (A colour bar per panel, each with its
    own log ticks, also made the figure take twice as long to draw.)"""
    names = list(projections)
    # Constrained layout reserves room for the suptitle above the panel titles (tight_layout let a
    # long one run into them and past the figure's edges); the title, a trial label with its run
    # id, is wrapped to the figure's width.
    fig, axes = plt.subplots(len(names), 2, figsize=(8, 3.2 * len(names)), squeeze=False, layout="constrained")
    # Errors are heavy-tailed: a log colour scale keeps the many small errors distinguishable.
    error = np.maximum(np.asarray(abs_error_meV, dtype=np.float64), 1e-3)
    columns = [
        (np.asarray(nsps, dtype=np.float64), "nSPS", "viridis", matplotlib.colors.Normalize),
        (error, "|error| (meV)", "magma", matplotlib.colors.LogNorm),
    ]
    for col, (values, label, cmap, norm_type) in enumerate(columns):
        finite = np.isfinite(values)
        norm = norm_type(vmin=values[finite].min(), vmax=values[finite].max()) if finite.any() else norm_type()
        for row, name in enumerate(names):
            xy = projections[name]
            ax = axes[row, col]
            if (~finite).any():
                ax.scatter(xy[~finite, 0], xy[~finite, 1], s=6, c="lightgrey", linewidths=0)
            points = ax.scatter(xy[finite, 0], xy[finite, 1], c=values[finite], s=6, linewidths=0, cmap=cmap, norm=norm)
            ax.set_title(f"{name}: {label}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        fig.colorbar(points, ax=axes[:, col], label=label, shrink=min(1.0, 3.0 / len(names)))
    fig.suptitle(textwrap.fill(title, UMAP_TITLE_WIDTH), fontsize=10)
    return _save(fig, path)


def score_scatter_figure(scores: pd.DataFrame, correlations: pd.DataFrame, path: Path, top: int = 9) -> Path | None:
    """Score vs test MAE in their units (configuration means over seeds, error bars: the test MAE's
    seed-to-seed sd where a configuration has more than one seed) for the most significant
    correlations.

    The values, not their ranks: a reader sees how much the error differs (meV) and how the score
    is spread. The statistic is still the rank one the table reports: the title gives Spearman rho
    and its 95% CI, the panel rho, its permutation p and the number of configurations n.
    """
    candidates = correlations[np.isfinite(correlations["rho"])].copy()
    if candidates.empty:
        return None
    # Most significant first; among equal p-values (common with few trials) the larger |rho|.
    candidates["abs_rho"] = candidates["rho"].abs()
    candidates = candidates.sort_values(["p_rho", "abs_rho"], ascending=[True, False], kind="stable").head(top)
    cols = min(3, len(candidates))
    rows = math.ceil(len(candidates) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(candidates) :]:
        ax.axis("off")
    for ax, (_, row) in zip(axes.flat, candidates.iterrows()):
        group = scores[(scores["block"] == row["block"]) & (scores["score"] == row["score"])]
        group = group[np.isfinite(group["value"]) & np.isfinite(group[TEST_MAE])]
        # The same configuration means the correlation is computed on (analysis/stats/correlate.py).
        group = group.groupby("configuration").agg(
            value=("value", "mean"), mae=(TEST_MAE, "mean"), sd=(TEST_MAE, "std"), seeds=(TEST_MAE, "count")
        )
        spread = (group["seeds"] > 1).to_numpy()  # a single seed has no sd: no bar rather than a zero one
        if spread.any():
            ax.errorbar(
                group["value"][spread], group["mae"][spread], yerr=group["sd"][spread], fmt="none", ecolor="grey", elinewidth=0.8, capsize=2
            )
        ax.scatter(group["value"], group["mae"], s=18, zorder=3)
        ax.set_xlabel(f"{row['score']} of {row['block']} (mean over seeds)", fontsize=8)
        ax.set_ylabel("test MAE (meV, mean ± sd over seeds)", fontsize=8)
        ax.tick_params(labelsize=7)
        # An empty legend holding the statistics: loc="best" puts it where it hides the fewest points.
        annotation = ax.legend(
            [],
            [],
            title=f"Spearman rho = {row['rho']:.2f}\np = {row['p_rho']:.2g}\nn = {row['n_configurations']}",
            loc="best",
            title_fontsize=7,
            alignment="left",
        )
        annotation.get_frame().set_alpha(0.8)
        interval = (
            f"95% CI [{row['rho_lo']:.2f}, {row['rho_hi']:.2f}]" if np.isfinite(row["rho_lo"]) else "(too few configurations for a CI)"
        )
        ax.set_title(f"{row['block']} {row['score']}\nrank correlation rho={row['rho']:.2f} {interval}", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


# |rho| above which RdBu_r cells are dark enough to need white text.
HEATMAP_DARK_ABOVE = 0.6


def heatmap_figure(correlations: pd.DataFrame, path: Path) -> Path | None:
    """Spearman rho of every score (rows) and block (columns) with test MAE across configurations;
    blank where undefined or left out (scores determined by the test MAE itself)."""
    if correlations.empty:
        return None
    table = correlations.pivot(index="score", columns="block", values="rho")
    table = table[block_order(table.columns)]
    counts = correlations.pivot(index="score", columns="block", values="n_configurations").reindex_like(table)
    fig, ax = plt.subplots(figsize=(1.1 * table.shape[1] + 3, 0.6 * table.shape[0] + 1.5))
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="lightgrey")
    image = ax.imshow(np.ma.masked_invalid(table.to_numpy(dtype=float)), cmap=cmap, vmin=-1, vmax=1, aspect="auto")
    ax.set_xticks(range(table.shape[1]), table.columns, fontsize=8)
    for label in ax.get_xticklabels():
        if _block_l(label.get_text()) is not None:
            label.set_color(l_colour(_block_l(label.get_text())))
    ax.set_yticks(range(table.shape[0]), table.index, fontsize=8)
    for (i, j), value in np.ndenumerate(table.to_numpy(dtype=float)):
        if np.isfinite(value):
            # White on the dark ends of the colour map, black on its light middle; n: configurations.
            color = "white" if abs(value) > HEATMAP_DARK_ABOVE else "black"
            ax.text(j, i, f"{value:.2f}\nn={int(counts.iat[i, j])}", ha="center", va="center", fontsize=7, color=color)
    fig.colorbar(image, ax=ax, label="Spearman rho with test MAE")
    ax.set_title("score vs test error across configurations (grey: undefined or not tested)", fontsize=9)
    return _save(fig, path)


# Norm-share legend: every configuration up to this many, else the best and worst ENDS.
NORM_SHARE_LEGEND_MAX = 10
NORM_SHARE_LEGEND_ENDS = 5
NORM_SHARE_LINE_STYLES = ("-", "--", ":", "-.")
NORM_SHARE_MARKERS_UP_TO = 15  # logged epochs per line


def norm_share_figure(histories: list[tuple[str, float, dict[str, list[tuple[int, float]]]]], path: Path) -> Path | None:
    """Per l, the logged share of the validation embeddings' squared norm by epoch, one line per trial.

    ``histories``: (configuration label, test MAE, metric history) per trial. The seeds of one
    configuration share a colour and line style; configurations are ranked by their mean test MAE
    (colour from dark, the best, to light, the worst) and the legend names each with that mean.
    """
    orders = sorted(
        {int(name.removeprefix("norm_share_l")) for _, _, history in histories for name in history if name.startswith("norm_share_l")}
    )
    if not orders:
        return None
    maes: dict[str, list[float]] = {}
    for label, mae, _ in histories:
        maes.setdefault(label, []).append(mae)
    means = {label: float(np.nanmean(values)) if np.isfinite(values).any() else math.nan for label, values in maes.items()}
    # Best first; a configuration without a test MAE last.
    ranked = sorted(means, key=lambda label: (not math.isfinite(means[label]), means[label], label))
    cmap = matplotlib.colormaps["viridis"]
    styles = {
        # Up to 0.9 of viridis: its last tenth is too pale on white. Line styles cycle so that
        # neighbours in rank, close in colour, still differ.
        label: {
            "color": cmap(0.9 * rank / max(len(ranked) - 1, 1)),
            "linestyle": NORM_SHARE_LINE_STYLES[rank % len(NORM_SHARE_LINE_STYLES)],
        }
        for rank, label in enumerate(ranked)
    }
    cols = min(3, len(orders))
    rows = math.ceil(len(orders) / cols)
    # The extra width is for the legend outside the panels.
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols + 2.5, 3.2 * rows), squeeze=False, layout="constrained")
    for ax in axes.flat[len(orders) :]:
        ax.axis("off")
    for ax, l in zip(axes.flat, orders):
        for label, _, history in histories:
            points = history.get(f"norm_share_l{l}")
            if points:
                epochs, values = zip(*points)
                # Markers show a sparse log's points (a single one has no line); on a dense one
                # they turn the dashed and dotted styles into noise.
                marker = "o" if len(points) <= NORM_SHARE_MARKERS_UP_TO else None
                ax.plot(epochs, values, marker=marker, markersize=2, linewidth=1, **styles[label])
        ax.set_title(f"l = {l}", fontsize=9, color=l_colour(l))
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_ylabel("share of squared norm", fontsize=8)
        # One scale for every panel, the whole range of a share: a 1-3% share must look small.
        ax.set_ylim(0.0, 1.0)
    # A long legend would run off the figure: past the limit, only the best and worst few are
    # named; the others are drawn, and their colours place them between.
    if len(ranked) > NORM_SHARE_LEGEND_MAX:
        shown = ranked[:NORM_SHARE_LEGEND_ENDS] + ranked[-NORM_SHARE_LEGEND_ENDS:]
        title = (
            f"configuration: mean test MAE\n{NORM_SHARE_LEGEND_ENDS} best and {NORM_SHARE_LEGEND_ENDS} worst of "
            f"{len(ranked)};\nthe other {len(ranked) - len(shown)} lie between"
        )
    else:
        shown = ranked
        title = "configuration: mean test MAE"
    handles = [matplotlib.lines.Line2D([], [], linewidth=1.5, **styles[label]) for label in shown]
    fig.legend(
        handles,
        [f"{label}: {means[label]:.1f} meV" for label in shown],
        loc="outside right upper",
        fontsize=7,
        title=title,
        title_fontsize=7,
        alignment="left",
    )
    return _save(fig, path)


def ablation_figure(table: pd.DataFrame, path: Path) -> Path | None:
    """Forest plot: per l, each estimate of the effect of including it on test MAE, with its 95% interval.

    A factorial table gets its own forest plot (:func:`factorial_figure`). Otherwise paired and
    regression estimates in colour; the unpaired one (confounded) in grey. Estimates without an
    interval are drawn as open markers.
    """
    if len(table) and (table["method"] == "factorial").all():
        return factorial_figure(table, path)
    shown = table[np.isfinite(table["effect_meV"].to_numpy(dtype=float))]
    if shown.empty:
        return None
    orders = sorted(shown["l"].unique())
    styles = {"paired": ("tab:blue", -0.2), "regression": ("tab:orange", 0.0), "unpaired": ("grey", 0.2)}
    fig, ax = plt.subplots(figsize=(7, 0.9 * len(orders) + 1.4))
    for method, (color, offset) in styles.items():
        rows = shown[shown["method"] == method]
        if rows.empty:
            continue
        y = np.array([orders.index(l) for l in rows["l"]]) + offset
        effect, lo, hi = (rows[c].to_numpy(dtype=float) for c in ("effect_meV", "lo_meV", "hi_meV"))
        has = np.isfinite(lo) & np.isfinite(hi)
        if has.any():
            ax.errorbar(
                effect[has], y[has], xerr=[effect[has] - lo[has], hi[has] - effect[has]], fmt="o", color=color, capsize=3, label=method
            )
        if (~has).any():
            ax.scatter(effect[~has], y[~has], facecolors="none", edgecolors=color, label=f"{method} (no interval)")
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(orders)), [f"l = {l}" for l in orders])
    for label, l in zip(ax.get_yticklabels(), orders):
        label.set_color(l_colour(l))
    ax.set_ylim(len(orders) - 0.5, -0.5)  # l = first at the top
    ax.set_xlabel("change of test MAE when l is included (meV); < 0: including it helps", fontsize=8)
    ax.legend(fontsize=8, loc="best")
    ax.set_title("ablation effects with 95% intervals", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


FACTORIAL_KINDS = {
    "main": ("tab:blue", "main effect"),
    "interaction": ("tab:purple", "interaction"),
    "simple": ("tab:grey", "simple effect (adding l to one l set)"),
}


def factorial_figure(table: pd.DataFrame, path: Path) -> Path | None:
    """Two forest panels sharing rows: every factorial term (main effects, interactions) and simple
    effect with its 95% interval, on test MAE in meV (left) and as a ratio on a log axis (right)."""
    rows = table[table["kind"].isin(list(FACTORIAL_KINDS))].reset_index(drop=True)
    rows = rows[np.isfinite(rows["effect_meV"].to_numpy(dtype=float))].reset_index(drop=True)
    if rows.empty:
        return None
    labels = [f"{row.term}" if row.kind in ("main", "interaction") else f"+{row.term} to [{row.context}]" for row in rows.itertuples()]
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.32 * len(rows) + 1.6), sharey=True)
    y = np.arange(len(rows))
    for kind, (color, label) in FACTORIAL_KINDS.items():
        chosen = (rows["kind"] == kind).to_numpy()
        if not chosen.any():
            continue
        part = rows[chosen]
        for ax, (value, lo, hi) in zip(axes, (("effect_meV", "lo_meV", "hi_meV"), ("ratio", "ratio_lo", "ratio_hi"))):
            v, a, b = (part[c].to_numpy(dtype=float) for c in (value, lo, hi))
            ax.errorbar(v, y[chosen], xerr=[v - a, b - v], fmt="o", color=color, capsize=3, label=label, markersize=4)
    axes[0].axvline(0.0, color="black", linewidth=0.8)
    axes[1].axvline(1.0, color="black", linewidth=0.8)
    axes[1].set_xscale("log")
    # Plain numbers on the ratio axis (the default writes 4 x 10^-1).
    axes[1].xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.2g"))
    axes[1].xaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.2g"))
    axes[1].tick_params(axis="x", which="both", labelsize=7)
    axes[0].set_yticks(y, labels, fontsize=8)
    for label, row in zip(axes[0].get_yticklabels(), rows.itertuples()):
        if row.kind == "main":
            label.set_color(l_colour(row.l))
    axes[0].set_ylim(len(rows) - 0.5, -0.5)
    axes[0].set_xlabel("change of test MAE (meV); < 0: including l helps", fontsize=8)
    axes[1].set_xlabel("ratio of test MAE (log scale); < 1: including l helps", fontsize=8)
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle("factorial effects with 95% intervals", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


class _PlainLogFormatter(matplotlib.ticker.LogFormatter):
    """matplotlib's choice of which log ticks to label (minor ones only on a short axis), printed as
    plain numbers (20,000 and 0.3, not 2 x 10^4 and 3 x 10^-1), as the report's tables print them."""

    def _num_to_string(self, x, vmin, vmax):
        return f"{x:,.0f}" if x >= 10 else f"{x:.2g}"


def plain_log_axis(axis) -> None:
    """Plain numbers on the major and minor ticks of a log axis."""
    axis.set_major_formatter(_PlainLogFormatter())
    axis.set_minor_formatter(_PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    axis.set_tick_params(which="both", labelsize=7)


def _per_configuration(trials: pd.DataFrame) -> pd.DataFrame:
    """Per configuration of the trial table (completed trials): mean and seed sd of test MAE, mean
    validation MAE, its l set and largest l, mean parameters and seconds per epoch (with sd), and
    whether every seed completed; ranked on mean validation MAE, best first."""
    grouped = trials.groupby("configuration", sort=False)
    table = pd.DataFrame(
        {
            "l_values": grouped["l_values"].first().astype(str),
            "mae": grouped[TEST_MAE].mean(),
            "sd": grouped[TEST_MAE].std(ddof=1),
            "val": grouped[BEST_VAL_MAE].mean(),
            "complete": grouped["in_comparisons"].all(),
        }
    )
    for column in ("num_params", EPOCH_SECONDS):
        if column in trials:
            table[column] = grouped[column].mean()
            table[f"{column}_sd"] = grouped[column].std(ddof=1)
    table["largest_l"] = table["l_values"].map(largest_l)
    table = table[np.isfinite(table["mae"])]
    return table.sort_values(["val", "mae"], kind="stable", na_position="last")


def _largest_l_legend(ax, orders, extra=(), **kwargs) -> None:
    handles = [
        matplotlib.lines.Line2D([], [], marker="o", linestyle="none", color=l_colour(l), label=f"largest l = {l}") for l in sorted(orders)
    ]
    ax.legend(handles=[*handles, *extra], fontsize=7, **kwargs)


def _composition_fit(ax, trials: pd.DataFrame, vertical: bool) -> list:
    """The composition fit's test MAE as a dashed grey line, with a band over its range when the
    trials' test splits differ; returns the legend handle."""
    baseline = trials[BASELINE_TEST_MAE].to_numpy(dtype=float)
    baseline = baseline[np.isfinite(baseline)]
    if not len(baseline):
        return []
    line, span = (ax.axvline, ax.axvspan) if vertical else (ax.axhline, ax.axhspan)
    line(float(baseline.mean()), color="grey", linestyle="--", linewidth=1.2)
    if baseline.max() - baseline.min() > 1e-6 * abs(baseline.mean()):
        span(float(baseline.min()), float(baseline.max()), color="grey", alpha=0.15, linewidth=0)
    return [matplotlib.lines.Line2D([], [], color="grey", linestyle="--", label="composition fit")]


def configuration_errors_figure(trials: pd.DataFrame, path: Path) -> Path | None:
    """Test MAE per configuration against the composition fit: the mean over seeds with the seed sd
    as a bar and each seed as an open dot, coloured by the configuration's largest l, ranked on
    mean validation MAE (best at the top: the order a selection on validation sees them in); the
    composition fit's test MAE as a dashed line. ``trials``: the trial table of `analyze`."""
    table = _per_configuration(trials)
    if table.empty:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 0.3 * len(table) + 1.8))
    for y, (configuration, row) in enumerate(table.iterrows()):
        colour = l_colour(row["largest_l"])
        seeds = trials.loc[trials["configuration"] == configuration, TEST_MAE].to_numpy(dtype=float)
        ax.scatter(seeds, np.full(len(seeds), y), s=14, facecolors="none", edgecolors=colour, linewidths=0.8, zorder=2)
        sd = row["sd"] if np.isfinite(row["sd"]) else None  # one seed: no bar rather than a zero one
        ax.errorbar(row["mae"], y, xerr=sd, fmt="o", color=colour, capsize=3, markersize=5, zorder=3)
    labels = [name if row["complete"] else f"{name} (not every seed)" for name, row in table.iterrows()]
    ax.set_yticks(range(len(table)), labels, fontsize=7)
    ax.set_ylim(len(table) - 0.5, -0.5)
    fit = _composition_fit(ax, trials, vertical=True)
    ax.set_xlim(left=0)
    ax.set_xlabel("test MAE (meV): mean over seeds, bar ± seed sd, open dots the seeds", fontsize=8)
    ax.set_ylabel("configuration, best on validation at the top", fontsize=8)
    seed = matplotlib.lines.Line2D([], [], marker="o", linestyle="none", markerfacecolor="none", color="grey", label="one seed")
    _largest_l_legend(ax, table["largest_l"].unique(), extra=[seed, *fit], loc="best")
    ax.set_title("test error per configuration against the composition fit", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


COST_AXES = {"num_params": "parameters", EPOCH_SECONDS: "seconds per training epoch (validation included)"}
COST_LABELS_UP_TO = 10  # configurations; past this, labels on the points would overlap


def cost_figure(trials: pd.DataFrame, path: Path) -> Path | None:
    """Accuracy against cost: mean test MAE over seeds (bars: seed sd) against parameters and
    against seconds per epoch (bars: seed sd of the wall time), log axes, one point per
    configuration coloured by its largest l; the composition fit as a dashed line. A cost the
    trials did not log (no finite value) gets no panel."""
    table = _per_configuration(trials)
    costs = [name for name in COST_AXES if name in table and np.isfinite(table[name]).any()]
    if table.empty or not costs:
        return None
    fig, axes = plt.subplots(1, len(costs), figsize=(5.2 * len(costs), 4.2), squeeze=False, sharey=True)
    for ax, cost in zip(axes[0], costs):
        shown = table[np.isfinite(table[cost])]
        for _, row in shown.iterrows():
            xerr = row[f"{cost}_sd"] if np.isfinite(row[f"{cost}_sd"]) and row[f"{cost}_sd"] > 0 else None
            yerr = row["sd"] if np.isfinite(row["sd"]) else None
            ax.errorbar(row[cost], row["mae"], xerr=xerr, yerr=yerr, fmt="o", color=l_colour(row["largest_l"]), capsize=2, markersize=5)
        if len(shown) <= COST_LABELS_UP_TO:
            for _, row in shown.iterrows():
                ax.annotate(
                    f"l={row['l_values']}",
                    (row[cost], row["mae"]),
                    textcoords="offset points",
                    xytext=(4, 3),
                    fontsize=6.5,
                    color="#333333",
                )
        fit = _composition_fit(ax, trials, vertical=False)
        ax.set_xscale("log")
        plain_log_axis(ax.xaxis)
        ax.set_xlabel(COST_AXES[cost], fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0, 0].set_ylabel("test MAE (meV), mean ± seed sd", fontsize=8)
    _largest_l_legend(axes[0, -1], table["largest_l"].unique(), extra=fit, loc="best")
    fig.suptitle("accuracy against cost, one point per configuration", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)
