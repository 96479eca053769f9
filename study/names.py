"""The names a trial's numbers and states go by, wherever they are written or read: MLflow metric
keys, the results a trial reports to Ray Tune, table columns, and the trial statuses of the
`irrep_study.status` tag. Plain strings (they are the stored format: renaming one orphans every
study tracked before); torch-free and Ray-free, so every layer may import this."""

from __future__ import annotations

# Metrics, in meV unless the name says otherwise.
VAL_MAE = "val_mae_meV"  # validation MAE of an epoch: what ranks configurations and stops trials
BEST_VAL_MAE = "best_val_mae_meV"  # lowest validation MAE so far: its epoch's model is the one kept
TEST_MAE = "test_mae_meV"  # test MAE of the kept model, measured once at the end: reported, never chosen on
BASELINE_VAL_MAE = "baseline_val_mae_meV"  # the composition fit (least squares on element counts)
BASELINE_TEST_MAE = "baseline_test_mae_meV"
TRAIN_LOSS = "train_loss"
EPOCH_SECONDS = "epoch_seconds"  # wall time of an epoch's training, on the trial's worker

# Statuses of a trial run (the `irrep_study.status` tag) and of a trial in a sweep's report.
RUNNING = "running"
COMPLETED = "completed"  # trained every epoch and measured its test error
STOPPED_EARLY = "stopped_early"  # stopped by the scheduler (ASHA) after an epoch
FAILED = "failed"  # raised, and failed again after its retries
INTERRUPTED = "interrupted"  # its driver stopped (Ctrl-C, killed); a resumed sweep continues it
STATUSES = (RUNNING, COMPLETED, STOPPED_EARLY, FAILED, INTERRUPTED)
