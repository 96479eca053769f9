"""Small torch helpers shared by the model tests."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build under `dtype`: e3nn computes its constants (Clebsch-Gordan coefficients, so(3)
    generators) in the default dtype, so a model built under float32 and cast with .double() is
    equivariant (and equal to the other backend) only to ~1e-8."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
