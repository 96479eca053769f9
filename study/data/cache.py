"""Where the processed QM9 cache lives, checked before any work; torch-free, so the CLI can
refuse a bad folder before it imports torch."""

from __future__ import annotations

import os
from pathlib import Path

from study.paths import writable_folder

CACHE_FORMAT_VERSION = 1
CACHE_FILE = f"qm9-v{CACHE_FORMAT_VERSION}.pt"
CACHE_META_FILE = f"qm9-v{CACHE_FORMAT_VERSION}.json"


def default_cache_dir() -> Path:
    return Path(os.environ.get("IRREP_STUDY_CACHE") or Path.home() / ".cache" / "irrep-study")


def cache_folder(cache_dir: Path | None, subfolder: str | None = None) -> Path:
    """The QM9 cache folder (or `subfolder` of it), checked before any work: a built cache is only
    read, so a read-only folder holding one will do; otherwise it must be a folder that can be written."""
    if cache_dir is not None:
        option = "--cache-dir"
    elif os.environ.get("IRREP_STUDY_CACHE"):
        option = "IRREP_STUDY_CACHE"
    else:
        option = "QM9 cache folder"
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if subfolder is not None:
        return writable_folder(folder / subfolder, option)
    if (folder / CACHE_FILE).is_file():
        return folder
    return writable_folder(folder, option)
