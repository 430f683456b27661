import os
import socket

import pytest

from ramoe_ray.cache import atomic_dir


def test_atomic_dir_leaves_nothing_on_failure_and_reuses_a_complete_artefact(tmp_path):
    def crash(tmp):
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_dir(tmp_path / "art", crash)
    assert list(tmp_path.iterdir()) == []  # no artefact, no temp folder

    built = []
    out = atomic_dir(tmp_path / "art", lambda tmp: (built.append(1), (tmp / "ok").write_text("1")))
    assert (out / "ok").read_text() == "1" and built == [1]
    assert atomic_dir(tmp_path / "art", crash) == out and built == [1]  # exists: not rebuilt


def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:  # the child exits at once; once reaped, its pid names no process
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def test_a_killed_writers_temp_folder_is_removed_on_the_next_build_and_no_live_one(tmp_path):
    host = socket.gethostname()
    dead = tmp_path / f".art.{_dead_pid()}@{host}.k1ll3d"  # a writer killed hard (kill -9) mid-write
    live = tmp_path / f".art.{os.getpid()}@{host}.l1v3"  # a concurrent writer, still running
    remote = tmp_path / ".art.1@other-host.n0d3"  # another node's writer: cannot be checked from here
    other = tmp_path / f".art2.{_dead_pid()}@{host}.0th3r"  # another artefact's leftover: its own build cleans it
    for d in (dead, live, remote, other):
        d.mkdir()
        (d / "part-0.parquet").write_bytes(b"half")
    atomic_dir(tmp_path / "art", lambda tmp: (tmp / "ok").write_text("1"))
    assert not dead.exists()
    assert live.is_dir() and remote.is_dir() and other.is_dir()
    assert (tmp_path / "art" / "ok").read_text() == "1"
    # a build's own temp folder carries its writer, so the next run can tell
    seen = []
    atomic_dir(tmp_path / "art3", lambda tmp: seen.append(tmp.name))
    assert seen[0].startswith(f".art3.{os.getpid()}@{host}.")
