"""Per-trial scores of the test embeddings: rotation-invariant features per irrep block
(`features`), utilization, structure and probe scores (`scores`), knockouts of one irrep at a time
through the trial's own model (`knockout`) and RDKit descriptors of the test molecules
(`descriptors`)."""
