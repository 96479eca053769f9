"""The test-set embeddings artifact: what every trial hands to analysis.

Format "irrep-study/embeddings", version 2: one NumPy ``.npz`` file (no pickled objects) with

| array | shape | meaning |
|---|---|---|
| ``meta`` | () str | JSON: format, version, target name, ``layout``, block names, ``reference`` (below) |
| ``mol_id`` | [N] int64 | QM9 molecule index |
| ``dataset_index`` | [N] int64 | position in the processed dataset |
| ``smiles`` | [N] str | SMILES of the molecule |
| ``target`` | [N] float64 | true target, in the target's unit (eV for energies) |
| ``prediction`` | [N] float64 | the model's prediction, same unit |
| ``composition_baseline`` | [N] float64 | the composition fit's prediction (least squares on element counts, training split), same unit |
| ``graph`` | [N, D] float32 | sum over atoms of the last block's node features (the paper's graph embedding) |
| ``graph_per_block`` | [B, N, D] float32 | the same sum after each block: input block, then the residual blocks |

``layout`` is ``IrrepsLayout.to_dict``; ``reference`` is the target reference the model trained
against (``TargetReference.to_dict``: prediction = baseline + scale x model output).
Slice any ``D`` axis per order with the layout: block l spans (2l+1) x multiplicity dims.
Version 1 (before target references) lacks ``reference`` and ``composition_baseline``; it is
refused with a message that names the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from study.data.qm9 import CollatedSplit
from study.data.reference import TargetReference
from study.errors import UserError
from study.nn.irreps import IrrepsLayout
from study.nn.model import evaluation_pass
from study.paths import atomic_write

FORMAT_NAME = "irrep-study/embeddings"
FORMAT_VERSION = 2


class EmbeddingsFormatError(UserError):
    """An embeddings file that is not ours, or of a version this code cannot read."""


@dataclass
class TestEmbeddings:
    mol_id: np.ndarray
    dataset_index: np.ndarray
    smiles: np.ndarray
    target: np.ndarray
    prediction: np.ndarray
    graph: np.ndarray
    graph_per_block: np.ndarray
    layout: IrrepsLayout
    target_name: str
    reference: TargetReference
    composition_baseline: np.ndarray

    @property
    def block_names(self) -> list[str]:
        return ["input"] + [f"block_{k}" for k in range(1, self.graph_per_block.shape[0])]


@torch.no_grad()
def compute_embeddings(model, data, target_name: str, device: torch.device, dtype: torch.dtype, batch_size: int = 128) -> TestEmbeddings:
    """Graph embeddings of every test molecule of `data` (study.training.trial.TrialData), after every
    block, with predictions made absolute by the data's target reference, in dataset order."""
    per_block: list[list[np.ndarray]] = []
    mol_id, index, smiles, target, prediction = [], [], [], [], []
    batches = CollatedSplit(data.test, device).batches(batch_size)
    for batch, embedding, absolute in evaluation_pass(model, batches, device, dtype, data.reference):
        graph_index = batch.batch
        sums = []
        for features in embedding.node_features:
            pooled = torch.zeros(batch.num_graphs, features.shape[-1], dtype=features.dtype, device=features.device)
            sums.append(pooled.index_add(0, graph_index, features).float().cpu().numpy())
        per_block.append(sums)
        mol_id.append(batch.mol_id.cpu().numpy())
        index.append(batch.idx.cpu().numpy())
        smiles.extend(batch.smiles)
        target.append(batch.y[:, data.target_column].double().cpu().numpy())
        prediction.append(absolute.cpu().numpy())
    graph_per_block = np.stack([np.concatenate([b[k] for b in per_block]) for k in range(len(per_block[0]))])
    return TestEmbeddings(
        mol_id=np.concatenate(mol_id).astype(np.int64),
        dataset_index=np.concatenate(index).astype(np.int64),
        smiles=np.asarray(smiles, dtype=str),
        target=np.concatenate(target),
        prediction=np.concatenate(prediction),
        graph=graph_per_block[-1],
        graph_per_block=graph_per_block,
        layout=model.layout,
        target_name=target_name,
        reference=data.reference,
        composition_baseline=np.asarray(data.composition_test, dtype=np.float64),
    )


def save_embeddings(embeddings: TestEmbeddings, path: Path) -> None:
    meta = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "target": embeddings.target_name,
        "layout": embeddings.layout.to_dict(),
        "blocks": embeddings.block_names,
        "reference": embeddings.reference.to_dict(),
    }
    arrays = dict(
        meta=np.asarray(json.dumps(meta)),
        mol_id=embeddings.mol_id,
        dataset_index=embeddings.dataset_index,
        smiles=embeddings.smiles,
        target=embeddings.target,
        prediction=embeddings.prediction,
        composition_baseline=embeddings.composition_baseline,
        graph=embeddings.graph,
        graph_per_block=embeddings.graph_per_block,
    )

    def write(temporary: Path) -> None:
        # Through a file object: given a name, numpy would append ".npz" to the temporary's.
        with open(temporary, "wb") as handle:
            np.savez_compressed(handle, **arrays)

    atomic_write(path, write)


def load_embeddings(path: Path) -> TestEmbeddings:
    """Read an embeddings file; EmbeddingsFormatError names the file if it is not a readable version."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except FileNotFoundError:
        raise EmbeddingsFormatError(f"{path}: embeddings file not found") from None
    except Exception as exc:
        raise EmbeddingsFormatError(f"{path}: not a readable embeddings file ({type(exc).__name__})") from None
    try:
        meta = json.loads(str(arrays["meta"]))
    except (KeyError, ValueError):
        raise EmbeddingsFormatError(f"{path}: no format metadata; not an {FORMAT_NAME} file") from None
    if meta.get("format") != FORMAT_NAME:
        raise EmbeddingsFormatError(f"{path}: format {meta.get('format')!r} is not {FORMAT_NAME!r}")
    if meta.get("version") == 1:
        raise EmbeddingsFormatError(
            f"{path}: embeddings format version 1 predates target references (no composition baseline); retrain the trial to analyse it"
        )
    if meta.get("version") != FORMAT_VERSION:
        raise EmbeddingsFormatError(
            f"{path}: embeddings format version {meta.get('version')!r} is not supported (this code reads {FORMAT_VERSION})"
        )
    return TestEmbeddings(
        mol_id=arrays["mol_id"],
        dataset_index=arrays["dataset_index"],
        smiles=arrays["smiles"],
        target=arrays["target"],
        prediction=arrays["prediction"],
        graph=arrays["graph"],
        graph_per_block=arrays["graph_per_block"],
        layout=IrrepsLayout.from_dict(meta["layout"]),
        target_name=meta["target"],
        reference=TargetReference.from_dict(meta["reference"]),
        composition_baseline=arrays["composition_baseline"],
    )
