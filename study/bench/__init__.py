"""Timing: training steps of the e3nn and fast backends side by side (`steps`, `irrep-study bench`)
and whole shrunk studies (`study`)."""
