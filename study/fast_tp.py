"""A fast, drop-in implementation of the interaction block's weighted tensor product.

The block computes, for every edge e (``hidden`` is the radial MLP's hidden layer ``[E, H]``, ``M``
its last linear layer ``[H, weight_numel]``):

    out[e] = FullyConnectedTensorProduct(x1[e], x2[e], weight=W[e]),   W[e] = scale * hidden[e] @ M

e3nn evaluates this path by path (106 paths for l <= 6), each as an einsum over an outer product
of the inputs, and its backward adds a zero-filled full-size gradient per sliced input. Here the
same function is a handful of dense ops per (input irrep i1, output irrep o) pair with P paths:

1. ``B = x2[:, rows] @ G``: the spherical harmonics times a precomputed ``[rows, k * P * d1]``
   constant holding the P paths' Clebsch-Gordan blocks (e3nn's ``wigner_3j``) times e3nn's path
   normalisation; ``rows`` is a contiguous range of x2 (see ``_x2_order``).
2. ``T = B @ x1_i1^T``: ``[E, k * P, u]`` = ``[E, k, P * u]``, every path's coupled input.
3. ``W = scale * hidden @ M_pair``: ``[E, P * u, w]``, the pair's per-edge weights only, one
   GEMM per pair so each block is still in cache when it is used (never the whole ``[E, weight_numel]``).
4. ``out_o^T += T @ W``: ``[E, k, w]``; summed over the inputs feeding o.

Fusing the MLP's last layer further (``(hidden (x) T) @ M``, which never forms W) costs k times the
FLOPs of forming W; for k = 1 it costs the same and measured no faster, so W is formed everywhere.

The parameters stay where they are (the block keeps e3nn's ``FullyConnectedNet``), and this module
registers exactly the buffers e3nn's tensor product has (``weight``, ``output_mask`` and the
``_compiled_main_left_right._w3j_*`` constants), so state dicts load into either backend. Like e3nn,
constants are stored in the default dtype at construction: build under
``torch.set_default_dtype(torch.float64)`` for float64-exact constants.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from e3nn import o3
from torch import Tensor, nn


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

        # Step 1 (Clebsch-Gordan): for each (i1, output) pair with P paths, B = x2[:, rows] @ G is
        # [E, k * P, d1] and T = B @ x1_i1^T is [E, k * P, u].
        # (i_out, [(i1, indices of its P paths in `paths`, x2 row range, G buffer)]) per output.
        self._plan: list[tuple[int, list[tuple[int, list[int], tuple[int, int], str]]]] = []
        for i_out, (_, ir_out) in enumerate(self.irreps_out):
            feeding = []
            for i1, (_, ir1) in enumerate(self.irreps_in1):
                group = paths_between(i1, i_out)
                if not group:
                    continue
                first = min(in2_offsets[p.i_in2] for p in group)
                last = max(in2_offsets[p.i_in2] + self.irreps_in2[p.i_in2].ir.dim for p in group)
                # [rows, k, P, d1]: row j of G multiplies the reordered x2[e, first + j].
                g = torch.zeros(last - first, ir_out.dim, len(group), ir1.dim, dtype=torch.float64)
                for a, p in enumerate(group):
                    cg = p.coefficient * clebsch_gordan(p.l1, p.l2, p.l_out)  # [d1, d2, k]
                    start = in2_offsets[p.i_in2] - first
                    g[start : start + cg.shape[1], :, a, :] = cg.permute(1, 2, 0)
                name = f"_cg_{i1}_{i_out}"
                self.register_buffer(name, g.reshape(last - first, -1).to(torch.get_default_dtype()), persistent=False)
                feeding.append((i1, [paths.index(p) for p in group], (first, last), name))
            if feeding:
                self._plan.append((i_out, feeding))
        # linear's columns per path, in e3nn's order: [u, w] blocks. Paths of zero size (skipped
        # above) have zero columns, so splitting by all paths' sizes lines up with `paths`.
        self._path_sizes = [p.weight_numel for p in all_paths]
        self._kept_paths = [k for k, p in enumerate(all_paths) if p.weight_numel > 0]

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
        num_edges = x1.shape[0]
        # torch.split, never slicing, on tensors that need gradients: the backward of a slice
        # allocates and zero-fills a tensor of the whole input's size, per slice.
        x1_t = [  # [E, d1, u] per input irrep
            block.reshape(num_edges, mul, dim).transpose(1, 2)
            for block, (mul, dim) in zip(torch.split(x1, [m * d for m, d in self._in1_shapes], dim=1), self._in1_shapes)
        ]
        x2 = x2.index_select(1, self._x2_order)
        hidden = hidden * scale
        # [H, mul1 * mul_out] per kept path: its columns of the radial MLP's last layer.
        all_m = torch.split(linear, self._path_sizes, dim=1)
        m_of_path = [all_m[k] for k in self._kept_paths]

        produced: dict[int, Tensor] = {}
        for i_out, feeding in self._plan:
            mul_out, dim_out = self._out_shapes[i_out]
            out_t = None  # out^T [E, k, w], summed over the input irreps feeding this output
            for i1, members, (first, last), g in feeding:
                mul1, dim1 = self._in1_shapes[i1]
                rows = len(members) * mul1
                # 1. T [E, k * P, u]: the CG contraction of every path (i1, *) -> i_out, with its
                #    coefficient, rows ordered (k, path) so that T viewed [E, k, P * u] meets W.
                b = (x2[:, first:last] @ getattr(self, g)).view(num_edges, dim_out * len(members), dim1)
                if dim1 == 1:
                    t = b * x1_t[i1]  # an outer product; bmm with an inner size of 1 is slower
                else:
                    t = torch.bmm(b, x1_t[i1])
                t = t.view(num_edges, dim_out, rows)
                # 2. W [E, P * u, w] from one GEMM per (i1, output) pair: small enough to still be
                #    in cache when the bmm reads it, and rows (path, u) in e3nn's weight layout.
                m = m_of_path[members[0]] if len(members) == 1 else torch.cat([m_of_path[k] for k in members], dim=1)
                w = (hidden @ m).view(num_edges, rows, mul_out)
                out_t = torch.bmm(t, w) if out_t is None else torch.baddbmm(out_t, t, w)
            # e3nn's layout of a block is multiplicity-major: [E, w, k].
            produced[i_out] = out_t.transpose(1, 2).reshape(num_edges, mul_out * dim_out)
        # Outputs without any path are zero, as in e3nn.
        full = [
            produced[i_out] if i_out in produced else x1.new_zeros(num_edges, mul * dim)
            for i_out, (mul, dim) in enumerate(self._out_shapes)
        ]
        return torch.cat(full, dim=1) if len(full) > 1 else full[0]
