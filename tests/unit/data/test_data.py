"""QM9 from qm9pack: counts, targets recomputed by hand from the raw CSV, edges, splits, cache."""

from __future__ import annotations

import csv
import itertools
import json
import os

import numpy as np
import pytest
import torch
from rdkit import Chem
from torch_geometric.loader import DataLoader

from study.config.trial import REFERENCE_U0_ATOM_MEAN, REFERENCE_U0_ATOM_STD
from study.data.qm9 import (
    CACHE_FILE,
    CACHE_META_FILE,
    TARGETS,
    CollatedSplit,
    DataError,
    QM9Dataset,
    load_qm9,
    qm9pack_data_dir,
    radius_edges,
    split_indices,
    target_index,
    target_stats,
)
from tests.helpers.imports import modules_of_package_imported_by

HARTREE_TO_EV = 27.211386246
# QM9's atomic reference energies for U0 (Hartree), typed here independently of study/data/qm9.py.
U0_ATOM_REF = {"H": -0.500273, "C": -37.846772, "N": -54.583861, "O": -75.064579, "F": -99.718730}


def raw_rows(indices: set[int]) -> dict[int, dict]:
    """Rows of qm9pack's first CSV by QM9 index, read with the csv module (no pandas, no study code)."""
    rows = {}
    with open(qm9pack_data_dir() / "qm9_part1.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            if int(row["Index"]) in indices:
                rows[int(row["Index"])] = row
            if len(rows) == len(indices):
                break
    return rows


def molecule(qm9, qm9_index: int) -> int:
    return int((qm9.mol_id == qm9_index).nonzero()[0, 0])


def test_all_molecules_with_all_targets(qm9):
    assert len(qm9) == 130_831
    assert qm9.y.shape == (130_831, 19) and qm9.y.dtype == torch.float64
    assert torch.isfinite(qm9.y).all()
    assert qm9.atom_ptr[-1] == qm9.z.shape[0] == qm9.pos.shape[0]
    assert set(qm9.z.unique().tolist()) == {1, 6, 7, 8, 9}
    assert qm9.mol_id[0] == 1 and qm9.mol_id[-1] == 133_885 and bool((qm9.mol_id.diff() > 0).all())
    assert len(qm9.smiles) == len(qm9)


def test_target_names_follow_pyg_order():
    assert len(TARGETS) == 19
    assert target_index("U0_atom") == 12 and target_index("mu") == 0 and target_index("C") == 18
    with pytest.raises(DataError, match="unknown target 'U0atom'"):
        target_index("U0atom")


@pytest.mark.parametrize("qm9_index, formula", [(1, "CH4"), (3, "H2O"), (21, "C4H10")])
def test_u0_atomization_energy_recomputed_by_hand(qm9, qm9_index, formula):
    row = raw_rows({qm9_index})[qm9_index]
    elements = row["Elements"].strip("[]").replace("'", "").split(",")
    expected_ev = (float(row["InternalEnergy_0K_au"]) - sum(U0_ATOM_REF[e] for e in elements)) * HARTREE_TO_EV
    k = molecule(qm9, qm9_index)
    assert qm9.y[k, 12].item() == pytest.approx(expected_ev, abs=1e-9)
    # The same row's other columns, in PyG units.
    assert qm9.y[k, target_index("U0")].item() == pytest.approx(float(row["InternalEnergy_0K_au"]) * HARTREE_TO_EV)
    assert qm9.y[k, target_index("gap")].item() == pytest.approx(float(row["HOMO_LUMO_gap_au"]) * HARTREE_TO_EV)
    assert qm9.y[k, target_index("mu")].item() == pytest.approx(float(row["Dipole_debye"]))
    positions = json.loads(row["XYZ_Ang"])
    assert torch.allclose(qm9.pos[qm9.atom_ptr[k] : qm9.atom_ptr[k + 1]], torch.tensor(positions, dtype=torch.float32))
    assert qm9.smiles[k] == row["SMILES"]


def test_methane_atomization_energy_in_ev(qm9):
    # -40.47893 Ha - (C + 4 H) = -0.631066 Ha
    assert qm9.y[molecule(qm9, 1), 12].item() == pytest.approx(-0.631066 * HARTREE_TO_EV, abs=1e-6)


def test_u0_atomization_statistics_match_the_reference_normalisation(qm9):
    stats = target_stats(qm9, "U0_atom")
    assert stats["count"] == 130_831
    # The seed's published normalisation, which config.py names (docs/science.md).
    assert stats["mean"] == pytest.approx(REFERENCE_U0_ATOM_MEAN, abs=5e-4)
    assert stats["std"] == pytest.approx(REFERENCE_U0_ATOM_STD, abs=5e-4)


def bond_graph(qm9, qm9_index: int):
    data = QM9Dataset(qm9, [molecule(qm9, qm9_index)], edges="bonds")[0]
    return data, {tuple(sorted(pair)) for pair in data.edge_index.T.tolist()}


def test_methane_has_four_c_h_bonds(qm9):
    data, bonds = bond_graph(qm9, 1)
    assert data.z.tolist() == [6, 1, 1, 1, 1]
    assert bonds == {(0, 1), (0, 2), (0, 3), (0, 4)}
    assert data.edge_index.shape == (2, 8)  # both directions
    assert data.y.shape == (1, 19) and data.mol_id == 1 and data.smiles == "C"


def test_water_and_benzene_bonds(qm9):
    _, water = bond_graph(qm9, 3)
    assert water == {(0, 1), (0, 2)}
    data, bonds = bond_graph(qm9, 214)
    assert data.smiles == "C1=CC=CC=C1"  # benzene
    carbons = {k for k, z in enumerate(data.z.tolist()) if z == 6}
    assert len(bonds) == 12
    assert sum(1 for a, b in bonds if a in carbons and b in carbons) == 6  # the ring
    assert all(sum(1 for bond in bonds if k in bond) == 3 for k in carbons)


def skeleton_smiles(atomic_numbers, pairs) -> str:
    """Canonical SMILES of a graph with every bond single: equal strings mean isomorphic graphs."""
    mol = Chem.RWMol()
    for number in atomic_numbers:
        mol.AddAtom(Chem.Atom(int(number)))
    for a, b in pairs:
        mol.AddBond(int(a), int(b), Chem.BondType.SINGLE)
    return Chem.MolToSmiles(mol.GetMol())


def test_bond_graph_is_the_smiles_graph(qm9):
    # The perceived bonds should give the molecule's own SMILES graph (hydrogens included); over
    # all of QM9 this holds for 130,829 of 130,831 molecules. A random 2,000 here.
    sample = np.random.default_rng(0).choice(len(qm9), size=2000, replace=False)
    agree = 0
    for k in sample:
        reference = Chem.AddHs(Chem.MolFromSmiles(qm9.smiles[k]))
        expected = skeleton_smiles(
            [a.GetAtomicNum() for a in reference.GetAtoms()],
            [(b.GetBeginAtomIdx(), b.GetEndAtomIdx()) for b in reference.GetBonds()],
        )
        atoms = qm9.z[qm9.atom_ptr[k] : qm9.atom_ptr[k + 1]].tolist()
        perceived = skeleton_smiles(atoms, qm9.bonds[:, qm9.bond_ptr[k] : qm9.bond_ptr[k + 1]].T.tolist())
        agree += perceived == expected
    assert agree / len(sample) >= 0.999


def test_strained_cage_keeps_its_transannular_contact_unbonded(qm9):
    # QM9 120207 holds an azabicyclo[1.1.1]pentane: its bridgehead carbons sit 1.84 A apart, inside
    # the distance rule, but a fifth bond on carbon is impossible, so the contact is dropped.
    data, bonds = bond_graph(qm9, 120207)
    degree = np.bincount(np.array(sorted(bonds)).ravel(), minlength=data.num_nodes)
    limits = {1: 1, 6: 4, 7: 4, 8: 2}
    assert all(degree[k] <= limits[z] for k, z in enumerate(data.z.tolist()))
    assert len(bonds) == Chem.AddHs(Chem.MolFromSmiles(data.smiles)).GetNumBonds()


def test_radius_edges_stay_within_the_cutoff_and_the_molecule(qm9):
    data = QM9Dataset(qm9, [molecule(qm9, 1)], edges="radius", cutoff=1.5)[0]
    # Methane: C-H is 1.09 A, H-H is 1.78 A, so a 1.5 A radius graph is exactly the C-H bonds.
    assert {tuple(sorted(p)) for p in data.edge_index.T.tolist()} == {(0, 1), (0, 2), (0, 3), (0, 4)}
    pos = torch.tensor([[0.0, 0, 0], [1.0, 0, 0], [3.0, 0, 0]])
    edges = radius_edges(pos, cutoff=2.5)
    assert sorted(map(tuple, edges.T.tolist())) == [(0, 1), (1, 0), (1, 2), (2, 1)]
    two = QM9Dataset(qm9, [molecule(qm9, 1), molecule(qm9, 3)], edges="radius", cutoff=6.0)
    assert two[0].edge_index.shape[1] == 5 * 4 and two[1].edge_index.shape[1] == 3 * 2  # complete graphs


def test_splits_are_deterministic_and_disjoint():
    first = split_indices(130_831, seed=21616)
    second = split_indices(130_831, seed=21616)
    assert all(np.array_equal(first[name], second[name]) for name in first)
    sizes = {name: len(v) for name, v in first.items()}
    assert sizes == {"train": 104_664, "val": 13_083, "test": 13_084}
    union = np.concatenate(list(first.values()))
    assert len(np.unique(union)) == 130_831
    other = split_indices(130_831, seed=1)
    assert not np.array_equal(first["test"], other["test"])


def test_split_sizes_and_subsets():
    absolute = split_indices(1000, seed=3, sizes=(100, 20, 30))
    assert [len(absolute[n]) for n in ("train", "val", "test")] == [100, 20, 30]
    assert len(np.unique(np.concatenate(list(absolute.values())))) == 150
    small = split_indices(1000, seed=3, subset=100)
    assert len(np.concatenate(list(small.values()))) == 100
    bigger = split_indices(1000, seed=3, subset=200)
    # Subsets are nested: a larger subset keeps every molecule of a smaller one.
    assert set(np.concatenate(list(small.values()))) <= set(np.concatenate(list(bigger.values())))
    partial = split_indices(1000, seed=3, fractions=(0.5, 0.1, 0.1))
    assert [len(partial[n]) for n in ("train", "val", "test")] == [500, 100, 100]
    with pytest.raises(ValueError, match="sum to <= 1"):
        split_indices(1000, seed=3, fractions=(0.8, 0.2, 0.1))
    with pytest.raises(ValueError, match="only 100 available"):
        split_indices(1000, seed=3, sizes=(80, 20, 20), subset=100)
    with pytest.raises(ValueError, match="subset"):
        split_indices(1000, seed=3, subset=1001)


@pytest.fixture
def small_source(tmp_path):
    """A 40-molecule qm9pack-like source folder, so the cache tests rebuild in a second."""
    source = tmp_path / "source"
    source.mkdir()
    with open(qm9pack_data_dir() / "qm9_part1.csv") as full, open(source / "qm9_part1.csv", "w") as small:
        for _, line in zip(range(41), full):
            small.write(line)
    return source


def test_cache_is_reused_and_corrupt_or_stale_cache_rebuilt(small_source, tmp_path):
    cache = tmp_path / "cache"
    messages: list[str] = []
    built = load_qm9(cache, log=messages.append, source_dir=small_source)
    assert len(built) == 40 and (cache / CACHE_FILE).exists()
    assert any("processing QM9" in m for m in messages)

    messages.clear()
    reused = load_qm9(cache, log=messages.append, source_dir=small_source)
    assert messages == [] and torch.equal(reused.y, built.y) and reused.smiles == built.smiles

    # Flip bytes in the middle of the tensor file: the checksum notices, the cache is rebuilt.
    raw = bytearray((cache / CACHE_FILE).read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 16] = b"\xff" * 16
    (cache / CACHE_FILE).write_bytes(bytes(raw))
    messages.clear()
    rebuilt = load_qm9(cache, log=messages.append, source_dir=small_source)
    assert any("corrupt" in m and "rebuilding" in m for m in messages), messages
    assert torch.equal(rebuilt.y, built.y) and torch.equal(rebuilt.bonds, built.bonds)
    assert load_qm9(cache, log=lambda m: None, source_dir=small_source).smiles == built.smiles

    # A changed source makes the cache stale. The cache fingerprints a source by size and
    # modification time; a rewrite within one tick of a coarse filesystem clock can keep the
    # mtime, so the change is made explicit: the same bytes with an mtime 5 s later (os.utime),
    # and then a source one line shorter with the original mtime (the size alone).
    source = small_source / "qm9_part1.csv"
    original = source.stat()
    os.utime(source, ns=(original.st_atime_ns, original.st_mtime_ns + 5 * 10**9))
    messages.clear()
    load_qm9(cache, log=messages.append, source_dir=small_source)
    assert any("stale" in m for m in messages), messages
    messages.clear()
    assert load_qm9(cache, log=messages.append, source_dir=small_source).smiles == built.smiles and messages == []
    lines = source.read_text().splitlines(keepends=True)
    source.write_text("".join(lines[:-1]))
    os.utime(source, ns=(original.st_atime_ns, original.st_mtime_ns + 5 * 10**9))
    messages.clear()
    assert len(load_qm9(cache, log=messages.append, source_dir=small_source)) == 39
    assert any("stale" in m for m in messages), messages

    # A cache written by another format version is rebuilt, not misread.
    meta = json.loads((cache / CACHE_META_FILE).read_text())
    (cache / CACHE_META_FILE).write_text(json.dumps({**meta, "format_version": 0}))
    messages.clear()
    assert len(load_qm9(cache, log=messages.append, source_dir=small_source)) == 39
    assert any("format version" in m for m in messages), messages


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no QM9 CSV files"):
        load_qm9(tmp_path / "cache", log=lambda m: None, source_dir=tmp_path)


def test_cli_data_json_reports_molecules_and_target_statistics(run_cli_in_process):
    result = run_cli_in_process("data", "--subset", "300", "--edges", "radius", "--cutoff", "4", "--json", check_exit=0)
    report = json.loads(result.stdout)
    assert report["molecules"] == 300
    assert report["edges"]["kind"] == "radius" and report["edges"]["mean_degree"] > 0
    assert report["target"]["name"] == "U0_atom" and report["target"]["count"] == 300
    assert -120 < report["target"]["mean"] < -10

    bad = run_cli_in_process("data", "--target", "energy")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()] and "--target" in bad.stderr


@pytest.mark.parametrize("edges", ["bonds", "radius"])
def test_collated_split_serves_the_data_loaders_batches(qm9, edges):
    # Training reads batches from a split collated once; they must be the PyG DataLoader's, batch
    # for batch (same molecules in the same order, same fields), or seeds would change meaning.
    indices = split_indices(len(qm9), seed=4, subset=300)["train"]
    dataset = QM9Dataset(qm9, indices, edges=edges)
    # Gathered from QM9's tensors, and collated from Data graphs (any other dataset of graphs).
    for collated, shuffle in itertools.product((CollatedSplit(dataset), CollatedSplit(list(dataset))), (True, False)):
        expected = DataLoader(dataset, batch_size=32, shuffle=shuffle, generator=torch.Generator().manual_seed(9))
        got = list(collated.batches(32, shuffle=shuffle, generator=torch.Generator().manual_seed(9)))
        assert len(got) == len(expected) == 8  # 240 molecules: the last batch is partial
        for want, have in zip(expected, got):
            for key in ("z", "pos", "y", "edge_index", "batch", "ptr", "mol_id", "idx"):
                assert want[key].dtype == have[key].dtype and torch.equal(want[key], have[key]), key
            assert want.smiles == have.smiles and want.num_graphs == have.num_graphs


def test_the_sweep_driver_starts_without_importing_pytorch_geometric():
    # Every sweep's driver imports study.data.qm9 and builds no graph; importing PyG would add
    # about 0.8 s of CPU to the start of every sweep. The trials import it where they batch.
    assert modules_of_package_imported_by(["study.sweep.driver"], "torch_geometric") == []
