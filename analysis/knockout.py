"""Functional use of each irrep block: how much worse the test error gets when the block is zeroed.

Two knockouts per block, both from the trial's own weights, on the same test molecules:

- ``all`` layers: the block's slice is zeroed in the output of the input block and of every
  residual block. By induction every hidden feature then has the slice at zero (x_0 = 0 in the
  slice; x_{k+1} = block(x_k) + x_k is a sum of two zeros there), so neither the readout nor any
  tensor-product path downstream ever sees the block.
- ``last`` layer only: the slice is zeroed in the features the readout receives (a pre-hook on
  the readout), after the last block. The readout is an equivariant linear map to 1x0e, so an
  l >= 1 block cannot reach it: its ``last`` knockout must change nothing. A non-zero value there
  would reveal a bug in the slicing or in the model.

The score is the increase of the test MAE in meV (knocked-out MAE minus the unmodified MAE that
the same code computes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from analysis.features import AnalysisBlock, analysis_blocks
from study.data import CollatedSplit
from study.errors import UserError
from study.irreps import IrrepBlock
from study.model import IrrepConvModel
from study.reference import TargetReference

EVAL_BATCH_SIZE = 128
WHERE = ("all", "last")


class KnockoutError(UserError):
    """The model does not have the structure the knockout hooks need."""


def _slices_zeroed(tensor: torch.Tensor, members: Sequence[IrrepBlock]) -> torch.Tensor:
    # Out of place: the model keeps the un-zeroed tensor for its residual sums otherwise.
    tensor = tensor.clone()
    for block in members:
        tensor[..., block.start : block.stop] = 0
    return tensor


@contextmanager
def zeroed(model: IrrepConvModel, members: Sequence[IrrepBlock], where: str) -> Iterator[None]:
    """Within the block, ``model`` runs with the ``members`` slices zeroed (``where`` = all | last)."""
    for name in ("input_block", "blocks", "readout"):
        if not hasattr(model, name):
            raise KnockoutError(f"model {type(model).__name__} has no {name!r}; knockouts need the reference structure")
    handles = []
    try:
        if where == "all":
            for module in [model.input_block, *model.blocks]:
                handles.append(module.register_forward_hook(lambda _m, _i, out: _slices_zeroed(out, members)))
        elif where == "last":
            handles.append(
                model.readout.register_forward_pre_hook(
                    lambda _m, args: (_slices_zeroed(args[0], members), *args[1:])
                )
            )
        else:
            raise ValueError(f"where must be one of {WHERE}, got {where!r}")
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def predictions(model: IrrepConvModel, split: CollatedSplit, reference: TargetReference, dtype: torch.dtype) -> np.ndarray:
    """The model's predictions in the target's unit (made absolute by its reference), in dataset order."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for batch in split.batches(EVAL_BATCH_SIZE):
        batch = batch.to(device)
        batch.pos = batch.pos.to(dtype)
        out.append(reference.absolute(model(batch), batch).cpu().numpy())
    return np.concatenate(out)


@dataclass
class KnockoutResult:
    baseline_mae_meV: float
    baseline: np.ndarray  # unmodified predictions
    deltas: dict[str, dict[str, float]]  # block name -> {"knockout_all_meV": ..., "knockout_last_meV": ...}
    predictions: dict[tuple[str, str], np.ndarray]  # (block, where) -> predictions (for inspection)


def knockout_scores(
    model: IrrepConvModel,
    dataset,
    targets: np.ndarray,
    reference: TargetReference,
    dtype: torch.dtype = torch.float32,
    units: Sequence[AnalysisBlock] | None = None,
    on_step: Callable[[str], None] | None = None,
) -> KnockoutResult:
    """Increase of the MAE (meV, thousandths of the target unit) when each block is zeroed."""
    targets = np.asarray(targets, dtype=np.float64)
    units = list(units) if units is not None else analysis_blocks(model.layout)
    # Collated once, on the model's device: every knockout below is one more pass over it.
    split = CollatedSplit(dataset, next(model.parameters()).device)
    baseline = predictions(model, split, reference, dtype)
    baseline_mae = float(np.abs(baseline - targets).mean() * 1000.0)
    deltas: dict[str, dict[str, float]] = {}
    kept: dict[tuple[str, str], np.ndarray] = {}
    for unit in units:
        deltas[unit.name] = {}
        for where in WHERE:
            if on_step is not None:
                on_step(f"{unit.name}/{where}")
            with zeroed(model, unit.members, where):
                knocked = predictions(model, split, reference, dtype)
            kept[(unit.name, where)] = knocked
            deltas[unit.name][f"knockout_{where}_meV"] = float(np.abs(knocked - targets).mean() * 1000.0) - baseline_mae
    return KnockoutResult(baseline_mae_meV=baseline_mae, baseline=baseline, deltas=deltas, predictions=kept)


def trial_knockout(trial, tensors, rows: np.ndarray | None = None, on_step: Callable[[str], None] | None = None) -> KnockoutResult:
    """Knockouts of a loaded :class:`analysis.load.Trial` on its test split (or the ``rows`` of it).

    The model is rebuilt from the trial's config and its ``best_model.pt``; the test split is
    rebuilt with the trial's own split settings and checked against the logged embeddings, so the
    knockouts are measured on exactly the molecules whose embeddings were scored.
    """
    from analysis.load import AnalysisError
    from study.data import QM9Dataset
    from study.train import build_model, model_dtype, prepare_data, select_device

    config = trial.config
    data = prepare_data(config, tensors)
    test_indices = np.asarray(data.test.indices)
    if not np.array_equal(test_indices, trial.embeddings.dataset_index):
        raise AnalysisError(
            f"trial run {trial.run_id}: the rebuilt test split does not match its logged embeddings "
            "(was QM9 processed differently?)"
        )
    targets = trial.embeddings.target
    if rows is not None:
        test_indices, targets = test_indices[rows], targets[rows]
    dataset = QM9Dataset(tensors, test_indices, edges=config.edges, cutoff=config.cutoff)
    dtype = model_dtype(config)
    try:
        state = torch.load(trial.weights_path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise AnalysisError(f"trial run {trial.run_id}: {trial.weights_path.name} is unreadable ({type(exc).__name__})") from None
    model = build_model(config)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise AnalysisError(
            f"trial run {trial.run_id}: {trial.weights_path.name} does not fit the model of its config ({str(exc).splitlines()[0]})"
        ) from None
    model = model.to(device=select_device("auto"), dtype=dtype)
    # The reference the trial trained against travels in its embeddings artifact.
    return knockout_scores(model, dataset, targets, trial.embeddings.reference, dtype, on_step=on_step)
