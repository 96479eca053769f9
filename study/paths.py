"""Paths a command writes, checked before any work, and files replaced atomically.

Every output path of the CLI (`train --out`, `sweep --storage`, `best --export`, `analyze --out`,
the QM9 cache folder) goes through `writable_folder` or `writable_file` at the start of its
command, so that a file where a folder belongs, a folder that cannot be written or a parent that
is a file is refused in one line naming the option and the path, not after minutes of work.
`atomic_write` replaces a file so that a write failing midway (a full disk) leaves the old file
whole and names the file that could not be written.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from study.errors import UserError


def _nearest_existing(path: Path) -> Path:
    """`path` itself or its closest ancestor that exists (a file or a folder)."""
    candidate = path
    # os.path.exists is False below a regular file (ENOTDIR) and inside a folder that cannot be
    # searched (EACCES), so the walk stops at that file or folder.
    while not os.path.exists(candidate) and candidate != candidate.parent:
        candidate = candidate.parent
    return candidate


def _as_given(ancestor: Path, path: Path) -> Path:
    """`ancestor` (of `path`'s absolute form) written as the matching ancestor of `path` as the user gave it."""
    levels = len(path.absolute().parts) - len(ancestor.parts)
    if 0 < levels <= len(path.parents):
        return path.parents[levels - 1]
    return path if levels == 0 else ancestor


def _check_can_create_in(path: Path, option: str) -> None:
    """`path` is a folder, or can be created as one: its nearest existing ancestor is a writable folder."""
    existing = _nearest_existing(path.absolute())
    if not os.path.isdir(existing):
        if existing == path.absolute():
            raise UserError(f"{option} {path}: exists and is not a folder")
        raise UserError(f"{option} {path}: {_as_given(existing, path)} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "the folder" if existing == path.absolute() else f"its parent {_as_given(existing, path)}"
        raise UserError(f"{option} {path}: {where} is not writable")


def writable_folder(path: str | Path, option: str) -> Path:
    """`path` as a folder that exists or can be created, and can be written; UserError otherwise.

    `option` names where the path came from (``--out``, ``IRREP_STUDY_CACHE``); nothing is created.
    """
    path = Path(path)
    _check_can_create_in(path, option)
    return path


def writable_file(path: str | Path, option: str) -> Path:
    """`path` as a file that can be created or replaced: not a folder, its parent an existing
    writable folder (the parent is not created); UserError otherwise."""
    path = Path(path)
    absolute = path.absolute()
    if os.path.isdir(absolute):
        raise UserError(f"{option} {path}: is a folder; give a file path")
    parent = absolute.parent
    existing = _nearest_existing(parent)
    if not os.path.isdir(existing):
        raise UserError(f"{option} {path}: {_as_given(existing, path)} is a file, not a folder")
    if existing != parent:
        raise UserError(f"{option} {path}: folder {path.parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{option} {path}: folder {path.parent} is not writable")
    return path


def atomic_write(path: str | Path, write: Callable[[Path], None], option: str | None = None) -> None:
    """Replace `path` with what `write(temporary_path)` writes, all or nothing.

    The temporary file sits beside `path` (same file system, so the replace is atomic). An
    OSError while writing or replacing (a full disk, a vanished folder) removes the temporary
    file, leaves any old `path` as it was, and is raised as a UserError naming `path`.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise UserError(f"{option + ' ' if option else ''}{path}: cannot write ({reason})") from None
    finally:
        try:
            temporary.unlink(missing_ok=True)
        except OSError:
            pass  # nothing to clean up where the folder itself is gone
