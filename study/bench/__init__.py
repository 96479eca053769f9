"""Timing: training steps of the e3nn and fast backends side by side (`steps`, `irrep-study bench`),
their reports as text (`tables`) and whole shrunk studies (`study`)."""
