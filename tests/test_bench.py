"""`irrep-study bench`: the smoke run produces a complete, self-consistent JSON report.

Timings are not asserted (shared machines make them flaky); the structure and the arithmetic
that ties the numbers together are.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from study.bench import BenchCase, parse_case, step_flops
from study.errors import UserError
from study.model import IrrepConvModel


def test_quick_bench_reports_both_backends(run_cli):
    result = run_cli("bench", "--quick", "--json", check_exit=0)
    report = json.loads(result.stdout)  # stdout holds the JSON document only; logs went to stderr
    assert "data loading" in result.stderr
    assert report["format"] == 1
    assert report["device"] == "cpu" or report["device"].startswith("cuda")
    assert report["matmul_gflops"] > 0
    assert set(report["data_loading"]) == {"bonds", "radius"}
    assert all(entry["molecules_per_s"] > 0 for entry in report["data_loading"].values())
    assert [c["name"] for c in report["configs"]] == ["0,1,2x4", "0,2x2:radius"]
    for config in report["configs"]:
        assert config["num_layers"] == 1 and config["batch_size"] == 8
        assert config["mean_edges_per_batch"] > 0 and config["flops_per_step"] > 0
        # Both backends hold the same parameters: float32 predictions agree.
        assert config["prediction_relative_difference"] < 1e-4
        for backend in ("e3nn", "fast"):
            numbers = config["backends"][backend]
            assert len(numbers["step_seconds"]) == report["repeats"] == 1
            assert numbers["median_step_seconds"] > 0
            assert math.isclose(numbers["molecules_per_s"], 8 / numbers["median_step_seconds"])
            assert math.isclose(numbers["gflops_per_s"], config["flops_per_step"] / numbers["median_step_seconds"] / 1e9)
            if report["device"] == "cpu":
                assert numbers["peak_memory_mb"] is None or numbers["peak_memory_mb"] >= 0
        backends = config["backends"]
        assert math.isclose(config["speedup"], backends["fast"]["molecules_per_s"] / backends["e3nn"]["molecules_per_s"])
    # The radius graph of the same number of molecules has many more edges than the bond graph.
    bonds, radius = report["configs"]
    assert radius["mean_edges_per_batch"] > 2 * bonds["mean_edges_per_batch"]


def test_bench_rejects_bad_configs(run_cli):
    result = run_cli("bench", "--configs", "1,2x8", check_exit=2)
    assert "--configs 1,2x8" in result.stderr and "must include 0" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("0,1,2x32", BenchCase((0, 1, 2), 32, "bonds")),
        ("0-6x16", BenchCase((0, 1, 2, 3, 4, 5, 6), 16, "bonds")),
        ("0,3-6x16:radius", BenchCase((0, 3, 4, 5, 6), 16, "radius")),
    ],
)
def test_parse_case(spec, expected):
    assert parse_case(spec) == expected


@pytest.mark.parametrize("spec", ["0,1,2", "0,1x", "0,1x0", "0,1x8:grid", "a,bx8", "0,1,1x8"])
def test_parse_case_rejects(spec):
    with pytest.raises(UserError, match="--configs"):
        parse_case(spec)


def test_step_flops_by_hand():
    # [0] x 1 layer, hidden 2, atom_dim 64, edge_dim 20: input block 64x0e -> 2x0e (one path,
    # d = 1), one hidden block 2x0e -> 2x0e. Forward per edge: MLP 2*20*2 + 2*2*numel, path
    # 2*1 (CG) + 2*u (contraction) + 2*u*w (weights).
    model = IrrepConvModel([0], 2, num_layers=0)
    input_block = 2 * 20 * 2 + 2 * 2 * (64 * 2) + 2 + 2 * 64 + 2 * 64 * 2
    hidden_block = 2 * 20 * 2 + 2 * 2 * (2 * 2) + 2 + 2 * 2 + 2 * 2 * 2
    assert step_flops(model, 10) == 3 * 10 * (input_block + hidden_block)
    # Linear in the edge count.
    assert step_flops(model, 20) == 2 * step_flops(model, 10)
    assert torch.get_default_dtype() == torch.float32
