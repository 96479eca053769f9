"""False-positive rates of the correlations across a study, by simulation (issue 11).

Null studies (score and error unrelated, most of their variance at configuration level) are
analysed two ways: per trial, every seed one unit (the analysis before issue 11), and per
configuration, the means over seeds (analysis/correlate.py now); the share of studies with
p <= 0.05 should be about 5%. A planted configuration-level correlation shows the power.

    python benchmarks/calibration.py                  # 400 studies per row, as in the tests
    python benchmarks/calibration.py --studies 4000   # tighter rates (binomial sd 0.35%)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from simulated_studies import rejection_rates  # noqa: E402

DESIGNS = [(6, 3, 0.8), (6, 3, 0.9), (10, 2, 0.8), (10, 2, 0.9)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=400)
    parser.add_argument("--permutations", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-mixed", action="store_true", help="skip the mixed model (the slowest part)")
    args = parser.parse_args()
    common = dict(studies=args.studies, n_perm=args.permutations, seed=args.seed)
    print(f"share of {args.studies} simulated studies with p <= 0.05")
    print(f"{'design':<22} {'truth':<8} {'analysis':<18} {'p_rho':>7} {'p_partial':>10} {'p_mixed':>8}")
    rows = [(design, 0.0) for design in DESIGNS] + [((10, 2, 0.85), 0.8)]
    for (configurations, seeds, share), rho in rows:
        design = f"{configurations} x {seeds}, {share:.0%} config"
        truth = "null" if rho == 0 else f"rho={rho}"
        started = time.perf_counter()
        before = rejection_rates(configurations, seeds, share, rho, per_trial=True, **common)
        after = rejection_rates(configurations, seeds, share, rho, mixed=not args.no_mixed, **common)
        for name, rates in (("per trial (before)", before), ("per configuration", after)):
            mixed = f"{rates['p_mixed']:>8.3f}" if "p_mixed" in rates else f"{'':>8}"
            print(f"{design:<22} {truth:<8} {name:<18} {rates['p_rho']:>7.3f} {rates['p_partial']:>10.3f} {mixed}")
        print(f"{'':<22} ({time.perf_counter() - started:.1f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
