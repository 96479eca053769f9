"""Analysis of a study from MLflow (`irrep-study analyze`): what including each l does to the test
error (ablation effects with intervals), and per-irrep utilization, structure and knockout scores
of every trial's test embeddings, related to test error across configurations.

In the order data flows: `load` (completed trials from MLflow), `scoring/` (features per irrep
block, scores, knockouts, RDKit descriptors), `stats/` (configurations and survival, factorial and
other ablation effects, correlations, their calibration by simulation), `report/` (the findings,
figures, tables and the HTML page), `pipeline` (the whole command), `analysis_run` (the analysis
as an MLflow run) and `reanalysis` (the statistics again from an analysis folder). Never imports
Ray.
"""
