"""The plan of the fast tensor product (:mod:`study.nn.fast_tp`): its paths and how each is computed.

As e3nn keeps a tensor product's "instructions" apart from the code that evaluates them, this module
works out, from the three Irreps alone, everything :class:`~study.nn.fast_tp.FusedRadialTensorProduct`
decides at construction: the coupling paths in e3nn's order with their weight offsets and
normalisation, the order of x2's components, which inputs are factored, which (input, output) pairs
share a coupling (and the Clebsch-Gordan constant of each coupling), and which pieces of T share a
weight GEMM, with the columns of the radial MLP's last layer each of those reads.

A plan is plain data: frozen dataclasses of ints, floats, strings and tuples, equal when built from
equal arguments, holding no tensors. The few tensors the module registers as buffers are built from
it on request (:meth:`Coupling.clebsch_gordan_matrix`, :meth:`TensorProductPlan.columns`), always
in the same way, so that equal plans give bitwise equal buffers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from e3nn import o3
from torch import Tensor


@dataclass(frozen=True)
class TensorProductPath:
    """One ``(i1, i2) -> i_out`` path of a fully connected "uvw" tensor product, in e3nn's order."""

    i_in1: int
    i_in2: int
    i_out: int
    l1: int
    l2: int
    l_out: int
    mul_in1: int
    mul_out: int
    weight_start: int  # first index of this path's [mul_in1, 1, mul_out] block in the flat weights
    coefficient: float  # e3nn's path normalisation, sqrt(alpha)

    @property
    def weight_numel(self) -> int:
        return self.mul_in1 * self.mul_out


def fully_connected_paths(irreps_in1: o3.Irreps, irreps_in2: o3.Irreps, irreps_out: o3.Irreps) -> list[TensorProductPath]:
    """The paths of ``o3.FullyConnectedTensorProduct(in1, in2, out)`` with their weight offsets and
    normalisation, as e3nn computes them with its defaults (``irrep_normalization="component"``,
    ``path_normalization="element"``, unit input and output variances).

    Paths with a zero multiplicity are kept (they hold no weights and give no output), as in e3nn.
    """
    triples = [
        (i1, i2, i_out)
        for i1, (_, ir1) in enumerate(irreps_in1)
        for i2, (_, ir2) in enumerate(irreps_in2)
        for i_out, (_, ir_out) in enumerate(irreps_out)
        if ir_out in ir1 * ir2
    ]
    # "element" normalisation: alpha = (2 l_out + 1) / (number of (u, v) pairs feeding this output).
    fan_in = {i_out: 0 for i_out in range(len(irreps_out))}
    for i1, i2, i_out in triples:
        fan_in[i_out] += irreps_in1[i1].mul * irreps_in2[i2].mul
    paths, start = [], 0
    for i1, i2, i_out in triples:
        mul1, mul2, mul_out = irreps_in1[i1].mul, irreps_in2[i2].mul, irreps_out[i_out].mul
        alpha = irreps_out[i_out].ir.dim
        if fan_in[i_out] > 0:
            alpha /= fan_in[i_out]
        paths.append(
            TensorProductPath(
                i_in1=i1,
                i_in2=i2,
                i_out=i_out,
                l1=irreps_in1[i1].ir.l,
                l2=irreps_in2[i2].ir.l,
                l_out=irreps_out[i_out].ir.l,
                mul_in1=mul1,
                mul_out=mul_out,
                weight_start=start,
                coefficient=math.sqrt(alpha),
            )
        )
        start += mul1 * mul2 * mul_out
    return paths


def clebsch_gordan(l1: int, l2: int, l_out: int) -> Tensor:
    """The ``[2l1+1, 2l2+1, 2l_out+1]`` coupling e3nn uses for a path, in float64.

    e3nn's specialised code replaces ``wigner_3j`` by the identity over ``sqrt(2l+1)`` whenever one
    order is 0 (the same matrix up to rounding); using the identical formula keeps float64 results
    equal to e3nn's to the last bits.
    """
    if l1 == 0 or l2 == 0 or l_out == 0:
        dim = 2 * max(l1, l2, l_out) + 1
        eye = torch.eye(dim, dtype=torch.float64) / math.sqrt(dim)
        if l1 == 0:
            return eye.unsqueeze(0)
        if l2 == 0:
            return eye.unsqueeze(1)
        return eye.unsqueeze(2)
    return o3.wigner_3j(l1, l2, l_out, dtype=torch.float64)


@dataclass(frozen=True)
class Thresholds:
    """The limits that choose a strategy (see :mod:`study.nn.fast_tp`); sizes are floats per edge.

    - ``merge_b_floats``: the pairs of one input share one coupling while its B stays at most this;
    - ``merge_w_floats``: the pieces of one output (k > 1) share one weight GEMM while their W stays
      at most this; in a stacked coupling, every such output's W must stay at most this too;
    - ``stack_b_floats``: all coupled inputs (of one multiplicity) are stacked into one coupling
      when the B of all its pairs together stays at most this;
    - ``factor_min_mul``: an input of dimension 1 is factored when its multiplicity is at least this.
    """

    merge_b_floats: int
    merge_w_floats: int
    stack_b_floats: int
    factor_min_mul: int


ColumnOrder = Literal["path_u_w", "u_path_w"]


@dataclass(frozen=True)
class ColumnBlock:
    """The columns of the radial MLP's last layer ``[H, weight_numel]`` that one GEMM reads.

    ``order`` is that of the block's ``[H, u, w]`` weights: ``"path_u_w"`` (path-major) or
    ``"u_path_w"`` (every path has the same u; u-major, then path, then w).
    """

    paths: tuple[TensorProductPath, ...]
    order: ColumnOrder

    @property
    def size(self) -> int:
        return sum(p.weight_numel for p in self.paths)

    def indices(self) -> Tensor:
        """``[size]`` int64 indices into the last layer's columns, in ``order``."""
        blocks = [torch.arange(p.weight_start, p.weight_start + p.weight_numel).view(p.mul_in1, p.mul_out) for p in self.paths]
        if self.order == "path_u_w":
            return torch.cat([b.reshape(-1) for b in blocks])
        return torch.cat(blocks, dim=1).reshape(-1)


@dataclass(frozen=True)
class FactoredTerm:
    """One path of a factored input: ``out_{i_out} += constant * x2[:, first:last] s_path``, where
    ``rows = (first, last)`` are the path's x2 components in the reordered x2 and ``s_path``
    (``mul_out`` columns) is the path's part of the input's ``s``."""

    i_out: int
    rows: tuple[int, int]
    constant: float  # e3nn's path normalisation over sqrt(k), the Clebsch-Gordan identity's scale
    mul_out: int


@dataclass(frozen=True)
class FactoredInput:
    """An input of dimension 1 computed without coupling: ``s = sum_h hidden (x1 @ M')`` with ``M'``
    the columns of ``column_block`` (order ``"u_path_w"``), split over ``terms`` in their order."""

    i_in1: int
    column_block: int  # index into TensorProductPlan.column_blocks
    terms: tuple[FactoredTerm, ...]


@dataclass(frozen=True)
class CouplingPiece:
    """The part of a coupling's T that feeds one output: ``[E, k * P, u]``, rows (k, path)."""

    i_out: int
    dim_out: int  # k = 2 l_out + 1
    paths: tuple[TensorProductPath, ...]  # e3nn's order
    row_starts: tuple[int, ...]  # per path: its x2 irrep's first row, relative to the coupling's rows

    @property
    def num_paths(self) -> int:
        return len(self.paths)


@dataclass(frozen=True)
class Coupling:
    """One ``B = x2[:, first:last] @ G``, ``T = B @ x1^T`` for the ``inputs`` stacked along d.

    ``G`` (buffer ``name``) is ``[last - first, sum over pieces of k P d]``, with ``d`` the stacked
    dimension; ``T`` splits into the ``pieces`` in their order.
    """

    name: str
    inputs: tuple[int, ...]
    input_offsets: tuple[int, ...]  # per input: its first component along the stacked d
    stacked_dim: int
    rows: tuple[int, int]  # (first, last) components of the reordered x2
    pieces: tuple[CouplingPiece, ...]

    def clebsch_gordan_matrix(self) -> Tensor:
        """``G`` in float64: row j multiplies the reordered ``x2[e, first + j]``; for each piece, its
        columns are ``[k, P, d]``, each path's Clebsch-Gordan block times its normalisation in the
        path's own rows and input components, zero elsewhere."""
        first, last = self.rows
        blocks = []
        for piece in self.pieces:
            g = torch.zeros(last - first, piece.dim_out, piece.num_paths, self.stacked_dim, dtype=torch.float64)
            for a, (p, start) in enumerate(zip(piece.paths, piece.row_starts)):
                cg = p.coefficient * clebsch_gordan(p.l1, p.l2, p.l_out)  # [d1, d2, k]
                offset = self.input_offsets[self.inputs.index(p.i_in1)]
                g[start : start + cg.shape[1], :, a, offset : offset + cg.shape[0]] = cg.permute(1, 2, 0)
            blocks.append(g.reshape(last - first, -1))
        return torch.cat(blocks, dim=1)


@dataclass(frozen=True)
class WeightGroup:
    """Pieces of T that share one weight GEMM (and one bmm): ``T`` of the pieces concatenated along
    (path, u), times the weights from ``column_block`` (order ``"path_u_w"``, the same paths)."""

    column_block: int  # index into TensorProductPlan.column_blocks
    pieces: tuple[tuple[int, int], ...]  # (index in TensorProductPlan.couplings, index of the piece)


@dataclass(frozen=True)
class OutputPlan:
    """The weight groups summed into output ``i_out`` (a scalar output has exactly one)."""

    i_out: int
    groups: tuple[WeightGroup, ...]


@dataclass(frozen=True)
class TensorProductPlan:
    """Everything ``FusedRadialTensorProduct(irreps_in1, irreps_in2, irreps_out)`` decides at
    construction. Outputs reached by no group are zero; every weighted path belongs to exactly one
    factored term or coupling piece, and its weights to exactly one column block."""

    irreps_in1: o3.Irreps
    irreps_in2: o3.Irreps
    irreps_out: o3.Irreps
    all_paths: tuple[TensorProductPath, ...]  # e3nn's, including those without weights
    paths: tuple[TensorProductPath, ...]  # the weighted ones, the only ones computed
    in1_shapes: tuple[tuple[int, int], ...]  # (multiplicity, dimension) per input irrep
    out_shapes: tuple[tuple[int, int], ...]  # (multiplicity, dimension) per output irrep
    x2_ranges: tuple[tuple[int, int], ...]  # x2's irreps' component ranges, in the reordered order
    factored: tuple[FactoredInput, ...]
    couplings: tuple[Coupling, ...]
    outputs: tuple[OutputPlan, ...]  # by output index
    column_blocks: tuple[ColumnBlock, ...]  # factored inputs' first, then the outputs' groups
    output_used: tuple[bool, ...]  # per output irrep: reached by a weighted path (e3nn's output_mask)
    e3nn_w3j: tuple[tuple[int, int, int], ...]  # (l1, l2, l_out) of e3nn's _w3j_* buffers, in its order

    @property
    def weight_numel(self) -> int:
        return sum(p.weight_numel for p in self.all_paths)

    def columns(self) -> Tensor:
        """All column blocks' indices concatenated (int64), in ``column_blocks`` order."""
        parts = [block.indices() for block in self.column_blocks]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def _chunks(items: list, size: Callable[[list], int], limit: int | None) -> list[list]:
    """Consecutive runs of ``items``, each grown while ``size(run) <= limit`` (no limit: one run)."""
    runs: list[list] = []
    for item in items:
        if runs and (limit is None or size(runs[-1] + [item]) <= limit):
            runs[-1].append(item)
        else:
            runs.append([item])
    return runs


# A pair: (output index, its paths from the inputs at hand, in e3nn's order).
_Pair = tuple[int, list[TensorProductPath]]


def plan_tensor_product(irreps_in1: o3.Irreps, irreps_in2: o3.Irreps, irreps_out: o3.Irreps, thresholds: Thresholds) -> TensorProductPlan:
    """The plan of ``FusedRadialTensorProduct(irreps_in1, irreps_in2, irreps_out)`` under
    ``thresholds``. Raises ``ValueError`` unless ``irreps_in2`` has multiplicity 1 per irrep."""
    if any(mul != 1 for mul, _ in irreps_in2):
        raise ValueError(f"irreps_in2 must have multiplicity 1 per irrep, got {irreps_in2}")
    all_paths = fully_connected_paths(irreps_in1, irreps_in2, irreps_out)
    # Paths without weights or output contribute exactly zero; e3nn skips them too.
    paths = [p for p in all_paths if p.weight_numel > 0]

    # x2's components reordered by (parity, l): the l2 of the paths of one (i1, output) pair
    # all have one parity and form an interval of l, so they are one contiguous row range.
    order = sorted(range(len(irreps_in2)), key=lambda i: (irreps_in2[i].ir.p, irreps_in2[i].ir.l, i))
    slices2 = irreps_in2.slices()
    x2_offsets = {i: sum(irreps_in2[j].ir.dim for j in order[: order.index(i)]) for i in order}

    def rows_of(pairs: list[_Pair]) -> tuple[int, int]:
        reached = [p for _, group in pairs for p in group]
        return (
            min(x2_offsets[p.i_in2] for p in reached),
            max(x2_offsets[p.i_in2] + irreps_in2[p.i_in2].ir.dim for p in reached),
        )

    def b_size(inputs: tuple[int, ...], pairs: list[_Pair]) -> int:
        """Floats per edge of B: rows x (k P over the pairs) x (d1 of the stacked inputs)."""
        first, last = rows_of(pairs)
        dim1 = sum(irreps_in1[i1].ir.dim for i1 in inputs)
        return (last - first) * sum(irreps_out[i_out].ir.dim * len(group) for i_out, group in pairs) * dim1

    column_blocks: list[ColumnBlock] = []

    def take_columns(group: list[TensorProductPath], column_order: ColumnOrder) -> int:
        column_blocks.append(ColumnBlock(tuple(group), column_order))
        return len(column_blocks) - 1

    # Below factor_min_mul the separate GEMM and contraction cost more operations than they save:
    # such an input joins the others (its T is an outer product).
    is_factored = [ir1.dim == 1 and mul1 >= thresholds.factor_min_mul for mul1, ir1 in irreps_in1]
    factored = []
    for i1 in range(len(irreps_in1)):
        group = [p for p in paths if p.i_in1 == i1] if is_factored[i1] else []
        if not group:
            continue
        block = take_columns(group, "u_path_w")
        terms = []
        for p in group:
            first, dim = x2_offsets[p.i_in2], irreps_in2[p.i_in2].ir.dim
            terms.append(FactoredTerm(p.i_out, (first, first + dim), p.coefficient / math.sqrt(dim), p.mul_out))
        factored.append(FactoredInput(i1, block, tuple(terms)))

    coupled_inputs = tuple(i1 for i1 in range(len(irreps_in1)) if not is_factored[i1])
    per_output = [(i_out, [p for p in paths if p.i_out == i_out and p.i_in1 in coupled_inputs]) for i_out in range(len(irreps_out))]
    per_output = [(i_out, group) for i_out, group in per_output if group]
    if (
        per_output
        and len({irreps_in1[i1].mul for i1 in coupled_inputs}) == 1
        and sum(b_size(coupled_inputs, [pair]) for pair in per_output) <= thresholds.stack_b_floats
        # an output's paths then share one weight GEMM, so its weights must stay small too
        and all(
            sum(p.weight_numel for p in group) <= thresholds.merge_w_floats for i_out, group in per_output if irreps_out[i_out].ir.dim > 1
        )
    ):
        chunks = [(coupled_inputs, per_output)]
    else:
        chunks = []
        for i1 in coupled_inputs:
            pairs = [(i_out, [p for p in paths if (p.i_in1, p.i_out) == (i1, i_out)]) for i_out in range(len(irreps_out))]
            pairs = [(i_out, group) for i_out, group in pairs if group]
            runs = _chunks(pairs, lambda run, i1=i1: b_size((i1,), run), thresholds.merge_b_floats)
            chunks += [((i1,), run) for run in runs]

    couplings = []
    for inputs, chunk in chunks:
        first, last = rows_of(chunk)
        offsets = tuple(sum(irreps_in1[i].ir.dim for i in inputs[:n]) for n in range(len(inputs)))
        pieces = tuple(
            CouplingPiece(i_out, irreps_out[i_out].ir.dim, tuple(group), tuple(x2_offsets[p.i_in2] - first for p in group))
            for i_out, group in chunk
        )
        name = "_cg_" + "_".join(map(str, inputs)) + f"_{chunk[0][0]}"
        stacked_dim = sum(irreps_in1[i1].ir.dim for i1 in inputs)
        couplings.append(Coupling(name, inputs, offsets, stacked_dim, (first, last), pieces))

    # Per output, its pieces of T in groups that share one weight GEMM. A scalar output forms no
    # weights: one group. Otherwise a group's per-edge weights [P * u, w] stay small enough to be
    # in cache when the bmm reads them.
    outputs = []
    for i_out, (_, ir_out) in enumerate(irreps_out):
        reached = [
            ((c, n), piece.paths) for c, coupling in enumerate(couplings) for n, piece in enumerate(coupling.pieces) if piece.i_out == i_out
        ]
        limit = None if ir_out.dim == 1 else thresholds.merge_w_floats
        groups = []
        for run in _chunks(reached, lambda run: sum(p.weight_numel for _, group in run for p in group), limit):
            block = take_columns([p for _, group in run for p in group], "path_u_w")
            groups.append(WeightGroup(block, tuple(piece for piece, _ in run)))
        if groups:
            outputs.append(OutputPlan(i_out, tuple(groups)))

    # e3nn keeps a wigner_3j constant for every weighted path it does not specialise (no l = 0).
    e3nn_w3j = tuple(dict.fromkeys((p.l1, p.l2, p.l_out) for p in paths if 0 not in (p.l1, p.l2, p.l_out)))
    return TensorProductPlan(
        irreps_in1=irreps_in1,
        irreps_in2=irreps_in2,
        irreps_out=irreps_out,
        all_paths=tuple(all_paths),
        paths=tuple(paths),
        in1_shapes=tuple((mul, ir.dim) for mul, ir in irreps_in1),
        out_shapes=tuple((mul, ir.dim) for mul, ir in irreps_out),
        x2_ranges=tuple((slices2[i].start, slices2[i].stop) for i in order),
        factored=tuple(factored),
        couplings=tuple(couplings),
        outputs=tuple(outputs),
        column_blocks=tuple(column_blocks),
        output_used=tuple(any(p.i_out == i_out for p in paths) for i_out in range(len(irreps_out))),
        e3nn_w3j=e3nn_w3j,
    )
