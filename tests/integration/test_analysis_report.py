"""`irrep-study analyze` end to end on real MLflow runs (logged trials, and a real quick sweep):
files, numbers, MLflow run, the report in a browser."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from analysis.load import load_study
from analysis.scoring.scores import ALL_SCORES, DETERMINED_BY_ERROR
from study.training.embeddings import load_embeddings
from tests.helpers.imports import modules_of_package_imported_by
from tests.helpers.mlflow_trials import console_script, one_torch_thread

pytestmark = pytest.mark.usefixtures("one_torch_thread_per_test")  # tiny models: one thread, reproducible under load

SPACES = Path(__file__).resolve().parents[2] / "search_spaces"
CHROMIUM = next((path for path in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if Path(path).exists()), None)


@pytest.fixture
def chromium() -> str:
    """Headless Chromium, for the tests that look at the report as a reader would. Missing, those
    tests skip on a developer's machine and fail in CI (CI=true), where .ci/run installs it."""
    if CHROMIUM is None:
        if os.environ.get("CI") == "true":
            pytest.fail("headless Chromium is missing: .ci/run installs it (Debian: apt-get install -y chromium)")
        pytest.skip("headless Chromium not installed (Debian: apt-get install -y chromium)")
    return CHROMIUM


@pytest.fixture(scope="module")
def analyzed(logged_study, qm9_cache_dir, tmp_path_factory):
    """One real `analyze` command over the session's logged study: (JSON document, output folder, stderr).

    In-process through typer's runner rather than a subprocess: UMAP compiles its numba kernels
    once per process, and the other analysis tests of this session have already paid for that.
    (The subprocess path of the console script is covered by the one-line error test below.)
    """
    from typer.testing import CliRunner

    from study.cli import app

    out = tmp_path_factory.mktemp("analyze") / "analysis"
    args = [
        "analyze",
        "--experiment",
        logged_study.experiment,
        "--tracking-uri",
        logged_study.tracking_uri,
        "--out",
        str(out),
        "--bootstrap",
        "300",
        "--cache-dir",
        str(qm9_cache_dir),
        "--json",
    ]
    with one_torch_thread():  # a module fixture is set up before the autouse one applies
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, (result.stderr[-3000:], result.exception)
    return json.loads(result.stdout), out, result.stderr


@pytest.fixture(scope="module")
def quick_sweep_analysis(qm9, qm9_cache_dir, tmp_path_factory):
    """The shipped quick study, shrunk to seconds, swept for real (local Ray, Optuna, SQLite MLflow)
    and then analysed by the console script: (sweep JSON, analyze JSON, analysis folder).

    One l set only, so the two proposals differ in `lr` alone: trials of the same seed share every
    field of their short label (l, h, seed), the case where a report once dropped a trial."""
    space = yaml.safe_load((SPACES / "quick.yaml").read_text())
    space["trial"].update(subset=300, epochs=2, hidden_dim=4, num_layers=1)
    space["search"]["params"]["l_values"] = {"choice": [[0, 1, 2]]}
    space["search"]["num_samples"] = 2
    space["scheduler"] = {"type": "none"}
    work = tmp_path_factory.mktemp("quick-e2e")
    (work / "quick.yaml").write_text(yaml.safe_dump(space))
    cli = console_script(work, qm9_cache_dir)
    swept = cli("sweep", "quick.yaml", "--num-cpus", "2")
    analysed = cli("analyze", "--experiment", "quick", "--out", "analysis", "--bootstrap", "200")
    return swept, analysed, work / "analysis"


@pytest.mark.slow  # a real quick sweep on Ray
def test_a_real_quick_sweep_is_analysed_end_to_end(quick_sweep_analysis):
    swept, analysed, out = quick_sweep_analysis
    completed = [t for t in swept["trials"] if t["status"] == "completed"]
    assert len(swept["trials"]) == 4 and len(completed) == 4  # 2 proposals x 2 seeds
    assert analysed["trials_analysed"] == 4 and analysed["parent_run_id"] is None
    assert analysed["configurations_compared"] == 2  # two proposals, each with both seeds completed
    scores = pd.read_csv(out / "scores.csv")
    assert set(scores["run_id"]) == {t["mlflow_run_id"] for t in completed}
    assert (out / "report.html").is_file() and (out / "correlations.csv").is_file()
    # The report opens with its findings: parameter importance (lr, the one parameter varied), the
    # configurations' errors, the Pareto front; then Optuna's plots, then the ablation effects.
    page = (out / "report.html").read_text()
    headings = re.findall(r"<h2>(.*?)</h2>", page)
    assert headings[:3] == ["Findings", "The search as Optuna sees it", "Ablation effects: what including each l does to the test error"]
    importance = pd.read_csv(out / "importance.csv")
    assert list(importance["parameter"]) == ["lr"] and importance["importance"].iloc[0] == pytest.approx(1.0)
    assert all(
        (out / f"{name}.png").is_file() for name in ("optuna_history", "optuna_importance", "optuna_parallel", "optuna_slice", "pareto")
    )
    assert (out / "ablation.csv").is_file()
    assert set(pd.read_csv(out / "configurations.csv")["n_trials"]) == {2}


def test_analyze_writes_scores_correlations_figures_and_report(analyzed, logged_study):
    document, out, stderr = analyzed
    assert document["trials_analysed"] == len(logged_study.trial_run_ids)
    assert document["trials_skipped"] == {"stopped_early": 1, "failed": 1}
    assert "4 completed trials" in stderr
    for name in (
        "ablation",
        "configurations",
        "scores",
        "configuration_scores",
        "correlations",
        "trials",
        "within_trial",
        "molecules",
        "report",
        "correlation_heatmap",
    ):
        assert Path(document["files"][name]).is_file(), name
    # UMAP grids of the 3 best and 3 worst trials: with 4 trials, all of them.
    assert len(list(out.glob("umap_*.png"))) == len(logged_study.trial_run_ids)
    # The trials logged norm_share_l{l} per epoch: the figure of it over epochs is drawn.
    assert (out / "norm_share_by_epoch.png").is_file()

    scores = pd.read_csv(out / "scores.csv")
    for run_id in logged_study.trial_run_ids:
        config = logged_study.configs[run_id]
        rows = scores[scores["run_id"] == run_id]
        expected_blocks = {f"l{l}" for l in config.l_values} | {"lgt0", "joint"}
        assert set(rows["block"]) == expected_blocks
        assert len(rows) == len(expected_blocks) * len(ALL_SCORES)
        assert rows["test_mae_meV"].unique() == pytest.approx([logged_study.results[run_id].test_mae_meV])
        by_key = rows.set_index(["block", "score"])["value"]
        # One value recomputed by hand from the trial's own embeddings file.
        embeddings = load_embeddings(logged_study.trial_dirs[run_id] / "test_embeddings.npz")
        l0 = embeddings.layout.block(0)
        squared = np.square(embeddings.graph.astype(np.float64))
        assert by_key[("l0", "norm_share")] == pytest.approx(squared[:, l0.start : l0.stop].sum() / squared.sum(), rel=1e-9)
        for l in config.l_values:
            if l > 0:
                # Zeroing l >= 1 before the readout changes nothing: no share of the gain is lost
                # (undefined, NaN, for a trial that does not beat the composition fit at all).
                share = by_key[(f"l{l}", "knockout_last_share")]
                assert share == 0.0 or math.isnan(share)
        assert by_key[("joint", "norm_share")] == pytest.approx(1.0)

    trials = pd.read_csv(out / "trials.csv").set_index("run_id")
    for run_id in logged_study.trial_run_ids:
        result = logged_study.results[run_id]
        assert trials.loc[run_id, "baseline_test_mae_meV"] == pytest.approx(result.baseline_test_mae_meV)
        assert trials.loc[run_id, "test_over_baseline"] == pytest.approx(result.test_mae_meV / result.baseline_test_mae_meV)
    # The unfinished trials share the first trial's configuration: it is left out of comparisons.
    first = logged_study.trial_run_ids[0]
    assert not trials.loc[first, "in_comparisons"] and trials["in_comparisons"].sum() == len(trials) - 1
    compared = [r for r in logged_study.trial_run_ids if trials.loc[r, "in_comparisons"]]

    correlations = pd.read_csv(out / "correlations.csv")
    assert {
        "block",
        "score",
        "n_configurations",
        "n_trials",
        "rho",
        "rho_lo",
        "rho_hi",
        "p_rho",
        "tau",
        "p_tau",
        "covariates",
        "partial_rho",
        "partial_rho_size",
        "mixed_slope",
        "q_rho",
    } <= set(correlations.columns)
    n_by_block = correlations.groupby("block")["n_configurations"].max().to_dict()
    with_l = lambda l: sum(l in logged_study.configs[r].l_values for r in compared)  # noqa: E731
    n = len(compared)
    assert n_by_block == {"l0": n, "l1": with_l(1), "l2": with_l(2), "lgt0": n, "joint": n}
    # Every block and score, less the l0 and joint knockouts, residual probes and residual kNN
    # scores (functions of the model's own error: DETERMINED_BY_ERROR).
    assert len(correlations) == len(n_by_block) * len(ALL_SCORES) - 8
    assert not set(zip(correlations["block"], correlations["score"])) & DETERMINED_BY_ERROR
    assert not correlations["score"].str.startswith("knockout").where(correlations["block"].isin(["l0", "joint"]), False).any()
    # Constant across configurations (exactly 1 by construction): no correlation is invented for it.
    by_key = correlations.set_index(["block", "score"])
    assert math.isnan(by_key.loc[("joint", "norm_share"), "rho"])

    ablation = pd.read_csv(out / "ablation.csv")
    assert set(ablation["l"]) == {1, 2} and set(ablation["method"]) == {"paired", "regression", "unpaired"}
    assert {"effect_meV", "lo_meV", "hi_meV", "n_pairs", "n_configurations", "n_trials"} <= set(ablation.columns)
    # The survivorship notes name the configuration that lost a seed.
    assert any("left out of the correlations and ablation effects" in note for note in document["notes"])

    within = pd.read_csv(out / "within_trial.csv")
    assert set(within["run_id"]) == set(logged_study.trial_run_ids) and "nsps" in set(within["descriptor"])


def test_report_is_self_contained(analyzed, logged_study):
    _, out, _ = analyzed
    page = (out / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", page), "report must not load anything from outside"
    images = re.findall(r'src="data:image/png;base64,', page)
    assert len(images) >= 2 + len(logged_study.trial_run_ids)
    for run_id in logged_study.trial_run_ids:
        assert run_id in page
    assert 'id="correlations"' in page and 'id="trials"' in page and 'id="ablation"' in page and 'id="warnings"' in page


class _Node:
    def __init__(self, tag: str, attrs: dict, parent: _Node | None):
        self.tag, self.attrs, self.parent, self.children, self.parts = tag, attrs, parent, [], []

    def text(self) -> str:
        return "".join(part if isinstance(part, str) else part.text() for part in self.parts)

    def find_all(self, tag: str, **attrs) -> list[_Node]:
        found = [self] if self.tag == tag and all(self.attrs.get(k) == v for k, v in attrs.items()) else []
        return found + [node for child in self.children for node in child.find_all(tag, **attrs)]

    def ancestor(self, tag: str) -> _Node | None:
        node = self.parent
        while node is not None and node.tag != tag:
            node = node.parent
        return node


def _page(path: Path) -> _Node:
    """The report as a tree of elements (the standard library's HTML parser; void elements have no end tag)."""
    from html.parser import HTMLParser

    class Builder(HTMLParser):
        VOID = {"img", "meta", "br", "hr", "input", "link"}

        def __init__(self):
            super().__init__()
            self.root = self.node = _Node("document", {}, None)

        def handle_starttag(self, tag, attrs):
            node = _Node(tag, dict(attrs), self.node)
            self.node.children.append(node)
            self.node.parts.append(node)
            if tag not in self.VOID:
                self.node = node

        def handle_endtag(self, tag):
            if tag not in self.VOID:
                assert self.node.tag == tag, f"</{tag}> closes <{self.node.tag}>"
                self.node = self.node.parent

        def handle_data(self, data):
            self.node.parts.append(data)

    builder = Builder()
    builder.feed(path.read_text())
    return builder.root


EXPONENT = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?[eE][-+]?\d+(?![\w.])")


def test_the_report_reads_as_a_results_page(analyzed):
    """What a reader relies on: a contents bar linking every section, the findings first with their
    figures beside them, every figure captioned, every table captioned with a link to its CSV, and
    numbers as a paper prints them (never 2.292e+04)."""
    _, out, _ = analyzed
    page = _page(out / "report.html")
    sections = [node.attrs["id"] for node in page.find_all("section")]
    (nav,) = page.find_all("nav")
    assert [a.attrs["href"] for a in nav.find_all("a")] == [f"#{section}" for section in sections]
    assert sections[0] == "findings" and {"ablation", "configurations", "trials", "correlations", "about"} <= set(sections)

    # The findings, each beside the figure that supports it (or a link to it, when it is shown already).
    findings = page.find_all("section", id="findings")[0]
    blocks = [node for node in findings.find_all("div") if "finding" in node.attrs.get("class", "").split()]
    assert blocks and all(block.find_all("p") for block in blocks)
    beside = {figure.attrs["id"] for block in blocks for figure in block.find_all("figure")}
    assert {"figure-ablation_effects", "figure-configuration_errors", "figure-score_vs_error"} <= beside
    assert any(block.find_all("a", href="#figure-ablation_effects") for block in blocks)  # the ablation's significance

    # Every figure: its picture inline and a numbered caption; the figures a reader expects are there.
    figures = page.find_all("figure")
    for number, figure in enumerate(figures, start=1):
        (image,) = figure.find_all("img")
        assert image.attrs["src"].startswith("data:image/png;base64,")
        (caption,) = figure.find_all("figcaption")
        assert caption.text().startswith(f"Figure {number}. ") and len(caption.text()) > 40
    names = {figure.attrs["id"].removeprefix("figure-") for figure in figures}
    assert {
        "ablation_effects",
        "configuration_errors",
        "accuracy_vs_cost",
        "norm_share_by_epoch",
        "score_vs_error",
        "correlation_heatmap",
        "pareto",
    } <= names

    # Every table: a one-line caption saying what a row is, with a link to the CSV beside the report.
    tables = page.find_all("table")
    for table in tables:
        block = table.ancestor("div")
        while "table-block" not in block.attrs.get("class", ""):
            block = block.ancestor("div")
        (caption,) = [p for p in block.find_all("p") if p.attrs.get("class") == "caption"]
        assert re.match(r"Table \d+\. One row per ", caption.text())
        (link,) = caption.find_all("a")
        assert link.attrs["href"].endswith(".csv") and (out / link.attrs["href"]).is_file()
    assert {"ablation", "configurations", "trials", "correlations", "importance", "pareto_front"} <= {t.attrs["id"] for t in tables}
    # Human column names, and no number in exponent notation anywhere in a table.
    headers = {th.text() for th in page.find_all("th")}
    # (One seed per configuration here: no seed sd to show beside the mean.)
    assert "test MAE (meV), mean" in headers and "parameters" in headers and "first in (of 5 forest seeds)" in headers
    assert not {"test_mae_meV_mean", "num_params", "importance_min", "first_in_seeds"} & headers
    cells = [td.text() for td in page.find_all("td")]
    assert cells and not [cell for cell in cells if EXPONENT.search(cell)]


def test_the_csv_files_keep_their_raw_columns_and_full_precision(analyzed):
    _, out, _ = analyzed
    configurations = pd.read_csv(out / "configurations.csv")
    assert {"test_mae_meV_mean", "test_mae_meV_sd", "num_params_mean", "epoch_seconds_mean"} <= set(configurations.columns)
    page = (out / "report.html").read_text()
    value = float(configurations["test_mae_meV_mean"].dropna().iloc[0])
    assert round(value, 1) != value  # more digits on disk than on the page
    assert f"{value:,.1f}" in page and repr(value) not in page


@pytest.mark.usefixtures("chromium")
def test_the_report_fits_a_laptop_window_and_a_phone_in_headless_chromium(analyzed, tmp_path):
    """No sideways scroll at 1,280 px or at 390 px (a phone): wide tables scroll in their own
    container. benchmarks/report_screenshots.py takes the screenshots as a reader would see them."""
    import matplotlib.image

    from benchmarks.report_screenshots import Chromium, screenshots

    _, out, _ = analyzed
    measured = screenshots(out / "report.html", tmp_path / "shots")
    assert measured["desktop"]["page_width"] <= 1280 and measured["phone"]["page_width"] <= 390
    for device, (height, width) in (("desktop", (900, 1280)), ("phone", (844, 390))):
        for name in ("first_screen", "findings"):
            pixels = matplotlib.image.imread(tmp_path / "shots" / f"{device}_{name}.png")
            assert pixels.shape[:2] == (height, width)
            assert pixels[..., :3].std() > 0.05  # text and figures, not a blank page
    with Chromium() as browser:
        browser.open((out / "report.html").as_uri(), 1280, 900)
        # The widest table is wider than the window: it scrolls inside its container, not the page.
        widest = browser.evaluate("Math.max(...[...document.querySelectorAll('.scroll')].map(e => e.scrollWidth))")
        assert widest > 1280 and browser.evaluate("document.documentElement.scrollWidth") <= 1280
        # The contents bar links every section, and following a link shows that section.
        browser.evaluate("document.querySelector('nav.contents a[href=\"#trials\"]').click()")
        top = browser.evaluate("document.getElementById('trials').getBoundingClientRect().top")
        assert 0 <= top < 100


def test_analysis_is_logged_to_mlflow_and_is_not_a_trial(analyzed, logged_study):
    document, out, _ = analyzed
    client = MlflowClient(tracking_uri=logged_study.tracking_uri)
    run = client.get_run(document["analysis_run_id"])
    assert run.data.tags["irrep_study.role"] == "analysis" and run.info.status == "FINISHED"
    assert run.data.params["trials_analysed"] == str(len(logged_study.trial_run_ids))
    # Nested under the one sweep it analysed, with a summary as metrics; the tables are artifacts.
    assert run.data.tags["mlflow.parentRunId"] == logged_study.parent_run_id
    assert run.data.metrics["trials_analysed"] == len(logged_study.trial_run_ids) and len(run.data.metrics) < 20
    assert not any(name.startswith(("rho/", "p_rho/")) for name in run.data.metrics)
    artifacts = {info.path for info in client.list_artifacts(run.info.run_id)}
    assert {path.name for path in out.iterdir() if path.is_file()} <= artifacts  # every file written is logged
    assert {"report.html", "scores.csv", "correlations.csv", "correlation_heatmap.png"} <= artifacts
    study = load_study(logged_study.experiment, tracking_uri=logged_study.tracking_uri)
    assert document["analysis_run_id"] not in {t.run_id for t in study.trials}
    assert len(study.trials) == len(logged_study.trial_run_ids)


def test_the_analysis_runs_description_says_what_the_study_found(analyzed, logged_study):
    document, out, _ = analyzed
    run = MlflowClient(tracking_uri=logged_study.tracking_uri).get_run(document["analysis_run_id"])
    description = run.data.tags["mlflow.note.content"]  # the run's description in the MLflow UI
    for sentence in (out / "findings.txt").read_text().splitlines():
        assert f"- {sentence}" in description
    assert "report.html" in description


def test_analyze_cli_reports_a_missing_experiment_in_one_line(logged_study, run_cli):
    result = run_cli("analyze", "--experiment", "never-ran", "--tracking-uri", logged_study.tracking_uri, check_exit=2)
    assert result.stderr.strip().count("\n") == 0 and "never-ran" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow  # a real quick sweep on Ray
@pytest.mark.usefixtures("chromium")
def test_report_of_a_real_sweep_renders_in_headless_chromium(quick_sweep_analysis, tmp_path):
    import matplotlib.image

    _, _, out = quick_sweep_analysis
    report = out / "report.html"
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*base, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    correlations = pd.read_csv(out / "correlations.csv")
    table = re.search(r'<table[^>]*id="correlations".*?</table>', dom.stdout, re.S)
    assert table is not None
    # One row per (block, score): the first rows in the table, the others folded into its continuation.
    rest = re.search(r'<table[^>]*id="correlations-more".*?</table>', dom.stdout, re.S)
    rows = sum(part.group(0).split("<tbody>")[1].count("<tr") for part in (table, rest) if part)
    assert rows == len(correlations)
    # Trials sharing their short label (l, h, seed; they differ in lr) are all listed, in every per-trial table.
    run_ids = set(pd.read_csv(out / "trials.csv")["run_id"])
    assert len(run_ids) == 4 and len(set(pd.read_csv(out / "trials.csv")["label"])) == 2
    for table_id in ("trials", "within_trial"):
        rows = re.search(rf'<table[^>]*id="{table_id}".*?</table>', dom.stdout, re.S).group(0)
        assert rows.count("<tr") == 4 + 1 and all(run_id in rows for run_id in run_ids)
    # The first section, as the browser laid it out, holds the findings.
    first = re.search(r"<h2>(.*?)</h2>(.*?)(?=<h2>)", dom.stdout, re.S)
    assert first.group(1) == "Findings"
    assert "lr explains most" in first.group(2) or "One parameter varied: lr" in first.group(2)
    assert 'id="importance"' in first.group(2) and 'id="pareto_front"' in first.group(2)
    assert "Best on validation:" in first.group(2)

    shot = tmp_path / "report.png"
    rendered = subprocess.run(
        [*base, "--window-size=1200,3000", f"--screenshot={shot}", report.as_uri()], capture_output=True, text=True, timeout=120
    )
    assert rendered.returncode == 0 and shot.is_file(), rendered.stderr[-2000:]
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (3000, 1200)
    # Not a blank page: text, tables and figures give many distinct shades.
    assert pixels[..., :3].std() > 0.05
    assert len(np.unique((pixels[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)) > 50
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)


@pytest.mark.slow  # a real quick sweep on Ray
def test_optuna_dashboard_opens_the_quick_studys_storage(quick_sweep_analysis):
    import urllib.request

    from tests.helpers.services import free_port, wait_until

    swept, _, _ = quick_sweep_analysis
    port = free_port()
    dashboard = subprocess.Popen(
        ["optuna-dashboard", swept["optuna_storage"], "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def studies():
            try:
                return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2).read())
            except OSError:
                return None

        wait_until(lambda: studies() is not None, 60, "optuna-dashboard to answer")
        [summary] = studies()["study_summaries"]
        assert summary["study_name"] == swept["optuna_study"]
        detail = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{summary['study_id']}", timeout=10).read())
        assert len(detail["trials"]) == 2  # one per proposal; its two seeds are replicates
    finally:
        dashboard.terminate()
        dashboard.wait(timeout=30)


def test_analysis_never_imports_ray():
    # Data flows one way and only study/sweep/ knows Ray; an analysis machine needs no Ray.
    import pkgutil

    import analysis

    modules = [module.name for module in pkgutil.walk_packages(analysis.__path__, "analysis.")]
    assert "analysis.pipeline" in modules and "analysis.scoring.knockout" in modules
    assert modules_of_package_imported_by(modules, "ray") == []


def test_the_per_trial_descriptor_table_keeps_trials_that_share_a_label():
    from analysis.report.sections import per_trial_descriptor_table

    # Two trials differing only in lr have the same label (l, h, seed): both must stay.
    within = pd.DataFrame(
        [
            {"run_id": run_id, "label": "l=0,1 h=8 seed=1", "descriptor": descriptor, "rho": rho}
            for run_id, base in (("run-a", 0.1), ("run-b", 0.2), ("run-c", 0.3))
            for descriptor, rho in (("nsps", base), ("num_rings", -base))
        ]
    )
    table = per_trial_descriptor_table(within)
    assert sorted(table["run_id"]) == ["run-a", "run-b", "run-c"]
    assert table.set_index("run_id").loc["run-b", "nsps"] == 0.2 and table.set_index("run_id").loc["run-c", "num_rings"] == -0.3
    with pytest.raises(ValueError):  # a duplicated (trial, descriptor) is an error, never silently dropped
        per_trial_descriptor_table(pd.concat([within, within.iloc[:1]]))


def test_the_reports_best_configuration_is_chosen_on_validation_not_test():
    from types import SimpleNamespace

    from analysis.pipeline import AnalysisSettings
    from analysis.report.sections import study_summary

    # "val-winner" is best on validation, "test-winner" on test: the summary names the first.
    trials = pd.DataFrame(
        [
            {"configuration": "val-winner", "best_val_mae_meV": 30.0, "test_mae_meV": 60.0, "baseline_test_mae_meV": 900.0},
            {"configuration": "test-winner", "best_val_mae_meV": 40.0, "test_mae_meV": 35.0, "baseline_test_mae_meV": 900.0},
        ]
    )
    study = SimpleNamespace(tracking_uri="sqlite:///x.db")
    summary = study_summary("e", None, study, trials, trials, "none", AnalysisSettings())
    assert summary["errors vs composition baseline"].startswith("best configuration on validation val-winner: test MAE 60.0 meV")
