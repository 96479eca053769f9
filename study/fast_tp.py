"""A fast, drop-in implementation of the interaction block's weighted tensor product.

The block computes, for every edge e (``hidden`` is the radial MLP's hidden layer ``[E, H]``, ``M``
its last linear layer ``[H, weight_numel]``):

    out[e] = FullyConnectedTensorProduct(x1[e], x2[e], weight=W[e]),   W[e] = scale * hidden[e] @ M

e3nn evaluates this path by path (106 paths for l <= 6), each as an einsum over an outer product
of the inputs, and its backward adds a zero-filled full-size gradient per sliced input. Here the
same function is a few dense ops per (input irrep i1, output irrep o) pair with P paths, k = 2 l_o + 1:

1. ``B = x2[:, rows] @ G``: the spherical harmonics times a precomputed ``[rows, k * P * d1]``
   constant holding the P paths' Clebsch-Gordan blocks (e3nn's ``wigner_3j``) times e3nn's path
   normalisation; ``rows`` is a contiguous range of x2 (see ``_x2_order``).
2. ``T = B @ x1_i1^T``: ``[E, k * P, u]`` = ``[E, k, P * u]``, every path's coupled input.
3. ``W = scale * hidden @ M_pair``: ``[E, P * u, w]``, the pair's per-edge weights only (never
   the whole ``[E, weight_numel]``).
4. ``out_o^T += T @ W``: ``[E, k, w]``; summed over the inputs feeding o.

Small models are bound by the number of operations (each batched matmul over ~1,200 tiny
per-edge matrices costs ~0.1 ms whatever its FLOPs), large ones by memory traffic. So:

- the pairs of one input share steps 1-2 (one GEMM, one bmm) while B stays under
  ``MERGE_B_FLOATS`` per edge, and the pairs of one output share steps 3-4 while their W stays
  under ``MERGE_W_FLOATS`` per edge (in cache when the bmm reads it); in a small block (all of B
  under ``STACK_B_FLOATS``, inputs of one multiplicity) the inputs are stacked along d instead, so
  that all outputs share one GEMM and one bmm for steps 1-2;
- a scalar output (k = 1) never forms W: ``out = sum_h hidden[e, h] (T @ M')[e, h, :]`` with
  ``M'`` ``[P * u, H * w]`` is one large GEMM of the same FLOPs (for k > 1 it costs k H / (H + k)
  times W's FLOPs, measured slower);
- an input of dimension 1 (l1 = 0) with multiplicity >= ``FACTOR_MIN_MUL`` (the input block's
  atom embedding) is factored: its Clebsch-Gordan block is the identity over sqrt(k), so a path's
  message is ``c x2_p[e, k] s_p[e, w]`` with ``s = sum_h hidden[e, h] (x1 @ M')[e, h, :]``, one
  GEMM for all its paths and no per-edge matrix at all.

Layouts matter as much as operation counts: step 4 returns ``out_o^T`` transposed, so its gradient
arrives as a transposed view, on which the backward's batched matmuls run 5x slower than on a
contiguous copy on the CPU; ``_ContiguousGradient`` hands them the copy there (a step 18-27%
faster from [0,1,2] x 8 to [0..6] x 16). On the GPU cuBLAS takes the view as it is, and the copy
only costs: on an H100, steps of [0,1,2] x 8, [0,1,2,3] x 8 and [0,1,2] x 32 were 7% faster
without it ([0..6] x 16 2% slower, within the noise), so it is applied to CPU tensors only.

The parameters stay where they are (the block keeps e3nn's ``FullyConnectedNet``), and this module
registers exactly the buffers e3nn's tensor product has (``weight``, ``output_mask`` and the
``_compiled_main_left_right._w3j_*`` constants), so state dicts load into either backend. Like e3nn,
constants are stored in the default dtype at construction: build under
``torch.set_default_dtype(torch.float64)`` for float64-exact constants.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from e3nn import o3
from torch import Tensor, nn


# Strategy thresholds (module doc), measured on 2 CPU cores: [0,1,2] x 8 and [0,1,2,3] x 8 gain
# from merging, [0..6] x 16 loses past these; stacking (one coupling for all outputs) gains 2-4% at
# [0,1,2] x 8 and 4% at [0,1,2,3] x 8 (G of 2,835 and 25,344 floats) and loses 44% at [0..4] x 8
# (143,750); a factored input of multiplicity 8 gained nothing.
MERGE_B_FLOATS = 4096
MERGE_W_FLOATS = 1024
STACK_B_FLOATS = 32768
FACTOR_MIN_MUL = 16


class _ContiguousGradient(torch.autograd.Function):
    """The identity, whose backward hands on its gradient made contiguous.

    An output block is formed as ``out^T [E, k, w]`` and returned transposed, so its gradient
    arrives as a transposed view; the batched matmuls of the backward run 5x slower on such a
    view than on a contiguous copy (0.76 against 0.14 ms for 1,200 edges, k = 5, P u = 32, w = 8).
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous()


def _sum_over_hidden(hidden: Tensor, z: Tensor) -> Tensor:
    """``[E, n]`` = sum_h hidden[e, h] z[e, h, :] for ``hidden`` ``[E, H]`` and ``z`` ``[E, H, n]``.

    A bmm of [1, H] rows, not a broadcast product and sum, whose backward multiplies an expanded
    gradient as large as z: 5% of a [0..6] x 16 step and 10% of a [0,1,2] x 32 step faster.
    """
    return torch.bmm(hidden.unsqueeze(1), z).squeeze(1)


def _chunks(items: list, size: Callable[[list], int], limit: int | None) -> list[list]:
    """Consecutive runs of ``items``, each grown while ``size(run) <= limit`` (no limit: one run)."""
    runs: list[list] = []
    for item in items:
        if runs and (limit is None or size(runs[-1] + [item]) <= limit):
            runs[-1].append(item)
        else:
            runs.append([item])
    return runs


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


class FusedRadialTensorProduct(nn.Module):
    """``o3.FullyConnectedTensorProduct(irreps_in1, irreps_in2, irreps_out, shared_weights=False)``
    with its per-edge weights given as ``scale * hidden @ linear`` (the radial MLP's last layer).

    ``irreps_in2`` must have multiplicity 1 per irrep (the spherical harmonics of an edge).
    Shapes: E edges; per irrep, u (or w) its multiplicity, d1 (or k) its dimension 2l + 1.
    """

    def __init__(self, irreps_in1: str | o3.Irreps, irreps_in2: str | o3.Irreps, irreps_out: str | o3.Irreps) -> None:
        super().__init__()
        self.irreps_in1 = o3.Irreps(irreps_in1)
        self.irreps_in2 = o3.Irreps(irreps_in2)
        self.irreps_out = o3.Irreps(irreps_out)
        if any(mul != 1 for mul, _ in self.irreps_in2):
            raise ValueError(f"irreps_in2 must have multiplicity 1 per irrep, got {self.irreps_in2}")
        all_paths = fully_connected_paths(self.irreps_in1, self.irreps_in2, self.irreps_out)
        self.weight_numel = sum(p.weight_numel for p in all_paths)
        self._register_e3nn_buffers(all_paths)
        # Paths without weights or output contribute exactly zero; e3nn skips them too.
        paths = [p for p in all_paths if p.weight_numel > 0]
        self.num_paths = len(paths)
        # Plain (multiplicity, dimension) pairs: forward touches no e3nn objects (torch.compile-able).
        self._in1_shapes = [(mul, ir.dim) for mul, ir in self.irreps_in1]
        self._out_shapes = [(mul, ir.dim) for mul, ir in self.irreps_out]
        # x2's components reordered by (parity, l): the l2 of the paths of one (i1, output) pair
        # all have one parity and form an interval of l, so they are one contiguous row range.
        order = sorted(range(len(self.irreps_in2)), key=lambda i: (self.irreps_in2[i].ir.p, self.irreps_in2[i].ir.l, i))
        slices2 = self.irreps_in2.slices()
        self.register_buffer(
            "_x2_order", torch.cat([torch.arange(slices2[i].start, slices2[i].stop) for i in order]), persistent=False
        )
        in2_offsets = {}
        for i in order:
            in2_offsets[i] = sum(self.irreps_in2[j].ir.dim for j in order[: order.index(i)])

        def paths_between(i1: int, i_out: int) -> list[TensorProductPath]:
            return [p for p in paths if (p.i_in1, p.i_out) == (i1, i_out)]  # e3nn's order: by i2

        # linear's columns per path, in e3nn's order: [u, w] blocks, the path's at weight_start.
        def columns(group: list[TensorProductPath], order: str) -> Tensor:
            """Indices into linear's columns: the group's [H, u, w] blocks in (path, u, w) order, or
            in (u, path, w) order (every path of the group has the same u)."""
            blocks = [torch.arange(p.weight_start, p.weight_start + p.weight_numel).view(p.mul_in1, p.mul_out) for p in group]
            if order == "path_u_w":
                return torch.cat([b.reshape(-1) for b in blocks])
            return torch.cat(blocks, dim=1).reshape(-1)

        column_parts: list[Tensor] = []

        def take_columns(indices: Tensor) -> int:
            """Registers a group's column indices; returns its block's index in forward's split."""
            column_parts.append(indices)
            return len(column_parts) - 1

        # Inputs of dimension 1 (l1 = 0): the Clebsch-Gordan block is the identity over sqrt(k), so a
        # path's message factors, c * x2_p[e, k] * s_p[e, w] with s_p = sum_(u, h) x1[e, u] hidden[e, h]
        # M_p[h, u, w]; one GEMM x1 @ [u, H * (all of its paths' w)] serves all its paths, and no
        # per-edge matrix is formed. (i1, linear's columns in (u, path, w) order, per path: i_out,
        # its x2 rows, constant, w.)
        self._factor_plan: list[tuple[int, int, list[tuple[int, tuple[int, int], float, int]]]] = []

        def factored(mul1: int, ir1: o3.Irrep) -> bool:
            # Below FACTOR_MIN_MUL the separate GEMM and contraction cost more operations than
            # they save: such an input joins the others (its T is an outer product).
            return ir1.dim == 1 and mul1 >= FACTOR_MIN_MUL

        for i1, (mul1, ir1) in enumerate(self.irreps_in1):
            group = [p for p in paths if p.i_in1 == i1] if factored(mul1, ir1) else []
            if not group:
                continue
            block = take_columns(columns(group, "u_path_w"))
            terms = []
            for p in group:
                first = in2_offsets[p.i_in2]
                dim = self.irreps_in2[p.i_in2].ir.dim
                terms.append((p.i_out, (first, first + dim), p.coefficient / math.sqrt(dim), p.mul_out))
            self._factor_plan.append((i1, block, terms))

        # The other inputs, per (i1, output) pair with P paths: B = x2[:, rows] @ G is [E, k * P, d1]
        # and T = B @ x1_i1^T is [E, k * P, u], every path's coupled input, rows (k, path). Pairs
        # share these two operations (small models are bound by the number of operations; large
        # ones by B's zeros and by cache): in a small block, all inputs of one multiplicity are
        # stacked along d (x1^T [E, sum d1, u]) and all outputs share one GEMM and one bmm, G
        # zero outside each path's own d1 and rows; otherwise the pairs of one input are merged
        # while B stays under MERGE_B_FLOATS per edge.
        # (inputs stacked, x2 row range, G buffer, [(i_out, P)] in row order)
        self._couple_plan: list[tuple[tuple[int, ...], tuple[int, int], str, list[tuple[int, int]]]] = []
        piece_paths: dict[tuple[int, int], list[TensorProductPath]] = {}  # (plan index, piece) -> paths

        def rows_of(pairs: list[tuple[int, list[TensorProductPath]]]) -> tuple[int, int]:
            reached = [p for _, group in pairs for p in group]
            return (
                min(in2_offsets[p.i_in2] for p in reached),
                max(in2_offsets[p.i_in2] + self.irreps_in2[p.i_in2].ir.dim for p in reached),
            )

        def b_size(inputs: tuple[int, ...], pairs: list[tuple[int, list[TensorProductPath]]]) -> int:
            """Floats per edge of B: rows x (k P over the pairs) x (d1 of the stacked inputs)."""
            first, last = rows_of(pairs)
            dim1 = sum(self.irreps_in1[i1].ir.dim for i1 in inputs)
            return (last - first) * sum(self.irreps_out[i_out].ir.dim * len(group) for i_out, group in pairs) * dim1

        coupled_inputs = tuple(i1 for i1, (mul1, ir1) in enumerate(self.irreps_in1) if not factored(mul1, ir1))
        # (output, all its paths from the coupled inputs), for the outputs they reach
        per_output = [
            (i_out, [p for p in paths if p.i_out == i_out and p.i_in1 in coupled_inputs])
            for i_out in range(len(self.irreps_out))
        ]
        per_output = [(i_out, group) for i_out, group in per_output if group]
        if (
            per_output
            and len({self.irreps_in1[i1].mul for i1 in coupled_inputs}) == 1
            and sum(b_size(coupled_inputs, [pair]) for pair in per_output) <= STACK_B_FLOATS
            # an output's paths then share one weight GEMM, so its weights must stay small too
            and all(
                sum(p.weight_numel for p in group) <= MERGE_W_FLOATS
                for i_out, group in per_output
                if self.irreps_out[i_out].ir.dim > 1
            )
        ):
            couplings = [(coupled_inputs, per_output)]
        else:
            couplings = []
            for i1 in coupled_inputs:
                pairs = [(i_out, paths_between(i1, i_out)) for i_out in range(len(self.irreps_out))]
                pairs = [(i_out, group) for i_out, group in pairs if group]
                couplings += [((i1,), chunk) for chunk in _chunks(pairs, lambda chunk: b_size((i1,), chunk), MERGE_B_FLOATS)]
        for inputs, chunk in couplings:
            first, last = rows_of(chunk)
            offsets = {i1: sum(self.irreps_in1[i].ir.dim for i in inputs[: inputs.index(i1)]) for i1 in inputs}
            stacked_dim = sum(self.irreps_in1[i1].ir.dim for i1 in inputs)
            blocks = []
            for piece, (i_out, group) in enumerate(chunk):
                # [rows, k, P, sum d1]: row j multiplies the reordered x2[e, first + j].
                g = torch.zeros(last - first, self.irreps_out[i_out].ir.dim, len(group), stacked_dim, dtype=torch.float64)
                for a, p in enumerate(group):
                    cg = p.coefficient * clebsch_gordan(p.l1, p.l2, p.l_out)  # [d1, d2, k]
                    start, offset = in2_offsets[p.i_in2] - first, offsets[p.i_in1]
                    g[start : start + cg.shape[1], :, a, offset : offset + cg.shape[0]] = cg.permute(1, 2, 0)
                blocks.append(g.reshape(last - first, -1))
                piece_paths[(len(self._couple_plan), piece)] = group
            name = "_cg_" + "_".join(map(str, inputs)) + f"_{chunk[0][0]}"
            self.register_buffer(name, torch.cat(blocks, dim=1).to(torch.get_default_dtype()), persistent=False)
            self._couple_plan.append((inputs, (first, last), name, [(i_out, len(group)) for i_out, group in chunk]))

        # Per output, its pieces of T (index in _couple_plan, index of the piece) in groups that
        # share one weight GEMM and one bmm, each with its paths' columns of linear in the same
        # (path, u) order. A scalar output forms no weights: one group. Otherwise a group's
        # per-edge weights [P * u, w] stay small enough to be in cache when the bmm reads them.
        self._plan: list[tuple[int, list[tuple[int, list[tuple[int, int]]]]]] = []
        for i_out, (mul_out, ir_out) in enumerate(self.irreps_out):
            pieces = [
                ((c, piece), piece_paths[(c, piece)])
                for c, (_, _, _, outputs) in enumerate(self._couple_plan)
                for piece, (reached, _) in enumerate(outputs)
                if reached == i_out
            ]
            limit = None if ir_out.dim == 1 else MERGE_W_FLOATS
            groups = []
            for chunk in _chunks(pieces, lambda chunk: sum(p.weight_numel for _, group in chunk for p in group), limit):
                block = take_columns(columns([p for _, group in chunk for p in group], "path_u_w"))
                groups.append((block, [piece for piece, _ in chunk]))
            if groups:
                self._plan.append((i_out, groups))

        all_columns = torch.cat(column_parts) if column_parts else torch.zeros(0, dtype=torch.long)
        self.register_buffer("_columns", all_columns, persistent=False)
        self._column_sizes = [len(part) for part in column_parts]

    def _register_e3nn_buffers(self, paths: list[TensorProductPath]) -> None:
        """The buffers of ``o3.FullyConnectedTensorProduct(..., shared_weights=False)``, same names,
        shapes and values, so that state dicts load in either direction. They are not used here."""
        dtype = torch.get_default_dtype()
        self.register_buffer("weight", torch.zeros(0, dtype=dtype))
        mask = []
        for i_out, (mul, ir) in enumerate(self.irreps_out):
            used = any(p.i_out == i_out and p.weight_numel > 0 for p in paths)
            mask.append(torch.full((mul * ir.dim,), 1.0 if used else 0.0, dtype=dtype))
        self.register_buffer("output_mask", torch.cat(mask) if mask else torch.ones(0, dtype=dtype))
        # e3nn keeps a wigner_3j constant for every weighted path it does not specialise (no l = 0).
        compiled = nn.Module()
        for p in paths:
            name = f"_w3j_{p.l1}_{p.l2}_{p.l_out}"
            if p.weight_numel > 0 and 0 not in (p.l1, p.l2, p.l_out) and not hasattr(compiled, name):
                compiled.register_buffer(name, o3.wigner_3j(p.l1, p.l2, p.l_out, dtype=torch.float64).to(dtype))
        self._compiled_main_left_right = compiled

    def forward(self, x1: Tensor, x2: Tensor, hidden: Tensor, linear: Tensor, scale: float) -> Tensor:
        """``[E, irreps_out.dim]`` = TP(x1 ``[E, in1]``, x2 ``[E, in2]``, weights ``scale * hidden @ linear``).

        ``hidden`` is ``[E, H]``, ``linear`` is ``[H, weight_numel]`` in e3nn's weight layout.
        """
        num_edges, num_hidden = hidden.shape
        # torch.split, never slicing, on tensors that need gradients: the backward of a slice
        # allocates and zero-fills a tensor of the whole input's size, per slice.
        x1_blocks = torch.split(x1, [m * d for m, d in self._in1_shapes], dim=1)
        x2 = x2.index_select(1, self._x2_order)
        hidden = hidden * scale

        # e3nn's layout of an output block is multiplicity-major: [E, w, k]; summed over its paths.
        produced: dict[int, Tensor] = {}

        def add(i_out: int, block: Tensor) -> None:
            produced[i_out] = block if i_out not in produced else produced[i_out] + block

        # Every group's columns of linear at once (one gather, one scatter in backward), in plan order.
        blocks = torch.split(linear.index_select(1, self._columns), self._column_sizes, dim=1)
        for i1, block, terms in self._factor_plan:
            # s [E, all paths' w] = sum_h hidden[e, h] * (x1 @ M')[e, h, :]: one GEMM for all paths.
            m = blocks[block].view(num_hidden, x1_blocks[i1].shape[1], -1)
            z = x1_blocks[i1] @ m.transpose(0, 1).reshape(m.shape[1], -1)
            s = _sum_over_hidden(hidden, z.view(num_edges, num_hidden, m.shape[2]))
            for (i_out, (first, last), constant, mul_out), s_path in zip(terms, torch.split(s, [t[3] for t in terms], dim=1)):
                add(i_out, (s_path * constant).unsqueeze(2) * x2[:, first:last].unsqueeze(1))

        # 1. T per coupling, split per output: [E, k * P, u] pieces, rows (k, path).
        coupled, stacked = [], {}
        for inputs, (first, last), g_name, outputs in self._couple_plan:
            if inputs not in stacked:  # x1^T [E, sum d1, u] of the inputs, stacked along d
                parts = [x1_blocks[i1].view(num_edges, *self._in1_shapes[i1]).transpose(1, 2) for i1 in inputs]
                stacked[inputs] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
            x1_t = stacked[inputs]
            dim1 = x1_t.shape[1]
            g = getattr(self, g_name)
            b = (x2[:, first:last] @ g).view(num_edges, g.shape[1] // dim1, dim1)
            t = b * x1_t if dim1 == 1 else torch.bmm(b, x1_t)  # bmm with an inner size of 1 is slow
            sizes = [self._out_shapes[i_out][1] * num_paths for i_out, num_paths in outputs]
            coupled.append(torch.split(t, sizes, dim=1) if len(sizes) > 1 else [t])

        for i_out, groups in self._plan:
            mul_out, dim_out = self._out_shapes[i_out]
            out_t = None  # out^T [E, k, w], summed over the groups
            for block, pieces in groups:
                # T [E, k, P * u] of the group's paths, columns (input, path, u).
                # (Explicit sizes, never -1: a batch may have no edges.)
                parts = [coupled[c][piece] for c, piece in pieces]
                parts = [part.reshape(num_edges, dim_out, part.shape[1] * part.shape[2] // dim_out) for part in parts]
                t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
                # 2. The group's columns of the radial MLP's last layer, [H, P * u, w].
                m = blocks[block].view(num_hidden, t.shape[2], mul_out)
                if dim_out == 1:
                    # A scalar output: out = sum_h hidden[e, h] (T @ M')[e, h, :] with M' [P * u, H * w],
                    # one large GEMM; per-edge weights would cost as many FLOPs, in small bmms.
                    z = t.reshape(num_edges, t.shape[2]) @ m.transpose(0, 1).reshape(t.shape[2], -1)
                    add(i_out, _sum_over_hidden(hidden, z.view(num_edges, num_hidden, mul_out)).unsqueeze(2))
                    continue
                # W [E, P * u, w], the group's per-edge weights: out^T += T @ W.
                w = (hidden @ m.view(num_hidden, -1)).view(num_edges, t.shape[2], mul_out)
                out_t = torch.bmm(t, w) if out_t is None else torch.baddbmm(out_t, t, w)
            if out_t is not None:
                if out_t.device.type == "cpu":  # on an H100 the copy cost 7% of a step (module doc)
                    out_t = _ContiguousGradient.apply(out_t)
                add(i_out, out_t.transpose(1, 2))
        # Outputs without any path are zero, as in e3nn.
        full = [
            produced[i_out].reshape(num_edges, mul * dim) if i_out in produced else x1.new_zeros(num_edges, mul * dim)
            for i_out, (mul, dim) in enumerate(self._out_shapes)
        ]
        return torch.cat(full, dim=1) if len(full) > 1 else full[0]
