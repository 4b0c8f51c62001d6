"""storage.atomic: files and folders appear whole under their name, or not at all."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.atomic import atomic_dir, atomic_path, write_json_atomic, write_text_atomic


def test_atomic_path_renames_a_whole_file_into_place(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "shard.parquet"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.suffix == ".parquet"
        assert not target.exists()  # nothing under the name while it is written
        pq.write_table(pa.table({"x": [1, 2]}), tmp)
    assert pq.read_table(target).column("x").to_pylist() == [1, 2]
    assert sorted(p.name for p in target.parent.iterdir()) == ["shard.parquet"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_atomic_path_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = write_text_atomic(tmp_path / "a.txt", "old\n")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_two_writers_of_one_file_get_their_own_temporaries(tmp_path: Path) -> None:
    target = tmp_path / "prepared.npz"
    with atomic_path(target) as one, atomic_path(target) as two:
        assert one != two
        np.savez(one, a=np.arange(3))
        np.savez(two, a=np.arange(3))
    assert np.load(target)["a"].tolist() == [0, 1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["prepared.npz"]


def test_write_json_atomic(tmp_path: Path) -> None:
    path = write_json_atomic(tmp_path / "x.json", {"a": Path("/p")})
    assert path.read_text() == '{\n  "a": "/p"\n}\n'


def test_atomic_dir_replaces_a_folder_whole(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "stale.bin").write_text("old")
    with atomic_dir(target) as tmp:
        (tmp / "config.json").write_text("{}")
        assert (target / "stale.bin").exists()  # the old folder stays until the block ends
    assert sorted(p.name for p in target.iterdir()) == ["config.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_atomic_dir_failure_keeps_the_old_folder(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights").write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_dir(target) as tmp:
        (tmp / "weights").write_text("half")
        raise KeyboardInterrupt
    assert (target / "weights").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
