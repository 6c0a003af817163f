"""Resumable progress on disk: one ``torch.save`` file per process, replaced atomically, read without code.

``meta`` says which work a checkpoint belongs to (the caller compares it before resuming), ``states``
holds the statistics (tensors, numbers, strings, lists, tuples, dicts).

Example:
    >>> save_checkpoint("ckpt", "runner", 0, {"done": 3}, {"align": acc.state_dict()})  # doctest: +SKIP
    >>> meta, states = load_checkpoint("ckpt", "runner", 0)  # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

from tl_latentspaces.files import read_torch_dict, torch_bytes, write_bytes_atomic

__all__ = ["checkpoint_path", "save_checkpoint", "load_checkpoint"]

FORMAT = "tl_latentspaces.checkpoint"
FORMAT_VERSION = 1
PathLike = Union[str, os.PathLike]
_FIX = "Delete it to start over, or pass another checkpoint_dir."


def checkpoint_path(folder: PathLike, kind: str, rank: int) -> Path:
    """The file of process ``rank`` for the run ``kind`` (``"runner"``, ``"jacobian-lens"``) in ``folder``."""
    return Path(folder) / f"{kind}-rank{rank}.pt"


def save_checkpoint(folder: PathLike, kind: str, rank: int, meta: dict[str, Any],
                    states: dict[str, Any]) -> Path:
    """Write ``{meta, states}`` for process ``rank``, replacing its previous checkpoint atomically."""
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "meta": meta, "states": states}
    return write_bytes_atomic(checkpoint_path(folder, kind, rank), torch_bytes(payload))


def load_checkpoint(folder: PathLike, kind: str,
                    rank: int) -> Optional[tuple[dict[str, Any], dict[str, Any]]]:
    """``(meta, states)`` saved by :func:`save_checkpoint`, or None when this process has none yet.

    Raises:
        ValueError: naming the file, if it is not such a checkpoint or the folder holds one of the earlier
            safetensors format.
    """
    folder = Path(folder)
    old = sorted(folder.glob(f"{kind}-rank*.safetensors"))
    if old:
        raise ValueError(f"the checkpoint {str(old[0])!r} was written by an earlier version of tl_latentspaces "
                         f"(safetensors), and this version cannot resume from it. {_FIX}")
    path = checkpoint_path(folder, kind, rank)
    if not path.is_file():
        return None
    payload = read_torch_dict(path, holds="a tl_latentspaces checkpoint", fix=_FIX)
    meta, states = payload.get("meta"), payload.get("states")
    if payload.get("format") != FORMAT or not isinstance(meta, dict) or not isinstance(states, dict):
        raise ValueError(f"{str(path)!r} is not a {FORMAT} file (format {payload.get('format')!r}). {_FIX}")
    if payload.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"the checkpoint {str(path)!r} has format_version {payload.get('format_version')!r}; this "
                         f"version reads {FORMAT_VERSION}. {_FIX}")
    return meta, states
