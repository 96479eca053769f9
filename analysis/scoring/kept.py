"""A trial's scores, computed once and kept with its MLflow run.

Scoring a trial (utilization, structure, UMAP, knockouts) is most of what `irrep-study analyze`
costs, and it depends on nothing but the trial's own artifacts and the score settings. So the
first analysis stores the result as an artifact of the trial's run,
``analysis_scores/scores-<key>.npz``, and every later analysis with the same key reads it back
instead of scoring again: a grown study scores only its new trials, a second ``--out`` scores
nothing. The key is a hash of :func:`score_key`: the scores' version (bump
:data:`SCORES_VERSION` whenever a score is computed differently), the settings that change a
score, and the versions of the libraries whose numbers they are (UMAP, scikit-learn, PyTorch).
Scores kept under another key are left in place (switching back reuses them) and the trial is
scored again, with a message saying what differs.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import tempfile
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path

import numpy as np

SCORES_VERSION = 2  # 2: UMAP from exact neighbours given to it (analysis/scoring/scores.py)
ARTIFACT_FOLDER = "analysis_scores"
LIBRARIES = ("umap-learn", "scikit-learn", "torch")


@dataclass
class TrialScores:
    """Everything the analysis keeps of scoring one trial."""

    values: dict[str, dict[str, float]]  # block -> score -> value
    sample: np.ndarray  # rows of the test embedding used by the structure scores
    umap: dict[str, np.ndarray] = field(default_factory=dict)  # block -> [len(sample), 2]
    knockout_maes: tuple[float, float] = (math.nan, math.nan)  # the model's and the composition fit's MAE (meV)


def score_key(score_settings, knockout: bool) -> dict:
    """What the scores of a trial are a function of, besides the trial itself."""
    return {
        "version": SCORES_VERSION,
        "knockout": bool(knockout),
        **asdict(score_settings),
        **{library: version(library) for library in LIBRARIES},
    }


def key_name(key: dict) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return f"scores-{digest}.npz"


def to_bytes(scores: TrialScores, key: dict) -> bytes:
    arrays = {"sample": np.asarray(scores.sample)}
    arrays.update({f"umap/{block}": np.asarray(xy, dtype=np.float64) for block, xy in scores.umap.items()})
    meta = {"key": key, "values": scores.values, "knockout_maes": list(scores.knockout_maes)}
    buffer = io.BytesIO()
    # NaN survives json (as NaN): a score can be undefined for a block.
    np.savez(buffer, meta=np.array(json.dumps(meta)), **arrays)
    return buffer.getvalue()


def from_file(path) -> tuple[dict, TrialScores]:
    """The key and scores of a kept file (a path or a binary file object)."""
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        umap = {name.removeprefix("umap/"): data[name] for name in data.files if name.startswith("umap/")}
        scores = TrialScores(meta["values"], data["sample"], umap, tuple(meta["knockout_maes"]))
    return meta["key"], scores


def differences(old: dict, new: dict) -> str:
    """``max_molecules 2000 -> 500, version 1 -> 2``: what a kept key has that the current one has not."""
    names = sorted(set(old) | set(new))
    return ", ".join(f"{name} {old.get(name)} -> {new.get(name)}" for name in names if old.get(name) != new.get(name))


class KeptScores:
    """The kept scores of a study's trials in its MLflow store: read, and written as they are computed."""

    def __init__(self, client, key: dict) -> None:
        self.client = client
        self.key = key
        self.name = key_name(key)

    def read(self, run_id: str) -> tuple[TrialScores | None, str | None]:
        """The trial's kept scores for this key, or None and (if it has scores of another key)
        what differs."""
        listing = [info.path for info in self.client.list_artifacts(run_id, ARTIFACT_FOLDER)]
        wanted = f"{ARTIFACT_FOLDER}/{self.name}"
        if wanted in listing:
            key, scores = from_file(Path(self.client.download_artifacts(run_id, wanted)))
            if key == self.key:
                return scores, None
        others = [path for path in listing if path != wanted and path.endswith(".npz")]
        if not others:
            return None, None
        old_key, _ = from_file(Path(self.client.download_artifacts(run_id, others[-1])))
        return None, differences(old_key, self.key)

    def write(self, run_id: str, scores: TrialScores) -> None:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / self.name
            path.write_bytes(to_bytes(scores, self.key))
            self.client.log_artifact(run_id, str(path), artifact_path=ARTIFACT_FOLDER)
