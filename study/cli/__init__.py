"""`irrep-study`: the command line.

Commands that report take `--json`: one JSON document on stdout, logs and progress on stderr.
Bad input ends with one line on stderr and exit code 2; `--debug` shows the traceback instead.
The app and what commands share live in `app`; the commands, by what they work on, in `trials`
(data, train), `sweeps` (sweep, sync, plan, bench) and `results` (best, analyze, reanalyze).
"""

# Each module registers its commands on the app; `--help` lists them in this order.
# isort: off
from study.cli import trials  # noqa: F401
from study.cli import sweeps  # noqa: F401
from study.cli import results  # noqa: F401

# isort: on
from study.cli.app import app, main

__all__ = ["app", "main"]
