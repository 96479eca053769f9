"""Irreps of a set of spherical-harmonic orders, and where each order lives in a feature vector.

A hidden feature of the reference model is e3nn's flat layout of ``m x l`` blocks, one after the
other in the order of the irreps string. Inside a block the layout is multiplicity-major: channel
``c``, component ``k`` (0 <= k < 2l+1) is at ``start + c * (2l+1) + k``. Splitting an embedding per
order therefore takes ``(2l+1) * multiplicity`` dimensions per block; splitting by multiplicity
alone (the mistake docs/science.md warns about) silently mixes blocks. :class:`IrrepsLayout` is the one
place that computes these offsets; analysis code must slice through it.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from e3nn import o3

from study.config.lvalues import MAX_L, parity_of, validate_l_values  # noqa: F401 (re-exported)

ArrayLike = TypeVar("ArrayLike", torch.Tensor, np.ndarray)


def irreps_for(l_values: Sequence[int], multiplicity: int) -> o3.Irreps:
    """``"mx0e+mx1o+..."``: one block per order, ascending, parity (-1)^l.

    With ``multiplicity=1`` this is the irreps of the spherical harmonics of an edge; with
    ``multiplicity=hidden_dim`` it is the hidden irreps of the reference model.
    """
    if isinstance(multiplicity, bool) or not isinstance(multiplicity, numbers.Integral) or multiplicity < 1:
        raise ValueError(f"multiplicity must be a positive integer, got {multiplicity!r}")
    ls = validate_l_values(l_values)
    return o3.Irreps([(int(multiplicity), (l, parity_of(l))) for l in ls])


@dataclass(frozen=True)
class IrrepBlock:
    """One ``multiplicity x l`` block of a flat feature vector, at ``[start, stop)``."""

    l: int
    parity: int
    multiplicity: int
    start: int
    stop: int

    @property
    def dim(self) -> int:
        return self.stop - self.start

    @property
    def irrep(self) -> str:
        """The block as an e3nn irreps string, e.g. ``"16x1o"``."""
        return f"{self.multiplicity}x{self.l}{'e' if self.parity == 1 else 'o'}"

    def __post_init__(self) -> None:
        if self.parity not in (1, -1):
            raise ValueError(f"parity must be 1 or -1, got {self.parity}")
        if self.l < 0 or self.multiplicity < 1 or self.start < 0:
            raise ValueError(f"invalid irrep block {self!r}")
        if self.stop - self.start != (2 * self.l + 1) * self.multiplicity:
            raise ValueError(
                f"block {self.l}: [{self.start}, {self.stop}) is not (2l+1) x multiplicity = {(2 * self.l + 1) * self.multiplicity} dims"
            )


@dataclass(frozen=True)
class IrrepsLayout:
    """Where each irrep block of a flat feature vector lives.

    Built from any e3nn irreps, including unsimplified ones:

    - Adjacent entries with the same order and parity (``"8x0e+8x0e"``) are merged into one block;
      this is exact, because two consecutive multiplicity-major blocks of the same ``2l+1`` are
      laid out exactly like one block with the summed multiplicity.
    - Entries are never reordered (the tensor is not), so an order that occurs in two separate
      places (``"4x0e+4x1o+4x0e"``, or ``1o`` and ``1e``) yields two blocks. ``blocks_for(l)``
      returns both; ``block(l)`` / ``slice`` / ``channels`` refuse such an ambiguous order with a
      ``ValueError`` rather than return dims that belong to a different block.
    - Zero-multiplicity entries occupy no dims and are dropped.
    """

    blocks: tuple[IrrepBlock, ...]

    def __post_init__(self) -> None:
        position = 0
        for block in self.blocks:
            if block.start != position:
                raise ValueError(f"blocks must be contiguous: block l={block.l} starts at {block.start}, expected {position}")
            position = block.stop

    @classmethod
    def from_irreps(cls, irreps: str | o3.Irreps) -> IrrepsLayout:
        # e3nn's simplify merges neighbouring copies of one irrep and drops empty ones; slices()
        # gives each block's span in the feature vector.
        simplified = o3.Irreps(irreps).simplify()
        return cls(
            tuple(
                IrrepBlock(l=ir.l, parity=ir.p, multiplicity=mul, start=span.start, stop=span.stop)
                for (mul, ir), span in zip(simplified, simplified.slices())
            )
        )

    @property
    def dim(self) -> int:
        return self.blocks[-1].stop if self.blocks else 0

    @property
    def l_values(self) -> tuple[int, ...]:
        """The order of each block, in layout order (ascending for the model's hidden irreps)."""
        return tuple(block.l for block in self.blocks)

    @property
    def irreps(self) -> o3.Irreps:
        return o3.Irreps([(b.multiplicity, (b.l, b.parity)) for b in self.blocks])

    def blocks_for(self, l: int) -> tuple[IrrepBlock, ...]:
        """Every block of order ``l`` (empty if none)."""
        return tuple(block for block in self.blocks if block.l == l)

    def block(self, l: int) -> IrrepBlock:
        """The single block of order ``l``; ``KeyError`` if absent, ``ValueError`` if ambiguous."""
        found = self.blocks_for(l)
        if not found:
            raise KeyError(f"no l={l} block in irreps {self}; present: {list(self.l_values)}")
        if len(found) > 1:
            raise ValueError(f"l={l} occurs in {len(found)} separate blocks of irreps {self}; use blocks_for({l})")
        return found[0]

    def slice(self, x: ArrayLike, l: int) -> ArrayLike:
        """The dims of block ``l`` of ``x`` (last axis): ``x[..., start:stop]``, a view."""
        block = self.block(l)
        self._check_last_dim(x)
        return x[..., block.start : block.stop]

    def channels(self, x: ArrayLike, l: int) -> ArrayLike:
        """Block ``l`` of ``x`` as ``[..., multiplicity, 2l+1]`` (one row per channel)."""
        block = self.block(l)
        flat = self.slice(x, l)
        return flat.reshape(tuple(flat.shape[:-1]) + (block.multiplicity, 2 * block.l + 1))

    def _check_last_dim(self, x: Any) -> None:
        # A tensor of another layout would slice without error and give wrong dims.
        if x.shape[-1] != self.dim:
            raise ValueError(f"last axis has {x.shape[-1]} dims, layout {self} has {self.dim}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly: the irreps string plus the explicit blocks (for readers without e3nn)."""
        return {
            "irreps": str(self),
            "dim": self.dim,
            "blocks": [
                {"l": b.l, "parity": b.parity, "multiplicity": b.multiplicity, "start": b.start, "stop": b.stop} for b in self.blocks
            ],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IrrepsLayout:
        if "blocks" in data:
            layout = cls(tuple(IrrepBlock(**block) for block in data["blocks"]))
            if "irreps" in data and cls.from_irreps(data["irreps"]) != layout:
                raise ValueError(f"layout blocks do not match irreps {data['irreps']!r}")
            return layout
        return cls.from_irreps(data["irreps"])

    def __str__(self) -> str:
        return "+".join(block.irrep for block in self.blocks)
