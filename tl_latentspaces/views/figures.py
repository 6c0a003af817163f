"""Figures of alignment results: a matrix between stack entries and per-entry curves."""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import torch

from tl_latentspaces.checks import check_float
from tl_latentspaces.views.data import num, nums
from tl_latentspaces.views.render import HTMLView, render_component

__all__ = ["cka_matrix_view", "layer_curves_view", "nice_ticks"]

ArrayLike = Any  # a torch.Tensor, numpy array or nested list of numbers


def _as_tensor(x: ArrayLike, what: str) -> torch.Tensor:
    try:
        if hasattr(x, "to_numpy") and not isinstance(x, torch.Tensor):
            x = x.to_numpy(dtype="float64", copy=True)  # a pandas column, as to_dataframe() gives (writable)
        return torch.as_tensor(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{what} must be a tensor, array or list of numbers, got {type(x).__name__}.") from err


def _check_labels(labels: Any, n: int, what: str) -> list[str]:
    if isinstance(labels, str) or not isinstance(labels, Sequence) or not all(isinstance(s, str) for s in labels):
        raise ValueError(f"labels must be a list of strings, got {labels!r}.")
    if len(labels) != n:
        raise ValueError(f"{what} has {n} layers but {len(labels)} labels were given.")
    return list(labels)


def cka_matrix_view(matrix: ArrayLike, labels: Sequence[str], title: str = "CKA between layers", *,
                    vmin: Optional[float] = None, vmax: Optional[float] = None) -> HTMLView:
    """A layer x layer similarity matrix (e.g. linear CKA) as a heat map (``MatrixHeatmap``).

    ``matrix`` is ``[L, L]``, row ``i`` drawn ``i``-th from the top, NaN grey; ``vmin, vmax`` default to
    ``[0, 1]``, widened to the data if it leaves that. ``.props`` holds the matrix (None for NaN).

    Example:
        >>> view = tll.cka_matrix_view(torch.eye(3), ["0_pre", "1_pre", "final_post"])  # doctest: +SKIP
        >>> view.save("cka.html")  # doctest: +SKIP
    """
    m = _as_tensor(matrix, "matrix")
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(f"matrix must be a non-empty square [L, L] tensor, got shape {tuple(m.shape)}.")
    L = m.shape[0]
    names = _check_labels(labels, L, "matrix")
    finite = m[torch.isfinite(m)]
    for name, bound in (("vmin", vmin), ("vmax", vmax)):
        if bound is not None:
            check_float(bound, name, minimum=-math.inf)
    lo = (min(0.0, finite.min().item()) if finite.numel() else 0.0) if vmin is None else vmin
    hi = (max(1.0, finite.max().item()) if finite.numel() else 1.0) if vmax is None else vmax
    if not hi > lo:
        raise ValueError(f"vmax must be greater than vmin, got vmin={lo}, vmax={hi}.")
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"vmin and vmax must be finite numbers, got vmin={lo}, vmax={hi}.")
    props = {"matrix": nums(m, 4), "labels": names, "vmin": float(lo), "vmax": float(hi), "title": title}
    return render_component("MatrixHeatmap", props, title=title)


def nice_ticks(lo: float, hi: float, n: int = 5) -> tuple[float, float, list[float], int]:
    """Round axis limits and ticks covering [lo, hi]; also the decimals to print them with."""
    if not hi > lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw * (1 - 1e-9))
    a, z = math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step
    ticks = [a + k * step for k in range(int(round((z - a) / step)) + 1)]
    decimals = max(0, -math.floor(math.log10(step) + 1e-9) + (1 if round(step / mag, 6) == 2.5 else 0))
    return a, z, ticks, decimals


def _curve_values(x: Any, L: int, what: str) -> list[Optional[float]]:
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return [num(x)] * L
    t = _as_tensor(x, what)
    if t.ndim == 0:
        return [num(float(t))] * L
    if t.ndim != 1 or t.shape[0] != L:
        raise ValueError(f"{what} must be a float or a tensor of shape [{L}] (one per label), got {tuple(t.shape)}.")
    return nums(t)


def layer_curves_view(labels: Sequence[str], curves: Mapping[str, ArrayLike],
                      null: Optional[Mapping[str, tuple[Any, Any]]] = None, *, ylabel: str = "", title: str = "",
                      ymin: Optional[float] = None, ymax: Optional[float] = None) -> HTMLView:
    """Per-layer curves (principal angles, variance in the embedding subspace, ...) (``LayerCurves``).

    Args:
        curves: ``{name: [L] values}``, one value per label; NaN leaves a gap.
        null: ``{name: (mean, std)}``, a curve's null baseline, each a float or ``[L]`` values: a dashed line
            at the mean with a band of one standard deviation.
        ymin, ymax: The y range (default: the data's, baselines included, rounded out).

    ``.props["series"]`` holds one ``{"name", "values", "baseline"}`` per curve, in the order given.

    Example:
        >>> labels = ["0_pre", "1_pre", "final_post"]
        >>> view = tll.layer_curves_view(labels, {"cosine": [1.0, 0.4, 0.2]}, ylabel="cosine")  # doctest: +SKIP
    """
    L = len(labels) if isinstance(labels, Sequence) and not isinstance(labels, str) else -1
    names = _check_labels(labels, L, "the x axis")
    if L == 0:
        raise ValueError("labels is empty: a curve needs at least one layer.")
    if not isinstance(curves, Mapping) or not curves:
        raise ValueError("curves must be a non-empty dict {name: [L] values}.")
    data = {str(k): _curve_values(v, L, f"curve {k!r}") for k, v in curves.items()}
    nulls: dict[str, dict[str, list[Optional[float]]]] = {}
    for key, pair in (null or {}).items():
        k = str(key)  # curve names are strings, as in data
        if k not in data:
            raise ValueError(f"null baseline {key!r} has no curve of that name; curves are {list(data)}.")
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ValueError(f"null[{k!r}] must be a (mean, std) pair, got {type(pair).__name__}.")
        nulls[k] = {"mean": _curve_values(pair[0], L, f"null[{k!r}] mean"),
                    "std": _curve_values(pair[1], L, f"null[{k!r}] std")}
    seen = [v for vs in data.values() for v in vs if v is not None]
    for nb in nulls.values():
        for mu, sd in zip(nb["mean"], nb["std"]):
            if mu is not None:
                seen += [mu - (sd or 0.0), mu + (sd or 0.0)]
    for name, bound in (("ymin", ymin), ("ymax", ymax)):
        if bound is not None:
            check_float(bound, name, minimum=-math.inf)
    if ymin is not None and ymax is not None and not ymax > ymin:
        raise ValueError(f"ymax must be greater than ymin, got ymin={ymin}, ymax={ymax}.")
    lo = min(seen) if ymin is None and seen else (0.0 if ymin is None else float(ymin))
    hi = max(seen) if ymax is None and seen else (1.0 if ymax is None else float(ymax))
    if not hi > lo:  # one bound given beyond all the data: the range reaches past it
        lo, hi = (lo, lo + (abs(lo) * 0.1 or 1.0)) if ymax is None else (hi - (abs(hi) * 0.1 or 1.0), hi)
    margin = 0.04 * (hi - lo)
    y0, y1, ticks, dec = nice_ticks(lo - (margin if ymin is None else 0.0), hi + (margin if ymax is None else 0.0))
    if ymin is not None:
        y0 = ymin
    if ymax is not None:
        y1 = ymax
    if not (math.isfinite(y0) and math.isfinite(y1) and y1 > y0):
        raise ValueError(f"ymax must be greater than ymin, both finite, got ymin={y0}, ymax={y1}.")
    ticks = [round(t, 12) for t in ticks if y0 - 1e-12 <= t <= y1 + 1e-12]
    series = [{"name": k, "values": v, **({"baseline": nulls[k]} if k in nulls else {})} for k, v in data.items()]
    props = {"labels": names, "series": series, "ylabel": ylabel, "title": title,
             "ymin": y0, "ymax": y1, "yTicks": ticks, "yDecimals": dec}
    return render_component("LayerCurves", props, title=title or ylabel or "layer curves")
