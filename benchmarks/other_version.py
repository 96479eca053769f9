"""Another version of one of this project's modules, loaded from a file beside this version's
(the A/B scripts: `git show REV:path > /tmp/file.py`, then time both in one process)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def load_other_version(path: Path, name: str):
    """The module in ``path``, registered as ``name`` (its dataclasses look their module up in
    ``sys.modules``); exits with one line if ``path`` is not a Python file."""
    spec = importlib.util.spec_from_file_location(name, path) if path.is_file() else None
    if spec is None or spec.loader is None:
        raise SystemExit(f"error: {path} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
