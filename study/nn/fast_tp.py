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

Variants: ``x1`` may carry a dimension of V variants of the input on the same edges (``[E, V, in1]``,
the knockouts of analysis/scoring/knockout.py). B and W depend on the edges only, so they are
formed once; the variants become rows of T (``[E, V * k, P * u]``), so step 4 reads each edge's W
once for all of them; and scalar outputs and factored inputs form W too (their GEMM's FLOPs would
grow V-fold). With one variant every step is the one above (training's path).

The parameters stay where they are (the block keeps e3nn's ``FullyConnectedNet``), and this module
registers exactly the buffers e3nn's tensor product has (``weight``, ``output_mask`` and the
``_compiled_main_left_right._w3j_*`` constants), so state dicts load into either backend. Like e3nn,
constants are stored in the default dtype at construction: build under
``torch.set_default_dtype(torch.float64)`` for float64-exact constants.

What is computed how (the paths, each one's strategy, the layouts and the constants' contents) is
decided by :mod:`study.nn.fast_tp_plan` from the three Irreps; this module registers the plan's
buffers and evaluates it.
"""

from __future__ import annotations

import torch
from e3nn import o3
from torch import Tensor, nn

from study.nn.fast_tp_plan import (
    TensorProductPath,
    TensorProductPlan,
    Thresholds,
    clebsch_gordan,
    fully_connected_paths,
    plan_tensor_product,
)

# The path helpers lived here before the plan module; their importers still find them here.
__all__ = ["FusedRadialTensorProduct", "TensorProductPath", "clebsch_gordan", "fully_connected_paths"]

# Strategy thresholds (module doc), measured on 2 CPU cores: [0,1,2] x 8 and [0,1,2,3] x 8 gain
# from merging, [0..6] x 16 loses past these; stacking (one coupling for all outputs) gains 2-4% at
# [0,1,2] x 8 and 4% at [0,1,2,3] x 8 (G of 2,835 and 25,344 floats) and loses 44% at [0..4] x 8
# (143,750); a factored input of multiplicity 8 gained nothing. Read at each construction (tests
# and benchmarks patch them here) and handed to the plan.
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


def _times_edge_weights(x: Tensor, hidden: Tensor, m: Tensor) -> Tensor:
    """``[E, V, n]`` = x[e, v, :] @ W[e] for x ``[E, V, c]``, with the per-edge weights
    ``W[e] = hidden[e] @ m`` (``m`` ``[H, c, n]``, W ``[c, n]``).

    With one variant, W is never formed: ``sum_h hidden[e, h] (x @ M')[e, h, :]`` with M'
    ``[c, H * n]`` is one large GEMM of W's FLOPs (a scalar output or a factored input; per-edge
    weights would cost as many FLOPs, in small bmms). With V variants that GEMM's FLOPs grow
    V-fold, W's do not: W is formed once and each edge's is read for all variants.
    """
    num_edges, num_variants, columns = x.shape
    num_hidden, _, n = m.shape
    if num_variants == 1:
        z = x.reshape(num_edges, columns) @ m.transpose(0, 1).reshape(columns, num_hidden * n)
        return _sum_over_hidden(hidden, z.view(num_edges, num_hidden, n)).unsqueeze(1)
    w = (hidden @ m.reshape(num_hidden, columns * n)).view(num_edges, columns, n)
    return torch.bmm(x, w)


def _transposed(x1_block: Tensor, mul_in: int, dim_in: int) -> Tensor:
    """An input block ``[E, V, u * d1]`` as ``x1^T`` ``[E, d1, V * u]``. A view with one variant."""
    num_edges, num_variants, _ = x1_block.shape
    x1_block = x1_block.view(num_edges, num_variants, mul_in, dim_in).permute(0, 3, 1, 2)
    return x1_block.reshape(num_edges, dim_in, num_variants * mul_in)


def _rows_per_variant(part: Tensor, dim_out: int, num_variants: int) -> Tensor:
    """A coupled piece ``[E, k * P, V * u]`` (rows (k, path), columns (variant, u)) as
    ``[E, V * k, P * u]``: rows (variant, k), columns (path, u). A view with one variant."""
    num_edges, rows, columns = part.shape
    num_paths, mul_in = rows // dim_out, columns // num_variants
    part = part.view(num_edges, dim_out, num_paths, num_variants, mul_in).permute(0, 3, 1, 2, 4)
    return part.reshape(num_edges, num_variants * dim_out, num_paths * mul_in)


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
        thresholds = Thresholds(
            merge_b_floats=MERGE_B_FLOATS,
            merge_w_floats=MERGE_W_FLOATS,
            stack_b_floats=STACK_B_FLOATS,
            factor_min_mul=FACTOR_MIN_MUL,
        )
        plan = plan_tensor_product(self.irreps_in1, self.irreps_in2, self.irreps_out, thresholds)
        self.weight_numel = plan.weight_numel
        self._register_e3nn_buffers(plan)
        self.num_paths = len(plan.paths)
        # forward reads the plan as the plain lists and tuples below, not as the plan's dataclasses:
        # models pickled before the plan module hold exactly these attributes and must still run,
        # and forward touches no e3nn objects (torch.compile-able).
        self._in1_shapes = list(plan.in1_shapes)
        self._out_shapes = list(plan.out_shapes)
        self.register_buffer("_x2_order", torch.cat([torch.arange(start, stop) for start, stop in plan.x2_ranges]), persistent=False)
        # (i1, its column block, per path: i_out, its x2 rows, constant, w)
        self._factor_plan: list[tuple[int, int, list[tuple[int, tuple[int, int], float, int]]]] = [
            (f.i_in1, f.column_block, [(t.i_out, t.rows, t.constant, t.mul_out) for t in f.terms]) for f in plan.factored
        ]
        # (inputs stacked, x2 row range, G buffer, [(i_out, P)] in row order)
        self._couple_plan: list[tuple[tuple[int, ...], tuple[int, int], str, list[tuple[int, int]]]] = []
        for coupling in plan.couplings:
            g = coupling.clebsch_gordan_matrix().to(torch.get_default_dtype())
            self.register_buffer(coupling.name, g, persistent=False)
            pieces = [(piece.i_out, piece.num_paths) for piece in coupling.pieces]
            self._couple_plan.append((coupling.inputs, coupling.rows, coupling.name, pieces))
        # (i_out, [(column block, [(index in _couple_plan, index of the piece)])])
        self._plan: list[tuple[int, list[tuple[int, list[tuple[int, int]]]]]] = [
            (output.i_out, [(group.column_block, list(group.pieces)) for group in output.groups]) for output in plan.outputs
        ]
        self.register_buffer("_columns", plan.columns(), persistent=False)
        self._column_sizes = [block.size for block in plan.column_blocks]

    def _register_e3nn_buffers(self, plan: TensorProductPlan) -> None:
        """The buffers of ``o3.FullyConnectedTensorProduct(..., shared_weights=False)``, same names,
        shapes and values, so that state dicts load in either direction. They are not used here."""
        dtype = torch.get_default_dtype()
        self.register_buffer("weight", torch.zeros(0, dtype=dtype))
        mask = [
            torch.full((mul * ir.dim,), 1.0 if used else 0.0, dtype=dtype) for (mul, ir), used in zip(self.irreps_out, plan.output_used)
        ]
        self.register_buffer("output_mask", torch.cat(mask) if mask else torch.ones(0, dtype=dtype))
        compiled = nn.Module()
        for l1, l2, l_out in plan.e3nn_w3j:
            compiled.register_buffer(f"_w3j_{l1}_{l2}_{l_out}", o3.wigner_3j(l1, l2, l_out, dtype=torch.float64).to(dtype))
        self._compiled_main_left_right = compiled

    def forward(self, x1: Tensor, x2: Tensor, hidden: Tensor, linear: Tensor, scale: float) -> Tensor:
        """``[E, irreps_out.dim]`` = TP(x1 ``[E, in1]``, x2 ``[E, in2]``, weights ``scale * hidden @ linear``).

        ``hidden`` is ``[E, H]``, ``linear`` is ``[H, weight_numel]`` in e3nn's weight layout.

        ``x1`` may also be ``[E, V, in1]``: V variants of the input on the same edges (the
        knockouts of analysis/scoring/knockout.py), giving ``[E, V, irreps_out.dim]``. Everything
        that depends on the edges only (the couplings B and the per-edge weights W, a third of a
        block's time at [0,1,2,3] x 16) is then formed once for all variants, and the bmms read
        each edge's W for all of them. Each variant's output equals the one of its own call up to
        rounding (the products have other shapes, so other summation orders).
        """
        variants = x1.dim() == 3
        if not variants:
            x1 = x1.unsqueeze(1)
        num_edges, num_variants, _ = x1.shape
        num_hidden = hidden.shape[1]
        # torch.split, never slicing, on tensors that need gradients: the backward of a slice
        # allocates and zero-fills a tensor of the whole input's size, per slice.
        x1_blocks = torch.split(x1, [m * d for m, d in self._in1_shapes], dim=2)
        x2 = x2.index_select(1, self._x2_order)
        hidden = hidden * scale

        # e3nn's layout of an output block is multiplicity-major: [E, V, w, k]; summed over its paths.
        produced: dict[int, Tensor] = {}

        def add(i_out: int, block: Tensor) -> None:
            produced[i_out] = block if i_out not in produced else produced[i_out] + block

        # Every group's columns of linear at once (one gather, one scatter in backward), in plan order.
        blocks = torch.split(linear.index_select(1, self._columns), self._column_sizes, dim=1)
        for i1, block, terms in self._factor_plan:
            # s [E, V, all paths' w] = x1 @ W over all its paths at once (one GEMM with one variant).
            s = _times_edge_weights(x1_blocks[i1], hidden, blocks[block].view(num_hidden, x1_blocks[i1].shape[2], -1))
            for (i_out, (first, last), constant, _mul_out), s_path in zip(terms, torch.split(s, [t[3] for t in terms], dim=2)):
                add(i_out, (s_path * constant).unsqueeze(3) * x2[:, first:last].view(num_edges, 1, 1, last - first))

        # 1. T per coupling, split per output: [E, k * P, V * u] pieces, rows (k, path).
        coupled, stacked = [], {}
        for inputs, (first, last), g_name, outputs in self._couple_plan:
            if inputs not in stacked:  # x1^T [E, sum d1, V * u] of the inputs, stacked along d
                parts = [_transposed(x1_blocks[i1], *self._in1_shapes[i1]) for i1 in inputs]
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
            out_t = None  # out^T [E, V * k, w], summed over the groups
            for block, pieces in groups:
                # T [E, V * k, P * u] of the group's paths, columns (input, path, u).
                parts = [_rows_per_variant(coupled[c][piece], dim_out, num_variants) for c, piece in pieces]
                t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
                # 2. The group's columns of the radial MLP's last layer, [H, P * u, w].
                m = blocks[block].view(num_hidden, t.shape[2], mul_out)
                if dim_out == 1:  # a scalar output: out [E, V, w] = T @ W (module doc)
                    add(i_out, _times_edge_weights(t, hidden, m).unsqueeze(3))
                    continue
                # W [E, P * u, w], the group's per-edge weights: out^T += T @ W.
                w = (hidden @ m.view(num_hidden, -1)).view(num_edges, t.shape[2], mul_out)
                out_t = torch.bmm(t, w) if out_t is None else torch.baddbmm(out_t, t, w)
            if out_t is not None:
                if out_t.device.type == "cpu":  # on an H100 the copy cost 7% of a step (module doc)
                    out_t = _ContiguousGradient.apply(out_t)
                add(i_out, out_t.view(num_edges, num_variants, dim_out, mul_out).transpose(2, 3))
        # Outputs without any path are zero, as in e3nn. (Explicit sizes, never -1: a batch may have no edges.)
        full = [
            produced[i_out].reshape(num_edges, num_variants, mul * dim)
            if i_out in produced
            else x1.new_zeros(num_edges, num_variants, mul * dim)
            for i_out, (mul, dim) in enumerate(self._out_shapes)
        ]
        out = torch.cat(full, dim=2) if len(full) > 1 else full[0]
        return out if variants else out.squeeze(1)
