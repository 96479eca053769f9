"""A/B of a trial's knockouts against another version of ``analysis/scoring/knockout.py``, in one process.

    git show 4e86d8f:analysis/scoring/knockout.py > /tmp/knockout_before.py
    python benchmarks/ab_knockouts.py /tmp/knockout_before.py --configs 0,1,2x16 0,1,2,3x16 0-6x16

Per configuration (``irrep-study bench``'s spelling: ``L_VALUESxHIDDEN[:edges]``): a 3-layer
float32 model (the ablation's shape at hidden 16; untrained weights, which cost what trained ones
do), its knockouts on ``--molecules`` QM9 molecules by each version, alternating, one thread
(as `analyze` scores a trial). Prints the best of ``--rounds`` seconds of each, their ratio, and
the largest difference of their predictions relative to the largest prediction. The other version
runs on this version's model (study/nn), so it measures what the knockout loop itself changed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from other_version import load_other_version  # noqa: E402 (beside this script)

from analysis.scoring import knockout  # noqa: E402
from analysis.scoring.features import analysis_blocks  # noqa: E402
from study.bench.steps import parse_case  # noqa: E402
from study.config.trial import TrialConfig  # noqa: E402
from study.data.qm9 import CollatedSplit, QM9Dataset, load_qm9  # noqa: E402
from study.data.reference import TargetReference  # noqa: E402
from study.nn.model import build_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("other", type=Path, help="another version of analysis/scoring/knockout.py")
    parser.add_argument("--configs", nargs="+", default=["0,1,2x16", "0,1,2,3x16"], help="L_VALUESxHIDDEN: 0,1,2x16 or 0,3-6x16")
    parser.add_argument("--molecules", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    other = load_other_version(args.other, "knockout_other")
    torch.set_num_threads(1)
    tensors = load_qm9(log=lambda _line: None)
    reference = TargetReference.mean(-76.0, 10.0)
    for spec in args.configs:
        case = parse_case(spec)
        config = TrialConfig(l_values=list(case.l_values), hidden_dim=case.hidden_dim, num_layers=case.num_layers, edges=case.edges)
        torch.manual_seed(0)
        model = build_model(config).eval()
        split = CollatedSplit(QM9Dataset(tensors, np.arange(1000, 1000 + args.molecules), edges=config.edges, cutoff=config.cutoff))
        units = analysis_blocks(model.layout)
        versions = {"this": knockout.knockout_predictions, "other": other.knockout_predictions}
        seconds: dict[str, list[float]] = {name: [] for name in versions}
        results = {}
        for round_ in range(args.rounds + 1):  # round 0 warms up
            for name in list(versions)[:: 1 if round_ % 2 else -1]:
                started = time.perf_counter()
                results[name] = versions[name](model, split, reference, torch.float32, units)
                if round_:
                    seconds[name].append(time.perf_counter() - started)
        (base_this, knocked_this), (base_other, knocked_other) = results["this"], results["other"]
        difference = max([np.abs(base_this - base_other).max()] + [np.abs(knocked_this[k] - knocked_other[k]).max() for k in knocked_this])
        this, theirs = min(seconds["this"]), min(seconds["other"])
        print(
            f"{case.name}: this version {this:.2f} s, {args.other.name} {theirs:.2f} s, time ratio other/this {theirs / this:.2f}; "
            f"max |difference| {difference / np.abs(base_other).max():.1e} of the largest prediction",
            flush=True,
        )


if __name__ == "__main__":
    main()
