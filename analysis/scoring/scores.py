"""Per-irrep scores of one trial's test-set graph embedding: how much each block is used, and how
much structure it carries. Every score reads only rotation-invariant features (analysis/scoring/features.py).

Scores per block (``l0``, ``l1``, ..., ``lgt0`` = all l >= 1, ``joint`` = everything):

utilization
- ``norm_share``: the block's share of the embedding's squared norm, summed over molecules.
- ``variance_share``: the block's share of the variance across molecules of the channel
  magnitudes (l = 0 scalars, l >= 1 channel norms); a large block that is the same for every
  molecule has a high norm share but a low variance share.
- ``participation_ratio`` (sum lambda)^2 / sum lambda^2 and ``effective_rank`` exp(entropy of
  lambda / sum lambda), of the eigenvalues lambda of the covariance of the channel magnitudes
  (features.channel_covariance), each divided by the block's channel count: the fraction of its
  channels' directions the block uses, in (0, 1]. (Undivided, a block with more channels scores
  higher by its size alone, and ``lgt0``/``joint`` always beat single blocks.)
- ``dead_fraction``: share of the block's channels whose RMS magnitude is below
  ``dead_tolerance`` times that of the strongest channel of the whole embedding.

structure (on a seeded subsample of at most ``max_molecules`` molecules; every block gets the
same number of features, its m standardized channel magnitudes, see analysis/scoring/features.py)
- ``probe_r2_residual`` / ``probe_r2_nsps``: cross-validated R^2 of a ridge regression from the
  block's features to the residual target / to nSPS (<= 0: no linear signal). The residual is the
  target minus the composition fit's prediction (study/data/reference.py): atom counts alone explain
  ~96% of U0_atom, so a probe of the raw target measures molecule size, and every block of every
  trial sat at that ceiling. The residual is what is left for chemistry beyond size.
- ``knn_residual`` / ``knn_nsps``: 1 - mean |y_i - y_j| over each molecule's k nearest neighbours
  in the block / mean |y_a - y_b| over all pairs: 0 = neighbours are no more alike than random
  pairs, 1 = neighbours have identical values.
- The model's prediction is a linear map of the summed l = 0 embedding (the readout is an
  equivariant linear map to 1x0e per atom, summed over atoms, then nn.Linear(1, 1)), and the l0
  features are the signed l = 0 scalars themselves. So a linear probe of the residual on ``l0`` or
  ``joint`` recovers the model's own prediction of it, and its R^2 is (nearly) the model's own
  accuracy; likewise ``knn_residual`` there (neighbours in a space where the prediction is a linear
  direction have similar predictions). Across trials they track the test MAE by construction: see
  :data:`DETERMINED_BY_ERROR`. On l >= 1 blocks (invariant norms, not the readout's input) they
  measure what the block carries.
- ``umap_trustworthiness``: sklearn's trustworthiness of the block's 2D UMAP projection (how
  faithfully the picture that the paper judged by eye keeps the block's neighbourhoods).

function (the deltas come from analysis/scoring/knockout.py and need the model's weights)
- ``knockout_all_share`` / ``knockout_last_share``: the share of the model's gain over the
  composition baseline (baseline MAE - model MAE) that is lost when the block is zeroed in every
  layer / only in the readout's input: 0 = the block is not needed, 1 = without it the model is no
  better than counting atoms (> 1: worse than that). Raw meV deltas grow with how good the model
  is, so they are not comparable across trials. The l0 and joint knockouts leave the model with
  nothing but its bias on top of the target reference, so their share is a function of the
  model's own MAE: see :data:`DETERMINED_BY_ERROR`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from analysis.scoring.features import (
    AnalysisBlock,
    analysis_blocks,
    channel_covariance,
    channel_magnitudes,
    channels_of,
    standardized_features,
)
from study.nn.irreps import IrrepsLayout

UTILIZATION_SCORES = ("norm_share", "variance_share", "participation_ratio", "effective_rank", "dead_fraction")
STRUCTURE_SCORES = ("probe_r2_residual", "probe_r2_nsps", "knn_residual", "knn_nsps", "umap_trustworthiness")
FUNCTIONAL_SCORES = ("knockout_all_share", "knockout_last_share")
ALL_SCORES = UTILIZATION_SCORES + STRUCTURE_SCORES + FUNCTIONAL_SCORES
# (block, score) pairs that are a function of the test MAE itself; correlating them with the test
# MAE across trials finds that identity, not a property of the representation.
# - Knockouts: zeroing l0 (or everything) leaves only the head's bias on top of the target
#   reference (a constant, or the composition fit), so the knocked-out MAE is nearly the same for
#   every trial of a split and the share is (constant - MAE) / (baseline - MAE).
# - Residual probe and kNN: the prediction is a linear function of the l0 scalars (see the module
#   doc), so on l0 and joint these scores measure how well the model's own prediction matches the
#   residual target, i.e. its test error.
PREDICTION_SCORES = ("probe_r2_residual", "knn_residual")
DETERMINED_BY_ERROR = frozenset((block, score) for block in ("l0", "joint") for score in FUNCTIONAL_SCORES + PREDICTION_SCORES)


@dataclass(frozen=True)
class ScoreSettings:
    seed: int = 0
    max_molecules: int | None = 2000  # structure scores: UMAP and trustworthiness are O(N^2)-ish
    knn_k: int = 10
    cv_folds: int = 5
    umap_neighbors: int = 15
    trust_neighbors: int = 10
    dead_tolerance: float = 1e-3
    umap: bool = True


@dataclass
class EmbeddingScores:
    """Scores of one embedding, and the 2D UMAP coordinates behind ``umap_trustworthiness``."""

    values: dict[str, dict[str, float]]  # block name -> score name -> value
    sample: np.ndarray  # rows of the embedding used by the structure scores
    umap: dict[str, np.ndarray] = field(default_factory=dict)  # block name -> [len(sample), 2]


# ---------------------------------------------------------------------------- utilization


def _squared_norm(embedding: np.ndarray, unit: AnalysisBlock) -> float:
    return float(sum(np.square(channels_of(embedding, block)).sum() for block in unit.members))


def _magnitude_variance(embedding: np.ndarray, unit: AnalysisBlock) -> float:
    return float(sum(channel_magnitudes(embedding, block).var(axis=0).sum() for block in unit.members))


def _eigenvalues(embedding: np.ndarray, unit: AnalysisBlock) -> np.ndarray:
    return np.clip(np.linalg.eigvalsh(channel_covariance(embedding, unit)), 0.0, None)


def participation_ratio(eigenvalues: np.ndarray) -> float:
    total = float(eigenvalues.sum())
    if total <= 0:
        return 0.0
    return total**2 / float(np.square(eigenvalues).sum())


def effective_rank(eigenvalues: np.ndarray) -> float:
    total = float(eigenvalues.sum())
    if total <= 0:
        return 0.0
    p = eigenvalues[eigenvalues > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


def _channel_rms(embedding: np.ndarray, unit: AnalysisBlock) -> np.ndarray:
    return np.concatenate([np.sqrt(np.square(channels_of(embedding, block)).sum(axis=-1).mean(axis=0)) for block in unit.members])


def local_utilization(embedding: np.ndarray, unit: AnalysisBlock, reference_rms: float, dead_tolerance: float) -> dict[str, float]:
    """The utilization scores that need nothing but the block itself (and a dead-channel scale)."""
    eigenvalues = _eigenvalues(embedding, unit)
    rms = _channel_rms(embedding, unit)
    # Divided by the channel count: the share of the block's channels it uses (see module doc).
    return {
        "participation_ratio": participation_ratio(eigenvalues) / unit.channels,
        "effective_rank": effective_rank(eigenvalues) / unit.channels,
        "dead_fraction": float((rms <= dead_tolerance * reference_rms).mean()),
    }


# ---------------------------------------------------------------------------- structure


def mean_pair_difference(values: np.ndarray) -> float:
    """Mean |y_a - y_b| over all pairs a != b, exactly, in O(N log N)."""
    y = np.sort(np.asarray(values, dtype=np.float64))
    n = len(y)
    if n < 2:
        return float("nan")
    weights = 2 * np.arange(n) - n + 1  # y_(i) is the larger of i pairs and the smaller of n-1-i
    return float((weights * y).sum() / (n * (n - 1) / 2))


def knn_consistency(features: np.ndarray, values: np.ndarray, k: int) -> float:
    """1 - (mean |y_i - y_j| over k nearest neighbours) / (mean over random pairs); see module doc."""
    from sklearn.neighbors import NearestNeighbors

    keep = np.isfinite(values)
    features, values = features[keep], values[keep]
    n = len(values)
    baseline = mean_pair_difference(values)
    if n < 3 or not baseline > 0:
        return float("nan")
    if not np.any(features):
        return 0.0  # a block that is zero everywhere has no neighbourhoods: no information
    k = min(k, n - 1)
    # kneighbors() without X leaves each point out of its own neighbour list, even with duplicates.
    neighbours = NearestNeighbors(n_neighbors=k).fit(features).kneighbors(return_distance=False)
    local = np.abs(values[:, None] - values[neighbours]).mean()
    return float(1.0 - local / baseline)


def probe_r2(features: np.ndarray, values: np.ndarray, folds: int, seed: int) -> float:
    """Mean cross-validated R^2 of a ridge regression (regularisation chosen inside each fold)."""
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import KFold, cross_val_score

    keep = np.isfinite(values)
    features, values = features[keep], values[keep]
    folds = min(folds, len(values) // 5)
    if folds < 2 or not np.std(values) > 0:
        return float("nan")
    model = RidgeCV(alphas=np.logspace(-3, 4, 15))
    cv = KFold(n_splits=folds, shuffle=True, random_state=seed)
    return float(np.mean(cross_val_score(model, features, values, cv=cv, scoring="r2")))


def exact_neighbours(features: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k`` nearest rows (itself first, as UMAP expects) and their Euclidean distances,
    exactly: all pairwise distances, ties broken by row order."""
    from scipy.spatial.distance import cdist

    distances = cdist(features, features)
    indices = np.argsort(distances, axis=1, kind="stable")[:, :k]
    return indices, np.take_along_axis(distances, indices, axis=1)


def umap_projection(features: np.ndarray, neighbors: int, seed: int) -> np.ndarray:
    """A seeded (so reproducible, single-threaded) 2D UMAP of the features."""
    import umap  # imported here: it compiles with numba on first use, seconds better not spent on import

    neighbors = min(neighbors, len(features) - 1)
    # The exact neighbours, given to UMAP: below 4,096 points UMAP would compute the same graph
    # through sklearn calling a numba distance once per pair from Python (5.5 s of a 1,000-point
    # projection's 8 s on 2 cores, measured); scipy's cdist takes milliseconds.
    knn = exact_neighbours(features, neighbors)
    with warnings.catch_warnings():
        # "n_jobs overridden by random_state" and spectral-init fallbacks on tiny sets are expected.
        warnings.simplefilter("ignore")
        reducer = umap.UMAP(n_components=2, n_neighbors=neighbors, random_state=seed, precomputed_knn=knn)
        return np.asarray(reducer.fit_transform(features), dtype=np.float64)


def trustworthiness_2d(features: np.ndarray, projection: np.ndarray, neighbors: int) -> float:
    from sklearn.manifold import trustworthiness

    # sklearn requires n_neighbors < n_samples / 2.
    k = min(neighbors, (len(features) - 1) // 2)
    if k < 1:
        return float("nan")
    return float(trustworthiness(features, projection, n_neighbors=k))


def structure_scores(
    embedding: np.ndarray, unit: AnalysisBlock, residual: np.ndarray, nsps: np.ndarray, settings: ScoreSettings
) -> tuple[dict[str, float], np.ndarray | None]:
    """Probe, kNN and UMAP scores of one block on the given molecules, and the UMAP coordinates.

    ``residual``: the target minus the composition fit's prediction, per molecule.
    """
    features = standardized_features(embedding, unit)
    scores = {
        "probe_r2_residual": probe_r2(features, residual, settings.cv_folds, settings.seed),
        "probe_r2_nsps": probe_r2(features, nsps, settings.cv_folds, settings.seed),
        "knn_residual": knn_consistency(features, residual, settings.knn_k),
        "knn_nsps": knn_consistency(features, nsps, settings.knn_k),
        "umap_trustworthiness": float("nan"),
    }
    projection = None
    if settings.umap and np.any(features) and len(features) >= 5:
        # UMAP's optimisation is chaotic: a 1e-12 difference in its input (float noise from rotating
        # a molecule, a BLAS with another summation order) gives another picture. Rounding the
        # unit-variance features to 1e-6 first makes equal invariants give the same projection.
        rounded = np.round(features, 6)
        projection = umap_projection(rounded, settings.umap_neighbors, settings.seed)
        scores["umap_trustworthiness"] = trustworthiness_2d(rounded, projection, settings.trust_neighbors)
    return scores, projection


# ---------------------------------------------------------------------------- function


def knockout_shares(deltas_meV: dict[str, float], model_mae_meV: float, baseline_mae_meV: float) -> dict[str, float]:
    """``knockout_*_share`` from ``knockout_*_meV`` deltas: the share of the gain over the baseline lost.

    ``model_mae_meV`` and ``baseline_mae_meV`` (the composition fit's MAE) must be measured on the
    same molecules as the deltas. A model no better than the baseline has no gain to lose: NaN.
    """
    gain = baseline_mae_meV - model_mae_meV
    shares = {}
    for name, delta in deltas_meV.items():
        share_name = name.removesuffix("_meV") + "_share"
        shares[share_name] = float(delta / gain) if gain > 0 else float("nan")
    return shares


def residual_target(embeddings) -> np.ndarray:
    """The test targets minus the composition fit's predictions (study.training.embeddings.TestEmbeddings)."""
    return np.asarray(embeddings.target, dtype=np.float64) - np.asarray(embeddings.composition_baseline, dtype=np.float64)


# ---------------------------------------------------------------------------- one embedding


def structure_sample(num_molecules: int, settings: ScoreSettings) -> np.ndarray:
    """Sorted rows used by the structure scores: all, or a seeded subset of ``max_molecules``."""
    if settings.max_molecules is None or num_molecules <= settings.max_molecules:
        return np.arange(num_molecules)
    rng = np.random.default_rng(settings.seed)
    return np.sort(rng.choice(num_molecules, size=settings.max_molecules, replace=False))


def score_embedding(
    embedding: np.ndarray,
    layout: IrrepsLayout,
    residual: np.ndarray,
    nsps: np.ndarray,
    settings: ScoreSettings = ScoreSettings(),
    on_block: Callable[[str], None] | None = None,
) -> EmbeddingScores:
    """Every utilization and structure score of every block of one ``[N, layout.dim]`` embedding.

    ``residual``: per molecule, the target minus the composition fit's prediction (see
    :func:`residual_target`); the structure scores relate the blocks to it.
    """
    embedding = np.asarray(embedding, dtype=np.float64)
    residual = np.asarray(residual, dtype=np.float64)
    nsps = np.asarray(nsps, dtype=np.float64)
    if embedding.shape != (len(residual), layout.dim) or len(nsps) != len(residual):
        raise ValueError(
            f"embedding {embedding.shape}, residual {residual.shape} and nsps {nsps.shape} do not match layout dim {layout.dim}"
        )
    units = analysis_blocks(layout)
    joint = units[-1]
    total_squared = _squared_norm(embedding, joint)
    total_variance = _magnitude_variance(embedding, joint)
    reference_rms = float(_channel_rms(embedding, joint).max(initial=0.0))
    sample = structure_sample(len(residual), settings)
    values: dict[str, dict[str, float]] = {}
    projections: dict[str, np.ndarray] = {}
    # Units with the same blocks (lgt0 of a model with one l >= 1 is that l's block; joint of an
    # l = 0 model is l0) have the same features, so the same structure scores and UMAP (seeded,
    # one thread): computed once per set of blocks.
    structures: dict[tuple, tuple[dict[str, float], np.ndarray | None]] = {}
    for unit in units:
        if on_block is not None:
            on_block(unit.name)
        scores = {
            "norm_share": _squared_norm(embedding, unit) / total_squared if total_squared > 0 else float("nan"),
            "variance_share": _magnitude_variance(embedding, unit) / total_variance if total_variance > 0 else float("nan"),
            **local_utilization(embedding, unit, reference_rms, settings.dead_tolerance),
        }
        if unit.members not in structures:
            structures[unit.members] = structure_scores(embedding[sample], unit, residual[sample], nsps[sample], settings)
        structure, projection = structures[unit.members]
        scores.update(structure)
        if projection is not None:
            projections[unit.name] = projection
        values[unit.name] = scores
    return EmbeddingScores(values=values, sample=sample, umap=projections)
