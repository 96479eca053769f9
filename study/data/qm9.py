"""QM9 from the `qm9pack` package: parsed once, cached on disk, served as PyG graphs.

Targets follow PyTorch Geometric's QM9 layout and units (index 12 is the U0 atomization energy
in eV). Geometry is in Angstrom. Two kinds of edges are built per molecule, without torch-cluster:
covalent bonds perceived from the geometry, and a radius graph within each molecule.

Cache format: one `torch.save` file holding plain tensors and the SMILES list, loaded with
`weights_only=True`, plus a JSON sidecar with the format version, a fingerprint of the source CSVs
and the SHA-256 of the tensor file. A cache whose checksum, version or source does not match is
rebuilt, with a message saying why.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from study.config.targets import TARGETS
from study.data.cache import (
    CACHE_FILE,
    CACHE_FORMAT_VERSION,
    CACHE_META_FILE,
    default_cache_dir,
)
from study.errors import UserError
from study.paths import atomic_write

if TYPE_CHECKING:  # PyG is imported where a graph is built: a sweep's driver builds none, and
    # importing PyG cost it about 0.8 s of CPU at every start (docs/development.md).
    from torch_geometric.data import Batch, Data

SOURCE_FILES = ("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv")
NUM_MOLECULES = 130_831

HARTREE_TO_EV = 27.211386246

# (qm9pack column, factor to PyG units) for every target that is a plain unit conversion.
_DIRECT_COLUMNS = {
    "mu": ("Dipole_debye", 1.0),
    "alpha": ("Polarizability_bohr3", 1.0),
    "homo": ("HOMO_au", HARTREE_TO_EV),
    "lumo": ("LUMO_au", HARTREE_TO_EV),
    "gap": ("HOMO_LUMO_gap_au", HARTREE_TO_EV),
    "r2": ("R2_bohr2", 1.0),
    "zpve": ("ZPVE_au", HARTREE_TO_EV),
    "U0": ("InternalEnergy_0K_au", HARTREE_TO_EV),
    "U": ("InternalEnergy_298K_au", HARTREE_TO_EV),
    "H": ("Enthalphy_298K_au", HARTREE_TO_EV),
    "G": ("GibbsFreeEnergy_298K_au", HARTREE_TO_EV),
    "cv": ("Heatcapacity_Cv_cal_mol_K", 1.0),
    "A": ("RotA_GHz", 1.0),
    "B": ("RotB_GHz", 1.0),
    "C": ("RotC_GHz", 1.0),
}

# B3LYP/6-31G(2df,p) energies of the free atoms (Hartree), QM9's atomref table (docs/science.md).
ATOMIC_NUMBERS = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}
ATOM_REFERENCES_HARTREE = {
    # element: (U0, U at 298 K, H at 298 K, G at 298 K)
    "H": (-0.500273, -0.498857, -0.497912, -0.510927),
    "C": (-37.846772, -37.845355, -37.844411, -37.861317),
    "N": (-54.583861, -54.582445, -54.581501, -54.598897),
    "O": (-75.064579, -75.063163, -75.062219, -75.079532),
    "F": (-99.718730, -99.717314, -99.716370, -99.733544),
}
_ATOMIZATION = (("U0_atom", "U0"), ("U_atom", "U"), ("H_atom", "H"), ("G_atom", "G"))


class DataError(UserError):
    """The QM9 source or cache cannot be used."""


def target_index(name: str) -> int:
    """Column of a target in `y`, by its PyG name (e.g. "U0_atom" -> 12)."""
    try:
        return TARGETS.index(name)
    except ValueError:
        raise DataError(f"unknown target {name!r}; choose one of {', '.join(TARGETS)}") from None


def qm9pack_data_dir() -> Path:
    # Importing qm9pack itself fails on new environments (it imports pkg_resources), so only locate it.
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the qm9pack package is not installed; run: pip install qm9pack")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


@dataclasses.dataclass(frozen=True)
class QM9Tensors:
    """All molecules, concatenated. Molecule k owns atoms atom_ptr[k]:atom_ptr[k+1] and
    bonds bond_ptr[k]:bond_ptr[k+1]; bond atom numbers are local to their molecule."""

    z: torch.Tensor  # [A] int64 atomic numbers
    pos: torch.Tensor  # [A, 3] float32, Angstrom
    atom_ptr: torch.Tensor  # [M + 1] int64
    bonds: torch.Tensor  # [2, B] int64, each covalent bond once, local atom numbers
    bond_ptr: torch.Tensor  # [M + 1] int64
    y: torch.Tensor  # [M, 19] float64, PyG target order and units
    mol_id: torch.Tensor  # [M] int64, QM9's molecule index (gdb id)
    smiles: list[str]

    def __len__(self) -> int:
        return int(self.mol_id.shape[0])

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


# ---------------------------------------------------------------------------- parsing the source


def _split_numbers(strings: Sequence[str], dtype) -> np.ndarray:
    # One vectorised parse of all "[[x,y,z],...]" strings instead of 130k literal_evals.
    text = " ".join(strings).translate(str.maketrans("[],'", "    "))
    return np.array(text.split(), dtype=dtype)


# Covalent radii (Angstrom, Cordero et al. 2008) and the largest number of bonds each element
# makes in QM9 (N reaches 4 in its ammonium zwitterions).
COVALENT_RADIUS = {1: 0.31, 6: 0.76, 7: 0.71, 8: 0.66, 9: 0.57}
MAX_BONDS = {1: 1, 6: 4, 7: 4, 8: 2, 9: 1}
BOND_TOLERANCE = 0.45  # Angstrom added to the sum of covalent radii


def perceive_bonds(z: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Covalent bonds [2, B] (i < j) of one molecule from its geometry.

    The connect-the-dots rule of Open Babel: a bond wherever two atoms are closer than the sum of
    their covalent radii plus 0.45 A; then, while an atom has more bonds than its element allows,
    its longest bond goes. The second step removes the 1.8-2.0 A transannular contacts of strained
    cages (bicyclo[1.1.1]pentanes and the like), which a distance rule alone takes for bonds. On
    QM9 the result is the graph of the molecule's SMILES for every sampled molecule
    (tests/unit/data/test_data.py measures it)."""
    radius = np.array([COVALENT_RADIUS[int(a)] for a in z])
    limit = np.array([MAX_BONDS[int(a)] for a in z])
    distance = np.linalg.norm(positions[:, None, :] - positions[None, :, :], axis=-1)
    bonded = (distance < radius[:, None] + radius[None, :] + BOND_TOLERANCE) & ~np.eye(len(z), dtype=bool)
    while True:
        over = np.nonzero(bonded.sum(axis=1) > limit)[0]
        if len(over) == 0:
            break
        bond_lengths = np.where(bonded[over], distance[over], 0.0)
        atom = over[np.argmax(bond_lengths.max(axis=1))]
        partner = np.argmax(np.where(bonded[atom], distance[atom], 0.0))
        bonded[atom, partner] = bonded[partner, atom] = False
    return np.stack(np.nonzero(np.triu(bonded))).astype(np.int64)


def _read_source(source_dir: Path, log: Callable[[str], None]) -> QM9Tensors:
    import pandas as pd

    paths = [source_dir / name for name in SOURCE_FILES if (source_dir / name).exists()]
    if not paths:
        raise DataError(f"{source_dir}: no QM9 CSV files ({', '.join(SOURCE_FILES)})")
    wanted = {"Index", "SMILES", "N_atoms", "Elements", "XYZ_Ang", *(c for c, _ in _DIRECT_COLUMNS.values())}
    try:
        frame = pd.concat([pd.read_csv(p, usecols=lambda c: c in wanted) for p in paths], ignore_index=True)
    except (ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"{source_dir}: cannot read the QM9 CSV files: {exc}") from None
    missing = wanted - set(frame.columns)
    if missing:
        raise DataError(f"{source_dir}: QM9 CSV lacks columns {sorted(missing)}")
    frame = frame.sort_values("Index", kind="stable").reset_index(drop=True)

    num_atoms = frame["N_atoms"].to_numpy(np.int64)
    elements = _split_numbers(frame["Elements"].tolist(), str)
    positions = _split_numbers(frame["XYZ_Ang"].tolist(), np.float64).reshape(-1, 3)
    if len(elements) != num_atoms.sum() or len(positions) != num_atoms.sum():
        raise DataError(f"{source_dir}: element or coordinate lists disagree with N_atoms")
    unknown = set(elements) - set(ATOMIC_NUMBERS)
    if unknown:
        raise DataError(f"{source_dir}: unexpected elements {sorted(unknown)}")
    atom_ptr = np.concatenate([[0], np.cumsum(num_atoms)])

    y = np.zeros((len(frame), len(TARGETS)), dtype=np.float64)
    for name, (column, factor) in _DIRECT_COLUMNS.items():
        y[:, target_index(name)] = frame[column].to_numpy(np.float64) * factor
    # Atomization energies: molecular energy minus the free atoms' energies, per atom type.
    counts = np.zeros((len(frame), len(ATOMIC_NUMBERS)), dtype=np.float64)
    element_column = {element: k for k, element in enumerate(ATOMIC_NUMBERS)}
    molecule_of_atom = np.repeat(np.arange(len(frame)), num_atoms)
    np.add.at(counts, (molecule_of_atom, np.array([element_column[e] for e in elements])), 1.0)
    references = np.array([ATOM_REFERENCES_HARTREE[e] for e in ATOMIC_NUMBERS])  # [5 elements, 4 energies]
    atom_sums = counts @ references * HARTREE_TO_EV
    for k, (atomized, total) in enumerate(_ATOMIZATION):
        y[:, target_index(atomized)] = y[:, target_index(total)] - atom_sums[:, k]

    log(f"perceiving covalent bonds of {len(frame)} molecules")
    atomic_numbers = np.array([ATOMIC_NUMBERS[e] for e in elements], dtype=np.int64)
    bonds, bond_counts = [], np.zeros(len(frame), dtype=np.int64)
    for m in range(len(frame)):
        start, stop = atom_ptr[m], atom_ptr[m + 1]
        pairs = perceive_bonds(atomic_numbers[start:stop], positions[start:stop])
        bonds.append(pairs)
        bond_counts[m] = pairs.shape[1]
    bond_ptr = np.concatenate([[0], np.cumsum(bond_counts)])

    return QM9Tensors(
        z=torch.as_tensor(atomic_numbers),
        pos=torch.as_tensor(positions, dtype=torch.float32),
        atom_ptr=torch.as_tensor(atom_ptr, dtype=torch.int64),
        bonds=torch.as_tensor(np.concatenate(bonds, axis=1), dtype=torch.int64),
        bond_ptr=torch.as_tensor(bond_ptr, dtype=torch.int64),
        y=torch.as_tensor(y, dtype=torch.float64),
        mol_id=torch.tensor(frame["Index"].to_numpy(np.int64)),
        smiles=[str(s) for s in frame["SMILES"].tolist()],
    )


# ---------------------------------------------------------------------------- the cache


def _source_fingerprint(source_dir: Path) -> list[dict]:
    # Name, size and modification time: enough to notice a changed or reinstalled source.
    fingerprint = []
    for name in SOURCE_FILES:
        path = source_dir / name
        if path.exists():
            stat = path.stat()
            fingerprint.append({"name": name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return fingerprint


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _cache_problem(cache_dir: Path, source_dir: Path) -> str | None:
    """Why the cache cannot be used (None: it can)."""
    data_path, meta_path = cache_dir / CACHE_FILE, cache_dir / CACHE_META_FILE
    if not data_path.exists() or not meta_path.exists():
        return "no cache yet"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return "cache metadata is unreadable"
    if not isinstance(meta, dict) or meta.get("format_version") != CACHE_FORMAT_VERSION:
        return "cache has another format version"
    if meta.get("source") != _source_fingerprint(source_dir):
        return "cache is stale: the qm9pack source files changed"
    if meta.get("sha256") != _sha256(data_path):
        return "cache is corrupt: checksum mismatch"
    return None


def _save_cache(tensors: QM9Tensors, cache_dir: Path, source_dir: Path) -> None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    data_path = cache_dir / CACHE_FILE
    atomic_write(data_path, lambda p: torch.save(tensors.to_dict(), p))
    meta = {
        "format_version": CACHE_FORMAT_VERSION,
        "source": _source_fingerprint(source_dir),
        "sha256": _sha256(data_path),
        "molecules": len(tensors),
    }
    atomic_write(cache_dir / CACHE_META_FILE, lambda p: p.write_text(json.dumps(meta, indent=2)))


def load_qm9(
    cache_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
    source_dir: str | Path | None = None,
) -> QM9Tensors:
    """All QM9 molecules; parsed from qm9pack on first use (about a minute), then read from the cache."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    source_dir = Path(source_dir) if source_dir is not None else qm9pack_data_dir()
    problem = _cache_problem(cache_dir, source_dir)
    if problem is None:
        try:
            return QM9Tensors(**torch.load(cache_dir / CACHE_FILE, weights_only=True))
        except Exception as exc:  # checksum matched but unpickling failed: treat as corrupt
            problem = f"cache is unreadable ({type(exc).__name__})"
    if problem != "no cache yet":
        log(f"{cache_dir / CACHE_FILE}: {problem}; rebuilding")
    started = time.perf_counter()
    log(f"processing QM9 from {source_dir} (once; cached in {cache_dir})")
    tensors = _read_source(source_dir, log)
    try:
        _save_cache(tensors, cache_dir, source_dir)
    except OSError as exc:
        raise DataError(f"{cache_dir}: cannot write the QM9 cache: {exc.strerror or exc}") from None
    log(f"processed {len(tensors)} molecules in {time.perf_counter() - started:.1f} s")
    return tensors


# ---------------------------------------------------------------------------- edges and graphs


def bond_edges(tensors: QM9Tensors, molecule: int) -> torch.Tensor:
    """Directed edges [2, 2B] of the covalent bonds of one molecule (both directions)."""
    pairs = tensors.bonds[:, tensors.bond_ptr[molecule] : tensors.bond_ptr[molecule + 1]]
    return torch.cat([pairs, pairs.flip(0)], dim=1)


def radius_edges(pos: torch.Tensor, cutoff: float) -> torch.Tensor:
    """Directed edges [2, E] between distinct atoms of one molecule closer than `cutoff` Angstrom."""
    distance = torch.cdist(pos.double(), pos.double())
    close = (distance < cutoff) & ~torch.eye(len(pos), dtype=torch.bool)
    return close.nonzero().T.contiguous()


class QM9Dataset(torch.utils.data.Dataset):
    """The molecules `indices` of `tensors` as PyG `Data` graphs with the chosen edges.

    Each graph carries z, pos [n, 3], y [1, 19] (float32), edge_index (row 0 source, row 1
    destination), mol_id (QM9 index), smiles and idx (position in the full dataset)."""

    def __init__(self, tensors: QM9Tensors, indices: Sequence[int], edges: str = "bonds", cutoff: float = 6.0):
        if edges not in ("bonds", "radius"):
            raise ValueError(f"edges must be 'bonds' or 'radius', got {edges!r}")
        self.tensors = tensors
        self.indices = np.asarray(indices, dtype=np.int64)
        self.edges = edges
        self.cutoff = cutoff

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> Data:
        from torch_geometric.data import Data

        t, molecule = self.tensors, int(self.indices[item])
        start, stop = int(t.atom_ptr[molecule]), int(t.atom_ptr[molecule + 1])
        pos = t.pos[start:stop]
        if self.edges == "bonds":
            edge_index = bond_edges(t, molecule)
        else:
            edge_index = radius_edges(pos, self.cutoff)
        return Data(
            z=t.z[start:stop],
            pos=pos,
            y=t.y[molecule].to(torch.float32).unsqueeze(0),
            edge_index=edge_index,
            mol_id=int(t.mol_id[molecule]),
            smiles=t.smiles[molecule],
            idx=molecule,
        )


def _concatenated_ranges(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``cat([arange(s, s + n) for s, n in zip(starts, lengths)])``, without the loop."""
    first_of_range = torch.cumsum(lengths, 0) - lengths
    return torch.repeat_interleave(starts - first_of_range, lengths) + torch.arange(int(lengths.sum()))


def _bond_edges(tensors: QM9Tensors, molecules: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`bond_edges` of every molecule, concatenated ([2, E], local atom numbers), and the
    number of edges of each: a molecule's B bonds, then the same B reversed."""
    first_bond = tensors.bond_ptr[molecules]
    num_bonds = tensors.bond_ptr[molecules + 1] - first_bond
    num_edges = 2 * num_bonds
    slot = _concatenated_ranges(torch.zeros_like(num_edges), num_edges)  # edge's position in its molecule
    bonds_of_edge = torch.repeat_interleave(num_bonds, num_edges)
    reversed_edge = slot >= bonds_of_edge
    edges = tensors.bonds[:, torch.repeat_interleave(first_bond, num_edges) + slot - reversed_edge * bonds_of_edge]
    edges = torch.where(reversed_edge, edges.flip(0), edges)
    return edges, num_edges


class CollatedSplit:
    """A :class:`QM9Dataset` collated once into flat tensors, served as PyG batches.

    The PyG DataLoader builds every batch from per-molecule ``Data`` objects (about 8,000
    molecules/s on one core, slower than a small model trains on a GPU). Here the split's atoms,
    edges and targets are concatenated once and each batch is a handful of vectorised gathers,
    then moved to ``device``. (Gathering on the GPU itself measured slower on an H200, 9,700
    molecules/s: each batch's sizes need a few device-to-host synchronisations.) The batches are
    exactly the DataLoader's: the same molecule order (the same ``RandomSampler`` draw from the
    same generator) and the same fields, dtypes and edge order (z, pos, y, edge_index, batch,
    ptr, mol_id, idx, smiles).
    """

    def __init__(self, dataset: torch.utils.data.Dataset, device: torch.device | str = "cpu") -> None:
        if isinstance(dataset, QM9Dataset):
            self._gather(dataset)
        else:  # any dataset of PyG graphs with these fields (e.g. rotated copies of molecules)
            self._collate([dataset[item] for item in range(len(dataset))])
        self.atom_start = torch.cumsum(self.num_atoms, 0) - self.num_atoms
        self.edge_start = torch.cumsum(self.num_edges, 0) - self.num_edges
        self.device = torch.device(device)

    def _gather(self, dataset: QM9Dataset) -> None:
        """From the dataset's concatenated tensors, never through per-molecule Data objects (those
        cost 0.15 ms a molecule: a quarter of a small quick-study trial)."""
        t = dataset.tensors
        molecules = torch.as_tensor(dataset.indices, dtype=torch.int64)
        self.num_atoms = t.atom_ptr[molecules + 1] - t.atom_ptr[molecules]
        atoms = _concatenated_ranges(t.atom_ptr[molecules], self.num_atoms)
        self.z = t.z[atoms]
        self.pos = t.pos[atoms]
        if dataset.edges == "bonds":
            self.local_edges, self.num_edges = _bond_edges(t, molecules)
        else:  # radius edges depend on each molecule's geometry: computed per molecule, as the dataset does
            per_molecule = [radius_edges(pos, dataset.cutoff) for pos in torch.split(self.pos, self.num_atoms.tolist())]
            self.num_edges = torch.tensor([e.shape[1] for e in per_molecule], dtype=torch.int64)
            self.local_edges = torch.cat(per_molecule, dim=1) if per_molecule else torch.zeros(2, 0, dtype=torch.int64)
        self.y = t.y[molecules].to(torch.float32)
        self.mol_id = t.mol_id[molecules].to(torch.int64)
        self.idx = molecules
        self.smiles = [t.smiles[m] for m in dataset.indices.tolist()]

    def _collate(self, graphs: list[Data]) -> None:
        self.num_atoms = torch.tensor([g.num_nodes for g in graphs], dtype=torch.int64)
        self.num_edges = torch.tensor([g.edge_index.shape[1] for g in graphs], dtype=torch.int64)
        self.z = torch.cat([g.z for g in graphs]) if graphs else torch.zeros(0, dtype=torch.int64)
        self.pos = torch.cat([g.pos for g in graphs]) if graphs else torch.zeros(0, 3)
        self.local_edges = torch.cat([g.edge_index for g in graphs], dim=1) if graphs else torch.zeros(2, 0, dtype=torch.int64)
        self.y = torch.cat([g.y for g in graphs]) if graphs else torch.zeros(0, len(TARGETS))
        self.mol_id = torch.tensor([g.mol_id for g in graphs], dtype=torch.int64)
        self.idx = torch.tensor([g.idx for g in graphs], dtype=torch.int64)
        self.smiles = [g.smiles for g in graphs]

    def __len__(self) -> int:
        return len(self.smiles)

    def batches(self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None):
        """Batches of ``batch_size`` molecules, as ``DataLoader(dataset, batch_size, shuffle, generator=...)``."""
        # torch's own DataLoader over the positions draws the molecule order, so it is the PyG
        # DataLoader's draw (its sampler and its use of the generator) by construction.
        positions = torch.utils.data.DataLoader(range(len(self)), batch_size=batch_size, shuffle=shuffle, generator=generator)
        for molecules in positions:
            yield self.batch(molecules)

    def batch(self, molecules: Sequence[int] | torch.Tensor) -> Batch:
        """The PyG batch of these molecules (positions in the split), in this order."""
        from torch_geometric.data import Batch

        index = torch.as_tensor(molecules, dtype=torch.int64)
        num_graphs = len(index)
        graph = torch.arange(num_graphs)
        atoms_per_graph = self.num_atoms[index]
        edges_per_graph = self.num_edges[index]
        ptr = torch.zeros(num_graphs + 1, dtype=torch.int64)
        ptr[1:] = torch.cumsum(atoms_per_graph, 0)
        atom_graph = torch.repeat_interleave(graph, atoms_per_graph)
        atoms = _concatenated_ranges(self.atom_start[index], atoms_per_graph)
        edge_graph = torch.repeat_interleave(graph, edges_per_graph)
        edges = _concatenated_ranges(self.edge_start[index], edges_per_graph)
        # Local atom numbers plus the graph's first atom in the batch, as PyG's collate increments them.
        edge_index = self.local_edges[:, edges] + ptr[edge_graph]
        batch = Batch(
            z=self.z[atoms],
            pos=self.pos[atoms],
            y=self.y[index],
            edge_index=edge_index,
            batch=atom_graph,
            ptr=ptr,
            mol_id=self.mol_id[index],
            idx=self.idx[index],
            smiles=[self.smiles[k] for k in index.tolist()],
        )
        batch._num_graphs = num_graphs
        return batch if self.device.type == "cpu" else batch.to(self.device)


# ---------------------------------------------------------------------------- splits and statistics


def split_indices(
    num: int,
    seed: int,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    sizes: tuple[int, int, int] | None = None,
    subset: int | None = None,
) -> dict[str, np.ndarray]:
    """Seeded train/val/test molecule indices, identical on every machine for the same arguments.

    One permutation of all molecules is drawn from `seed`; `subset` keeps its first `subset`
    entries (so smaller subsets are nested in larger ones); the splits are consecutive pieces of
    what remains, of absolute `sizes` if given, else of `fractions` of it."""
    if subset is not None:
        if subset <= 0 or subset > num:
            raise ValueError(f"subset must be between 1 and {num}, got {subset}")
    pool = np.random.default_rng(seed).permutation(num)[: subset or num]
    if sizes is not None:
        if any(s < 0 for s in sizes):
            raise ValueError(f"split sizes must be non-negative, got {sizes}")
        if sum(sizes) > len(pool):
            raise ValueError(f"split sizes {list(sizes)} need {sum(sizes)} molecules, only {len(pool)} available")
        counts = list(sizes)
    else:
        if any(f < 0 for f in fractions) or sum(fractions) > 1 + 1e-9:
            raise ValueError(f"split fractions must be non-negative and sum to <= 1, got {list(fractions)}")
        counts = [int(f * len(pool)) for f in fractions]
        if abs(sum(fractions) - 1) < 1e-9:
            counts[2] = len(pool) - counts[0] - counts[1]  # whole pool used: the remainder goes to test
    bounds = np.cumsum([0, *counts])
    return {name: pool[bounds[k] : bounds[k + 1]] for k, name in enumerate(("train", "val", "test"))}


def target_stats(tensors: QM9Tensors, target: str, indices: Sequence[int] | None = None) -> dict:
    values = tensors.y[:, target_index(target)]
    if indices is not None:
        values = values[torch.as_tensor(np.asarray(indices, dtype=np.int64))]
    return {
        "count": int(values.numel()),
        "mean": float(values.mean()),
        "std": float(values.std()),
        "min": float(values.min()),
        "max": float(values.max()),
    }
