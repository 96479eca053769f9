"""Throughput and memory of the e3nn and fast tensor-product backends on real QM9 batches.

A thin wrapper of `irrep-study bench` (the logic lives in study/bench/steps.py); the same options apply:

    python benchmarks/bench.py --threads 1            # the CPU table of docs/performance.md
    python benchmarks/bench.py --configs 0-6x16 --repeats 9 --json > bench.json
"""

from __future__ import annotations

import sys

from study.cli import main

if __name__ == "__main__":
    sys.argv[1:1] = ["bench"]
    main()
