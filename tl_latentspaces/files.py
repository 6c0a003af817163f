"""Atomic writes: a reader sees the old file or folder or the new one, never half of either.

Content goes to a flushed temporary sibling, then is renamed over the target (atomic on one file
system; a replaced folder is briefly absent between its two renames). On any failure, KeyboardInterrupt
included, the temporary is removed and the old content stays.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch

__all__ = ["check_can_write_in", "json_safe", "read_torch_dict", "torch_bytes", "write_bytes_atomic",
           "write_files_atomic", "write_into_folder", "replace_folder_atomic", "sha256_hex"]

PathLike = Union[str, "os.PathLike[str]"]


def _temp_file(folder: Path, name: str, data: bytes, mode: int) -> str:
    """``data`` in a new temporary file next to ``folder / name``, flushed to disk, with permissions ``mode``."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # mkstemp makes the file owner-only
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def _mode_for(target: Path) -> int:
    """An existing file's permissions, else rw-r--r--."""
    return (target.stat().st_mode & 0o777) if target.exists() else 0o644


def _folder_mode(target: Path) -> int:
    """An existing folder's permissions, else what a plain ``mkdir`` would give under the umask."""
    if target.is_dir():
        return target.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def write_bytes_atomic(path: PathLike, data: bytes, *, make_parents: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path. ``make_parents=False``: a missing folder raises."""
    target = Path(path)
    folder = target.parent
    if target.is_dir():
        raise IsADirectoryError(f"cannot write {str(target)!r}: it is a folder. Pass a file path in it, e.g. "
                                f"{str(target / 'out')!r}.")
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"cannot write {str(target)!r}: {str(folder)!r} is a file, not a folder.")
    if make_parents:
        folder.mkdir(parents=True, exist_ok=True)
    elif not folder.is_dir():
        raise FileNotFoundError(f"cannot write {str(target)!r}: folder {str(folder)!r} does not exist.")
    tmp = _temp_file(folder, target.name, data, _mode_for(target))
    try:
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def write_files_atomic(folder: PathLike, payload: Mapping[str, bytes]) -> list[Path]:
    """Write several files into ``folder``: all are written out before any is replaced (each rename atomic)."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    temps: dict[str, str] = {}
    try:
        for name, data in payload.items():
            temps[name] = _temp_file(out, name, data, _mode_for(out / name))
        for name, tmp in temps.items():
            os.replace(tmp, out / name)
    except BaseException:
        for tmp in temps.values():
            Path(tmp).unlink(missing_ok=True)
        raise
    return [out / name for name in payload]


def json_safe(obj: Any) -> Any:
    """``obj`` as plain JSON values (a JSON round trip; anything JSON cannot hold becomes its ``str``)."""
    return json.loads(json.dumps(obj, default=str))


_PLAIN_SCALARS = (str, bool, int, float, type(None))


def _plain(value: Any, path: str) -> Any:
    """``value`` with its tensors detached (a view copied, so its whole storage is not saved along); anything
    ``torch.load(weights_only=True)`` would refuse raises here, naming where it is."""
    if isinstance(value, torch.Tensor):
        t = value.detach()
        return t.clone() if t.untyped_storage().nbytes() != t.numel() * t.element_size() else t
    if isinstance(value, dict):
        return {key: _plain(item, f"{path}[{key!r}]") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(item, f"{path}[{i}]") for i, item in enumerate(value))
    if isinstance(value, _PLAIN_SCALARS):
        return value
    raise TypeError(f"state entry {path or 'state'} has type {type(value).__name__}; states hold tensors, numbers, "
                    "strings, None, lists, tuples and dicts.")


def torch_bytes(obj: Any) -> bytes:
    """``obj`` (tensors, numbers, strings, None, lists, tuples, dicts) as ``torch.save`` bytes that
    ``torch.load(weights_only=True)`` reads back; anything else raises ``TypeError`` naming where it is."""
    buf = io.BytesIO()
    torch.save(_plain(obj, ""), buf)
    return buf.getvalue()


def read_torch_dict(path: PathLike, *, holds: str, fix: str = "") -> dict:
    """A ``torch.save`` file holding a dict, read with ``weights_only=True`` (tensors and containers, never code).

    ``holds`` describes the dict expected, ``fix`` ends the message of the ValueError raised for a bad file.
    """
    tail = f" {fix}" if fix else ""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message suggests weights_only=False; quote only what it rejected
        reason = str(err).partition("WeightsUnpickler error:")[2].partition("Check the documentation")[0]
        reason = " ".join(reason.split())[:200] or "content other than tensors and containers"
        raise ValueError(
            f"refusing to load {path}: it is not a plain tensor file (the unpickler, restricted to tensors "
            f"and containers, rejected it: {reason}). A pickle can run arbitrary code, so nothing in it was "
            f"executed.{tail}"
        ) from None
    except Exception as err:  # a damaged or foreign file can fail anywhere inside the unpickler
        raise ValueError(f"cannot read {path} as a torch.save file ({type(err).__name__}: {err}); it is damaged or "
                         f"not such a file.{tail}") from err
    if not isinstance(state, dict):
        raise ValueError(f"{path} must hold a dict ({holds}), got {type(state).__name__}.")
    return state


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_into_folder(path: PathLike, files: Sequence[tuple[str, bytes]], *, own_marker: str,
                      what: str = "folder this package wrote") -> Path:
    """Write ``files`` (``(name, data)`` pairs) into the folder ``path``, one atomic replace each, in order.

    Other files in the folder stay. Write the content first and the file that names it last, so a
    crash between two writes leaves a state the reader recognises; a name may come twice (interim, final).
    An existing path must be an empty folder or one holding ``own_marker``, else FileExistsError
    (``what`` names the kind of folder). Into a new or empty folder, a failed write takes back the files it
    wrote (and the folder it made), so that a retry finds the folder as it was.
    """
    folder = Path(path)
    if folder.exists() and (not folder.is_dir() or (any(folder.iterdir()) and not (folder / own_marker).is_file())):
        raise FileExistsError(f"{str(folder)!r} already exists and is not a {what} (no {own_marker}); "
                              "refusing to write into it. Choose another path, or an empty folder.")
    created = not folder.exists()
    fresh = created or not any(folder.iterdir())
    folder.mkdir(parents=True, exist_ok=True)
    try:
        for name, data in files:
            write_bytes_atomic(folder / name, data, make_parents=False)
    except BaseException:
        if fresh:
            for name, _ in files:
                (folder / name).unlink(missing_ok=True)
        if created and not any(folder.iterdir()):
            folder.rmdir()
        raise
    return folder


def check_can_write_in(folder: Path, what: str, fix: str) -> None:
    """``folder`` exists and is writable, or can be created: its nearest existing ancestor is a writable folder."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{what}: cannot create the folder {str(folder)!r} because {str(existing)!r} is a file. {fix}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"{what}: the folder {str(existing)!r} is not writable. {fix}")
    try:  # permission bits do not tell everything (root on /proc, some network mounts): write a probe file
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise PermissionError(f"{what}: cannot write in the folder {str(existing)!r} ({err.strerror or err}). "
                              f"{fix}") from None


def replace_folder_atomic(path: PathLike, write: Callable[[Path], None], *, own_marker: Optional[str],
                          what: str = "folder this package wrote") -> Path:
    """Write a folder atomically: ``write(tmp)`` fills a temporary sibling, which is then renamed over ``path``.

    An existing ``path`` is replaced only if it holds ``own_marker``, else FileExistsError (``what`` names
    the kind of folder); ``own_marker=None`` replaces whatever is there (the package's caches). If the
    final rename fails, the previous folder is put back.
    """
    path = Path(path)
    if path.exists() and own_marker is not None and (not path.is_dir() or not (path / own_marker).is_file()):
        raise FileExistsError(f"{str(path)!r} already exists and is not a {what} (no {own_marker}); "
                              "refusing to replace it. Choose another path or remove it first.")
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=parent))
    old: Optional[Path] = None
    try:
        os.chmod(tmp, _folder_mode(path))  # mkdtemp makes the folder owner-only
        write(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=parent))
            os.replace(path, old / "previous")
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and (old / "previous").exists() and not path.exists():
            os.replace(old / "previous", path)  # put the previous folder back
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path
