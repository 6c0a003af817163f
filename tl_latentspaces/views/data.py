"""Small helpers that turn result tensors into the plain lists and indices views send to a page."""

from __future__ import annotations

import json
import math
from typing import Any, Optional, Union

import torch

from tl_latentspaces.results import LensResult

Selector = Union[int, str]
"""A stack entry: a label such as ``"12_pre"``, or an index."""


def num(x: float, digits: int = 5) -> Optional[float]:
    """A float rounded to ``digits`` significant digits; None for NaN and infinities."""
    x = float(x)
    if not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


def nums(t: torch.Tensor, digits: int = 5) -> Any:
    """A tensor as nested lists of rounded floats (None for non-finite values)."""
    return _rounded(t.detach().double().tolist(), digits)


def _rounded(x: Any, digits: int) -> Any:
    if isinstance(x, list):
        return [_rounded(v, digits) for v in x]
    return num(x, digits)


def batch_index(batch: Any, size: int) -> int:
    if isinstance(batch, bool) or not isinstance(batch, int) or not -size <= batch < size:
        raise ValueError(f"batch must be an int in [-{size}, {size - 1}] (the input has {size} rows), got {batch!r}.")
    return batch % size


def real_positions(result: LensResult, b: int) -> list[int]:
    """Indices into the read positions of batch row ``b`` that are real tokens (not padding)."""
    keep = [i for i, m in enumerate(result.mask[b].tolist()) if m]
    if not keep:
        raise ValueError(f"batch row {b} has no real (non-padding) token among the read positions.")
    return keep


def entry_index(result: LensResult, label: Selector) -> int:
    if isinstance(label, str):
        return result.index(label)
    if isinstance(label, int) and not isinstance(label, bool):
        n = len(result.labels)
        if not -n <= label < n:
            raise ValueError(f"entry {label} is out of range for {n} entries; valid labels are {result.labels}.")
        return label % n
    raise ValueError(f"a stack entry is a label like '3_pre' or an int, got {label!r}.")


def target_names(result: LensResult, b: int, keep: list[int]) -> list[str]:
    """A name per target column: the token when every shown position has the same target."""
    if result.target_ids is None:
        return []
    names = []
    for t in range(result.target_ids.shape[-1]):
        ids = set(result.target_ids[b, keep, t].tolist())
        names.append(json.dumps(result.decode(ids.pop()), ensure_ascii=False) if len(ids) == 1 else f"target {t}")
    return names
