"""The analysis's statistics against their nominal error rates, by seeded simulation.

Correlations across a study: null studies (score and error unrelated, most of their variance at
configuration level) are analysed two ways: per trial, every seed one unit (an earlier analysis),
and per configuration, the means over seeds (analysis/stats/correlate.py); the share of studies with
p <= 0.05 should be about 5%. A planted configuration-level correlation shows the power.

Factorial studies (analysis/stats/factorial.py, simulated by analysis/stats/simulation.py): per term, how
often the 95% interval covers the planted population effect, and how often a null interaction
(and the additive model's lack-of-fit test) rejects at 0.05, with the intervals conditional on
the test set (seed residual only) and with the test molecules' sampling carried.

    python benchmarks/calibration.py                  # 400 studies per row, as in the tests
    python benchmarks/calibration.py --studies 4000   # tighter rates (binomial sd 0.35%)
    python benchmarks/calibration.py --only factorial
"""

from __future__ import annotations

import argparse
import sys
import time

from analysis.stats.simulation import FACTORIAL_SCENARIOS, calibration, rejection_rates

DESIGNS = [(6, 3, 0.8), (6, 3, 0.9), (10, 2, 0.8), (10, 2, 0.9)]


def correlation_rows(args) -> None:
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


def factorial_rows(args) -> None:
    print(
        f"\nfactorial studies: share of {args.studies} simulated studies whose 95% interval covers the planted "
        "population effect (coverage) and with p <= 0.05 (rejects; a false-positive rate where truth = 0)"
    )
    print(f"{'scenario':<30} {'intervals':<24} {'term':<12} {'scale':<5} {'truth':>8} {'coverage':>9} {'rejects':>8}")
    for name, spec in FACTORIAL_SCENARIOS.items():
        for with_molecules, label in ((False, "seed only (conditional)"), (True, "seed + test molecules")):
            started = time.perf_counter()
            table = calibration(spec, args.studies, seed=args.seed, with_molecules=with_molecules)
            for row in table.itertuples():
                truth = "" if row.term == "lack of fit" else f"{row.truth:+8.3f}"
                coverage = "" if row.term == "lack of fit" else f"{row.coverage:9.3f}"
                print(f"{name:<30} {label:<24} {row.term:<12} {row.scale:<5} {truth:>8} {coverage:>9} {row.rejects:>8.3f}")
            print(f"{'':<30} ({time.perf_counter() - started:.1f} s)", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=400)
    parser.add_argument("--permutations", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-mixed", action="store_true", help="skip the mixed model (the slowest part)")
    parser.add_argument("--only", choices=("correlations", "factorial"), help="run one part only")
    args = parser.parse_args()
    if args.only != "factorial":
        correlation_rows(args)
    if args.only != "correlations":
        factorial_rows(args)


if __name__ == "__main__":
    main()
