"""The reference model of docs/science.md (EquiTriton's ``EquiTritonModel`` plus its ``nn.Linear(1, 1)`` head).

Built only from e3nn's own blocks so that every order l, contiguous or not, goes through the same
well-tested code: ``o3.spherical_harmonics`` for edge directions, ``soft_one_hot_linspace`` for the
Bessel radial basis, ``FullyConnectedNet`` for the per-edge weights, ``FullyConnectedTensorProduct``
for the messages and ``o3.Linear`` for the readout.

Reference behaviour kept on purpose (it is the baseline of every comparison):
- the spherical harmonics and radial basis of the edges are the reference's (same function, same
  constants); they are computed once per forward by :func:`edge_geometry` and shared by every block
  (the reference recomputes them in each block: the same numbers, computed five times);
- messages are summed, then divided by the constant ``degree_norm``, not by the actual degree;
- the readout sees only the l = 0 channels (``o3.Linear`` to ``1x0e`` has no other path).

``backend="fast"`` (the default) evaluates the same tensor product with the same parameters through
:mod:`study.nn.fast_tp` (grouped dense matmuls instead of e3nn's per-path einsums); ``backend="e3nn"``
runs e3nn's own ``FullyConnectedTensorProduct``. The state dicts of the two are interchangeable.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from e3nn import o3
from e3nn.math import soft_one_hot_linspace
from e3nn.nn import FullyConnectedNet
from torch import Tensor, nn

from study.config.trial import TrialConfig
from study.nn.fast_tp import FusedRadialTensorProduct
from study.nn.irreps import IrrepsLayout, irreps_for, validate_l_values

# sqrt(37): the reference's estimate of the average number of neighbours in QM9.
REFERENCE_DEGREE_NORM = 6.08275253
BACKENDS = ("e3nn", "fast")


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build under `dtype`: e3nn computes its constants (Clebsch-Gordan coefficients, so(3)
    generators) in the default dtype, so a model built under float32 and cast with .double() holds
    float32-rounded constants (the backends then agree to ~1e-9, not ~1e-15)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@dataclass
class EdgeGeometry:
    """What every block needs of the edges: their spherical harmonics and radial basis."""

    sh: Tensor  # [E, sum(2l + 1)] for the model's l_values, "integral" normalisation
    radial: Tensor  # [E, edge_dim] Bessel basis of |r_ij| with the cutoff envelope


def edge_geometry(pos: Tensor, edge_index: Tensor, l_values: Sequence[int], edge_dim: int, cutoff: float) -> EdgeGeometry:
    """The reference's edge features, computed once per forward and shared by all blocks."""
    # Source minus destination, as in the reference; the sign matters for odd l.
    edge_vec = pos[edge_index[0]] - pos[edge_index[1]]
    # A plain list of l (not an Irreps object), so that torch.compile traces through it.
    sh = o3.spherical_harmonics(list(l_values), edge_vec, normalize=True, normalization="integral")
    # The Bessel basis has no normalisation constant; the reference rescales by sqrt(edge_dim).
    radial = (
        soft_one_hot_linspace(edge_vec.norm(dim=-1), start=0.0, end=cutoff, number=edge_dim, basis="bessel", cutoff=True) * edge_dim**0.5
    )
    return EdgeGeometry(sh, radial)


class InteractionBlock(nn.Module):
    """One equivariant convolution: ``in_irreps x Y(r_ij) -> hidden_dim x (each l)``, weights from |r_ij|."""

    def __init__(
        self,
        in_irreps: str | o3.Irreps,
        l_values: Sequence[int],
        edge_dim: int,
        hidden_dim: int,
        cutoff: float,
        degree_norm: float,
        backend: str = "fast",
    ) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        self.l_values = validate_l_values(l_values)
        self.in_irreps = o3.Irreps(in_irreps)
        self.sh_irreps = irreps_for(self.l_values, 1)
        self.out_irreps = irreps_for(self.l_values, hidden_dim)
        self.out_dim = self.out_irreps.dim  # a plain int: forward touches no e3nn objects (torch.compile)
        self.edge_dim = int(edge_dim)
        self.cutoff = float(cutoff)
        self.degree_norm = float(degree_norm)
        # Every allowed path ("uvw"); no shared weights: each edge gets its own from the radial MLP.
        if backend == "e3nn":
            self.tp = o3.FullyConnectedTensorProduct(self.in_irreps, self.sh_irreps, self.out_irreps, shared_weights=False)
        else:
            self.tp = FusedRadialTensorProduct(self.in_irreps, self.sh_irreps, self.out_irreps)
        self.radial = FullyConnectedNet([self.edge_dim, hidden_dim, self.tp.weight_numel], torch.nn.functional.silu)

    def forward(self, x: Tensor, pos: Tensor, edge_index: Tensor, geometry: EdgeGeometry | None = None) -> Tensor:
        """Messages summed per destination atom over ``degree_norm``; ``geometry`` of these edges is
        computed here when not given (the model passes one shared by all its blocks).

        ``x`` is ``[N, in]``, or ``[N, V, in]`` for V variants of the features on the same graph
        (analysis/scoring/knockout.py), which the fast backend evaluates at once."""
        if geometry is None:
            geometry = edge_geometry(pos, edge_index, self.l_values, self.edge_dim, self.cutoff)
        src, dst = edge_index[0], edge_index[1]
        sh, radial = geometry.sh, geometry.radial
        # index_select, not x[src]: its backward is one index_add, where advanced indexing's is an
        # accumulating index_put that sorts the indices (gather fwd+bwd: 0.07 against 0.23 ms per block
        # at [0,1,2] x 8 on 2 cores).
        x_src = x.index_select(0, src)
        if self.backend == "e3nn":
            weights = self.radial(radial)
            if x.dim() == 3:  # e3nn broadcasts leading dimensions: the edges' own over the variants
                sh, weights = sh.unsqueeze(1), weights.unsqueeze(1)
            messages = self.tp(x_src, sh, weights)
        else:
            # The fast tensor product takes the MLP's last linear layer itself, so that it can form
            # the per-edge weights one (input, output) pair at a time; the scale is e3nn's for that
            # layer (FullyConnectedNet divides its weight by sqrt(fan-in) in every call).
            last = self.radial.layer1
            scale = 1.0 / (last.h_in * last.var_in / last.var_out) ** 0.5
            messages = self.tp(x_src, sh, self.radial.layer0(radial), last.weight, scale)
        # index_add over all nodes: atoms with no incoming edge (isolated atoms) get exact zeros.
        out = torch.zeros(x.shape[0], *messages.shape[1:], dtype=messages.dtype, device=messages.device)
        out = out.index_add(0, dst, messages)
        return out / self.degree_norm


@dataclass
class GraphContext:
    """What every block of one batch shares: positions, edges, their geometry, and which graph each atom is in."""

    pos: Tensor
    edge_index: Tensor
    geometry: object  # edge_geometry's result
    graph_index: Tensor
    num_graphs: int


@dataclass
class Embedding:
    """What :meth:`IrrepConvModel.embed` returns; slice any feature with ``layout``."""

    node_features: list[Tensor]  # [n, layout.dim] per block: input block, then each residual block
    graph: Tensor  # [num_graphs, layout.dim] sum over atoms of the last block's features
    prediction: Tensor  # [num_graphs] standardized prediction
    layout: IrrepsLayout


class IrrepConvModel(nn.Module):
    """Atom embedding -> input block -> ``num_layers + 1`` residual blocks -> scalar readout -> sum -> Linear(1, 1)."""

    def __init__(
        self,
        l_values: Sequence[int],
        hidden_dim: int,
        num_layers: int = 3,
        atom_dim: int = 64,
        edge_dim: int = 20,
        cutoff: float = 6.0,
        degree_norm: float = REFERENCE_DEGREE_NORM,
        num_elements: int = 100,
        backend: str = "fast",
    ) -> None:
        super().__init__()
        if num_layers < 0:
            raise ValueError(f"num_layers must be >= 0, got {num_layers}")
        self.l_values = validate_l_values(l_values)
        self.hidden_irreps = irreps_for(self.l_values, hidden_dim)
        self.layout = IrrepsLayout.from_irreps(self.hidden_irreps)
        # padding_idx=0: z = 0 is not an element; its row stays zero as in the reference.
        self.atom_embedding = nn.Embedding(num_elements, atom_dim, padding_idx=0)
        self.backend = backend
        block_args = dict(
            l_values=self.l_values,
            edge_dim=edge_dim,
            hidden_dim=hidden_dim,
            cutoff=cutoff,
            degree_norm=degree_norm,
            backend=backend,
        )
        self.input_block = InteractionBlock(f"{atom_dim}x0e", **block_args)
        self.blocks = nn.ModuleList(InteractionBlock(self.hidden_irreps, **block_args) for _ in range(num_layers + 1))
        self.readout = o3.Linear(self.hidden_irreps, "1x0e")
        self.head = nn.Linear(1, 1)

    def forward(self, batch) -> Tensor:
        """Standardized prediction per graph, shape ``[num_graphs]``."""
        node_features, graph_index, num_graphs = self._node_features(batch)
        return self._predict(node_features[-1], graph_index, num_graphs)

    def embed(self, batch) -> Embedding:
        """Node features of every block, the summed graph embedding and the prediction.

        Not detached: call under ``torch.no_grad()`` for analysis.
        """
        node_features, graph_index, num_graphs = self._node_features(batch)
        return Embedding(
            node_features=node_features,
            graph=_sum_per_graph(node_features[-1], graph_index, num_graphs),
            prediction=self._predict(node_features[-1], graph_index, num_graphs),
            layout=self.layout,
        )

    def _node_features(self, batch) -> tuple[list[Tensor], Tensor, int]:
        """The layer loop shared by forward and embed: per-block node features, graph index, graph count."""
        x, graph = self.input_features(batch)
        return self.layer_features(x, graph), graph.graph_index, graph.num_graphs

    def input_features(self, batch) -> tuple[Tensor, GraphContext]:
        """The input block's node features and what every later block and the readout reuse."""
        graph_index, num_graphs = _graph_index(batch)
        first = self.input_block
        geometry = edge_geometry(batch.pos, batch.edge_index, self.l_values, first.edge_dim, first.cutoff)
        graph = GraphContext(batch.pos, batch.edge_index, geometry, graph_index, num_graphs)
        return first(self.atom_embedding(batch.z), batch.pos, batch.edge_index, geometry), graph

    def layer_features(self, x: Tensor, graph: GraphContext, after_block=None) -> list[Tensor]:
        """``x`` (the input block's output) and each residual block's node features after it.
        ``after_block``, if given, is applied to each block's output before its residual sum
        (analysis/scoring/knockout.py zeroes a slice there)."""
        node_features = [x]
        for block in self.blocks:
            out = block(x, graph.pos, graph.edge_index, graph.geometry)
            if after_block is not None:
                out = after_block(out)
            # Out of place, so the features already stored for embed() are not modified.
            x = out + x
            node_features.append(x)
        return node_features

    def predict(self, x: Tensor, graph: GraphContext) -> Tensor:
        """Standardized prediction per graph from the last block's node features ``x``."""
        return self._predict(x, graph.graph_index, graph.num_graphs)

    def _predict(self, x: Tensor, graph_index: Tensor, num_graphs: int) -> Tensor:
        per_atom = self.readout(x)  # [n, 1]: only the l = 0 channels reach it
        return self.head(_sum_per_graph(per_atom, graph_index, num_graphs)).squeeze(-1)


class CompiledOrEager(nn.Module):
    """``torch.compile(model)``'s forward, or the model's own where compiling fails.

    Compilation happens at the first call, so that is where it can fail (no C++ compiler, an
    unsupported platform or torch build); the wrapper then warns once, in one line, and runs
    eagerly from there on: the same function, so training goes on unchanged.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.failure: str | None = None
        try:
            self._compiled = torch.compile(model, dynamic=True)
        except Exception as exc:  # some platforms refuse at once (e.g. a Python dynamo does not support)
            self._fail(exc)

    def _fail(self, exc: Exception) -> None:
        first_line = (str(exc).strip().splitlines() or [""])[0][:200]
        self.failure = f"{type(exc).__name__}: {first_line}"
        warnings.warn(f"compile: torch.compile is unavailable here ({self.failure}); training without it", stacklevel=3)

    def forward(self, batch) -> Tensor:
        if self.failure is None:
            try:
                return self._compiled(batch)
            except Exception as exc:  # torch raises many types from its compiler stack
                self._fail(exc)
        return self.model(batch)


def _graph_index(batch) -> tuple[Tensor, int]:
    """The graph of each atom and the number of graphs; a batch without ``batch`` is one graph."""
    num_atoms = batch.z.shape[0]
    graph_index = getattr(batch, "batch", None)
    if graph_index is None:
        return torch.zeros(num_atoms, dtype=torch.long, device=batch.z.device), 1
    num_graphs = getattr(batch, "num_graphs", None)
    if num_graphs is None:
        num_graphs = int(graph_index.max()) + 1 if num_atoms else 0
    return graph_index, int(num_graphs)


def _sum_per_graph(x: Tensor, graph_index: Tensor, num_graphs: int) -> Tensor:
    # dim_size from num_graphs, not from the index, so a trailing graph with no atoms still gets a row.
    out = torch.zeros(num_graphs, x.shape[-1], dtype=x.dtype, device=x.device)
    return out.index_add(0, graph_index, x)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """Training's AdamW: fused (one kernel over all parameters instead of about ten operations per
    parameter tensor; on 2 CPU cores 0.7 ms of a 17 ms step at hidden 8); the same update up to
    floating-point rounding, deterministic, so a resumed trial still continues exactly."""
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars (includes the all-zero padding row of the atom embedding)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------- building and evaluating


def model_dtype(config: TrialConfig) -> torch.dtype:
    return torch.float64 if config.dtype == "float64" else torch.float32


def build_model(config: TrialConfig) -> IrrepConvModel:
    """The trial's model, built in its dtype: e3nn's and the fast backend's Clebsch-Gordan constants
    are computed in the default dtype, so a float64 trial gets float64-exact constants."""
    with default_dtype(model_dtype(config)):
        return IrrepConvModel(
            l_values=config.l_values,
            hidden_dim=config.hidden_dim,
            num_layers=config.num_layers,
            atom_dim=config.atom_dim,
            edge_dim=config.edge_dim,
            cutoff=config.cutoff,
            degree_norm=config.degree_norm,
            backend=config.backend,
        )


def to_device(batch, device: torch.device, dtype: torch.dtype):
    """A PyG batch on `device`, with positions in the model's dtype (the rest keeps its own)."""
    batch = batch.to(device)
    batch.pos = batch.pos.to(dtype)
    return batch


@torch.no_grad()
def evaluation_pass(
    model: IrrepConvModel, batches, device: torch.device, dtype: torch.dtype, reference
) -> Iterator[tuple[object, Embedding, Tensor]]:
    """The one evaluation loop (validation, test embeddings, knockouts): each batch on the device,
    the model's embedding of it, and its predictions in the target's unit (made absolute by the
    trial's `reference`, a study.data.reference.TargetReference)."""
    model.eval()
    for batch in batches:
        batch = to_device(batch, device, dtype)
        embedding = model.embed(batch)
        yield batch, embedding, reference.absolute(embedding.prediction, batch)
