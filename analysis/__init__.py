"""Analysis of a study from MLflow: per-irrep utilization, structure and knockout scores of every
trial's test embeddings, correlated with test error across trials (`irrep-study analyze`).

Modules, in the order data flows: load (trials from MLflow), descriptors (RDKit, cached),
features (rotation-invariant features per irrep block), scores, knockout, correlate, plots,
report (self-contained HTML), pipeline (the whole command). Never imports Ray.
"""
