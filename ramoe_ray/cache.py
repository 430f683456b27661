"""The content-addressed cache: keys, and atomic writes.

Keys: an artefact's folder name is ``content_key`` of everything that determines it (its inputs, and
the ``code_digest`` of the code that computes it); files and folders enter a key through
``file_digest`` / ``folder_digest`` (memoised, so multi-GB weights are read once).

Writes: every stage writes into a temporary sibling and renames it into place (``os.replace`` is atomic
on one filesystem); an artefact that exists is complete and is reused as is.
"""

from __future__ import annotations

import contextlib
import contextvars
import glob
import hashlib
import inspect
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_dir(final: str | os.PathLike, build: Callable[[Path], None]) -> Path:
    """Runs ``build(tmp_dir)`` and renames tmp_dir to ``final``; an existing ``final`` is returned
    untouched. Losing a race to a concurrent builder of the same artefact is fine. The temporary folder
    is named after its writer (``.FINAL.PID@HOST.xxxx``): the leftovers of a writer killed hard are removed
    on the next build of the same artefact (``remove_stale_temps``)."""
    final = Path(final)
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.{os.getpid()}@{socket.gethostname()}."))
    try:
        build(tmp)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.is_dir():
            raise
    return final


def remove_stale_temps(final: str | os.PathLike) -> list[Path]:
    """Removes the temporary folders of ``final`` whose writer, a process on this host, no longer runs;
    returns them. A folder of a live process, or of another host (it cannot be checked from here), is
    left alone."""
    final = Path(final)
    host, removed = socket.gethostname(), []
    for tmp in final.parent.glob(f".{glob.escape(final.name)}.*@*"):
        pid, _, rest = tmp.name[len(final.name) + 2:].partition("@")
        if tmp.is_dir() and pid.isdigit() and rest.rpartition(".")[0] == host and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as JSON (indented, NaN refused) atomically (``write_text_atomic``)."""
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False))


def write_text_atomic(path: str | os.PathLike, text: str | bytes) -> Path:
    """Write text (or bytes) via a temp file in the same folder, fsync, and ``os.replace``: never half written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode() if isinstance(text, str) else text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


# ------------------------------------------------------------------------------------------- keys


def content_key(obj: Any, length: int = 24) -> str:
    """sha256 of ``obj`` as canonical JSON (sorted keys; other types by ``str``), cut to ``length`` hex digits."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


def code_digest(*parts: Any) -> str:
    """Hash of the code that determines an artefact: each part is a module (its whole source file) or a
    function/class (its source)."""
    h = hashlib.sha256()
    for part in parts:
        path = getattr(part, "__file__", None) if inspect.ismodule(part) else None
        h.update(Path(path).read_bytes() if path else inspect.getsource(part).encode())
    return h.hexdigest()[:16]


_READ_ONLY = contextvars.ContextVar("ramoe_cache_read_only", default=False)


@contextlib.contextmanager
def read_only():
    """Within it, ``file_digest`` reads its memos but writes none (a dry run writes nothing)."""
    token = _READ_ONLY.set(True)
    try:
        yield
    finally:
        _READ_ONLY.reset(token)


def file_digest(path: str | os.PathLike, cache_dir: str | os.PathLike) -> str:
    """sha256 of a file's bytes, memoised under ``cache_dir/hashes`` by (absolute path, size, mtime_ns)
    (``read_only``: the memo is read, not written)."""
    path = Path(path).resolve()
    st = path.stat()
    memo = Path(cache_dir) / "hashes" / content_key([str(path), st.st_size, st.st_mtime_ns], 32)
    if memo.is_file():
        return memo.read_text().strip()
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if not _READ_ONLY.get():
        write_text_atomic(memo, h.hexdigest())
    return h.hexdigest()


def folder_digest(folder: str | os.PathLike, cache_dir: str | os.PathLike) -> str:
    """Content hash of every file under ``folder`` (names starting with '.' skipped)."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    return content_key([[str(p.relative_to(folder)), file_digest(p, cache_dir)] for p in files], 64)
