"""One trial: fit the reference model, evaluate, checkpoint every epoch, report.

A trial is deterministic given its config: the model is initialised from `seed`, and the
order of each epoch's batches comes from a generator seeded with (`seed`, epoch), so a run
resumed from a checkpoint continues exactly as if it had never stopped.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from study.config.trial import EXECUTION_FIELDS, LEGACY_DEFAULTS, TrialConfig
from study.data.qm9 import (
    CollatedSplit,
    QM9Dataset,
    QM9Tensors,
    load_qm9,
    split_indices,
    target_index,
)
from study.data.reference import TargetReference, element_counts, fit_composition
from study.errors import UserError
from study.names import COMPLETED, TRAIN_LOSS, VAL_MAE
from study.nn.model import (
    CompiledOrEager,
    IrrepConvModel,
    build_model,
    count_parameters,
    evaluation_pass,
    make_optimizer,
    model_dtype,
    to_device,
)
from study.paths import atomic_write
from study.training.embeddings import compute_embeddings, save_embeddings

# Format 2 adds the target reference and the learning-rate scheduler's state; format 1
# checkpoints (global mean/std, constant rate) still resume.
CHECKPOINT_FORMAT = 2
READABLE_CHECKPOINT_FORMATS = (1, 2)
# Evaluation needs no gradients, so larger batches cost little memory and save Python overhead.
EVAL_BATCH_SIZE = 128
EMBEDDINGS_FILE = "test_embeddings.npz"


@dataclass
class EpochMetrics:
    epoch: int
    train_loss: float
    val_mae_meV: float
    # Share of the squared norm of the validation graph embeddings held by each l block (sums to 1).
    norm_share: dict[int, float] = field(default_factory=dict)

    def tracked(self) -> dict[str, float]:
        """The epoch's metrics under their MLflow names."""
        metrics = {TRAIN_LOSS: self.train_loss, VAL_MAE: self.val_mae_meV}
        metrics.update({f"norm_share_l{l}": share for l, share in self.norm_share.items()})
        return metrics


@dataclass
class TrialResult:
    status: str  # COMPLETED or "diverged"
    epochs_completed: int
    num_params: int
    train_seconds: float
    best_epoch: int | None = None
    best_val_mae_meV: float | None = None
    test_mae_meV: float | None = None
    diverged_epoch: int | None = None
    reason: str | None = None
    target_mean: float | None = None  # the `mean` reference's numbers (None for `composition`)
    target_std: float | None = None
    reference: dict | None = None  # TargetReference.to_dict(): how predictions are made absolute
    baseline_val_mae_meV: float | None = None  # the composition fit on the same split
    baseline_test_mae_meV: float | None = None
    history: list[EpochMetrics] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrialData:
    """The three splits of a trial, ready for loaders, with the target's reference.

    `reference` is what the model trains against (study/data/reference.py); `composition` is the
    composition fit on the same training split, the baseline every error is read against
    (the same object as `reference` when the trial trains against it)."""

    train: QM9Dataset
    val: QM9Dataset
    test: QM9Dataset
    target_column: int
    reference: TargetReference
    composition: TargetReference
    composition_val: np.ndarray  # the composition fit's prediction of each validation molecule
    composition_test: np.ndarray  # ... and of each test molecule, in dataset order
    baseline_val_mae_meV: float
    baseline_test_mae_meV: float


def cpu_fallback_warning(name: str) -> str | None:
    """The warning `select_device(name)` gives, if any: `auto` falls back to the CPU although the
    process was handed GPUs (Ray sets CUDA_VISIBLE_DEVICES for a trial that asked for some) that
    torch cannot use. None when CUDA works, or when no GPU was named."""
    if name != "auto" or torch.cuda.is_available():
        return None
    assigned = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if not assigned or assigned == "-1":
        return None
    return (
        f"device: auto: GPU(s) were assigned (CUDA_VISIBLE_DEVICES={assigned}) but torch finds no usable CUDA device; training on the CPU"
    )


def select_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        fallback = cpu_fallback_warning(name)
        if fallback is not None:
            warnings.warn(fallback, stacklevel=2)
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device: cuda was requested but no CUDA GPU is available")
    return torch.device(name)


def prepare_data(config: TrialConfig, tensors: QM9Tensors, reference: TargetReference | None = None) -> TrialData:
    """Split (same split for every trial with the same split_seed) and fit the target's reference
    on the training split; `reference` (from a checkpoint) replaces the fit when given."""
    try:
        splits = split_indices(
            len(tensors),
            seed=config.split_seed,
            fractions=config.split_fractions,
            sizes=config.split_sizes,
            subset=config.subset,
        )
    except ValueError as exc:
        raise UserError(f"split: {exc}") from None
    for name, indices in splits.items():
        if len(indices) == 0:
            raise UserError(f"split: the {name} split is empty; raise subset or the {name} fraction")
    column = target_index(config.target)
    # The elements present, ascending; a count per atomic number is O(atoms), where torch.unique
    # sorts QM9's 2.4M atoms (65-140 ms of every trial).
    elements = torch.bincount(tensors.z).nonzero().flatten().tolist()
    counts = {name: element_counts(tensors.z, tensors.atom_ptr, indices, elements) for name, indices in splits.items()}
    y = {name: tensors.y[torch.as_tensor(indices), column].numpy() for name, indices in splits.items()}
    try:
        composition = fit_composition(counts["train"], y["train"], elements)
    except ValueError as exc:
        raise UserError(f"target_reference: {exc}") from None
    if reference is None:
        reference = composition if config.target_reference == "composition" else _mean_reference(config, y["train"])
    composition_val = composition.baseline_from_counts(counts["val"], elements)
    composition_test = composition.baseline_from_counts(counts["test"], elements)
    datasets = {name: QM9Dataset(tensors, indices, edges=config.edges, cutoff=config.cutoff) for name, indices in splits.items()}
    return TrialData(
        datasets["train"],
        datasets["val"],
        datasets["test"],
        column,
        reference,
        composition,
        composition_val,
        composition_test,
        baseline_val_mae_meV=mae_milli(torch.from_numpy(composition_val), torch.from_numpy(y["val"])),
        baseline_test_mae_meV=mae_milli(torch.from_numpy(composition_test), torch.from_numpy(y["test"])),
    )


def _mean_reference(config: TrialConfig, train_y: np.ndarray) -> TargetReference:
    """The seed's standardisation: the config's mean and std, else the training split's."""
    if config.target_mean is not None:
        return TargetReference.mean(config.target_mean, config.target_std)
    # Computed with torch, as before references existed, so `mean` trials keep their numbers.
    values = torch.as_tensor(train_y)
    mean, std = float(values.mean()), float(values.std())
    if not std > 0:
        raise UserError("target_std: the training split's target has zero spread; give target_std")
    return TargetReference.mean(mean, std)


@torch.no_grad()
def evaluate(
    model: IrrepConvModel, loader: Iterable, data: TrialData, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, dict[int, float]]:
    """Predictions, targets, and the share of the graph embeddings' squared norm held by each l."""
    predictions, targets = [], []
    layout = model.layout
    squared = {l: 0.0 for l in layout.l_values}
    for batch, embedding, prediction in evaluation_pass(model, loader, device, dtype, data.reference):
        predictions.append(prediction.cpu())
        targets.append(batch.y[:, data.target_column].double().cpu())
        graph = embedding.graph.double()
        for block in layout.blocks:
            squared[block.l] += float(graph[:, block.start : block.stop].square().sum())
    total = sum(squared.values())
    shares = {l: (value / total if total > 0 else math.nan) for l, value in squared.items()}
    return torch.cat(predictions), torch.cat(targets), shares


def mae_milli(predictions: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean absolute error in thousandths of the target unit: meV for the energy targets."""
    return float((predictions - targets).abs().mean() * 1000.0)


def _atomic_save(obj: object, path: Path) -> None:
    """A crash or a full disk mid-write must never leave a truncated checkpoint under the real name."""

    def save(temporary: Path) -> None:
        try:
            torch.save(obj, temporary)
        except RuntimeError as exc:  # torch reports a failed write (ENOSPC) as a RuntimeError
            raise OSError(str(exc).strip().splitlines()[0] if str(exc).strip() else "write failed") from None

    atomic_write(path, save)


def load_checkpoint(path: Path) -> dict:
    """A checkpoint written by `run_trial`, loaded without executing pickled code."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: checkpoint not found") from None
    except Exception as exc:  # torch raises many types for a damaged file
        raise UserError(f"{path}: checkpoint is corrupt or unreadable ({type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("format") not in READABLE_CHECKPOINT_FORMATS:
        raise UserError(f"{path}: not a checkpoint of format {' or '.join(map(str, READABLE_CHECKPOINT_FORMATS))}")
    return state


def make_scheduler(config: TrialConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """The learning-rate schedule of `config` (None for `constant`); its state goes in checkpoints."""
    if config.lr_schedule == "cosine":
        # Stepped after every batch, down to 0 at the last one.
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * steps_per_epoch)
    if config.lr_schedule == "plateau":
        # Stepped once per epoch on the validation MAE.
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.5, patience=2)
    return None


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # Seeding per epoch (not one stream for the whole run) makes resume exact without saving RNG state.
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


class _NonFinite(Exception):
    """Training produced a non-finite number; the trial diverged."""


def _train_epoch(model, optimizer, scheduler, data: TrialData, loader, device, dtype, on_batch) -> float:
    model.train()
    total, count = 0.0, 0
    for batch in loader:
        batch = to_device(batch, device, dtype)
        target = data.reference.standardize(batch.y[:, data.target_column].to(dtype), batch)
        loss = F.mse_loss(model(batch), target)
        if not torch.isfinite(loss):
            raise _NonFinite("non-finite training loss")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # Exploding gradients show up here before the loss does; stepping with them would write
        # inf/NaN into every weight.
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
        if not torch.isfinite(grad_norm):
            raise _NonFinite("non-finite gradient")
        optimizer.step()
        if isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR):
            scheduler.step()
        total += loss.item() * batch.num_graphs
        count += batch.num_graphs
        on_batch()
    return total / count


def _open_output(out_dir: Path, config: TrialConfig, resume: bool) -> dict | None:
    """Create `out_dir`; the checkpoint to continue from (None: start fresh)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{out_dir}: cannot create output folder ({exc.strerror})") from None
    checkpoint_path = out_dir / "checkpoint.pt"
    state = None
    if resume and checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path)
        # The backend and compilation are not part of the function being trained: resuming with
        # another is exact, and checkpoints written before the fields existed lack them. Fields
        # added later take the value that such checkpoints trained with.
        saved = {**LEGACY_DEFAULTS, **{k: v for k, v in state["config"].items() if k not in EXECUTION_FIELDS}}
        if saved != config.model_dump(mode="json", exclude=set(EXECUTION_FIELDS)):
            raise UserError(f"{checkpoint_path}: written by a different config; use another output folder")
    elif checkpoint_path.exists():
        raise UserError(f"{out_dir}: holds a checkpoint already; pass --resume to continue it or choose another folder")
    (out_dir / "config.yaml").write_text(config.to_yaml())
    return state


def _saved_reference(state: dict | None) -> TargetReference | None:
    """The reference a checkpoint trained against (format 1: its config's global mean and std)."""
    if state is None:
        return None
    if "reference" in state:
        return TargetReference.from_dict(state["reference"])
    return None  # format 1: refitted from the same training split, which gives the same numbers


@dataclass
class _Training:
    """What a trial carries from one epoch to the next, all of which its checkpoint saves."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object | None
    history: list[EpochMetrics] = field(default_factory=list)
    best_val: float = math.inf
    best_epoch: int | None = None
    best_state: dict | None = None  # the best epoch's weights, on the CPU
    train_seconds: float = 0.0
    epoch: int = 0  # epochs done

    def restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.history = [EpochMetrics(**m) for m in state["history"]]
        self.best_val, self.best_epoch, self.best_state = state["best_val"], state["best_epoch"], state["best_state"]
        self.train_seconds, self.epoch = state["train_seconds"], state["epoch"]

    def checkpoint(self, config: TrialConfig, reference: TargetReference) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": config.model_dump(mode="json"),
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "reference": reference.to_dict(),
            "best_state": self.best_state,
            "best_val": self.best_val,
            "best_epoch": self.best_epoch,
            "history": [asdict(m) for m in self.history],
            "train_seconds": self.train_seconds,
        }


def run_trial(
    config: TrialConfig,
    out_dir: Path,
    tensors: QM9Tensors | None = None,
    resume: bool = False,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> TrialResult:
    """Train one trial into `out_dir` (config.yaml, checkpoint.pt, best_model.pt, result.json and
    test_embeddings.npz, the test-set embeddings of the best weights; see study/training/embeddings.py).

    `on_epoch` receives each epoch's metrics as they are measured; `progress(done, total)` is
    called after every training batch.
    """
    out_dir = Path(out_dir)
    state = _open_output(out_dir, config, resume)
    tensors = tensors if tensors is not None else load_qm9()
    data = prepare_data(config, tensors, reference=_saved_reference(state))
    device, dtype = select_device(config.device), model_dtype(config)
    training = _start_training(config, data, dtype, device, state)
    result = _new_result(training, data)

    # Training steps go through torch.compile when asked; evaluation and saving use the model itself.
    trained = CompiledOrEager(training.model) if config.compile else training.model
    # Each split collated once, on the training device: batches are then a few gathers each.
    train_split, val_split = CollatedSplit(data.train, device), CollatedSplit(data.val, device)
    for epoch in range(training.epoch + 1, config.epochs + 1):
        try:
            metrics = _run_epoch(config, training, trained, data, train_split, val_split, epoch, device, dtype, progress)
        except _NonFinite as problem:
            result.status, result.diverged_epoch, result.reason = "diverged", epoch, str(problem)
            break
        _atomic_save(training.checkpoint(config, data.reference), out_dir / "checkpoint.pt")
        result.epochs_completed = epoch
        if on_epoch is not None:
            on_epoch(metrics)

    result.history, result.train_seconds = training.history, training.train_seconds
    if result.status == COMPLETED and training.best_state is not None:
        _test_best_weights(config, training, data, device, dtype, out_dir, result)
    (out_dir / "result.json").write_text(json.dumps(result.to_dict(), indent=2))
    return result


def _start_training(config: TrialConfig, data: TrialData, dtype: torch.dtype, device: torch.device, state: dict | None) -> _Training:
    """The seeded model, its optimizer and schedule; continued from `state` when resuming."""
    torch.manual_seed(config.seed)
    model = build_model(config).to(device=device, dtype=dtype)
    optimizer = make_optimizer(model, config.lr, config.weight_decay)
    scheduler = make_scheduler(config, optimizer, math.ceil(len(data.train) / config.batch_size))
    training = _Training(model, optimizer, scheduler)
    if state is not None:
        training.restore(state)
    return training


def _new_result(training: _Training, data: TrialData) -> TrialResult:
    reference = data.reference
    return TrialResult(
        status=COMPLETED,
        epochs_completed=training.epoch,
        num_params=count_parameters(training.model),
        train_seconds=training.train_seconds,
        target_mean=reference.intercept if reference.kind == "mean" else None,
        target_std=reference.scale if reference.kind == "mean" else None,
        reference=reference.to_dict(),
        baseline_val_mae_meV=data.baseline_val_mae_meV,
        baseline_test_mae_meV=data.baseline_test_mae_meV,
    )


def _run_epoch(
    config: TrialConfig,
    training: _Training,
    trained,
    data: TrialData,
    train_split: CollatedSplit,
    val_split: CollatedSplit,
    epoch: int,
    device,
    dtype,
    progress,
) -> EpochMetrics:
    """Train one epoch, validate, keep the best weights so far; `_NonFinite` when it diverges."""
    batches_per_epoch = math.ceil(len(data.train) / config.batch_size)
    done = 0

    def on_batch() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress((epoch - 1) * batches_per_epoch + done, config.epochs * batches_per_epoch)

    started = time.perf_counter()
    try:
        loader = train_split.batches(config.batch_size, shuffle=True, generator=_epoch_generator(config.seed, epoch))
        train_loss = _train_epoch(trained, training.optimizer, training.scheduler, data, loader, device, dtype, on_batch)
        val_predictions, val_targets, norm_share = evaluate(training.model, val_split.batches(EVAL_BATCH_SIZE), data, device, dtype)
        val_mae = mae_milli(val_predictions, val_targets)
        if not math.isfinite(val_mae):
            raise _NonFinite("non-finite validation error")
    finally:
        training.train_seconds += time.perf_counter() - started  # a diverged epoch counts too
    if isinstance(training.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        training.scheduler.step(val_mae)
    metrics = EpochMetrics(epoch, train_loss, val_mae, norm_share)
    training.history.append(metrics)
    training.epoch = epoch
    if val_mae < training.best_val:
        training.best_val, training.best_epoch = val_mae, epoch
        training.best_state = {k: v.detach().cpu().clone() for k, v in training.model.state_dict().items()}
    return metrics


def _test_best_weights(
    config: TrialConfig, training: _Training, data: TrialData, device, dtype, out_dir: Path, result: TrialResult
) -> None:
    """Save the best epoch's weights and their test-set embeddings, and fill in the test result."""
    training.model.load_state_dict(training.best_state)
    _atomic_save(training.best_state, out_dir / "best_model.pt")
    embeddings = compute_embeddings(training.model, data, config.target, device, dtype)
    save_embeddings(embeddings, out_dir / EMBEDDINGS_FILE)
    # One pass over the test set: the embeddings hold the predictions the test MAE is made of.
    result.test_mae_meV = mae_milli(torch.from_numpy(embeddings.prediction), torch.from_numpy(embeddings.target))
    result.best_epoch, result.best_val_mae_meV = training.best_epoch, training.best_val
