"""`python -m study.cli`: the `irrep-study` command."""

from study.cli import main

main()
