"""Sets of spherical-harmonic orders (l values): the rules a set must follow, and the parity of
each order. Kept free of torch and e3nn so that configs are validated, and bad ones refused,
without paying for those imports."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np

# The paper used orders up to 10; e3nn's spherical harmonics go further, but tensor products
# with l > 10 are slow enough that a value above this is almost certainly a typo.
MAX_L = 10


def validate_l_values(l_values: Sequence[int]) -> tuple[int, ...]:
    """Check a set of orders and return it sorted ascending.

    Non-contiguous sets such as ``[0, 3, 4, 5, 6]`` are valid. ``0`` is required because the
    readout only sees the scalar (l = 0) channels. Errors are one-line ``ValueError`` messages.
    """
    if isinstance(l_values, (str, bytes)) or not isinstance(l_values, Sequence | np.ndarray):
        raise ValueError(f"l values must be a list of integers, got {l_values!r}")
    values = list(l_values)
    if not values:
        raise ValueError("l values must not be empty (give at least [0])")
    # bool is an Integral in Python, but `True` as an order is a mistake, not an l = 1.
    if any(isinstance(v, bool | np.bool_) or not isinstance(v, numbers.Integral) for v in values):
        raise ValueError(f"l values must be integers, got {values!r}")
    values = [int(v) for v in values]
    for value in values:
        if not 0 <= value <= MAX_L:
            raise ValueError(f"l value {value} out of range 0..{MAX_L}")
    seen: set[int] = set()
    for value in values:
        if value in seen:
            raise ValueError(f"l value {value} repeated")
        seen.add(value)
    if 0 not in seen:
        raise ValueError("l values must include 0")
    return tuple(sorted(values))


def parity_of(l: int) -> int:
    """Parity of the spherical harmonic of order ``l``: (-1)^l (1 even, -1 odd)."""
    return 1 if l % 2 == 0 else -1
