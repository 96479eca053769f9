"""QM9 as tensors: loading from the `qm9pack` package, seeded splits and batches (`qm9`), where
the processed cache lives (`cache`, torch-free), and the per-element reference every trial learns
the residual of, which is also the composition baseline every model is compared with
(`reference`)."""
