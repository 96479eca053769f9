"""A/B of the fast tensor product against another version of ``study/nn/fast_tp.py``, in one process.

Both models hold the same parameters; their training steps alternate on the same batches (the
order flips every batch and round), so a machine's changes of speed hit both alike.

    git show 59baabd:study/nn/fast_tp.py > /tmp/fast_tp_before.py
    python benchmarks/ab_fast_tp.py /tmp/fast_tp_before.py --tensors qm9-subset.pt --device cuda

``--tensors`` is a subset file written by ``benchmarks/device_suite.py export``; without it QM9
is read from the local cache. Prints the median ms per step of each and their ratio.

    python benchmarks/ab_fast_tp.py --compiled --configs 0-6x16 --threads 1

``--compiled`` compares this version eager against this version through ``torch.compile``
(``compile: true`` in a trial config: dynamic shapes, as batches vary); the first compiled step,
which compiles, is timed apart and printed.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from other_version import load_other_version  # noqa: E402 (beside this script)

from study.bench.steps import bench_batches, bench_models, parse_case, timed_step  # noqa: E402
from study.data.qm9 import QM9Tensors, load_qm9, target_index  # noqa: E402
from study.nn.model import CompiledOrEager, make_optimizer  # noqa: E402

CASES = (("0,1,2x8", 2), ("0,1,2,3x8", 2), ("0,1,2x32", 3), ("0-6x16", 3), ("0,3-6x16", 3))


def compare(
    other, tensors: QM9Tensors, spec: str, num_layers: int, device: torch.device, batches: int, rounds: int, warmup: int
) -> tuple[float, float]:
    """Median seconds per step of (this version, the other); ``other`` None: this version compiled."""
    case = parse_case(spec, num_layers=num_layers)
    data = bench_batches(tensors, case, 32, batches, device)
    ours = bench_models(case, device, ("fast",))["fast"]
    theirs = copy.deepcopy(ours)
    column = target_index("U0_atom")
    entries = [(ours, make_optimizer(ours, lr=1e-3), [])]
    if other is None:
        compiled = CompiledOrEager(theirs)
        optimizer = make_optimizer(theirs, lr=1e-3)
        started = time.perf_counter()
        # This step puts the compiled copy one update ahead of the eager one: no matter for timing.
        timed_step(compiled, optimizer, data[0], column, device)
        if compiled.failure is not None:
            raise SystemExit(f"error: torch.compile failed here ({compiled.failure})")
        print(f"{spec}: first compiled step (compiling) {time.perf_counter() - started:.1f} s", flush=True)
        entries.append((compiled, optimizer, []))
    else:
        for block in [theirs.input_block, *theirs.blocks]:
            block.tp = other.FusedRadialTensorProduct(block.in_irreps, block.sh_irreps, block.out_irreps).to(device)
        entries.append((theirs, make_optimizer(theirs, lr=1e-3), []))
    for round_ in range(rounds):
        for i, batch in enumerate(data):
            for model, optimizer, times in entries if (i + round_) % 2 == 0 else entries[::-1]:
                seconds = timed_step(model, optimizer, batch, column, device)
                if i >= warmup:
                    times.append(seconds)
    return statistics.median(entries[0][2]), statistics.median(entries[1][2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("other", type=Path, nargs="?", help="another version of study/nn/fast_tp.py")
    parser.add_argument("--compiled", action="store_true", help="compare against this version through torch.compile instead")
    parser.add_argument("--threads", type=int, help="torch's CPU threads (default: torch's own choice)")
    parser.add_argument("--tensors", type=Path, help="a QM9 subset file (device_suite.py export)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--configs", nargs="*", default=[spec for spec, _ in CASES], help="among " + ", ".join(spec for spec, _ in CASES))
    parser.add_argument("--batches", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    layers = dict(CASES)
    unknown = [spec for spec in args.configs if spec not in layers]
    if unknown:
        raise SystemExit(f"error: unknown config {unknown[0]!r}; choose among {', '.join(layers)}")
    if (args.other is None) == (not args.compiled):
        raise SystemExit("error: give either another fast_tp.py or --compiled, not both or neither")
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"error: --threads {args.threads}: must be at least 1")
        torch.set_num_threads(args.threads)
    other = None if args.compiled else load_other_version(args.other, "fast_tp_other")
    name = "compiled" if args.compiled else args.other.name
    tensors = QM9Tensors(**torch.load(args.tensors, weights_only=True)) if args.tensors else load_qm9()
    for spec in args.configs:
        ours, theirs = compare(other, tensors, spec, layers[spec], torch.device(args.device), args.batches, args.rounds, warmup=3)
        print(
            f"{spec}: this version {ours * 1e3:.2f} ms, {name} {theirs * 1e3:.2f} ms per step, time ratio other/this {theirs / ours:.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
