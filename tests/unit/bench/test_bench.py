"""`irrep-study bench`: the smoke run produces a complete, self-consistent JSON report.

Timings are not asserted (shared machines make them flaky); the structure and the arithmetic
that ties the numbers together are.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from study.bench.steps import BenchCase, growth_exponent, parse_case, step_flops
from study.bench.study import Shrink, parse_shrink, shrunk_configs
from study.bench.tables import context_lines
from study.config.space import load_search_space
from study.errors import UserError
from study.nn.model import IrrepConvModel

ROOT = Path(__file__).resolve().parents[3]


def test_quick_bench_reports_every_backend(run_cli_in_process):
    result = run_cli_in_process("bench", "--quick", "--json", check_exit=0)
    report = json.loads(result.stdout)  # stdout holds the JSON document only; logs went to stderr
    assert "data loading" in result.stderr
    assert report["format"] == 2
    assert report["device"] == "cpu" or report["device"].startswith("cuda")
    assert report["matmul_gflops"] > 0
    # cuEquivariance is in the test extra: its column is there, on its PyTorch fallback on CPU.
    assert report["backends"] == ["e3nn", "fast", "cueq"]
    # Its CUDA kernels only on a GPU with cuequivariance-ops-torch installed; its PyTorch fallback otherwise.
    kernels = report["device"].startswith("cuda") and importlib.util.find_spec("cuequivariance_ops_torch") is not None
    assert report["cueq"] == ("cuda kernels" if kernels else "pytorch fallback")
    assert set(report["data_loading"]) == {"bonds", "radius"}
    for loading in report["data_loading"].values():
        assert loading["molecules_per_s"] > 0 and loading["dataloader_molecules_per_s"] > 0
        assert loading["collate_seconds"] >= 0 and loading["molecules"] == 24
    assert [c["name"] for c in report["configs"]] == ["0,1,2x4", "0,2x2:radius"]
    for config in report["configs"]:
        assert config["num_layers"] == 1 and config["batch_size"] == 8
        assert config["mean_edges_per_batch"] > 0 and config["flops_per_step"] > 0
        # All backends hold the same parameters: float32 predictions agree with e3nn's.
        assert set(config["prediction_relative_differences"]) == {"fast", "cueq"}
        assert max(config["prediction_relative_differences"].values()) < 1e-4
        # The report names the implementation cuEquivariance actually built (its PyTorch one on CPU).
        # Its fused kernel can only have run where the kernels are there; "naive" (PyTorch) may run anywhere.
        assert config["cueq_method"] == "naive" or (report["cueq"] == "cuda kernels" and config["cueq_method"] == "fused_tp")
        backends = config["backends"]
        for backend in report["backends"]:
            numbers = backends[backend]
            assert len(numbers["step_seconds"]) == report["repeats"] == 1
            assert numbers["median_step_seconds"] > 0
            assert math.isclose(numbers["molecules_per_s"], 8 / numbers["median_step_seconds"])
            assert math.isclose(numbers["gflops_per_s"], config["flops_per_step"] / numbers["median_step_seconds"] / 1e9)
            assert math.isclose(numbers["vs_e3nn"], numbers["molecules_per_s"] / backends["e3nn"]["molecules_per_s"])
            if report["device"] == "cpu":
                assert numbers["peak_memory_mb"] is None or numbers["peak_memory_mb"] >= 0
        assert config["speedup"] == backends["fast"]["vs_e3nn"]
    # The radius graph of the same number of molecules has many more edges than the bond graph.
    bonds, radius = report["configs"]
    assert radius["mean_edges_per_batch"] > 2 * bonds["mean_edges_per_batch"]
    # The table names the third column.
    table = run_cli_in_process("bench", "--quick", check_exit=0).stdout
    assert "cueq mol/s" in table and "fast/e3nn" in table
    assert "cuEquivariance: pytorch fallback (method naive)" in table or report["device"] != "cpu"


def test_lmax_sweep_fits_the_growth_of_its_own_timings(run_cli_in_process):
    result = run_cli_in_process(
        "bench", "--lmax-sweep", "3", "--num-layers", "0", "--repeats", "1", "--warmup", "0", "--batch-size", "4", "--json", check_exit=0
    )
    report = json.loads(result.stdout)
    assert [c["lmax"] for c in report["configs"]] == [1, 2, 3]
    assert [c["l_values"] for c in report["configs"]] == [[0, 1], [0, 1, 2], [0, 1, 2, 3]]
    assert all(c["hidden_dim"] == 16 for c in report["configs"])
    for backend in report["backends"]:
        seconds = [c["backends"][backend]["median_step_seconds"] for c in report["configs"]]
        slope = np.polyfit(np.log([1, 2, 3]), np.log(seconds), 1)[0]
        assert report["growth"][backend]["time_exponent"] == pytest.approx(slope)
    # More orders, more arithmetic: the FLOP count grows with lmax.
    flops = [c["flops_per_step"] for c in report["configs"]]
    assert flops == sorted(flops) and flops[0] < flops[-1]


def test_growth_exponent_recovers_a_power_law():
    sizes = [1, 2, 3, 5, 8]
    assert growth_exponent(sizes, [0.3 * s**2.5 for s in sizes]) == pytest.approx(2.5)


def test_study_bench_runs_a_shrunk_space_once_per_backend(run_cli_in_process, tmp_path):
    space = {
        "name": "tiny",
        "trial": {"hidden_dim": 2, "num_layers": 0, "subset": 200, "epochs": 3, "batch_size": 32},
        "search": {"method": "grid", "grid": [{"l_values": [0]}, {"l_values": [0, 1]}, {"l_values": [0, 2]}]},
        "seeds": [5, 6],
        "scheduler": {"type": "none"},
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(space))
    result = run_cli_in_process("bench", "--study", "tiny.yaml", "--shrink", "2x1x1", "--json", check_exit=0)
    report = json.loads(result.stdout)
    assert report["study"] == "tiny" and report["shrink"] == "2x1x1" and report["subset"] == 200
    # Evenly spaced grid entries (the first and the last), the first seed.
    assert [t["l_values"] for t in report["trials"]] == [[0], [0, 2]]
    assert {t["seed"] for t in report["trials"]} == {5}
    for backend in ("e3nn", "fast"):
        assert report["total_seconds"][backend] == pytest.approx(sum(t["seconds"][backend] for t in report["trials"]))
    assert report["speedup"] == pytest.approx(report["total_seconds"]["e3nn"] / report["total_seconds"]["fast"])
    # Both backends train the same function from the same seed.
    for trial in report["trials"]:
        assert trial["test_mae_meV"]["fast"] == pytest.approx(trial["test_mae_meV"]["e3nn"], rel=1e-3)


def test_shrunk_optuna_space_draws_valid_distinct_seeded_configurations():
    space = load_search_space(ROOT / "search_spaces" / "quick.yaml")
    first = shrunk_configs(space, Shrink(configurations=5, seeds=2, epochs=2))
    again = shrunk_configs(space, Shrink(configurations=5, seeds=2, epochs=2))
    assert [c.model_dump() for c in first] == [c.model_dump() for c in again]  # seeded by search.seed
    assert len(first) == 10 and all(c.epochs == 2 and c.subset == 4000 for c in first)
    assert [c.seed for c in first[:2]] == [1, 2]
    assert all(0 in c.l_values and set(c.l_values) <= {0, 1, 2, 3} for c in first)
    assert all(3e-3 <= c.lr <= 2e-2 for c in first)
    assert len({c.lr for c in first}) == 5


@pytest.mark.parametrize("spec", ["4x1", "0x1x2", "4x1x2x3", "axbxc", "4x-1x2"])
def test_parse_shrink_rejects(spec):
    with pytest.raises(UserError, match="--shrink"):
        parse_shrink(spec)


def test_bench_rejects_bad_configs(run_cli_in_process):
    result = run_cli_in_process("bench", "--configs", "1,2x8", check_exit=2)
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


def test_the_report_says_when_cuequivariance_fell_back_from_its_cuda_kernels():
    report = {
        "device": "cuda",
        "device_name": "GPU",
        "threads": 1,
        "batch_size": 32,
        "repeats": 1,
        "warmup": 0,
        "cueq": "cuda kernels",
        "configs": [{"cueq_method": "naive"}],
    }
    assert "CUDA kernels failed to load" in context_lines(report)[1]
    report["configs"] = [{"cueq_method": "fused_tp"}]
    assert context_lines(report)[1] == "cuEquivariance: cuda kernels (method fused_tp)"
