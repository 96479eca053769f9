"""Training throughput and memory of the tensor-product backends (``irrep-study bench``).

Each configuration is measured in one process on the same real QM9 batches: the backends hold
the same parameters (the fast model loads the e3nn model's state dict), warm up, then take turns,
one training step (forward, backward, AdamW) each, the order rotated every round so that a slow
phase of a shared machine hits all. Reported per backend: the median step time as molecules/s,
the useful GFLOP/s of :func:`step_flops`, and the peak memory of one more, untimed step.

Backends: e3nn's ``FullyConnectedTensorProduct``, the fast one (study/nn/fast_tp.py), and, when
``cuequivariance-torch`` is importable (``pip install -e '.[cueq]'``), NVIDIA cuEquivariance's
``FullyConnectedTensorProduct`` (``mul_ir`` layout: e3nn's weight layout, so it takes the same
per-edge weights) in the e3nn model's place: its CUDA kernels when ``cuequivariance-ops-torch`` is
installed and the device is a GPU, else its PyTorch fallback (the report says which).

``--lmax-sweep N`` measures l = 0..lmax for lmax = 1..N at hidden 16 and fits the growth
exponent ``a`` of ``time ~ lmax^a`` (and of peak memory), to budget a study before launching it.

Memory: on CUDA, ``torch.cuda.max_memory_allocated`` above what was allocated before the step. On
CPU torch keeps no allocator statistics, so it is the peak resident set size of the process during
the step (Linux ``VmHWM``, reset just before, after freed heap pages went back to the system) minus
the resident size before it: what the step adds at its worst moment (activations kept for the
backward pass, gradients, temporaries), parameters and optimizer state excluded. Elsewhere CPU
memory is reported as null.
"""

from __future__ import annotations

import ctypes
import gc
import importlib.util
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from torch_geometric.loader import DataLoader

from study.config.trial import REFERENCE_U0_ATOM_MEAN, REFERENCE_U0_ATOM_STD
from study.data.qm9 import (
    CollatedSplit,
    QM9Dataset,
    QM9Tensors,
    split_indices,
    target_index,
)
from study.errors import UserError
from study.nn.fast_tp import fully_connected_paths
from study.nn.irreps import validate_l_values
from study.nn.model import BACKENDS, IrrepConvModel, make_optimizer

BENCH_FORMAT = 2
LMAX_SWEEP_HIDDEN = 16
DEFAULT_CASES = ("0,1,2x32", "0-4x16", "0-6x16", "0,3,4,5,6x16", "0,1,2x32:radius")
QUICK_CASES = ("0,1,2x4", "0,2x2:radius")
SEED = 21616


@dataclass(frozen=True)
class BenchCase:
    """One model configuration to measure: ``"0,3,4,5,6x16"``, ``"0-6x16"``, ``"0,1,2x32:radius"``."""

    l_values: tuple[int, ...]
    hidden_dim: int
    edges: str = "bonds"
    num_layers: int = 3

    @property
    def name(self) -> str:
        suffix = "" if self.edges == "bonds" else f":{self.edges}"
        return f"{','.join(map(str, self.l_values))}x{self.hidden_dim}{suffix}"


def parse_case(spec: str, num_layers: int = 3) -> BenchCase:
    """``L x H [:edges]`` with L a comma list of orders or ranges (``0-6``); UserError if malformed."""
    text = spec.strip()
    edges = "bonds"
    if ":" in text:
        text, edges = text.split(":", 1)
    if edges not in ("bonds", "radius"):
        raise UserError(f"--configs {spec}: edges must be 'bonds' or 'radius', got {edges!r}")
    orders, sep, hidden = text.rpartition("x")
    if not sep or not hidden.isdigit() or int(hidden) < 1:
        raise UserError(f"--configs {spec}: expected L_VALUESxHIDDEN[:edges], e.g. 0,1,2x32 or 0-6x16:radius")
    l_values: list[int] = []
    try:
        for part in orders.split(","):
            first, dash, last = part.strip().partition("-")
            l_values.extend(range(int(first), int(last) + 1) if dash else [int(first)])
        l_values = list(validate_l_values(l_values))
    except ValueError as exc:
        raise UserError(f"--configs {spec}: {exc}") from None
    return BenchCase(tuple(l_values), int(hidden), edges, num_layers)


def step_flops(model: IrrepConvModel, num_edges: int) -> int:
    """Arithmetic of one training step of the interaction blocks, counted from their paths.

    Per edge and block, forward: the radial MLP (``2 * edge_dim * H + 2 * H * weight_numel``) and,
    per path ``(l1, l2) -> l_out`` with multiplicities ``u -> w``, the Clebsch-Gordan coupling
    (``2 d1 d2 k``), the input contraction (``2 u d1 k``) and the weights (``2 u w k``), with
    ``d = 2l + 1``. The backward pass is counted as twice the forward, the usual convention.
    Embedding, spherical harmonics, scatter and readout are left out: under 1% here.
    """
    forward = 0
    for block in [model.input_block, *model.blocks]:
        hidden = block.radial.hs[1]
        per_edge = 2 * block.edge_dim * hidden + 2 * hidden * block.tp.weight_numel
        for path in fully_connected_paths(block.in_irreps, block.sh_irreps, block.out_irreps):
            d1, d2, k = 2 * path.l1 + 1, 2 * path.l2 + 1, 2 * path.l_out + 1
            per_edge += 2 * d1 * d2 * k + 2 * path.mul_in1 * d1 * k + 2 * path.mul_in1 * path.mul_out * k
        forward += per_edge * num_edges
    return 3 * forward


def matmul_gflops(device: torch.device, size: int = 2048, repeats: int = 5) -> float:
    """The machine's float32 square-matmul rate (GFLOP/s), median of ``repeats`` after a warm-up."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    times = []
    for index in range(repeats + 1):
        synchronize(device)
        started = time.perf_counter()
        a @ b
        synchronize(device)
        if index:
            times.append(time.perf_counter() - started)
    return 2 * size**3 / statistics.median(times) / 1e9


def data_loading(dataset: QM9Dataset, batch_size: int, device: torch.device) -> dict:
    """Molecules/s of shuffled training batches on ``device``: from the split collated once (what
    training uses), with the one-time collation, and through the PyG DataLoader (what it used)."""

    def rate(batches: Callable[[], Iterable]) -> float:
        # One epoch untimed first: its first batch pays one-time costs (lazy imports, allocator
        # growth) that an epoch of training does not.
        for _ in batches():
            pass
        molecules = 0
        started = time.perf_counter()
        for batch in batches():
            molecules += batch.to(device).num_graphs
        synchronize(device)
        return molecules / (time.perf_counter() - started)

    started = time.perf_counter()
    collated = CollatedSplit(dataset, device)
    collate_seconds = time.perf_counter() - started
    generator = torch.Generator().manual_seed(SEED)
    return {
        "molecules_per_s": rate(lambda: collated.batches(batch_size, shuffle=True, generator=generator)),
        "collate_seconds": collate_seconds,
        "dataloader_molecules_per_s": rate(lambda: DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator)),
        "molecules": len(dataset),
    }


class PeakMemory:
    """Peak memory a block of work adds: CUDA allocator peak, or the Linux process's VmHWM."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._libc = None
        if device.type == "cpu" and sys.platform.startswith("linux"):
            try:
                self._libc = ctypes.CDLL("libc.so.6")
                self._status_kib("VmRSS")
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                self._libc = None
        self.available = device.type == "cuda" or self._libc is not None
        self._base = 0

    @staticmethod
    def _status_kib(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise OSError(f"no {key} in /proc/self/status")

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif self._libc is not None:
            # Give freed heap pages back first, or the step could reuse them unseen.
            self._libc.malloc_trim(0)
            self._base = self._status_kib("VmRSS") * 1024
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS

    def peak_bytes(self) -> int | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self._base
        if self._libc is not None:
            return self._status_kib("VmHWM") * 1024 - self._base
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_batches(tensors: QM9Tensors, case: BenchCase, batch_size: int, count: int, device: torch.device) -> list:
    """`count` batches of `batch_size` molecules of the same seeded subset every bench run uses."""
    indices = split_indices(len(tensors), seed=SEED, fractions=(1.0, 0.0, 0.0), subset=batch_size * count)["train"]
    dataset = QM9Dataset(tensors, indices, edges=case.edges)
    return list(CollatedSplit(dataset, device).batches(batch_size))


def cueq_status(device: torch.device) -> str | None:
    """How cuEquivariance would run here: "cuda kernels", "pytorch fallback", or None if absent."""
    if importlib.util.find_spec("cuequivariance_torch") is None:
        return None
    if device.type == "cuda" and importlib.util.find_spec("cuequivariance_ops_torch") is not None:
        return "cuda kernels"
    return "pytorch fallback"


def bench_backends(device: torch.device) -> tuple[str, ...]:
    return (*BACKENDS, "cueq") if cueq_status(device) else BACKENDS


def _cueq_model(case: BenchCase, device: torch.device) -> IrrepConvModel:
    """The e3nn model with every block's tensor product replaced by cuEquivariance's."""
    import cuequivariance as cue
    import cuequivariance_torch as cuet

    model = IrrepConvModel(case.l_values, case.hidden_dim, num_layers=case.num_layers, backend="e3nn")
    for block in [model.input_block, *model.blocks]:
        irreps = [cue.Irreps("O3", str(i)) for i in (block.in_irreps, block.sh_irreps, block.out_irreps)]
        block.tp = cuet.FullyConnectedTensorProduct(
            *irreps,
            layout=cue.mul_ir,
            shared_weights=False,
            method="fused_tp" if cueq_status(device) == "cuda kernels" else "naive",
        )
    return model


def cueq_method(model: IrrepConvModel) -> str:
    """The implementation cuEquivariance actually built: it falls back to "naive" (PyTorch) with only
    a warning when its CUDA kernels fail to load, so the report names what ran."""
    return model.input_block.tp.f.method


def bench_models(case: BenchCase, device: torch.device, backends: Sequence[str] = BACKENDS) -> dict[str, IrrepConvModel]:
    """The case's model for each backend, with the same seeded initial weights."""
    torch.manual_seed(SEED)
    models = {backend: IrrepConvModel(case.l_values, case.hidden_dim, num_layers=case.num_layers, backend=backend) for backend in BACKENDS}
    # Same parameters in all: the comparison is of evaluations of one function.
    models["fast"].load_state_dict(models["e3nn"].state_dict())
    if "cueq" in backends:
        models["cueq"] = _cueq_model(case, device)
        # Its tensor products hold no parameters; their e3nn constants have no counterpart there.
        shared = {k: v for k, v in models["e3nn"].state_dict().items() if ".tp." not in k}
        models["cueq"].load_state_dict(shared, strict=False)
    return {backend: model.to(device) for backend, model in models.items() if backend in backends}


def training_step(model: IrrepConvModel, optimizer: torch.optim.Optimizer, batch, column: int) -> None:
    """One step as training takes it (forward, MSE on the standardised target, backward, AdamW)."""
    target = (batch.y[:, column] - REFERENCE_U0_ATOM_MEAN) / REFERENCE_U0_ATOM_STD
    loss = F.mse_loss(model(batch), target.to(batch.pos.dtype))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def timed_step(model: IrrepConvModel, optimizer: torch.optim.Optimizer, batch, column: int, device: torch.device) -> float:
    """Seconds of one training step, the device synchronised before and after (a GPU runs ahead)."""
    synchronize(device)
    started = time.perf_counter()
    training_step(model, optimizer, batch, column)
    synchronize(device)
    return time.perf_counter() - started


def bench_case(
    case: BenchCase,
    tensors: QM9Tensors,
    repeats: int,
    warmup: int,
    batch_size: int,
    device: torch.device,
    log: Callable[[str], None],
    backends: Sequence[str] = BACKENDS,
) -> dict:
    """Time ``repeats`` alternating training steps per backend after ``warmup`` each; see the module doc."""
    batches = bench_batches(tensors, case, batch_size, warmup + repeats, device)
    models = bench_models(case, device, backends)
    column = target_index("U0_atom")
    optimizers = {name: make_optimizer(model, lr=1e-3) for name, model in models.items()}
    with torch.no_grad():
        first = {name: model(batches[0]) for name, model in models.items()}
    scale = first["e3nn"].abs().max()
    differences = {name: float((first[name] - first["e3nn"]).abs().max() / scale) for name in models if name != "e3nn"}

    seconds: dict[str, list[float]] = {name: [] for name in models}
    for index, batch in enumerate(batches):
        # Rotate the order every round: no backend always runs right after the same other one.
        names = list(models)
        shift = index % len(names)
        order = names[shift:] + names[:shift]
        round_seconds = {}
        for name in order:
            round_seconds[name] = timed_step(models[name], optimizers[name], batch, column, device)
            if index >= warmup:
                seconds[name].append(round_seconds[name])
        kind = "warm-up" if index < warmup else "step"
        log(f"  {kind} {index + 1}/{len(batches)}: " + ", ".join(f"{n} {round_seconds[n]:.3f} s" for n in models))
    # Memory in one more, untimed step each: measuring returns freed pages to the system first,
    # which would make a timed step pay page faults that training does not.
    memory = PeakMemory(device)
    peaks: dict[str, int | None] = {}
    for name in models:
        memory.start()
        training_step(models[name], optimizers[name], batches[-1], column)
        peaks[name] = memory.peak_bytes()

    num_edges = statistics.mean(int(b.edge_index.shape[1]) for b in batches[warmup:])
    flops = step_flops(models["fast"], round(num_edges))
    result = {
        "name": case.name,
        "l_values": list(case.l_values),
        "hidden_dim": case.hidden_dim,
        "num_layers": case.num_layers,
        "edges": case.edges,
        "batch_size": batch_size,
        "mean_atoms_per_batch": statistics.mean(int(b.num_nodes) for b in batches[warmup:]),
        "mean_edges_per_batch": num_edges,
        "num_params": sum(p.numel() for p in models["fast"].parameters()),
        "flops_per_step": flops,
        "prediction_relative_difference": differences["fast"],
        "prediction_relative_differences": differences,
        "cueq_method": cueq_method(models["cueq"]) if "cueq" in models else None,
        "backends": {},
    }
    for name in models:
        median = statistics.median(seconds[name])
        result["backends"][name] = {
            "step_seconds": seconds[name],
            "median_step_seconds": median,
            "molecules_per_s": batch_size / median,
            "gflops_per_s": flops / median / 1e9,
            "peak_memory_mb": peaks[name] / 2**20 if peaks[name] is not None else None,
        }
    for numbers in result["backends"].values():
        numbers["vs_e3nn"] = numbers["molecules_per_s"] / result["backends"]["e3nn"]["molecules_per_s"]
    fast, e3nn = result["backends"]["fast"], result["backends"]["e3nn"]
    result["speedup"] = fast["vs_e3nn"]
    result["memory_ratio"] = fast["peak_memory_mb"] / e3nn["peak_memory_mb"] if fast["peak_memory_mb"] and e3nn["peak_memory_mb"] else None
    return result


def _header(device: torch.device, batch_size: int, repeats: int, warmup: int, backends: Sequence[str]) -> dict:
    import e3nn

    return {
        "format": BENCH_FORMAT,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "e3nn": e3nn.__version__,
        "backends": list(backends),
        "cueq": cueq_status(device),
        "batch_size": batch_size,
        "repeats": repeats,
        "warmup": warmup,
    }


def run_bench(
    tensors: QM9Tensors,
    cases: Sequence[BenchCase],
    repeats: int = 5,
    warmup: int = 1,
    batch_size: int = 32,
    device: torch.device | None = None,
    matmul_size: int = 2048,
    loading_batches: int = 50,
    log: Callable[[str], None] = print,
) -> dict:
    """The whole benchmark as one JSON-ready document (format ``BENCH_FORMAT``)."""
    device = device or torch.device("cpu")
    backends = bench_backends(device)
    started = time.perf_counter()
    log(f"matmul reference ({matmul_size}x{matmul_size}, float32)")
    report = {
        **_header(device, batch_size, repeats, warmup, backends),
        "matmul_gflops": matmul_gflops(device, matmul_size),
        "data_loading": {},
        "configs": [],
    }
    pool = split_indices(len(tensors), seed=SEED, fractions=(1.0, 0.0, 0.0), subset=batch_size * loading_batches)["train"]
    for edges in sorted({case.edges for case in cases}):
        loading = data_loading(QM9Dataset(tensors, pool, edges=edges), batch_size, device)
        report["data_loading"][edges] = loading
        log(
            f"data loading ({edges}): {loading['molecules_per_s']:.0f} molecules/s collated "
            f"(once: {loading['collate_seconds'] * 1000:.1f} ms), {loading['dataloader_molecules_per_s']:.0f} through the PyG DataLoader"
        )
    for case in cases:
        log(f"config {case.name} ({case.num_layers} layers, {case.edges} edges)")
        report["configs"].append(bench_case(case, tensors, repeats, warmup, batch_size, device, log, backends))
    report["seconds"] = time.perf_counter() - started
    return report


def growth_exponent(sizes: Sequence[float], values: Sequence[float]) -> float:
    """``a`` of the least-squares fit ``value ~ c * size^a`` (a line in log-log)."""
    slope, _ = np.polyfit(np.log(np.asarray(sizes, dtype=float)), np.log(np.asarray(values, dtype=float)), 1)
    return float(slope)


def run_lmax_sweep(
    tensors: QM9Tensors,
    max_lmax: int,
    num_layers: int,
    repeats: int = 3,
    warmup: int = 1,
    batch_size: int = 32,
    device: torch.device | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Step time and peak memory of l = 0..lmax, hidden ``LMAX_SWEEP_HIDDEN``, for lmax = 1..max_lmax."""
    device = device or torch.device("cpu")
    backends = bench_backends(device)
    started = time.perf_counter()
    report = {**_header(device, batch_size, repeats, warmup, backends), "hidden_dim": LMAX_SWEEP_HIDDEN, "configs": []}
    lmaxes = list(range(1, max_lmax + 1))
    for lmax in lmaxes:
        case = BenchCase(tuple(range(lmax + 1)), LMAX_SWEEP_HIDDEN, num_layers=num_layers)
        log(f"lmax {lmax}: {case.name} ({num_layers} layers)")
        report["configs"].append({"lmax": lmax, **bench_case(case, tensors, repeats, warmup, batch_size, device, log, backends)})
    report["growth"] = {}
    for name in backends:
        seconds = [c["backends"][name]["median_step_seconds"] for c in report["configs"]]
        memory = [c["backends"][name]["peak_memory_mb"] for c in report["configs"]]
        report["growth"][name] = {
            "time_exponent": growth_exponent(lmaxes, seconds) if len(lmaxes) > 1 else None,
            "memory_exponent": (growth_exponent(lmaxes, memory) if len(lmaxes) > 1 and all(m and m > 0 for m in memory) else None),
        }
    report["seconds"] = time.perf_counter() - started
    return report
