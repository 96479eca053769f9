"""What a trial will need, estimated before any work: parameters, edges per batch, peak memory.

Peak memory of a training step is counted from the model's tensor-product paths, the way
``study.bench.steps.step_flops`` counts its arithmetic: per edge and block, the gathered input features,
the spherical harmonics, the radial MLP's hidden layer (and its gradient), the messages (and the
summed output), and per path the Clebsch-Gordan coupling (``k d1``), the coupled input (``k u``)
and the per-edge weights (``u w``). Times 4 bytes (float32) or 8 (float64) and the edges of a
batch, this matched the CUDA allocator's measured peak of the fast backend within 2% on 12
configurations (l = 0..1 to 0..8 at hidden 16, [0,1,2] and [0,1,2,3] at hidden 8 and 32, an H200,
``results/bench-h200/``; e3nn's within 15% after a factor of 1.13). Parameters, their gradients
and AdamW's two moments add 4 copies of the parameters. No model is built: a model too large for
the machine is refused before it is allocated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from study.config.trial import TrialConfig
from study.data.qm9 import QM9Tensors, radius_edges, split_indices
from study.errors import UserError
from study.nn.fast_tp import fully_connected_paths
from study.nn.irreps import irreps_for

# Measured peak over counted floats (see the module doc): fitted on an H200's allocator.
ACTIVATION_FACTOR = {"fast": 1.0, "e3nn": 1.13}
# Copies of the parameters a training step holds: weights, gradients, AdamW's exp_avg and exp_avg_sq.
PARAMETER_COPIES = 4
NUM_ELEMENTS = 100  # rows of the atom embedding (study.nn.model.IrrepConvModel's default)
# Molecules whose edges are counted to size a batch (radius edges are computed for each).
EDGE_SAMPLE = 256


@dataclass(frozen=True)
class Estimate:
    num_params: int
    edges_per_batch: float  # a large batch: mean + 3 standard deviations of the batch's edge count
    step_bytes: int  # activations and temporaries of one training step at that batch
    parameter_bytes: int  # parameters, gradients and optimizer state
    bytes_per_float: int

    @property
    def total_bytes(self) -> int:
        return self.step_bytes + self.parameter_bytes


def _blocks(config: TrialConfig):
    """(input irreps, spherical-harmonics irreps, output irreps) of every interaction block."""
    hidden = irreps_for(config.l_values, config.hidden_dim)
    sh = irreps_for(config.l_values, 1)
    first = irreps_for([0], config.atom_dim)
    return [(first, sh, hidden)] + [(hidden, sh, hidden)] * (config.num_layers + 1)


def num_params(config: TrialConfig) -> int:
    """Trainable scalars of the trial's model, counted from its irreps (equals count_parameters)."""
    total = NUM_ELEMENTS * config.atom_dim + config.hidden_dim + 2  # embedding, readout (l = 0 only), head
    for irreps_in, sh, irreps_out in _blocks(config):
        weight_numel = sum(p.weight_numel for p in fully_connected_paths(irreps_in, sh, irreps_out))
        total += config.edge_dim * config.hidden_dim + config.hidden_dim * weight_numel  # the radial MLP
    return total


def floats_per_edge(config: TrialConfig) -> int:
    """Floats a training step holds per edge, summed over blocks (see the module doc)."""
    total = 0
    for irreps_in, sh, irreps_out in _blocks(config):
        total += irreps_in.dim + sh.dim + 2 * config.hidden_dim + 2 * irreps_out.dim
        for path in fully_connected_paths(irreps_in, sh, irreps_out):
            k, d1 = 2 * path.l_out + 1, 2 * path.l1 + 1
            total += k * d1 + k * path.mul_in1 + path.mul_in1 * path.mul_out
    return total


def edges_per_batch(config: TrialConfig, tensors: QM9Tensors) -> float:
    """Edges of a large batch of the trial's molecules: mean + 3 sd of a batch's edge count."""
    pool = split_indices(len(tensors), seed=config.split_seed, fractions=(1.0, 0.0, 0.0), subset=config.subset)["train"]
    sample = np.random.default_rng(0).choice(pool, size=min(EDGE_SAMPLE, len(pool)), replace=False)
    if config.edges == "bonds":
        counts = 2 * (tensors.bond_ptr[1:] - tensors.bond_ptr[:-1]).numpy()[sample]
    else:
        counts = np.array(
            [radius_edges(tensors.pos[int(tensors.atom_ptr[k]) : int(tensors.atom_ptr[k + 1])], config.cutoff).shape[1] for k in sample]
        )
    mean, sd = float(counts.mean()), float(counts.std())
    return config.batch_size * mean + 3 * math.sqrt(config.batch_size) * sd


def estimate(config: TrialConfig, tensors: QM9Tensors) -> Estimate:
    bytes_per_float = 8 if config.dtype == "float64" else 4
    edges = edges_per_batch(config, tensors)
    params = num_params(config)
    step = ACTIVATION_FACTOR[config.backend] * edges * floats_per_edge(config) * bytes_per_float
    return Estimate(params, edges, int(step), PARAMETER_COPIES * params * bytes_per_float, bytes_per_float)


def available_bytes(device: torch.device) -> int | None:
    """Free memory where the trial would run: the GPU's free memory, or Linux's MemAvailable."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def gib(value: float) -> str:
    return f"{value / 2**30:.2f} GiB" if value >= 2**28 else f"{value / 2**20:.0f} MiB"


def check_fits(config: TrialConfig, found: Estimate, device: torch.device, what: str, copies: int = 1) -> None:
    """UserError when ``copies`` trials of ``config`` cannot fit in the device's free memory."""
    free = available_bytes(device)
    needed = copies * found.total_bytes
    if free is None or needed <= free:
        return
    count = f"{copies} trials at once of " if copies > 1 else ""
    raise UserError(
        f"{what}: {count}l_values={list(config.l_values)} hidden_dim={config.hidden_dim} num_layers={config.num_layers} "
        f"batch_size={config.batch_size} needs an estimated {gib(needed)} ({found.num_params:,} parameters, "
        f"{found.edges_per_batch:.0f} edges per batch) but {device.type} has {gib(free)} free; "
        "use a smaller model or batch, or --force to try anyway"
    )


def check_memory(config: TrialConfig, tensors: QM9Tensors, what: str, copies: int = 1, force: bool = False, log=print) -> Estimate:
    """Estimate a trial's peak memory, say it, and refuse (UserError) a trial whose `copies`
    together exceed the free memory of its device, unless `force`."""
    from study.training.trial import select_device

    found = estimate(config, tensors)
    log(f"estimate: {found.num_params:,} parameters, {found.edges_per_batch:.0f} edges per batch, peak {gib(found.total_bytes)} per trial")
    if not force:
        check_fits(config, found, select_device(config.device), what, copies)
    return found
