"""Module names that files written before the package layout still name: pickled MLflow models
(`study.model.IrrepConvModel`, ...) and Ray Tune's saved experiment state, which `--resume`
unpickles (`study.sweep.SeedRepeater`, `study.space.OptunaSpace`, ...). Pickles name a class
by module and attribute, so each old module answers with its new module's attributes.

`install()` (run by `import study`) adds a finder that imports an old module name as a view of
the new one; the old names of classes that moved out of `study.sweep`, still a package, are
answered by its `__getattr__` from `SWEEP_NAMES`. Nothing new is written under these names.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types

MOVED_MODULES = {
    "study.space": "study.config.space",
    "study.lvalues": "study.config.lvalues",
    "study.targets": "study.config.targets",
    "study.reference": "study.data.reference",
    "study.irreps": "study.nn.irreps",
    "study.model": "study.nn.model",
    "study.fast_tp": "study.nn.fast_tp",
    "study.train": "study.training.trial",
    "study.embeddings": "study.training.embeddings",
    "study.resources": "study.training.resources",
    "study.plan": "study.training.plan",
    "study.journal": "study.tracking.journal",
    "study.mlflow_model": "study.tracking.logged_model",
    "study.seed_groups": "study.sweep.seed_groups",
    "study.bench_study": "study.bench.study",
}

# Classes and functions of the old `study/sweep.py` that Ray Tune pickles with a sweep's state.
SWEEP_NAMES = {
    "SeedRepeater": "study.sweep.scheduling",
    "SeedAwareASHA": "study.sweep.scheduling",
    "SweepStatus": "study.sweep.status",
    "TrackTrialEnds": "study.sweep.callbacks",
    "SweepContext": "study.sweep.trainable",
    "run_sweep_trial": "study.sweep.trainable",
}


class _View(types.ModuleType):
    """An old module name: every attribute is the new module's."""

    def __init__(self, name: str, target: str):
        super().__init__(name, f"moved to {target}")
        self._target = target

    def __getattr__(self, attribute: str):
        return getattr(importlib.import_module(self._target), attribute)


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        return _View(spec.name, MOVED_MODULES[spec.name])

    def exec_module(self, module) -> None:
        pass


def sweep_attribute(name: str):
    """An attribute of the old `study.sweep` module (for `study.sweep.__getattr__`)."""
    if name not in SWEEP_NAMES:
        raise AttributeError(f"module 'study.sweep' has no attribute {name!r}")
    return getattr(importlib.import_module(SWEEP_NAMES[name]), name)


def install() -> None:
    if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModules())
