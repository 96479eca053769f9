"""The target's reference: the part of the target the model does not have to learn.

Every reference has the same affine form, so training, evaluation, embeddings and knockouts share
one code path:

    baseline(molecule) = intercept + sum over its atoms of coefficient[z]
    prediction         = baseline + scale * model_output
    training target    = (y - baseline) / scale

- ``mean`` (the seed's setup): no per-element coefficients; intercept and scale are the global mean
  and standard deviation of the target. Kept for reproducing the reference table.
- ``composition`` (the default): least squares of the target on the per-element atom counts plus an
  intercept, fitted on the training split only; the model learns the residual divided by the
  residual's standard deviation. This is what MACE, NequIP and SchNetPack's atomrefs do for total
  energies: with sum pooling a global standardisation leaves the model to learn molecule size.

The composition fit is also the baseline every model's error is read against
(``baseline_val_mae_meV``, ``baseline_test_mae_meV``), whatever reference the model trains with.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

REFERENCE_KINDS = ("mean", "composition")
ELEMENT_SYMBOLS = {1: "H", 6: "C", 7: "N", 8: "O", 9: "F"}
# Rows of the element table; the model's atom embedding has the same number of elements.
NUM_ELEMENTS = 100


class ReferenceFitWarning(UserWarning):
    """An element never occurs in the training split: its coefficient is set to zero."""


@dataclass(frozen=True)
class TargetReference:
    kind: str
    intercept: float
    scale: float
    coefficients: dict[int, float] = field(default_factory=dict)  # atomic number -> per-atom term

    def __post_init__(self) -> None:
        if self.kind not in REFERENCE_KINDS:
            raise ValueError(f"reference kind must be one of {REFERENCE_KINDS}, got {self.kind!r}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"reference scale must be finite and positive, got {self.scale!r}")

    @classmethod
    def mean(cls, mean: float, std: float) -> TargetReference:
        return cls("mean", float(mean), float(std))

    # ------------------------------------------------------------------ numbers per molecule

    def baseline_from_counts(self, counts: np.ndarray, elements: list[int]) -> np.ndarray:
        """Baseline of molecules given their atom counts [N, len(elements)] (float64)."""
        weights = np.array([self.coefficients.get(int(z), 0.0) for z in elements], dtype=np.float64)
        return self.intercept + np.asarray(counts, dtype=np.float64) @ weights

    def _graph_baseline(self, batch) -> torch.Tensor:
        """Baseline of each graph of a PyG batch (float64, on the batch's device)."""
        table = torch.zeros(NUM_ELEMENTS, dtype=torch.float64, device=batch.z.device)
        for z, value in self.coefficients.items():
            table[int(z)] = value
        graph_index = getattr(batch, "batch", None)
        if graph_index is None:
            graph_index = torch.zeros_like(batch.z)
        num_graphs = int(getattr(batch, "num_graphs", 1))
        per_graph = torch.zeros(num_graphs, dtype=torch.float64, device=batch.z.device)
        return per_graph.index_add(0, graph_index, table[batch.z]) + self.intercept

    def standardize(self, y: torch.Tensor, batch) -> torch.Tensor:
        """The training target of each graph: (y - baseline) / scale, in y's dtype."""
        if self.kind == "mean":
            # Kept literally as the seed's expression, so `mean` trials reproduce earlier numbers.
            return (y - self.intercept) / self.scale
        return ((y.double() - self._graph_baseline(batch)) / self.scale).to(y.dtype)

    def absolute(self, output: torch.Tensor, batch) -> torch.Tensor:
        """Predictions in the target's unit (float64) from the model's standardized output."""
        if self.kind == "mean":
            return output.double() * self.scale + self.intercept
        return output.double() * self.scale + self._graph_baseline(batch)

    # ------------------------------------------------------------------ travelling with artifacts

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "intercept": self.intercept,
            "scale": self.scale,
            # JSON keys are strings; atomic numbers go back to int in from_dict.
            "coefficients": {str(z): value for z, value in sorted(self.coefficients.items())},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TargetReference:
        return cls(
            kind=str(data["kind"]),
            intercept=float(data["intercept"]),
            scale=float(data["scale"]),
            coefficients={int(z): float(v) for z, v in dict(data.get("coefficients") or {}).items()},
        )

    def flat_params(self) -> dict[str, str]:
        """MLflow params: ``reference_intercept``, ``reference_scale``, ``reference_coef_H``, ..."""
        params = {
            "reference_kind": self.kind,
            "reference_intercept": repr(self.intercept),
            "reference_scale": repr(self.scale),
        }
        for z, value in sorted(self.coefficients.items()):
            params[f"reference_coef_{ELEMENT_SYMBOLS.get(z, f'Z{z}')}"] = repr(value)
        return params


# ---------------------------------------------------------------------------- the composition fit


def element_counts(z: torch.Tensor, atom_ptr: torch.Tensor, molecules: np.ndarray, elements: list[int]) -> np.ndarray:
    """Atom counts [len(molecules), len(elements)] of the given molecules (float64)."""
    molecules = np.asarray(molecules, dtype=np.int64)
    starts, stops = atom_ptr[molecules].numpy(), atom_ptr[molecules + 1].numpy()
    sizes = stops - starts
    atoms = np.concatenate([np.arange(a, b) for a, b in zip(starts, stops)]) if len(molecules) else np.zeros(0, np.int64)
    owner = np.repeat(np.arange(len(molecules)), sizes)
    column = {int(e): k for k, e in enumerate(elements)}
    atom_z = z[torch.as_tensor(atoms)].numpy() if len(atoms) else np.zeros(0, np.int64)
    counts = np.zeros((len(molecules), len(elements)), dtype=np.float64)
    np.add.at(counts, (owner, np.array([column[int(a)] for a in atom_z], dtype=np.int64)), 1.0)
    return counts


def fit_composition(counts: np.ndarray, y: np.ndarray, elements: list[int]) -> TargetReference:
    """Least squares of ``y`` on ``counts`` plus an intercept; the residual's std is the scale.

    An element absent from ``counts`` (all zeros) gets a zero coefficient and a warning: the
    minimum-norm solution of least squares already gives it zero, the warning says why.
    """
    counts = np.asarray(counts, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if counts.shape[0] != y.shape[0] or counts.shape[1] != len(elements):
        raise ValueError(f"counts {counts.shape} do not match {y.shape[0]} targets and {len(elements)} elements")
    if len(y) < 2:
        raise ValueError("the composition fit needs at least two training molecules")
    present = counts.any(axis=0)
    for z, seen in zip(elements, present):
        if not seen:
            symbol = ELEMENT_SYMBOLS.get(int(z), f"Z={z}")
            warnings.warn(
                f"element {symbol} never occurs in the training split; its composition coefficient is 0", ReferenceFitWarning, stacklevel=2
            )
    design = np.column_stack([counts[:, present], np.ones(len(y))])
    solution, *_ = np.linalg.lstsq(design, y, rcond=None)
    coefficients = {int(z): 0.0 for z in elements}
    coefficients.update({int(z): float(c) for z, c in zip(np.asarray(elements)[present], solution[:-1])})
    residual = y - design @ solution
    scale = float(residual.std(ddof=1))
    if not scale > 1e-9 * max(1.0, float(np.abs(y).max())):
        # A (numerically) perfect fit leaves nothing to learn: a unit scale keeps the model's
        # target finite instead of dividing by rounding noise.
        scale = 1.0
    return TargetReference("composition", float(solution[-1]), scale, coefficients)
