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

import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from analysis.scoring.features import AnalysisBlock, analysis_blocks
from study.data.qm9 import CollatedSplit
from study.data.reference import TargetReference
from study.errors import UserError
from study.nn.irreps import IrrepBlock
from study.nn.model import IrrepConvModel, evaluation_pass, to_device

EVAL_BATCH_SIZE = 128
WHERE = ("all", "last")
# Variants per pass through the blocks: as many as fit in this many floats of node features per
# atom. More variants share more of each edge's work but cost more memory traffic; measured (one
# thread, 256 molecules, hidden 16, 3 layers): [0,1,2,3] fastest with all 5 at once (1.05 s
# against 1.17-1.22 s four at a time), [0,3,4,5,6] (656 per variant) and [0..6] (784) four at a time
# (4.0-4.5 s against 5.3-5.4 s five at a time; 11.5 s against 13.0 s).
FEATURES_PER_PASS = 3200


class KnockoutError(UserError):
    """The model does not have the structure the knockout hooks need."""


def _slices_zeroed(tensor: torch.Tensor, members: Sequence[IrrepBlock]) -> torch.Tensor:
    # Out of place: the model keeps the un-zeroed tensor for its residual sums otherwise.
    tensor = tensor.clone()
    for block in members:
        tensor[..., block.start : block.stop] = 0
    return tensor


def _zeroed_per_variant(features: torch.Tensor, knocked_out: Sequence[Sequence[IrrepBlock]]) -> torch.Tensor:
    """``features`` ``[N, V, F]`` with variant v's ``knocked_out[v]`` slices zeroed (out of place)."""
    features = features.clone()
    for variant, members in enumerate(knocked_out):
        for block in members:
            features[:, variant, block.start : block.stop] = 0
    return features


def _check_structure(model) -> None:
    for name in ("input_block", "blocks", "readout"):
        if not hasattr(model, name):
            raise KnockoutError(f"model {type(model).__name__} has no {name!r}; knockouts need the reference structure")


def _read_by_readout(model: IrrepConvModel) -> set[IrrepBlock]:
    """The hidden blocks the readout reads: those of an irrep it maps to (o3.Linear has no other path)."""
    outputs = {(ir.l, ir.p) for _, ir in model.readout.irreps_out}
    return {block for block in model.layout.blocks if (block.l, block.parity) in outputs}


@contextmanager
def zeroed(model: IrrepConvModel, members: Sequence[IrrepBlock], where: str) -> Iterator[None]:
    """Within the block, ``model`` runs with the ``members`` slices zeroed (``where`` = all | last)."""
    _check_structure(model)
    handles = []
    try:
        if where == "all":
            for module in [model.input_block, *model.blocks]:
                handles.append(module.register_forward_hook(lambda _m, _i, out: _slices_zeroed(out, members)))
        elif where == "last":
            handles.append(model.readout.register_forward_pre_hook(lambda _m, args: (_slices_zeroed(args[0], members), *args[1:])))
        else:
            raise ValueError(f"where must be one of {WHERE}, got {where!r}")
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def predictions(model: IrrepConvModel, split: CollatedSplit, reference: TargetReference, dtype: torch.dtype) -> np.ndarray:
    """The model's predictions in the target's unit (made absolute by its reference), in dataset order."""
    device = next(model.parameters()).device
    passes = evaluation_pass(model, split.batches(EVAL_BATCH_SIZE), device, dtype, reference)
    return np.concatenate([prediction.cpu().numpy() for _, _, prediction in passes])


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
    # Collated once, on the model's device.
    split = CollatedSplit(dataset, next(model.parameters()).device)
    baseline, kept = knockout_predictions(model, split, reference, dtype, units, on_step)
    baseline_mae = float(np.abs(baseline - targets).mean() * 1000.0)
    deltas: dict[str, dict[str, float]] = {unit.name: {} for unit in units}
    for (name, where), knocked in kept.items():
        deltas[name][f"knockout_{where}_meV"] = float(np.abs(knocked - targets).mean() * 1000.0) - baseline_mae
    return KnockoutResult(baseline_mae_meV=baseline_mae, baseline=baseline, deltas=deltas, predictions=kept)


@torch.no_grad()
def knockout_predictions(
    model: IrrepConvModel,
    split: CollatedSplit,
    reference: TargetReference,
    dtype: torch.dtype,
    units: Sequence[AnalysisBlock],
    on_step: Callable[[str], None] | None = None,
) -> tuple[np.ndarray, dict[tuple[str, str], np.ndarray]]:
    """The unmodified predictions and, per (block, where), the knocked-out ones, in dataset order.

    The numbers of a pass of :func:`predictions` per knockout under :func:`zeroed`, up to float
    rounding (a test bounds the difference), from one loop over the batches that computes each
    shared part once: the geometry and the input block for every knockout, and the unmodified
    last-layer features for every ``last`` knockout (which only re-runs the readout). The ``all``
    knockouts and the unmodified model run through the residual blocks together, as variants of
    the node features ``[N, 1 + units, F]``: the fast tensor product forms each edge's couplings
    and weights once for all of them (study/nn/fast_tp.py).

    A unit that holds every block the readout reads (l0, joint) needs no pass through the blocks:
    zeroed in every layer, those blocks are exact zeros in the last features too (each residual
    sum adds two zeros there), so the readout sees exactly what its ``last`` knockout gives it,
    and its ``all`` prediction is that one, bit for bit.
    """
    _check_structure(model)
    model.eval()
    device = next(model.parameters()).device
    baseline: list[torch.Tensor] = []
    knocked: dict[tuple[str, str], list[torch.Tensor]] = {(unit.name, where): [] for unit in units for where in WHERE}
    batches = list(split.batches(EVAL_BATCH_SIZE))

    read = _read_by_readout(model)
    # What each variant of the node features has zeroed: the first nothing (the unmodified model),
    # then the slices of each unit that needs the blocks, once per set of slices (lgt0 of a model
    # with one l >= 1 zeroes what that l's unit zeroes).
    variant_of: dict[tuple[IrrepBlock, ...], int] = {(): 0}
    for unit in units:
        if not read <= set(unit.members):
            variant_of.setdefault(unit.members, len(variant_of))
    variants: list[Sequence[IrrepBlock]] = list(variant_of)
    per_pass = max(1, FEATURES_PER_PASS // model.layout.dim)
    for index, batch in enumerate(batches):
        if on_step is not None:
            on_step(f"knockouts, batch {index + 1}/{len(batches)}")
        batch = to_device(batch, device, dtype)
        x0, graph = model.input_features(batch)
        finals = []
        for start in range(0, len(variants), per_pass):
            chunk = variants[start : start + per_pass]
            zero = functools.partial(_zeroed_per_variant, knocked_out=chunk)
            features = zero(x0.unsqueeze(1).expand(-1, len(chunk), -1))
            finals.append(model.layer_features(features, graph, after_block=zero)[-1])
        last = torch.cat(finals, dim=1)  # [N, variants, F]
        baseline.append(reference.absolute(model.predict(last[:, 0], graph), batch))
        for unit in units:
            readout_only = reference.absolute(model.predict(_slices_zeroed(last[:, 0], unit.members), graph), batch)
            knocked[(unit.name, "last")].append(readout_only)
            if unit.members in variant_of:
                knocked[(unit.name, "all")].append(reference.absolute(model.predict(last[:, variant_of[unit.members]], graph), batch))
            else:
                knocked[(unit.name, "all")].append(readout_only)
    joined = {key: torch.cat(parts).cpu().numpy() for key, parts in knocked.items()}
    return torch.cat(baseline).cpu().numpy(), joined


def trial_knockout(trial, tensors, rows: np.ndarray | None = None, on_step: Callable[[str], None] | None = None) -> KnockoutResult:
    """Knockouts of a loaded :class:`analysis.load.Trial` on its test split (or the ``rows`` of it).

    Everything comes from the trial's artifacts: the model from its config and ``best_model.pt``,
    the test molecules, their targets and the target reference from its embeddings, so the
    knockouts are measured on exactly the molecules whose embeddings were scored.
    """
    from analysis.load import AnalysisError
    from study.data.qm9 import QM9Dataset
    from study.nn.model import build_model, model_dtype
    from study.training.trial import select_device

    config, embeddings = trial.config, trial.embeddings
    test_indices, targets = np.asarray(embeddings.dataset_index), embeddings.target
    # The artifact names each molecule twice, by its place in the processed QM9 and by QM9's own
    # id: the two must agree in this QM9, or the knockouts would score other molecules.
    if test_indices.max(initial=-1) >= len(tensors) or not np.array_equal(tensors.mol_id[test_indices].numpy(), embeddings.mol_id):
        raise AnalysisError(
            f"trial run {trial.run_id}: its logged test molecules are not at the same places in this QM9 (was QM9 processed differently?)"
        )
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
    return knockout_scores(model, dataset, targets, embeddings.reference, dtype, on_step=on_step)
