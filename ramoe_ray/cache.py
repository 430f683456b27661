"""Atomic artefact writes: a crash never leaves an artefact that looks complete.

Every stage writes into a temporary sibling and renames it into place (``os.replace`` is atomic on
one filesystem); an artefact that exists is complete and is reused as is.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable


def atomic_dir(final: str | os.PathLike, build: Callable[[Path], None]) -> Path:
    """Runs ``build(tmp_dir)`` and renames tmp_dir to ``final``; an existing ``final`` is returned
    untouched. Losing a race to a concurrent builder of the same artefact is fine."""
    final = Path(final)
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        build(tmp)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.is_dir():
            raise
    return final


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as JSON via a temp file in the same folder and ``os.replace`` (never half written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path
