"""RDKit descriptors of test molecules from their SMILES, cached on disk by SMILES.

Columns (per molecule, counted over heavy atoms; hydrogens are implicit in QM9's SMILES):

| column | meaning |
|---|---|
| ``sps`` | spacial score (RDKit ``SpacialScore.SPS``, not normalised) |
| ``nsps`` | size-normalised spacial score (SPS / heavy atoms): the paper's colour of molecular complexity |
| ``stereo_centers`` | potential tetrahedral stereo centres (assigned or not) |
| ``stereo_bonds`` | double bonds that could carry E/Z stereo |
| ``sp``, ``sp2``, ``sp3`` | atoms of each hybridization |
| ``aromatic`` | aromatic atoms |
| ``heavy_neighbours`` | mean number of heavy-atom neighbours of a heavy atom |
| ``heavy_atoms`` | heavy-atom count |
| ``rings`` | ring count (SSSR) |

A SMILES RDKit cannot parse gives NaN in every column rather than stopping the analysis.
The cache is one ``.npz`` (format version in its name) holding the SMILES and every column; new
SMILES are computed and merged in, and the file is replaced atomically.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

DESCRIPTOR_VERSION = 1
CACHE_NAME = f"descriptors-v{DESCRIPTOR_VERSION}.npz"
COLUMNS = (
    "sps",
    "nsps",
    "stereo_centers",
    "stereo_bonds",
    "sp",
    "sp2",
    "sp3",
    "aromatic",
    "heavy_neighbours",
    "heavy_atoms",
    "rings",
)


def describe(smiles: str) -> dict[str, float]:
    """Every descriptor of one molecule; NaN everywhere if RDKit cannot parse the SMILES."""
    from rdkit import Chem, RDLogger
    from rdkit.Chem import SpacialScore

    RDLogger.DisableLog("rdApp.*")  # QM9 has a few strained SMILES RDKit warns about; NaN says enough
    mol = Chem.MolFromSmiles(smiles)
    if mol is None or mol.GetNumAtoms() == 0:
        return {name: float("nan") for name in COLUMNS}
    heavy = [atom for atom in mol.GetAtoms() if atom.GetAtomicNum() > 1]
    hybridization = [atom.GetHybridization() for atom in heavy]
    stereo = Chem.FindPotentialStereo(mol)
    return {
        "sps": float(SpacialScore.SPS(mol, normalize=False)),
        "nsps": float(SpacialScore.SPS(mol, normalize=True)),
        "stereo_centers": float(sum(info.type == Chem.StereoType.Atom_Tetrahedral for info in stereo)),
        "stereo_bonds": float(sum(info.type == Chem.StereoType.Bond_Double for info in stereo)),
        "sp": float(hybridization.count(Chem.HybridizationType.SP)),
        "sp2": float(hybridization.count(Chem.HybridizationType.SP2)),
        "sp3": float(hybridization.count(Chem.HybridizationType.SP3)),
        "aromatic": float(sum(atom.GetIsAromatic() for atom in heavy)),
        "heavy_neighbours": float(np.mean([sum(n.GetAtomicNum() > 1 for n in atom.GetNeighbors()) for atom in heavy]) if heavy else 0.0),
        "heavy_atoms": float(len(heavy)),
        "rings": float(mol.GetRingInfo().NumRings()),
    }


def _read_cache(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            if set(COLUMNS) | {"smiles"} <= set(data.files):
                return {key: data[key] for key in ("smiles", *COLUMNS)}
    except (OSError, ValueError):
        pass  # a missing or damaged cache is rebuilt; it only ever saves time
    return {}


def _write_cache(path: Path, table: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Unique temp name: two analyses may share the cache; the last replace wins, both are complete.
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **table)
    os.replace(tmp, path)


def default_cache_dir() -> Path:
    from study.data.cache import default_cache_dir as qm9_cache_dir

    return Path(qm9_cache_dir()) / "descriptors"


def descriptors(smiles: Sequence[str], cache_dir: Path | None = None) -> pd.DataFrame:
    """One row per SMILES (input order, duplicates allowed), the columns of the module docstring."""
    smiles = [str(s) for s in smiles]
    path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / CACHE_NAME
    cached = _read_cache(path)
    known: dict[str, int] = {s: k for k, s in enumerate(cached.get("smiles", np.asarray([], dtype=str)).tolist())}
    missing = sorted({s for s in smiles if s not in known})
    if missing:
        rows = [describe(s) for s in missing]
        new = {"smiles": np.asarray(missing, dtype=str)}
        new.update({name: np.asarray([row[name] for row in rows], dtype=np.float64) for name in COLUMNS})
        if cached:
            cached = {key: np.concatenate([cached[key], new[key]]) for key in new}
        else:
            cached = new
        try:
            _write_cache(path, cached)
        except OSError:
            pass  # a read-only cache folder costs recomputation next time, not the analysis
        known = {s: k for k, s in enumerate(cached["smiles"].tolist())}
    order = np.asarray([known[s] for s in smiles], dtype=np.int64)
    frame = pd.DataFrame({name: cached[name][order] for name in COLUMNS})
    frame.insert(0, "smiles", smiles)
    return frame
