"""The reference model: symmetry, structure, batching, gradients.

Molecules are built here (random positions, radius edges) so these tests do not depend on the
data pipeline. Symmetry checks run in float64, where e3nn's equivariance is exact to ~1e-12.
"""

from __future__ import annotations

import pytest
import torch
from e3nn import o3
from torch_geometric.data import Batch, Data

from study.nn.irreps import IrrepsLayout, irreps_for
from study.nn.model import (
    Embedding,
    InteractionBlock,
    IrrepConvModel,
    count_parameters,
    default_dtype,
)

CUTOFF = 6.0
ELEMENTS = torch.tensor([1, 6, 7, 8, 9])

# Small models keep the file fast; the property under test does not depend on width or depth,
# except that the [0, 1, 2] case runs the default depth (num_layers=3, 5 blocks).
SYMMETRY_CASES = [
    pytest.param([0, 1, 2], 4, 3, id="l012-default-depth"),
    pytest.param([0, 3, 4, 5, 6], 3, 1, id="l03456"),
    pytest.param([0, 1, 2, 10], 2, 0, id="l01210"),
]


def radius_edges(pos: torch.Tensor, cutoff: float = CUTOFF) -> torch.Tensor:
    """All ordered pairs i != j closer than the cutoff, as [2, E]."""
    distance = torch.cdist(pos, pos)
    mask = (distance < cutoff) & ~torch.eye(pos.shape[0], dtype=torch.bool)
    return mask.nonzero().T.contiguous()


def random_molecule(generator: torch.Generator, num_atoms: int | None = None, dtype=torch.float64) -> Data:
    if num_atoms is None:
        num_atoms = int(torch.randint(5, 9, (1,), generator=generator))
    z = ELEMENTS[torch.randint(0, len(ELEMENTS), (num_atoms,), generator=generator)]
    # ~1.5 A spread: most pairs inside the 6 A cutoff, some not.
    pos = (torch.randn(num_atoms, 3, generator=generator) * 1.5).to(dtype)
    return Data(z=z, pos=pos, edge_index=radius_edges(pos))


def make_model(l_values, hidden_dim, num_layers, seed=0, dtype=torch.float64) -> IrrepConvModel:
    torch.manual_seed(seed)
    with default_dtype(dtype):
        model = IrrepConvModel(l_values, hidden_dim, num_layers=num_layers, cutoff=CUTOFF)
    return model.to(dtype).eval()


def rotated(data: Data, matrix: torch.Tensor, shift: torch.Tensor | None = None) -> Data:
    pos = data.pos @ matrix.T
    if shift is not None:
        pos = pos + shift
    # Same edges: distances are unchanged, and recomputing could flip pairs right at the cutoff.
    return Data(z=data.z, pos=pos, edge_index=data.edge_index)


def permuted(data: Data, perm: torch.Tensor, edge_order: torch.Tensor) -> Data:
    """Atom i of the new molecule is atom perm[i] of the old one; edges relabelled and reordered."""
    new_label = torch.empty_like(perm)
    new_label[perm] = torch.arange(len(perm))
    return Data(z=data.z[perm], pos=data.pos[perm], edge_index=new_label[data.edge_index][:, edge_order])


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def wigner_d(l: int, parity: int, matrix: torch.Tensor) -> torch.Tensor:
    # Through e3nn's irreps so that the parity factor applies for reflections.
    with default_dtype(torch.float64):
        return o3.Irreps(f"1x{l}{'e' if parity == 1 else 'o'}").D_from_matrix(matrix)


def symmetry_transforms(generator_seed: int) -> list[tuple[str, torch.Tensor]]:
    torch.manual_seed(generator_seed)
    rotation = o3.rand_matrix(dtype=torch.float64)
    return [("rotation", rotation), ("reflection", -rotation)]


@pytest.mark.parametrize(("l_values", "hidden_dim", "num_layers"), SYMMETRY_CASES)
def test_prediction_is_invariant(l_values, hidden_dim, num_layers):
    model = make_model(l_values, hidden_dim, num_layers)
    generator = torch.Generator().manual_seed(1)
    molecules = [random_molecule(generator) for _ in range(3)]
    batch = Batch.from_data_list(molecules)
    with torch.no_grad():
        reference = model(batch)
        assert reference.shape == (3,)
        for name, matrix in symmetry_transforms(2):
            shift = torch.randn(3, dtype=torch.float64) * 10
            moved = Batch.from_data_list([rotated(m, matrix, shift) for m in molecules])
            assert relative_error(model(moved), reference) < 1e-12, name
        perms = []
        for m in molecules:
            perms.append(
                permuted(m, torch.randperm(m.num_nodes, generator=generator), torch.randperm(m.edge_index.shape[1], generator=generator))
            )
        assert relative_error(model(Batch.from_data_list(perms)), reference) < 1e-12


@pytest.mark.parametrize(("l_values", "hidden_dim", "num_layers"), SYMMETRY_CASES)
def test_every_block_transforms_with_its_wigner_d(l_values, hidden_dim, num_layers):
    model = make_model(l_values, hidden_dim, num_layers)
    generator = torch.Generator().manual_seed(3)
    molecules = [random_molecule(generator) for _ in range(2)]
    with torch.no_grad():
        original = model.embed(Batch.from_data_list(molecules))
        assert len(original.node_features) == num_layers + 2
        for name, matrix in symmetry_transforms(4):
            moved = model.embed(Batch.from_data_list([rotated(m, matrix) for m in molecules]))
            pairs = list(zip(moved.node_features, original.node_features)) + [(moved.graph, original.graph)]
            for layer, (new, old) in enumerate(pairs):
                for block in original.layout.blocks:
                    d = wigner_d(block.l, block.parity, matrix)
                    expected = original.layout.channels(old, block.l) @ d.T
                    got = original.layout.channels(new, block.l)
                    scale = float(expected.abs().max())
                    assert scale > 1e-6, f"l={block.l} block is all zero in layer {layer}: test would be vacuous"
                    error = float((got - expected).abs().max())
                    assert error < 1e-9 * max(1.0, scale), f"{name}, layer {layer}, l={block.l}: {error}"


def test_odd_blocks_are_not_invariant_under_reflection():
    # Guards the test above: the parity factor must matter, so -R must differ from R on l odd.
    model = make_model([0, 1, 2], 4, 0)
    molecule = random_molecule(torch.Generator().manual_seed(5))
    with torch.no_grad():
        original = model.embed(molecule)
        rotation = o3.rand_matrix(dtype=torch.float64)
        by_rotation = model.embed(rotated(molecule, rotation))
        by_reflection = model.embed(rotated(molecule, -rotation))
    layout = original.layout
    assert torch.allclose(layout.slice(by_reflection.graph, 1), -layout.slice(by_rotation.graph, 1))
    assert torch.allclose(layout.slice(by_reflection.graph, 2), layout.slice(by_rotation.graph, 2))


def test_structure_of_reference_model():
    hidden = 8
    model = IrrepConvModel([0, 1, 2], hidden)  # defaults: num_layers=3, atom_dim=64, edge_dim=20
    blocks = [m for m in model.modules() if isinstance(m, InteractionBlock)]
    assert len(blocks) == 5
    assert blocks[0] is model.input_block
    assert model.input_block.tp.irreps_in1 == o3.Irreps("64x0e")
    assert model.atom_embedding.num_embeddings == 100 and model.atom_embedding.embedding_dim == 64
    assert model.atom_embedding.padding_idx == 0
    assert model.hidden_irreps == o3.Irreps("8x0e+8x1o+8x2e")
    assert str(model.layout) == "8x0e+8x1o+8x2e"
    for block in blocks:
        assert block.sh_irreps == o3.Irreps("1x0e+1x1o+1x2e")
        assert block.tp.irreps_out == model.hidden_irreps
        assert block.radial.hs == [20, hidden, block.tp.weight_numel]
        # The reference's literal, kept as is: it is meant as sqrt(37) = 6.0827625... but differs
        # from it in the 5th decimal (a 1.6e-6 relative difference in every message).
        assert block.cutoff == 6.0 and block.degree_norm == 6.08275253
    for block in blocks[1:]:
        assert block.tp.irreps_in1 == model.hidden_irreps
    assert model.readout.irreps_in == model.hidden_irreps
    assert model.readout.irreps_out == o3.Irreps("1x0e")
    assert (model.head.in_features, model.head.out_features) == (1, 1)


def test_parameter_count_matches_hand_count():
    # [0,1,2] "uvw" paths: input 0e x {0e,1o,2e} -> 3 paths of 64 x h; hidden blocks have 11 paths
    # of h x h (0e0e0e 0e1o1o 0e2e2e 1o0e1o 1o1o0e 1o1o2e 1o2e1o 2e0e2e 2e1o1o 2e2e0e 2e2e2e).
    # No tensor-product or MLP biases; the readout is h -> 1 without bias; head Linear(1, 1).
    h = 32
    embedding = 100 * 64
    input_block = 20 * h + h * 3 * 64 * h
    hidden_block = 20 * h + h * 11 * h * h
    expected = embedding + input_block + 4 * hidden_block + h + 2
    model = IrrepConvModel([0, 1, 2], h)
    assert model.input_block.tp.weight_numel == 3 * 64 * h
    assert model.blocks[0].tp.weight_numel == 11 * h * h
    assert count_parameters(model) == expected == 1_648_034


def test_messages_flow_from_source_to_destination():
    # One directed edge 0 -> 1: only atom 1 receives a message, scaled by 1 / degree_norm.
    torch.manual_seed(0)
    pos = torch.tensor([[0.0, 0.0, 0.0], [0.3, 1.1, -0.4]], dtype=torch.float64)
    edge_index = torch.tensor([[0], [1]])
    block = InteractionBlock("4x0e", [0, 1, 2], edge_dim=20, hidden_dim=4, cutoff=CUTOFF, degree_norm=1.0).double()
    x = torch.randn(2, 4, dtype=torch.float64)
    out = block(x, pos, edge_index)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert out[1].abs().max() > 0
    block.degree_norm = 4.0
    assert torch.allclose(block(x, pos, edge_index), out / 4.0)
    block.degree_norm = 1.0
    # The l = 1 part follows the source-minus-destination vector: moving the source flips it.
    # Reflecting the source through the destination reverses the edge vector at equal length.
    reversed_pos = torch.stack([2 * pos[1] - pos[0], pos[1]])
    flipped = block(x, reversed_pos, edge_index)
    layout = IrrepsLayout.from_irreps(block.out_irreps)
    assert torch.allclose(layout.slice(flipped[1], 1), -layout.slice(out[1], 1))
    assert torch.allclose(layout.slice(flipped[1], 2), layout.slice(out[1], 2))


def test_batch_matches_molecules_alone():
    model = make_model([0, 1, 2], 4, 1)
    generator = torch.Generator().manual_seed(6)
    first, second = random_molecule(generator, 7), random_molecule(generator, 5)
    with torch.no_grad():
        together = model.embed(Batch.from_data_list([first, second]))
        alone = [model.embed(first), model.embed(second)]
    assert together.prediction.shape == (2,)
    assert together.graph.shape == (2, model.layout.dim)
    for index, single in enumerate(alone):
        assert single.prediction.shape == (1,)
        assert torch.allclose(together.prediction[index], single.prediction[0], rtol=0, atol=1e-12)
        assert torch.allclose(together.graph[index], single.graph[0], rtol=0, atol=1e-12)
    atoms = slice(0, 7)
    for layer_together, layer_alone in zip(together.node_features, alone[0].node_features):
        assert torch.allclose(layer_together[atoms], layer_alone, rtol=0, atol=1e-12)


def test_embed_and_forward_agree():
    model = make_model([0, 3, 4], 3, 1)
    batch = Batch.from_data_list([random_molecule(torch.Generator().manual_seed(7)) for _ in range(2)])
    with torch.no_grad():
        embedding = model.embed(batch)
        prediction = model(batch)
    assert isinstance(embedding, Embedding)
    assert torch.equal(embedding.prediction, prediction)
    last = embedding.node_features[-1]
    per_graph = torch.stack([last[batch.batch == g].sum(0) for g in range(2)])
    assert torch.allclose(embedding.graph, per_graph, rtol=0, atol=1e-12)
    assert embedding.layout == model.layout


def test_graph_without_edges():
    # A lone atom receives no message: all features are exactly zero and the prediction is the head bias.
    model = make_model([0, 1, 2], 4, 1)
    lone = Data(z=torch.tensor([6]), pos=torch.zeros(1, 3, dtype=torch.float64), edge_index=torch.zeros(2, 0, dtype=torch.long))
    molecule = random_molecule(torch.Generator().manual_seed(8), 6)
    with torch.no_grad():
        single = model.embed(lone)
        batch = model(Batch.from_data_list([molecule, lone]))
        molecule_alone = model(molecule)
    assert torch.equal(single.graph, torch.zeros(1, model.layout.dim, dtype=torch.float64))
    assert torch.allclose(single.prediction, model.head.bias.detach())
    assert torch.allclose(batch, torch.cat([molecule_alone, single.prediction]), rtol=0, atol=1e-12)


def test_gradients_reach_every_parameter():
    model = make_model([0, 1, 2], 4, 3, dtype=torch.float32).train()
    generator = torch.Generator().manual_seed(9)
    batch = Batch.from_data_list([random_molecule(generator, dtype=torch.float32) for _ in range(4)])
    loss = torch.nn.functional.mse_loss(model(batch), torch.randn(4, generator=generator))
    loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        if name != "atom_embedding.weight":
            assert parameter.grad.abs().max() > 0, name


def test_rejects_invalid_l_values():
    with pytest.raises(ValueError, match="must include 0"):
        IrrepConvModel([1, 2], 4)
    assert IrrepConvModel([2, 0], 2, num_layers=0).hidden_irreps == irreps_for([0, 2], 2)


@pytest.mark.parametrize("backend", ["fast", "e3nn"])
def test_shared_edge_geometry_is_what_each_block_would_compute(backend):
    # The model computes the edges' spherical harmonics and radial basis once and hands them to
    # every block; a block left to compute its own (as the reference does) gives the same bits.
    generator = torch.Generator().manual_seed(3)
    batch = Batch.from_data_list([random_molecule(generator) for _ in range(3)])
    with default_dtype(torch.float64):
        torch.manual_seed(0)
        model = IrrepConvModel([0, 2, 3], 4, num_layers=1, backend=backend)
    shared = model(batch)
    x = model.input_block(model.atom_embedding(batch.z), batch.pos, batch.edge_index)
    for block in model.blocks:
        x = block(x, batch.pos, batch.edge_index) + x
    graph = torch.zeros(batch.num_graphs, 1, dtype=x.dtype).index_add(0, batch.batch, model.readout(x))
    assert torch.equal(shared, model.head(graph).squeeze(-1))
