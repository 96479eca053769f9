"""How long `irrep-study analyze` takes on a study the shape of the published ablation, first and
second run, against the code of an earlier commit.

    python benchmarks/analysis_speed.py --before ffa2142 --out results/bench-cpu/analysis-speed

The study: search_spaces/ablation.yaml's 8 configurations x 5 seeds, hidden 16, 3 layers, each
with 1,000 test molecules as in the ablation (so scoring, UMAP and knockouts cost what they cost
there), but trained on 400 molecules for one epoch so that it is made in about two minutes (by a
real `irrep-study sweep` into ``--work``, once; later runs reuse it). The scores do not depend on
how well a model learned, only on its shape and its test molecules.

Then, each as the console command a user runs (a subprocess, `--no-log-mlflow`):
1. ``before``: `analyze` from a git worktree of ``--before`` (the code to compare with);
2. ``first``: `analyze` with this code after the kept scores of earlier runs are deleted;
3. ``second``: the same command again: every trial's scores are read back from its run.
It prints and writes (``--out``: ``.json`` and ``.txt``) each run's wall time and the ratios, and
compares the scores: ``first`` against ``before`` score by score (max |difference|), ``second``
against ``first`` (which must be identical).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "analysis-speed"


def make_study(work: Path, env: dict) -> str:
    """The ablation-shaped study in ``work``; its tracking URI."""
    uri = f"sqlite:///{work / 'mlflow.db'}"
    if (work / "made").exists():
        return uri
    space = yaml.safe_load((ROOT / "search_spaces" / "ablation.yaml").read_text())
    space["name"] = EXPERIMENT
    space["trial"].update(epochs=1, train_size=400, val_size=100, test_size=1000)
    work.mkdir(parents=True, exist_ok=True)
    (work / "space.yaml").write_text(yaml.safe_dump(space, sort_keys=False))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "study.cli", "sweep", "space.yaml", "--tracking-uri", uri], cwd=work, env=env, check=True)
    print(f"study made in {time.perf_counter() - started:.0f} s", flush=True)
    (work / "made").touch()
    return uri


def worktree(rev: str, work: Path) -> Path:
    folder = work / f"before-{rev}"
    if not folder.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(folder), rev], check=True)
    return folder


def analyze(code: Path, uri: str, out: Path, env: dict, extra: tuple[str, ...] = ()) -> float:
    """Seconds of one `irrep-study analyze` run by the code in ``code`` (its own study/ and analysis/)."""
    shutil.rmtree(out, ignore_errors=True)
    # PYTHONPATH first: the worktree's packages, not the installed ones.
    run_env = {**env, "PYTHONPATH": str(code)}
    command = [sys.executable, "-m", "study.cli", "analyze", "--experiment", EXPERIMENT, "--tracking-uri", uri]
    command += ["--out", str(out), "--no-log-mlflow", *extra]
    started = time.perf_counter()
    subprocess.run(command, cwd=code, env=run_env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def score_differences(a: Path, b: Path) -> pd.DataFrame:
    """Per score, the largest |difference| between two analyses' scores.csv (same trials and blocks)."""
    key = ["run_id", "block", "score"]
    left = pd.read_csv(a / "scores.csv").set_index(key)["value"]
    right = pd.read_csv(b / "scores.csv").set_index(key)["value"]
    if set(left.index) != set(right.index):
        raise SystemExit(f"{a} and {b} score different trials, blocks or scores")
    right = right.reindex(left.index)
    both_nan = left.isna() & right.isna()
    difference = (left - right).abs().where(~both_nan, 0.0)
    one_nan = left.isna() ^ right.isna()
    difference[one_nan] = float("inf")
    return difference.groupby(level="score").max().rename("max_abs_difference").reset_index()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/irrep-analysis-speed"), help="where the study and analyses go")
    parser.add_argument("--before", help="git revision to compare with (e.g. the commit before a change)")
    parser.add_argument("--out", type=Path, help="write OUT.json and OUT.txt")
    args = parser.parse_args()
    env = {**os.environ}
    uri = make_study(args.work, env)

    seconds: dict[str, float] = {}
    if args.before:
        seconds["before"] = analyze(worktree(args.before, args.work), uri, args.work / "before", env)
        print(f"before ({args.before}): {seconds['before']:.1f} s", flush=True)
    # A first run: no trial keeps scores yet.
    for folder in (args.work / "mlartifacts").glob("*/artifacts/analysis_scores"):
        shutil.rmtree(folder)
    for run in ("first", "second"):
        seconds[run] = analyze(ROOT, uri, args.work / run, env)
        print(f"{run}: {seconds[run]:.1f} s", flush=True)

    lines = [
        f"`irrep-study analyze` of a 40-trial ablation-shaped study; {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"
    ]
    lines += [f"{run}: {value:.1f} s" for run, value in seconds.items()]
    if "before" in seconds:
        lines += [
            f"first run {seconds['before'] / seconds['first']:.1f}x faster than before, "
            f"second run {seconds['before'] / seconds['second']:.1f}x faster than before's first"
        ]
        lines += ["max |score difference| first vs before:"]
        lines += [
            f"  {row.score}: {row.max_abs_difference:.3g}"
            for row in score_differences(args.work / "before", args.work / "first").itertuples()
        ]
    second = score_differences(args.work / "first", args.work / "second")
    lines += [f"second vs first: {'identical' if (second['max_abs_difference'] == 0).all() else 'DIFFERENT'} scores"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".txt").write_text(text + "\n")
        document = {"seconds": seconds, "before": args.before, "cpus": os.cpu_count()}
        args.out.with_suffix(".json").write_text(json.dumps(document, indent=2) + "\n")


if __name__ == "__main__":
    main()
