"""irrep-study: sweeps and ablations of equivariant GNNs over irrep configurations.

Packages by job, lowest first: `config` (what users write, validated without torch), `data` (QM9
and the composition reference), `nn` (the model), `training` (one trial, and what trials cost),
`tracking` (MLflow), `sweep` (Ray Tune; the only package that imports Ray), `bench` (timing); and
the modules `cli` (the commands), `best` (ranking configurations), `names` (metric and status
names), `errors`, `paths`, `legacy` (old module names that saved files still use).
"""

from study import legacy

__version__ = "0.1.0"

legacy.install()
