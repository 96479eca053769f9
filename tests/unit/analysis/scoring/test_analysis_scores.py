"""Per-irrep scores: slicing through the layout, planted truth, rotation invariance; descriptors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation
from torch_geometric.loader import DataLoader

from analysis.scoring.descriptors import COLUMNS, describe, descriptors
from analysis.scoring.features import analysis_blocks, channel_magnitudes, channels_of
from analysis.scoring.knockout import knockout_scores
from analysis.scoring.scores import (
    STRUCTURE_SCORES,
    UTILIZATION_SCORES,
    ScoreSettings,
    local_utilization,
    mean_pair_difference,
    score_embedding,
    structure_scores,
)
from study.config.trial import REFERENCE_U0_ATOM_MEAN, REFERENCE_U0_ATOM_STD
from study.data.qm9 import QM9Dataset, split_indices
from study.data.reference import TargetReference
from study.nn.irreps import IrrepsLayout
from study.nn.model import IrrepConvModel

pytestmark = pytest.mark.usefixtures("one_torch_thread_per_test")  # tiny models: one thread, reproducible under load

FAST = ScoreSettings(seed=0, max_molecules=None)


# ---------------------------------------------------------------------------- slicing


def test_blocks_of_16x0e_16x1o_16x2e_have_16_48_80_dims_in_multiplicity_major_order():
    layout = IrrepsLayout.from_irreps("16x0e+16x1o+16x2e")
    units = {unit.name: unit for unit in analysis_blocks(layout)}
    assert list(units) == ["l0", "l1", "l2", "lgt0", "joint"]
    assert [(b.start, b.stop) for b in layout.blocks] == [(0, 16), (16, 64), (64, 144)]
    assert [units[name].members[0].dim for name in ("l0", "l1", "l2")] == [16, 48, 80]
    assert units["lgt0"].l_values == (1, 2) and units["joint"].l_values == (0, 1, 2)

    # Dim start + c*(2l+1) + k holds channel c, component k: the value 1000*c + k says which it is.
    x = np.zeros((2, layout.dim))
    for block in layout.blocks:
        for c in range(block.multiplicity):
            for k in range(2 * block.l + 1):
                x[:, block.start + c * (2 * block.l + 1) + k] = 1000 * c + k + 0.5 * block.l
    for block in layout.blocks:
        channels = channels_of(x, block)
        assert channels.shape == (2, 16, 2 * block.l + 1)
        expected = 1000 * np.arange(16)[:, None] + np.arange(2 * block.l + 1)[None, :] + 0.5 * block.l
        assert np.array_equal(channels[0], expected)
    # Invariants: the same count for every block (m scalars for l = 0, m channel norms for l >= 1),
    # so no block wins a probe by having more features.
    assert [channel_magnitudes(x, block).shape for block in layout.blocks] == [(2, 16)] * 3


def test_each_score_reads_only_its_own_block():
    rng = np.random.default_rng(3)
    layout = IrrepsLayout.from_irreps("16x0e+16x1o+16x2e")
    n = 120
    x = rng.normal(size=(n, layout.dim))
    target, nsps = rng.normal(size=n), rng.uniform(size=n)
    units = {unit.name: unit for unit in analysis_blocks(layout)}
    for name in ("l0", "l1", "l2"):
        unit = units[name]
        block = unit.members[0]
        poisoned = np.full_like(x, np.nan)  # any read outside the block turns a score into NaN
        poisoned[:, block.start : block.stop] = x[:, block.start : block.stop]
        settings = ScoreSettings(seed=0, umap=False)
        clean, _ = structure_scores(x, unit, target, nsps, settings)
        dirty, _ = structure_scores(poisoned, unit, target, nsps, settings)
        assert clean == pytest.approx(dirty, abs=0, nan_ok=True) and all(
            math.isfinite(v) for k, v in dirty.items() if k != "umap_trustworthiness"
        )
        assert local_utilization(poisoned, unit, 1.0, 1e-3) == local_utilization(x, unit, 1.0, 1e-3)

    # The shares are the only scores that look elsewhere: for their denominator.
    scores = score_embedding(x, layout, target, nsps, ScoreSettings(umap=False)).values
    squared = np.square(x)
    assert scores["l1"]["norm_share"] == pytest.approx(squared[:, 16:64].sum() / squared.sum())
    assert scores["l2"]["norm_share"] == pytest.approx(squared[:, 64:144].sum() / squared.sum())
    assert scores["lgt0"]["norm_share"] == pytest.approx(squared[:, 16:].sum() / squared.sum())
    assert sum(scores[name]["norm_share"] for name in ("l0", "l1", "l2")) == pytest.approx(1.0)
    assert sum(scores[name]["variance_share"] for name in ("l0", "l1", "l2")) == pytest.approx(1.0)


@pytest.mark.parametrize(("irreps", "same"), [("8x0e+8x1o", ("l1", "lgt0")), ("8x0e", ("l0", "joint"))])
def test_units_of_the_same_blocks_are_scored_once_with_the_scores_of_scoring_each(monkeypatch, irreps, same):
    from analysis.scoring import scores as scores_module

    rng = np.random.default_rng(4)
    layout = IrrepsLayout.from_irreps(irreps)
    x = rng.normal(size=(60, layout.dim))
    target, nsps = rng.normal(size=60), rng.uniform(size=60)
    settings = ScoreSettings(seed=0)  # UMAP too
    calls = []
    real = scores_module.structure_scores
    monkeypatch.setattr(scores_module, "structure_scores", lambda *args: calls.append(args[1].name) or real(*args))
    result = score_embedding(x, layout, target, nsps, settings)
    assert len(calls) == len(analysis_blocks(layout)) - 1 and same[1] not in calls
    # What the unit scored alone would have: its own structure scores and projection, exactly.
    alone, projection = real(x, {u.name: u for u in analysis_blocks(layout)}[same[1]], target, nsps, settings)
    assert {k: result.values[same[1]][k] for k in alone} == pytest.approx(alone, abs=0, nan_ok=True)
    assert np.array_equal(result.umap[same[1]], projection) and np.array_equal(result.umap[same[0]], projection)


# ---------------------------------------------------------------------------- planted truth


def planted_embedding(n: int = 240, m: int = 16, live_l1: int = 3, seed: int = 0):
    """l = 0 encodes target and nSPS (linearly and through smooth features); l = 1 is weak noise
    in a few channels, the rest dead. Every score should rank l = 0 as the used, structured block."""
    rng = np.random.default_rng(seed)
    layout = IrrepsLayout.from_irreps(f"{m}x0e+{m}x1o")
    target = rng.normal(size=n)
    nsps = rng.uniform(0, 1, size=n)
    latent = np.stack([target, 3 * (nsps - 0.5)], axis=1)
    frequencies = rng.normal(size=(2, m - 2)) * 1.5
    phases = rng.uniform(0, 2 * np.pi, m - 2)
    l0 = 5.0 * np.concatenate([latent, np.sin(latent @ frequencies + phases)], axis=1)
    l1 = np.zeros((n, m, 3))
    l1[:, :live_l1] = 0.3 * rng.normal(size=(n, live_l1, 3))
    embedding = np.concatenate([l0, l1.reshape(n, -1)], axis=1)
    return embedding, layout, -76.0 + 10.0 * target, 40.0 * nsps


def test_planted_signal_in_l0_and_noise_in_l1_rank_the_blocks_on_every_score():
    embedding, layout, target, nsps = planted_embedding()
    scores = score_embedding(embedding, layout, target, nsps, FAST).values
    l0, l1 = scores["l0"], scores["l1"]
    higher_is_more_used = [s for s in UTILIZATION_SCORES + STRUCTURE_SCORES if s != "dead_fraction"]
    for score in higher_is_more_used:
        assert l0[score] > l1[score], (score, l0[score], l1[score])
    assert l0["dead_fraction"] < l1["dead_fraction"]
    # Magnitudes, not only order: the noise block has no signal, the planted block nearly all of it.
    assert l1["dead_fraction"] == pytest.approx(13 / 16)
    assert l0["probe_r2_residual"] > 0.9 and l0["probe_r2_nsps"] > 0.9
    assert l1["probe_r2_residual"] < 0.1 and l1["probe_r2_nsps"] < 0.1
    assert abs(l1["knn_residual"]) < 0.15 and abs(l1["knn_nsps"]) < 0.15 and l0["knn_residual"] > 0.5
    assert l0["norm_share"] > 0.9 and l0["variance_share"] > 0.9
    # 3 live channels of 16: at most 3/16 of the block's channel directions are used.
    assert l1["participation_ratio"] <= 3.0 / 16 + 1e-9 and l1["effective_rank"] <= 3.0 / 16 + 1e-9


def test_knn_consistency_baseline_is_the_exact_mean_pair_difference():
    values = np.array([3.0, -1.0, 4.0, 1.0, 5.0])
    brute = np.mean([abs(a - b) for i, a in enumerate(values) for j, b in enumerate(values) if i != j])
    assert mean_pair_difference(values) == pytest.approx(brute)


# ---------------------------------------------------------------------------- rotation invariance


class RotatedMolecules(torch.utils.data.Dataset):
    """The molecules of `base`, each turned by its own random rotation (float64 positions)."""

    def __init__(self, base: QM9Dataset, seed: int | None):
        self.base, self.seed = base, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, item: int):
        data = self.base[item].clone()
        pos = data.pos.double()
        if self.seed is not None:
            rotation = torch.as_tensor(Rotation.random(random_state=self.seed + item).as_matrix())
            pos = pos @ rotation.T
        data.pos = pos
        return data


@torch.no_grad()
def graph_embeddings(model: IrrepConvModel, dataset) -> np.ndarray:
    rows = []
    for batch in DataLoader(dataset, batch_size=64):
        rows.append(model.embed(batch).graph.numpy())
    return np.concatenate(rows)


def test_every_score_is_unchanged_when_molecules_are_rotated(qm9, tmp_path):
    torch.manual_seed(0)
    # float64 end to end, constants included (e3nn and the fast backend build their Clebsch-Gordan
    # and normalisation constants in the default dtype), so rotating a molecule changes its
    # invariants only at the 1e-15 level. In float32 the invariants differ by about 1e-7, which is
    # enough to change a UMAP picture (its optimisation is chaotic).
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = IrrepConvModel(l_values=[0, 1, 2], hidden_dim=4, num_layers=1)
    finally:
        torch.set_default_dtype(saved)
    indices = split_indices(len(qm9), seed=5, fractions=(1.0, 0.0, 0.0), subset=80)["train"]
    base = QM9Dataset(qm9, indices)
    upright, turned = RotatedMolecules(base, None), RotatedMolecules(base, seed=100)
    x, x_rot = graph_embeddings(model, upright), graph_embeddings(model, turned)
    layout = model.layout
    # The raw l >= 1 components really turned (so the test is not vacuous), the scalars did not.
    l1 = layout.blocks[1]
    assert np.abs(x[:, l1.start : l1.stop] - x_rot[:, l1.start : l1.stop]).max() > 1e-3 * np.abs(x[:, l1.start : l1.stop]).max()
    assert np.allclose(x[:, : layout.blocks[0].stop], x_rot[:, : layout.blocks[0].stop], rtol=1e-9, atol=1e-12)

    target = qm9.y[torch.as_tensor(indices), 12].double().numpy()
    nsps = descriptors([qm9.smiles[i] for i in indices], cache_dir=tmp_path)["nsps"].to_numpy()
    settings = ScoreSettings(seed=0, max_molecules=None)
    scores, scores_rot = score_embedding(x, layout, target, nsps, settings), score_embedding(x_rot, layout, target, nsps, settings)
    assert scores.values.keys() == scores_rot.values.keys()
    for block, values in scores.values.items():
        for score, value in values.items():
            assert scores_rot.values[block][score] == pytest.approx(value, rel=1e-6, abs=1e-9), (block, score)

    # Knockouts too: the model's output is invariant, with or without a block zeroed. In float64
    # the deltas (meV, of order 1e3) differ by rounding only (measured between 1e-13 and 1e-11 meV).
    reference = TargetReference.mean(REFERENCE_U0_ATOM_MEAN, REFERENCE_U0_ATOM_STD)
    knocked = knockout_scores(model, upright, target, reference, dtype=torch.float64)
    knocked_rot = knockout_scores(model, turned, target, reference, dtype=torch.float64)
    for block, deltas in knocked.deltas.items():
        for score, value in deltas.items():
            assert knocked_rot.deltas[block][score] == pytest.approx(value, rel=0, abs=1e-9), (block, score)


# ---------------------------------------------------------------------------- descriptors


def test_descriptors_of_known_molecules():
    benzene = describe("c1ccccc1")
    assert benzene["aromatic"] == 6 and benzene["sp2"] == 6 and benzene["rings"] == 1
    assert benzene["heavy_atoms"] == 6 and benzene["heavy_neighbours"] == 2 and benzene["stereo_centers"] == 0
    butanol = describe("CCC(C)O")
    assert butanol["stereo_centers"] == 1 and butanol["sp3"] == 5 and butanol["aromatic"] == 0
    assert butanol["nsps"] == pytest.approx(butanol["sps"] / butanol["heavy_atoms"])
    assert describe("CC#N")["sp"] == 2
    assert describe("CC=CC")["stereo_bonds"] == 1
    assert all(math.isnan(v) for v in describe("not a smiles((").values())


def test_descriptors_are_cached_by_smiles(tmp_path, monkeypatch):
    smiles = ["CCO", "c1ccccc1", "CCO", "CC(C)(C)O"]
    first = descriptors(smiles, cache_dir=tmp_path)
    assert list(first.columns) == ["smiles", *COLUMNS] and list(first["smiles"]) == smiles
    assert first.loc[0, "heavy_atoms"] == 3 and first.loc[1, "aromatic"] == 6
    assert first.iloc[0, 1:].tolist() == first.iloc[2, 1:].tolist()

    def refuse(smiles):
        raise AssertionError(f"{smiles} should have come from the cache")

    monkeypatch.setattr("analysis.scoring.descriptors.describe", refuse)
    again = descriptors(list(reversed(smiles)), cache_dir=tmp_path)
    assert again.iloc[::-1].reset_index(drop=True).equals(first)
    monkeypatch.undo()
    # A new molecule is computed and merged in, the old ones stay.
    more = descriptors(["CCO", "CCN"], cache_dir=tmp_path)
    assert more.loc[1, "heavy_atoms"] == 3 and more.loc[0, "sps"] == first.loc[0, "sps"]
