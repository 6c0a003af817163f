"""Atomic writes: old content survives any failure, and no temporary file is left behind."""

from __future__ import annotations

import io
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from tl_latentspaces import files
from tl_latentspaces.checkpoints import load_checkpoint, save_checkpoint
from tl_latentspaces.files import replace_folder_atomic, write_bytes_atomic, write_files_atomic, write_into_folder


def test_write_bytes_creates_replaces_and_keeps_the_mode(tmp_path):
    target = tmp_path / "sub" / "a.json"
    assert write_bytes_atomic(target, b"one") == target and target.read_bytes() == b"one"
    assert target.stat().st_mode & 0o777 == 0o644
    os.chmod(target, 0o600)
    write_bytes_atomic(target, b"two")
    assert target.read_bytes() == b"two" and target.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.json"]


def test_write_bytes_without_parents_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="folder .*missing.* does not exist"):
        write_bytes_atomic(tmp_path / "missing" / "a.html", b"x", make_parents=False)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(IsADirectoryError, match=r"cannot write .*: it is a folder\. Pass a file path in it"):
        write_bytes_atomic(tmp_path, b"x")
    (tmp_path / "afile").write_bytes(b"keep")
    for make_parents in (True, False):
        with pytest.raises(NotADirectoryError, match=r"afile' is a file, not a folder"):
            write_bytes_atomic(tmp_path / "afile" / "a.html", b"x", make_parents=make_parents)
    assert [p.name for p in tmp_path.iterdir()] == ["afile"] and (tmp_path / "afile").read_bytes() == b"keep"


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_failed_rename_keeps_the_old_file(tmp_path, monkeypatch, error):
    target = tmp_path / "a.txt"
    target.write_bytes(b"old")

    def fail(src, dst):
        raise error

    monkeypatch.setattr(files.os, "replace", fail)
    with pytest.raises(type(error)):
        write_bytes_atomic(target, b"new")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_several_files_all_written_before_any_is_replaced(tmp_path, monkeypatch):
    (tmp_path / "a").write_bytes(b"old a")
    (tmp_path / "b").write_bytes(b"old b")
    real = files._temp_file

    def second_fails(folder, name, data, mode):
        if name == "b":
            raise OSError("disk full")
        return real(folder, name, data, mode)

    monkeypatch.setattr(files, "_temp_file", second_fails)
    with pytest.raises(OSError, match="disk full"):
        write_files_atomic(tmp_path, {"a": b"new a", "b": b"new b"})
    assert (tmp_path / "a").read_bytes() == b"old a" and (tmp_path / "b").read_bytes() == b"old b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
    monkeypatch.setattr(files, "_temp_file", real)
    assert write_files_atomic(tmp_path, {"a": b"new a", "b": b"new b"}) == [tmp_path / "a", tmp_path / "b"]
    assert (tmp_path / "b").read_bytes() == b"new b"


def test_folder_replacement(tmp_path):
    target = tmp_path / "lens"

    def writer(text):
        def write(tmp):
            (tmp / "marker").write_text(text)
        return write

    replace_folder_atomic(target, writer("one"), own_marker="marker")
    umask = os.umask(0o022)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask
    replace_folder_atomic(target, writer("two"), own_marker="marker")
    assert (target / "marker").read_text() == "two"

    def broken(tmp):
        (tmp / "marker").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        replace_folder_atomic(target, broken, own_marker="marker")
    assert (target / "marker").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lens"]

    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="is not a lens folder \\(no marker\\)"):
        replace_folder_atomic(foreign, writer("x"), own_marker="marker", what="lens folder")
    assert (foreign / "mine.txt").read_text() == "keep"
    replace_folder_atomic(foreign, writer("cache"), own_marker=None)
    assert sorted(p.name for p in foreign.iterdir()) == ["marker"]


def test_write_into_folder_replaces_the_named_files_only(tmp_path):
    folder = tmp_path / "lens"
    write_into_folder(folder, [("data.bin", b"1"), ("marker", b"names 1")], own_marker="marker")
    (folder / "README.md").write_text("mine")
    (folder / "sub").mkdir()
    (folder / "sub" / "keep.txt").write_text("also mine")
    write_into_folder(folder, [("marker", b"interim"), ("data.bin", b"2"), ("marker", b"names 2")], own_marker="marker")
    assert (folder / "data.bin").read_bytes() == b"2" and (folder / "marker").read_bytes() == b"names 2"
    assert (folder / "README.md").read_text() == "mine" and (folder / "sub" / "keep.txt").read_text() == "also mine"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "data.bin", "marker", "sub"]
    # An empty folder is used; a folder of other files or a file is refused, untouched.
    (tmp_path / "empty").mkdir()
    write_into_folder(tmp_path / "empty", [("marker", b"x")], own_marker="marker")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "data.bin").write_bytes(b"theirs")
    (tmp_path / "afile").write_text("a file")
    for target in (tmp_path / "other", tmp_path / "afile"):
        with pytest.raises(FileExistsError, match="is not a lens folder .no marker.; refusing to write into it"):
            write_into_folder(target, [("data.bin", b"ours")], own_marker="marker", what="lens folder")
    assert (tmp_path / "other" / "data.bin").read_bytes() == b"theirs" and (tmp_path / "afile").read_text() == "a file"


def test_write_into_folder_stops_at_a_failure_in_order(tmp_path, monkeypatch):
    folder = tmp_path / "f"
    write_into_folder(folder, [("a", b"old a"), ("marker", b"old")], own_marker="marker")
    real = files.os.replace

    def full(src, dst):
        if Path(dst).name == "marker":
            raise OSError("disk full")
        return real(src, dst)

    monkeypatch.setattr(files.os, "replace", full)
    with pytest.raises(OSError, match="disk full"):
        write_into_folder(folder, [("a", b"new a"), ("marker", b"new")], own_marker="marker")
    with pytest.raises(OSError, match="disk full"):
        write_into_folder(tmp_path / "fresh", [("data.bin", b"new"), ("marker", b"new")], own_marker="marker")
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError, match="disk full"):
        write_into_folder(tmp_path / "empty", [("data.bin", b"new"), ("marker", b"new")], own_marker="marker")
    monkeypatch.undo()
    # into a new or empty folder, the files written before the failure are taken back: a retry works
    assert list((tmp_path / "empty").iterdir()) == []
    write_into_folder(tmp_path / "empty", [("data.bin", b"new"), ("marker", b"new")], own_marker="marker")
    shutil.rmtree(tmp_path / "empty")
    # What came before the failure is written, what came after is not, no temporary is left,
    # and a folder the failed call created is gone again.
    assert (folder / "a").read_bytes() == b"new a" and (folder / "marker").read_bytes() == b"old"
    assert sorted(p.name for p in folder.iterdir()) == ["a", "marker"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]
    assert files.sha256_hex(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_torch_bytes_reads_back_and_refuses_what_a_safe_load_would_refuse(tmp_path):
    big = torch.arange(100_000, dtype=torch.float32)
    state = {"view": big[10:13], "n": 3, "pair": (1, "a"), "nested": {"none": None, "list": [0.5, True]}}
    back = torch.load(io.BytesIO(files.torch_bytes(state)), weights_only=True)
    assert torch.equal(back["view"], torch.tensor([10.0, 11.0, 12.0])) and back["pair"] == (1, "a")
    assert back["nested"] == {"none": None, "list": [0.5, True]} and back["n"] == 3
    # a view is saved alone, not with the 400 KB storage it lives in
    assert len(files.torch_bytes({"view": big[10:13]})) < 4096
    # a checkpoint holding something a weights_only load refuses fails when written, naming where, and leaves
    # no file behind (it used to be written, and the run could not resume from it)
    with pytest.raises(TypeError, match=r"state entry \['states'\]\['align'\]\['bad'\] has type object"):
        save_checkpoint(tmp_path, "runner", 0, {"done": 1}, {"align": {"bad": object()}})
    assert list(tmp_path.iterdir()) == [] and load_checkpoint(tmp_path, "runner", 0) is None


def test_a_pickle_is_refused_without_advice_to_unpickle_it(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (Path.write_text, (marker, "pwned"))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"state": Evil()}))
    with pytest.raises(ValueError, match=r"refusing to load .*evil.pt: .*rejected it: \w") as info:
        files.read_torch_dict(tmp_path / "evil.pt", holds="a state")
    assert "weights_only" not in str(info.value) and "nothing in it was executed" in str(info.value)
    assert not marker.exists()
