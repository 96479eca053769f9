"""irrep-study: sweeps and ablations of equivariant GNNs over irrep configurations."""

__version__ = "0.1.0"
