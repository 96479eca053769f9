"""The 19 QM9 targets by name, in PyTorch Geometric's order (index 12 is U0_atom). A module of
its own so that configs name-check targets without importing torch."""

# PyTorch Geometric's QM9 target order; units after conversion in the comments.
TARGETS = (
    "mu",  # D
    "alpha",  # a0^3
    "homo",  # eV
    "lumo",  # eV
    "gap",  # eV
    "r2",  # a0^2
    "zpve",  # eV
    "U0",  # eV
    "U",  # eV
    "H",  # eV
    "G",  # eV
    "cv",  # cal/(mol K)
    "U0_atom",  # eV
    "U_atom",  # eV
    "H_atom",  # eV
    "G_atom",  # eV
    "A",  # GHz
    "B",  # GHz
    "C",  # GHz
)
