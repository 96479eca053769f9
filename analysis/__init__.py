"""Analysis of a study from MLflow (`irrep-study analyze`): what including each l does to the test
error (ablation effects with intervals), and per-irrep utilization, structure and knockout scores
of every trial's test embeddings, related to test error across configurations.

Modules, in the order data flows: load (completed trials from MLflow), configurations (what a
trial is a replicate of), survival (every trial run's status; which configurations completed),
descriptors (RDKit, cached), features (rotation-invariant features per irrep block), scores,
knockout, ablation, correlate, plots, report (self-contained HTML), pipeline (the whole command).
Never imports Ray.
"""
