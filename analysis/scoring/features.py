"""Rotation-invariant features of each irrep block of a graph embedding.

The raw components of an l >= 1 block turn with the molecule: a score computed on them measures
the orientation of the test molecules as much as the model (the third weak point of the paper's analysis, docs/science.md). Every
score of this package therefore reads only invariants of a block with multiplicity m, and the
same number of them for every block, so that blocks of different l compete on equal terms (a
probe with m(m+1)/2 power-spectrum features for l >= 1 against m scalars for l = 0 would favour
the larger blocks by their feature count alone):

- the channel magnitudes: for l = 0 the m scalars themselves (already invariant, and signed: the
  sign is information, not orientation); for l >= 1 the m channel norms |x_c| (invariant under any
  rotation or reflection applied to the whole molecule). Both are linear in the embedding's scale.

A block's dims are always found through :class:`study.nn.irreps.IrrepsLayout` ((2l+1) x multiplicity
per block); nothing here splits by multiplicity alone.

Besides the real blocks (``l0``, ``l1``, ...) the analysis uses two pseudo-blocks:
``lgt0`` (every block with l >= 1 together: "the non-scalar part") and ``joint`` (everything).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from study.nn.irreps import IrrepBlock, IrrepsLayout

NONSCALAR = "lgt0"
JOINT = "joint"


def block_name(block: IrrepBlock) -> str:
    """``l{l}``: the model has one block per order, so the order names it across trials."""
    return f"l{block.l}"


@dataclass(frozen=True)
class AnalysisBlock:
    """A named set of irrep blocks that is scored as one unit."""

    name: str
    members: tuple[IrrepBlock, ...]

    @property
    def l_values(self) -> tuple[int, ...]:
        return tuple(block.l for block in self.members)

    @property
    def channels(self) -> int:
        return sum(block.multiplicity for block in self.members)


def analysis_blocks(layout: IrrepsLayout) -> list[AnalysisBlock]:
    """One entry per irrep block, then ``lgt0`` (if any l >= 1) and ``joint``.

    Layouts with the same l in two places (``1o`` and ``1e``) are refused: the model never makes
    them, and giving both the name ``l1`` would merge scores of different blocks across trials.
    """
    seen: set[int] = set()
    for block in layout.blocks:
        if block.l in seen:
            raise ValueError(f"layout {layout} has order l={block.l} in more than one block; cannot name blocks by l")
        seen.add(block.l)
    result = [AnalysisBlock(block_name(block), (block,)) for block in layout.blocks]
    nonscalar = tuple(block for block in layout.blocks if block.l > 0)
    if nonscalar:
        result.append(AnalysisBlock(NONSCALAR, nonscalar))
    result.append(AnalysisBlock(JOINT, tuple(layout.blocks)))
    return result


def channels_of(embedding: np.ndarray, block: IrrepBlock) -> np.ndarray:
    """``[N, multiplicity, 2l+1]``: the block's dims, one row per channel (multiplicity-major layout)."""
    if embedding.ndim != 2:
        raise ValueError(f"expected a [molecules, dims] embedding, got shape {embedding.shape}")
    if embedding.shape[1] < block.stop:
        raise ValueError(f"embedding has {embedding.shape[1]} dims, block {block.irrep} ends at {block.stop}")
    flat = np.asarray(embedding[:, block.start : block.stop], dtype=np.float64)
    return flat.reshape(len(embedding), block.multiplicity, 2 * block.l + 1)


def channel_magnitudes(embedding: np.ndarray, block: IrrepBlock) -> np.ndarray:
    """``[N, m]``: the scalar of each l = 0 channel, the norm |x_c| of each l >= 1 channel.

    These are the invariants whose spread across molecules the variance share measures; both are
    linear in the embedding's scale, so blocks of different l compare fairly.
    """
    channels = channels_of(embedding, block)
    if block.l == 0:
        return channels[:, :, 0]
    return np.linalg.norm(channels, axis=-1)


def channel_covariance(embedding: np.ndarray, unit: AnalysisBlock) -> np.ndarray:
    """``[C, C]``: covariance across molecules of the channel magnitudes of the unit's blocks.

    The same recipe for every l (an earlier version used the covariance of the l = 0 scalars but
    the uncentred mean power spectrum of l >= 1, so the two were not comparable). Magnitudes are
    invariant, so their mean and their cross-block covariances are too: a pseudo-block gets the
    full matrix over all its channels.
    """
    magnitudes = np.concatenate([channel_magnitudes(embedding, block) for block in unit.members], axis=1)
    centered = magnitudes - magnitudes.mean(axis=0, keepdims=True)
    return centered.T @ centered / max(len(centered), 1)


def standardized_features(embedding: np.ndarray, unit: AnalysisBlock) -> np.ndarray:
    """The channel magnitudes of every member block, standardized, each block weighted equally.

    Each feature gets zero mean and unit variance (a constant feature stays 0), then each member
    block is divided by the square root of its channel count, so that in a pseudo-block a block
    with more channels does not outweigh the others in distances and probes.
    """
    parts = []
    for block in unit.members:
        features = channel_magnitudes(embedding, block)
        centered = features - features.mean(axis=0, keepdims=True)
        scale = centered.std(axis=0, keepdims=True)
        # Relative threshold: float noise on a constant feature must not be blown up to unit variance.
        tiny = scale <= 1e-12 * max(float(np.abs(features).max(initial=0.0)), 1e-300)
        scale[tiny] = 1.0
        centered[:, tiny[0]] = 0.0
        parts.append(centered / scale / np.sqrt(features.shape[1]))
    return np.concatenate(parts, axis=1)
