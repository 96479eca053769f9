"""Every figure of `irrep-study bench` in one run on a machine without QM9's source or MLflow/Ray:
the GPU table of docs/performance.md comes from here.

    # here, where QM9 is cached: a seeded 12,000-molecule subset as one file (about 10 MB)
    python benchmarks/device_suite.py export --out qm9-subset.pt
    # there (a GPU machine with torch, e3nn, PyG, pydantic; cuequivariance-torch optional, its CUDA
    # kernels with cuequivariance-ops-torch-cu13 and cuequivariance-ops-cu13)
    python benchmarks/device_suite.py run --tensors qm9-subset.pt --out results/ --device cuda
    python benchmarks/device_suite.py compile --tensors qm9-subset.pt --out results/ --device cuda

`run` writes bench.json/.txt (per-step table, e3nn / fast / cuEquivariance), lmax.json/.txt (the
lmax sweep) and study-quick / study-ablation .json/.txt (shrunk studies end to end per backend).
`compile` trains the quick study's largest trial eager and through torch.compile (3 epochs each)
and writes compile.json: seconds per epoch and the validation MAE of both.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from study.bench.steps import parse_case, run_bench, run_lmax_sweep  # noqa: E402
from study.bench.study import format_study_bench, parse_shrink, run_study_bench  # noqa: E402
from study.bench.tables import format_lmax_sweep, format_table  # noqa: E402
from study.config.space import load_search_space  # noqa: E402
from study.data.qm9 import QM9Tensors, split_indices  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CASES = ("0,1,2x8", "0,1,2,3x8")  # the study models: 2 layers
LARGE_CASES = ("0,1,2x32", "0-6x16")  # the seed's sizes: 3 layers


def subset_tensors(tensors: QM9Tensors, molecules: int, seed: int = 0) -> QM9Tensors:
    """A seeded random subset of the molecules, re-packed with its own pointers."""
    keep = sorted(split_indices(len(tensors), seed=seed, fractions=(1.0, 0.0, 0.0), subset=molecules)["train"].tolist())
    atoms = [torch.arange(int(tensors.atom_ptr[k]), int(tensors.atom_ptr[k + 1])) for k in keep]
    bonds = [torch.arange(int(tensors.bond_ptr[k]), int(tensors.bond_ptr[k + 1])) for k in keep]

    def pointers(ranges) -> torch.Tensor:
        return torch.cumsum(torch.tensor([0] + [len(r) for r in ranges]), 0)

    index = torch.tensor(keep)
    return QM9Tensors(
        z=tensors.z[torch.cat(atoms)],
        pos=tensors.pos[torch.cat(atoms)],
        atom_ptr=pointers(atoms),
        bonds=tensors.bonds[:, torch.cat(bonds)],
        bond_ptr=pointers(bonds),
        y=tensors.y[index],
        mol_id=tensors.mol_id[index],
        smiles=[tensors.smiles[k] for k in keep],
    )


def export(out: Path, molecules: int) -> None:
    from study.data.qm9 import load_qm9

    torch.save(subset_tensors(load_qm9(), molecules).to_dict(), out)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {molecules} molecules)")


def run(tensors_path: Path, out: Path, device: str, repeats: int, lmax: int, smoke: bool = False) -> None:
    tensors = QM9Tensors(**torch.load(tensors_path, weights_only=True))
    out.mkdir(parents=True, exist_ok=True)
    on_device = torch.device(device)

    def save(name: str, report: dict, text: str) -> None:
        (out / f"{name}.json").write_text(json.dumps(report, indent=1))
        (out / f"{name}.txt").write_text(text + "\n")
        print(text, flush=True)

    started = time.perf_counter()
    small = [parse_case(spec, num_layers=2) for spec in CASES]
    large = [parse_case(spec, num_layers=3) for spec in ([] if smoke else LARGE_CASES)]
    report = run_bench(tensors, small + large, repeats=repeats, warmup=3, device=on_device, log=lambda m: None)
    save("bench", report, format_table(report))
    print(f"[{time.perf_counter() - started:.0f} s]", flush=True)
    sweep = run_lmax_sweep(tensors, lmax, num_layers=2, repeats=max(3, repeats // 2), warmup=2, device=on_device, log=lambda m: None)
    save("lmax", sweep, format_lmax_sweep(sweep))
    print(f"[{time.perf_counter() - started:.0f} s]", flush=True)
    for name in ("quick", "ablation"):
        space = load_search_space(ROOT / "search_spaces" / f"{name}.yaml")
        study = run_study_bench(space, name, parse_shrink("2x1x1" if smoke else "4x1x2"), tensors, device=device, log=print)
        save(f"study-{name}", study, format_study_bench(study))
        print(f"[{time.perf_counter() - started:.0f} s]", flush=True)


def compare_compile(tensors_path: Path, out: Path, device: str, epochs: int = 3) -> dict:
    """Seconds per epoch of one trial eager and compiled, and its metrics (which must agree)."""
    import tempfile

    from study.config.trial import TrialConfig
    from study.training.trial import run_trial

    tensors = QM9Tensors(**torch.load(tensors_path, weights_only=True))
    trial = dict(
        l_values=[0, 1, 2, 3],
        hidden_dim=8,
        num_layers=2,
        subset=4000,
        epochs=epochs,
        target_reference="composition",
        lr_schedule="cosine",
        lr=0.01,
        device=device,
        seed=1,
    )
    rows = {}
    for compiled in (False, True):
        stamps = [time.perf_counter()]
        with tempfile.TemporaryDirectory() as run_dir:
            result = run_trial(
                TrialConfig(**trial, compile=compiled),
                Path(run_dir),
                tensors=tensors,
                on_epoch=lambda metrics, stamps=stamps: stamps.append(time.perf_counter()),
            )
        rows[str(compiled)] = {
            "first_epoch_s": stamps[1] - stamps[0],
            "later_epoch_s": [b - a for a, b in zip(stamps[1:], stamps[2:])],
            "val": [m.val_mae_meV for m in result.history],
            "test": result.test_mae_meV,
        }
        print(f"compile={compiled}: {rows[str(compiled)]}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compile.json").write_text(json.dumps(rows, indent=1))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("export", help="write a QM9 subset file from the local cache")
    make.add_argument("--out", type=Path, required=True)
    make.add_argument("--molecules", type=int, default=12_000)
    measure = commands.add_parser("run", help="run every bench section on a subset file")
    measure.add_argument("--tensors", type=Path, required=True)
    measure.add_argument("--out", type=Path, required=True)
    measure.add_argument("--device", default="cuda")
    measure.add_argument("--repeats", type=int, default=10)
    measure.add_argument("--lmax", type=int, default=8)
    measure.add_argument("--smoke", action="store_true", help="small cases only: checks the script in a minute")
    timing = commands.add_parser("compile", help="one trial's epochs eager and through torch.compile")
    timing.add_argument("--tensors", type=Path, required=True)
    timing.add_argument("--out", type=Path, required=True)
    timing.add_argument("--device", default="cuda")
    timing.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    if args.command == "export":
        export(args.out, args.molecules)
    elif args.command == "compile":
        compare_compile(args.tensors, args.out, args.device, args.epochs)
    else:
        run(args.tensors, args.out, args.device, args.repeats, args.lmax, args.smoke)


if __name__ == "__main__":
    main()
