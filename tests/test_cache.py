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
