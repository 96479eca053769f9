"""A completed trial's best model as an MLflow Model (PyTorch flavour), and its registration.

Each completed trial logs, beside its files, the artifact folder `model`: an MLflow Model built
from the trial's `config.yaml` and `best_model.pt`, so that
``mlflow.pytorch.load_model("runs:/<run id>/model")`` (or ``models:/NAME/VERSION`` once
`irrep-study best --register NAME` registered it) returns the trained ``IrrepConvModel``. Its
forward takes a PyG batch of QM9 molecules and returns the standardized prediction, exactly as the
model rebuilt from best_model.pt does; the MLmodel file's metadata holds the trial config and the
target reference that turns that output into the target's unit (``TargetReference.absolute``),
and the config is also the extra file `extra_files/config.yaml` (for `irrep-study train`).

The folder is built on local disk in the trial's work folder and logged through the trial's
journal like every other artifact, so it reaches MLflow after a tracking outage too.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from study.errors import UserError
from study.tracking import store

MODEL_ARTIFACT = "model"  # artifact path of the MLflow Model in a trial run
MODEL_FOLDER = "mlflow_model"  # where it is built, in the trial's work folder


def _requirements() -> list[str]:
    """What loading the model needs, pinned to what built it. Given explicitly: MLflow's own
    inference of requirements loads the model in a subprocess, seconds per trial."""
    pins = []
    for package in ("irrep-study", "torch", "e3nn"):
        try:
            pins.append(f"{package}=={version(package)}")
        except PackageNotFoundError:  # irrep-study run from a source tree that was never installed
            pins.append(package)
    return pins


@contextmanager
def _quiet_mlflow() -> Iterator[None]:
    """No per-trial warning about pickled models (the format is chosen on purpose, see below) and
    no progress bar for copying the extra file, in every trial's log."""
    logger = logging.getLogger("mlflow.pytorch")
    level = logger.level
    logger.setLevel(logging.ERROR)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        yield
    finally:
        logger.setLevel(level)


def save_trial_model(out_dir: Path) -> Path | None:
    """Build the MLflow Model of the trial in `out_dir` (a folder `run_trial` wrote) as
    ``out_dir/mlflow_model``; None when the trial has no best weights (it did not complete)."""
    import mlflow.pytorch
    import torch

    from study.config.trial import load_trial_config
    from study.nn.model import build_model

    out_dir = Path(out_dir)
    weights, config_file = out_dir / "best_model.pt", out_dir / "config.yaml"
    if not weights.exists() or not config_file.exists():
        return None
    config = load_trial_config(config_file)
    # Rebuilt exactly as analysis loads a trial (its config, then best_model.pt), on the CPU.
    model = build_model(config)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.eval()
    metadata = {"trial_config": config.model_dump(mode="json")}
    result_file = out_dir / "result.json"
    if result_file.exists():
        metadata["target_reference"] = json.loads(result_file.read_text()).get("reference")
    target = out_dir / MODEL_FOLDER
    shutil.rmtree(target, ignore_errors=True)  # save_model refuses an existing folder (a retried trial)
    with _quiet_mlflow():
        # "pickle", not MLflow's default "pt2": pt2 traces forward with example tensors, and this
        # forward takes a PyG batch. Unpickling needs irrep-study installed (it is a requirement).
        mlflow.pytorch.save_model(
            model,
            str(target),
            serialization_format="pickle",
            pip_requirements=_requirements(),
            extra_files=[str(config_file)],
            metadata=metadata,
        )
    return target


def register_run_model(uri: str, run_id: str, name: str) -> int:
    """Register run `run_id`'s logged MLflow Model (``runs:/<run_id>/model``) under `name` in the
    model registry of `uri` (a new version when `name` exists); its version number."""
    from mlflow.exceptions import MlflowException

    client = store.client(uri)
    with store.quick_failure():
        try:
            listing = {info.path for info in client.list_artifacts(run_id, MODEL_ARTIFACT)}
        except Exception as exc:
            raise UserError(f"--register: cannot list the artifacts of run {run_id} ({_first_line(exc)})") from None
    if f"{MODEL_ARTIFACT}/MLmodel" not in listing:
        raise UserError(
            f"--register: the winning run {run_id} has no logged MLflow model (runs:/{run_id}/{MODEL_ARTIFACT}); "
            "trials logged before irrep-study logged models have none"
        )
    # The run's own artifact location, which is what mlflow.register_model stores for a runs:/ URI
    # (this client, unlike that fluent function, keeps to `uri` rather than MLflow's global URI).
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{MODEL_ARTIFACT}"
    try:
        try:
            client.create_registered_model(name)
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise
        return int(client.create_model_version(name, source, run_id=run_id).version)
    except Exception as exc:  # MLflow raises more than MlflowException for a store it cannot use
        registry = os.environ.get("MLFLOW_REGISTRY_URI") or uri  # MLflow's own choice of registry
        raise UserError(f"--register {name}: the model registry {store.redact(registry)} refused it ({_first_line(exc)})") from None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
