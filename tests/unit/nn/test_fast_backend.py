"""The fast tensor product computes e3nn's function with e3nn's parameters.

Every case builds the e3nn model once (in float64, so its constants are float64-exact), copies its
state dict into a fast model, and compares predictions and gradients (every parameter and the
atom positions) on a real QM9 batch, in float64 and in float32.
"""

from __future__ import annotations

import io

import pytest
import torch
from e3nn import o3
from torch_geometric.loader import DataLoader

from study.config.trial import TrialConfig
from study.data.qm9 import QM9Dataset, split_indices
from study.nn import fast_tp, fast_tp_plan
from study.nn.fast_tp import FusedRadialTensorProduct, fully_connected_paths
from study.nn.model import IrrepConvModel, build_model, default_dtype, to_device

# (l values, hidden_dim): the orders of the paper's configurations (docs/science.md), small widths for speed.
CASES = [
    pytest.param((0, 1, 2), 3, id="l012"),
    pytest.param((0, 1, 2, 3, 4), 2, id="l01234"),
    pytest.param((0, 1, 2, 3, 4, 5, 6), 2, id="l0-6"),
    pytest.param((0, 3, 4, 5, 6), 2, id="l03456"),
    pytest.param((0, 1, 2, 10), 2, id="l01210"),
]
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # These batches are tiny: with two threads every op waits at a barrier for the other, and on a
    # shared machine a descheduled thread stalls the whole test.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def qm9_batches(qm9):
    """Two real QM9 batches: 6 molecules with bond edges, 3 with 6 A radius edges (denser)."""
    indices = split_indices(len(qm9), seed=21616, subset=2000)["test"]
    bonds = next(iter(DataLoader(QM9Dataset(qm9, indices[:6], edges="bonds"), batch_size=6)))
    radius = next(iter(DataLoader(QM9Dataset(qm9, indices[6:9], edges="radius", cutoff=6.0), batch_size=3)))
    return {"bonds": bonds, "radius": radius}


def model_pair(l_values, hidden_dim, num_layers=1, seed=0) -> tuple[IrrepConvModel, IrrepConvModel]:
    """An e3nn model and a fast model holding the same parameters (copied through the state dict)."""
    torch.manual_seed(seed)
    with default_dtype(torch.float64):
        reference = IrrepConvModel(l_values, hidden_dim, num_layers=num_layers, backend="e3nn")
        fast = IrrepConvModel(l_values, hidden_dim, num_layers=num_layers, backend="fast")
    fast.load_state_dict(reference.state_dict())
    return reference, fast


def forward_and_gradients(model: IrrepConvModel, batch, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    model = model.to(dtype)
    batch = batch.clone()
    batch.pos = batch.pos.to(dtype).requires_grad_(True)
    model.zero_grad(set_to_none=True)
    prediction = model(batch)
    # A loss that weights molecules differently, so that gradients are not symmetric sums.
    weights = torch.linspace(0.5, 1.5, prediction.numel(), dtype=dtype)
    (weights * prediction).sum().backward()
    results = {"prediction": prediction.detach(), "pos.grad": batch.pos.grad}
    for name, parameter in model.named_parameters():
        results[f"{name}.grad"] = parameter.grad
    return results


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    got, expected = got.detach(), expected.detach()
    assert got.shape == expected.shape, (got.shape, expected.shape)
    if expected.numel() == 0:  # nothing to differ (a batch without edges)
        return 0.0
    scale = expected.abs().max()
    if scale == 0:
        return float(got.abs().max())
    return float((got - expected).abs().max() / scale)


@pytest.mark.parametrize(("l_values", "hidden_dim"), CASES)
def test_fast_matches_e3nn_outputs_and_gradients(qm9_batches, l_values, hidden_dim):
    reference, fast = model_pair(l_values, hidden_dim)
    batch = qm9_batches["bonds"]
    for dtype in (torch.float64, torch.float32):
        expected = forward_and_gradients(reference, batch, dtype)
        got = forward_and_gradients(fast, batch, dtype)
        assert expected.keys() == got.keys()
        # Guard: gradients must reach every tensor-product weight, or the comparison proves little.
        for name, value in expected.items():
            if ".radial." in name:
                assert value.abs().max() > 0, f"{name} has no gradient"
        for name in expected:
            error = relative_error(got[name], expected[name])
            assert error < TOLERANCE[dtype], f"{dtype}, {name}: relative error {error:.2e}"


def test_fast_matches_e3nn_on_a_radius_graph_at_default_depth(qm9_batches):
    reference, fast = model_pair((0, 1, 2), 4, num_layers=3)
    expected = forward_and_gradients(reference, qm9_batches["radius"], torch.float64)
    got = forward_and_gradients(fast, qm9_batches["radius"], torch.float64)
    for name in expected:
        assert relative_error(got[name], expected[name]) < 1e-10, name


# The fast tensor product's strategies, from its module constants: inputs of dimension 1 factored
# out or coupled like the others; (input, output) pairs merged into few large operations, kept one
# per pair (what large models use), or all inputs stacked (small models). Each must compute
# e3nn's function.
IRREGULAR = "3x0e+2x1o+1x1e+4x2e"  # uneven multiplicities, both parities
STRATEGIES = [
    pytest.param({}, IRREGULAR, id="defaults"),
    pytest.param({"FACTOR_MIN_MUL": 1, "MERGE_B_FLOATS": 0, "MERGE_W_FLOATS": 0}, IRREGULAR, id="factored-per-pair"),
    pytest.param({"FACTOR_MIN_MUL": 10**9, "MERGE_B_FLOATS": 10**9, "MERGE_W_FLOATS": 10**9}, IRREGULAR, id="merged"),
    pytest.param({"FACTOR_MIN_MUL": 10**9, "STACK_B_FLOATS": 10**9, "MERGE_W_FLOATS": 10**9}, "2x0e+2x1o+2x1e+2x2e", id="stacked"),
]


@pytest.mark.parametrize(("strategy", "irreps_in1"), STRATEGIES)
def test_every_tensor_product_strategy_matches_e3nn(monkeypatch, strategy, irreps_in1):
    for name, value in strategy.items():
        monkeypatch.setattr(fast_tp, name, value)
    # An input order missing from the output, and an output (1x5e) that no path reaches: e3nn
    # leaves it zero.
    irreps_in1 = o3.Irreps(irreps_in1)
    irreps_in2 = o3.Irreps("0e+1o+2e+3o")
    irreps_out = o3.Irreps("2x0e+3x1o+2x1e+1x2e+2x3e+1x5e")
    with default_dtype(torch.float64):
        reference = o3.FullyConnectedTensorProduct(irreps_in1, irreps_in2, irreps_out, shared_weights=False)
        fast = FusedRadialTensorProduct(irreps_in1, irreps_in2, irreps_out)
    # The strategy took effect: the 3x0e input factored out or not; pairs merged, stacked or not.
    assert len(fast._factor_plan) == (1 if strategy.get("FACTOR_MIN_MUL") == 1 else 0)
    pairs = {(p.i_in1, p.i_out) for p in fully_connected_paths(irreps_in1, irreps_in2, irreps_out) if p.weight_numel}
    coupled_pairs = len(pairs) - len({i_out for i1, i_out in pairs if i1 == 0} if fast._factor_plan else set())
    stacks = [inputs for inputs, _, _, _ in fast._couple_plan]
    if strategy.get("MERGE_B_FLOATS") == 0:
        assert len(fast._couple_plan) == coupled_pairs
    if strategy.get("MERGE_B_FLOATS") == 10**9:
        assert stacks == [(i1,) for i1 in range(len(irreps_in1))]
    if strategy.get("STACK_B_FLOATS") == 10**9:
        assert stacks == [tuple(range(len(irreps_in1)))]  # one coupling for all outputs
    assert fast.weight_numel == reference.weight_numel
    assert [(p.i_in1, p.i_in2, p.i_out) for p in fully_connected_paths(irreps_in1, irreps_in2, irreps_out)] == [
        (ins.i_in1, ins.i_in2, ins.i_out) for ins in reference.instructions
    ]
    generator = torch.Generator().manual_seed(0)
    num_edges, hidden = 7, 5
    x1 = torch.randn(num_edges, irreps_in1.dim, generator=generator, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(num_edges, irreps_in2.dim, generator=generator, dtype=torch.float64, requires_grad=True)
    h = torch.randn(num_edges, hidden, generator=generator, dtype=torch.float64, requires_grad=True)
    linear = torch.randn(hidden, fast.weight_numel, generator=generator, dtype=torch.float64, requires_grad=True)
    scale = 0.3
    expected = reference(x1, x2, scale * h @ linear)
    got = fast(x1, x2, h, linear, scale)
    assert relative_error(got, expected) < 1e-12
    assert torch.equal(got[:, -11:], torch.zeros(num_edges, 11, dtype=torch.float64))
    cotangent = torch.randn(expected.shape, generator=generator, dtype=torch.float64)
    grads_expected = torch.autograd.grad(expected, (x1, x2, h, linear), cotangent)
    grads_got = torch.autograd.grad(got, (x1, x2, h, linear), cotangent)
    for name, g, e in zip(("x1", "x2", "hidden", "linear"), grads_got, grads_expected):
        assert relative_error(g, e) < 1e-12, name


@pytest.mark.parametrize(("strategy", "irreps_in1"), STRATEGIES)
@pytest.mark.parametrize("num_edges", [7, 0])
def test_variants_of_the_input_give_each_variant_s_own_tensor_product(monkeypatch, strategy, irreps_in1, num_edges):
    # x1 [E, V, in1] (the knockouts' variants of the node features on the same edges) must give,
    # per variant, e3nn's tensor product of that variant, in every strategy; also on no edges.
    for name, value in strategy.items():
        monkeypatch.setattr(fast_tp, name, value)
    irreps_in1, irreps_in2 = o3.Irreps(irreps_in1), o3.Irreps("0e+1o+2e+3o")
    irreps_out = o3.Irreps("2x0e+3x1o+2x1e+1x2e+2x3e+1x5e")
    with default_dtype(torch.float64):
        reference = o3.FullyConnectedTensorProduct(irreps_in1, irreps_in2, irreps_out, shared_weights=False)
        fast = FusedRadialTensorProduct(irreps_in1, irreps_in2, irreps_out)
    generator = torch.Generator().manual_seed(1)
    variants, hidden = 3, 5
    x1 = torch.randn(num_edges, variants, irreps_in1.dim, generator=generator, dtype=torch.float64)
    x2 = torch.randn(num_edges, irreps_in2.dim, generator=generator, dtype=torch.float64)
    h = torch.randn(num_edges, hidden, generator=generator, dtype=torch.float64)
    linear = torch.randn(hidden, fast.weight_numel, generator=generator, dtype=torch.float64)
    got = fast(x1, x2, h, linear, 0.3)
    assert got.shape == (num_edges, variants, irreps_out.dim)
    for variant in range(variants):
        expected = reference(x1[:, variant], x2, 0.3 * h @ linear)
        assert relative_error(got[:, variant], expected) < 1e-12, variant
        # The variants' own calls agree with the batched one (the training path, one variant).
        assert relative_error(fast(x1[:, variant], x2, h, linear, 0.3), got[:, variant]) < 1e-12, variant


@pytest.mark.parametrize("backend", ["fast", "e3nn"])
def test_an_interaction_block_evaluates_variants_of_its_node_features_each_as_alone(qm9_batches, backend):
    torch.manual_seed(0)
    with default_dtype(torch.float64):
        model = IrrepConvModel((0, 1, 2), 16, num_layers=1, backend=backend)  # 16x0e: the factored input
    batch = to_device(qm9_batches["bonds"].clone(), torch.device("cpu"), torch.float64)
    with torch.no_grad():
        x0, graph = model.input_features(batch)
        variants = torch.stack([x0, 2.0 * x0, -x0.flip(1)], dim=1)  # [N, 3, F], three different inputs
        block = model.blocks[0]
        got = block(variants, graph.pos, graph.edge_index, graph.geometry)
        for variant in range(variants.shape[1]):
            alone = block(variants[:, variant], graph.pos, graph.edge_index, graph.geometry)
            assert relative_error(got[:, variant], alone) < 1e-12, variant


def test_output_blocks_hand_their_batched_matmuls_a_contiguous_gradient(monkeypatch):
    # Output blocks are formed as out^T [E, k, w] and returned transposed; on the CPU the backward's
    # bmm runs 5x slower on the transposed view of the gradient that autograd would hand it (docs/performance.md).
    calls = []
    apply = fast_tp._ContiguousGradient.apply
    monkeypatch.setattr(fast_tp._ContiguousGradient, "apply", lambda x: calls.append(x.shape) or apply(x))
    tp = FusedRadialTensorProduct("8x0e + 8x1o + 8x2e", "1x0e + 1x1o + 1x2e", "8x0e + 8x1o + 8x2e")
    num_edges, hidden = 5, 4
    tp(torch.randn(num_edges, 72), torch.randn(num_edges, 9), torch.randn(num_edges, hidden), torch.randn(hidden, tp.weight_numel), 0.5)
    assert sorted(calls) == [(num_edges, 3, 8), (num_edges, 5, 8)]  # every output with k > 1, on the CPU

    out_t = torch.randn(4, 3, 2, requires_grad=True)
    seen = []
    out_t.register_hook(lambda grad: seen.append(grad))
    cotangent = torch.randn(4, 2, 3)
    fast_tp._ContiguousGradient.apply(out_t).transpose(1, 2).backward(cotangent)
    assert seen[0].is_contiguous()
    assert torch.equal(seen[0], cotangent.transpose(1, 2))


@pytest.mark.parametrize(("source", "target"), [("e3nn", "fast"), ("fast", "e3nn")])
def test_checkpoint_of_one_backend_loads_into_the_other(qm9_batches, source, target):
    # As in training: built in float32, saved, loaded with strict key and shape checking.
    l_values, hidden_dim = (0, 2, 3), 3
    torch.manual_seed(1)
    trained = IrrepConvModel(l_values, hidden_dim, num_layers=1, backend=source)
    with torch.no_grad():  # move away from the initialisation, as a trained checkpoint would be
        for parameter in trained.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    buffer.seek(0)
    loaded = IrrepConvModel(l_values, hidden_dim, num_layers=1, backend=target)
    state = torch.load(buffer, weights_only=True)
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in loaded.state_dict().items()}
    loaded.load_state_dict(state, strict=True)
    batch = qm9_batches["bonds"]
    with torch.no_grad():
        expected, got = trained.eval()(batch), loaded.eval()(batch)
    assert relative_error(got, expected) < 1e-6
    assert not torch.allclose(expected, IrrepConvModel(l_values, hidden_dim, num_layers=1, backend=target).eval()(batch))


@pytest.mark.parametrize("l_values", [(0, 1, 2), (0, 3, 4, 5, 6), (0, 1, 2, 10)])
def test_state_dict_keys_and_buffers_are_e3nn_s(l_values):
    torch.manual_seed(0)
    reference = IrrepConvModel(l_values, 2, num_layers=0, backend="e3nn").state_dict()
    fast = IrrepConvModel(l_values, 2, num_layers=0, backend="fast").state_dict()
    assert list(fast) == list(reference)
    for key, value in reference.items():
        if "radial" in key or key.startswith(("atom_embedding", "readout.weight", "head")):
            continue  # parameters: random, compared in the tests above
        assert torch.equal(fast[key], value), key  # the same buffers, built the same way: bit for bit (measured)


def test_config_selects_the_backend():
    assert TrialConfig().backend == "fast"
    small = dict(l_values=(0, 1), hidden_dim=2, num_layers=0)
    assert isinstance(build_model(TrialConfig(**small, backend="e3nn")).input_block.tp, o3.FullyConnectedTensorProduct)
    assert isinstance(build_model(TrialConfig(**small)).input_block.tp, FusedRadialTensorProduct)
    with pytest.raises(ValueError, match="backend"):
        IrrepConvModel((0, 1), 2, backend="cuda-kernels")


def test_a_float64_trial_builds_its_model_in_float64(qm9_batches):
    # Built in float32 and cast, the Clebsch-Gordan constants keep float32 rounding: the backends
    # then differ by ~1e-9. Built in float64 (as build_model does for a float64 trial) they agree
    # to rounding of float64 arithmetic.
    small = dict(l_values=(0, 1, 2, 3), hidden_dim=3, num_layers=1, dtype="float64")
    torch.manual_seed(0)
    reference = build_model(TrialConfig(**small, backend="e3nn"))
    fast = build_model(TrialConfig(**small, backend="fast"))
    fast.load_state_dict(reference.state_dict())
    assert all(p.dtype == torch.float64 for p in reference.parameters())
    assert all(b.dtype == torch.float64 for b in fast.buffers() if b.is_floating_point())
    assert torch.get_default_dtype() == torch.float32  # the build left the default alone
    batch = qm9_batches["bonds"]
    expected = forward_and_gradients(reference, batch, torch.float64)
    got = forward_and_gradients(fast, batch, torch.float64)
    assert max(relative_error(got[name], expected[name]) for name in expected) < 1e-13


@pytest.mark.parametrize(("strategy", "irreps_in1"), STRATEGIES)
def test_the_plan_is_plain_data_covering_every_weighted_path_once(strategy, irreps_in1):
    # The plan module's contract (study/nn/fast_tp_plan.py): equal arguments give equal plans; every
    # weighted path is computed by one factored term or one coupling piece, and each of its weights
    # is read by exactly one column block.
    thresholds = {"FACTOR_MIN_MUL": 16, "MERGE_B_FLOATS": 4096, "MERGE_W_FLOATS": 1024, "STACK_B_FLOATS": 32768, **strategy}
    thresholds = fast_tp_plan.Thresholds(**{name.lower(): value for name, value in thresholds.items()})
    irreps = (o3.Irreps(irreps_in1), o3.Irreps("0e+1o+2e+3o"), o3.Irreps("2x0e+3x1o+2x1e+1x2e+2x3e+1x5e"))
    plan = fast_tp_plan.plan_tensor_product(*irreps, thresholds)
    assert plan == fast_tp_plan.plan_tensor_product(*irreps, thresholds)
    computed = [(f.i_in1, p.i_out) for f in plan.factored for p in plan.column_blocks[f.column_block].paths]
    computed += [(p.i_in1, p.i_out) for c in plan.couplings for piece in c.pieces for p in piece.paths]
    assert sorted(computed) == sorted((p.i_in1, p.i_out) for p in plan.paths)
    assert len(computed) == len(plan.paths)
    weighted = torch.cat([torch.arange(p.weight_start, p.weight_start + p.weight_numel) for p in plan.paths])
    assert torch.equal(plan.columns().sort().values, weighted.sort().values)
    with pytest.raises(ValueError, match="multiplicity 1"):
        fast_tp_plan.plan_tensor_product(irreps[0], o3.Irreps("2x0e"), irreps[2], thresholds)
