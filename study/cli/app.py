"""The `irrep-study` application: the Typer app, the options and output helpers every command
shares, and `main`, which turns a UserError into one line on stderr and exit code 2."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from study.data.cache import cache_folder
from study.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Plain help, not typer's rich panels: those show every on/off flag as taking a value
    # (`--json <bool>`, `--help <bool>`), which they do not.
    rich_markup_mode=None,
    # Up to 120 columns where the terminal has them (click's default stops at 80, cutting the
    # command list's summaries short).
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120},
    help="Sweeps and ablations of equivariant GNNs over irrep configurations on QM9.",
)
# soft_wrap: a long line (a path, a run id) stays one line in a log file instead of being cut at 80 columns.
log = Console(stderr=True, highlight=False, soft_wrap=True)
# The exit code of a process stopped by SIGINT (128 + 2), as shells report Ctrl-C.
INTERRUPTED_EXIT = 130


@dataclass
class GlobalOptions:
    """The options before the command (`irrep-study --debug sweep ...`), set once per invocation."""

    debug: bool = False
    verbose: bool = False


OPTIONS = GlobalOptions()


CacheDirOption = Annotated[
    Optional[Path],
    typer.Option("--cache-dir", help="Where the processed QM9 cache lives (default: $IRREP_STUDY_CACHE or ~/.cache/irrep-study)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout; logs go to stderr.")]
ForceOption = Annotated[bool, typer.Option("--force", help="Start even when the memory estimate exceeds the free memory.")]


def _print_version(value: bool) -> None:
    if not value:
        return
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("irrep-study")
    except PackageNotFoundError:  # run from a source tree that was never installed
        found = "unknown (not installed)"
    typer.echo(f"irrep-study {found}")
    raise typer.Exit()


@app.callback()
def _global_options(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")] = False,
    version: Annotated[
        bool,
        # Eager: answered before the command that would otherwise be required.
        typer.Option("--version", help="Print the version and exit.", is_eager=True, callback=_print_version),
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", help="Also show Ray's, MLflow's and Optuna's own log lines and Ray Tune's banners.")
    ] = False,
) -> None:
    OPTIONS.debug, OPTIONS.verbose = debug, verbose
    if not verbose:
        _quiet_libraries()


def _quiet_libraries() -> None:
    """What this tool says is enough by default: MLflow's INFO lines (creating its tables), Ray's
    note that token authentication is on (docs/sweeps.md says so), Ray Tune's experiment banner and its
    TensorBoard hint are shown only with --verbose (Optuna's INFO lines: study/sweep/search.py, where the
    study is created). Their warnings and errors still are."""
    import logging

    # Read by MLflow when it is imported, here and in the trial workers this process starts.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # Ray Tune's older console output, which `verbose=0` (study/sweep/driver.py) silences entirely.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)


def emit_json(document: dict) -> None:
    sys.stdout.write(json.dumps(document, indent=2) + "\n")
    # Ray's exit hooks can end the process before Python flushes a piped stdout.
    sys.stdout.flush()


def load_tensors(cache_dir: Optional[Path]):
    from study.data.qm9 import load_qm9

    return load_qm9(cache_folder(cache_dir), log=lambda message: log.print(message))


def print_runs_page(uri: str, experiment_id: str, as_json: bool) -> None:
    """The MLflow UI's page of the experiment's training runs, when the tracking URI is a server:
    MLflow 3 opens an experiment in its GenAI view, where a sweep looks empty. On stderr under
    --json (stdout holds the document)."""
    from study.tracking import store

    url = store.runs_page_url(uri, experiment_id)
    if url is None:
        return
    line = f"MLflow runs: {url}"
    if as_json:
        log.print(line, markup=False)
    else:
        typer.echo(line)


TrackingUriOption = Annotated[
    Optional[str],
    typer.Option("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)."),
]


def print_report(report: dict, as_json: bool, as_text) -> None:
    if as_json:
        emit_json(report)
    else:
        typer.echo(as_text(report))


def main() -> None:
    try:
        app()
    except UserError as exc:
        if OPTIONS.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
