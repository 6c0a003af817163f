"""Colour scales, and the metrics views colour by (named as ``LensResult.to_dataframe()`` names them)."""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import torch

from tl_latentspaces.checks import warn_user
from tl_latentspaces.results import LensDiff, LensResult
from tl_latentspaces.views.data import num, nums


# Colour ranges: the central 96% of a lens's values, so that a few extreme cells (the BOS
# position, 0_pre's KL of hundreds of nats, 0_pre's own-token cosine of 1) do not wash out the rest.
Q_LOW, Q_HIGH = 0.02, 0.98
_RANGES = {
    "fixed": "fixed range",
    "prob": "0 to the 98th percentile",
    "quantile": "2nd to 98th percentile",
    "log": "log scale, 2nd to 98th percentile",
    "centred": "centred on 0, ± the 98th percentile of |value|",
    "change": "centred on 0, ± the largest |change|",
    "size-log": "log scale, 0 to the largest value",
    "change-log": "log scale, centred on 0, ± the largest |change|",
}

# Old metric names, accepted for one release with a DeprecationWarning.
_RENAMED = {"own_scores": "own_cosine", "own_ranks": "own_rank"}
_RENAMED_TARGET = re.compile(r"target_(probs|ranks):(\d+)|target_(prob|rank)_delta:(\d+)")


def metric_name(name: str) -> str:
    """The current name of a metric given under an old name (with a DeprecationWarning)."""
    new = _RENAMED.get(name)
    match = _RENAMED_TARGET.fullmatch(name) if new is None else None
    if match and match.group(1):
        new = f"target{match.group(2)}_{match.group(1)[:-1]}"
    elif match:
        new = f"target{match.group(4)}_{match.group(3)}_delta"
    if new is None:
        return name
    warn_user(
        f"the metric name {name!r} is deprecated and will be removed in the next release; use {new!r} "
        "(the column name LensResult.to_dataframe() and summary() use).",
        DeprecationWarning)
    return new


def _metric(key: str, name: str, view: int, values: torch.Tensor, *, scale: str = "sequential", reverse: bool = False,
            log: bool = False, fmt: str = "number", unit: str = "", description: str, ranging: str) -> dict[str, Any]:
    m: dict[str, Any] = {"key": key, "name": name, "view": view, "values": nums(values), "scale": scale,
                         "reverse": reverse, "log": log, "format": fmt, "description": description}
    return {**m, "unit": unit, "_ranging": ranging} if unit else {**m, "_ranging": ranging}


def run_metrics(r: LensResult, view: int, b: int, keep: list[int], targets: list[str]) -> list[dict[str, Any]]:
    sel = lambda t: t[:, b][:, keep]  # noqa: E731  [entry, pos]
    out = [
        _metric("top1_prob", "top-1 probability", view, sel(r.top_probs[..., 0]), fmt="percent",
                description="probability of the cell's top-1 token under the lens", ranging="prob"),
        _metric("entropy", "entropy", view, sel(r.entropy), reverse=True, unit="nats",
                description="entropy of the lens's distribution (dark: confident)", ranging="quantile"),
        _metric("kl_to_final", "KL to final", view, sel(r.kl_to_final), reverse=True, log=True, unit="nats",
                description="KL(final ‖ lens) (dark: close to the model's output)", ranging="log"),
    ]
    if r.target_probs is not None and r.target_ranks is not None:
        for t, name in enumerate(targets):
            out.append(_metric(f"target{t}_prob", f"p({name})", view, sel(r.target_probs[..., t]), fmt="percent",
                               description=f"probability of the target {name}", ranging="prob"))
            out.append(_metric(f"target{t}_rank", f"rank({name})", view, sel(r.target_ranks[..., t].double()),
                               reverse=True, log=True, fmt="integer",
                               description=f"rank of the target {name} (0 = top; dark: near the top)",
                               ranging="log"))
    if r.own_scores is not None:
        out.append(_metric("own_cosine", "own-token cosine", view, sel(r.own_scores), scale="diverging",
                           description="cosine between the residual and its own input token's embedding "
                                       "(blue: positive, red: negative)", ranging="centred"))
    if r.own_ranks is not None:
        out.append(_metric("own_rank", "own-token rank", view, sel(r.own_ranks.double()), reverse=True, log=True,
                           fmt="integer", description="rank of the position's own token by cosine (0 = nearest)",
                           ranging="log"))
    return out


def diff_metrics(d: LensDiff, b: int, keep: list[int], targets: list[str]) -> list[dict[str, Any]]:
    sel = lambda t: t[:, b][:, keep]  # noqa: E731
    out = []
    if d.divergence is not None:
        out.append(_metric("divergence", "divergence", -1, sel(d.divergence), log=True, unit="nats",
                           description="KL(base lens ‖ other lens) at each cell (dark: the runs' readouts differ)",
                           ranging="size-log"))
    out += [
        _metric("top1_changed", "top-1 changed", -1, sel(d.top1_changed.double()), fmt="bool",
                description="whether the lens's top-1 token differs between the runs", ranging="fixed"),
        _metric("kl_delta", "Δ KL to final", -1, sel(d.kl_delta), scale="diverging", unit="nats",
                description="change in KL to each run's own final distribution", ranging="change"),
        _metric("entropy_delta", "Δ entropy", -1, sel(d.entropy_delta), scale="diverging", unit="nats",
                description="change in the lens's entropy", ranging="change"),
    ]
    base, other = d.base, d.other
    if d.target_prob_delta is not None and base.target_ranks is not None and other.target_ranks is not None:
        for t, name in enumerate(targets):
            out.append(_metric(f"target{t}_prob_delta", f"Δ p({name})", -1, sel(d.target_prob_delta[..., t]),
                               scale="diverging", fmt="percent",
                               description=f"change in the probability of {name} (percentage points)",
                               ranging="change"))
            rank_delta = other.target_ranks[..., t].double() - base.target_ranks[..., t].double()
            out.append(_metric(f"target{t}_rank_delta", f"Δ rank({name})", -1, sel(rank_delta), scale="diverging",
                               log=True, fmt="integer", reverse=True,
                               description=f"change in the rank of {name} (blue: moved up)", ranging="change-log"))
    return out


def _quantile(values: torch.Tensor, q: float) -> float:
    return float(torch.quantile(values, q)) if values.numel() else 0.0


def colour_range(values: Sequence[float], ranging: str) -> tuple[float, float]:
    """The colour range ``(min, max)`` of a metric's values (see ``_RANGES`` for the kinds)."""
    v = torch.tensor([x for x in values if x is not None], dtype=torch.float64)
    if ranging == "fixed":
        return 0.0, 1.0
    if ranging == "size-log":
        top = float(v.max()) if v.numel() else 0.0
        return 0.0, top if top > 0 else 1e-6
    if ranging in ("change", "change-log"):
        # A patch's effect sits in few cells: its size is the signal.
        bound = float(v.abs().max()) if v.numel() else 0.0
        return (-bound, bound) if bound > 0 else (-1e-6, 1e-6)
    if ranging == "centred":
        size = v.abs()
        bound = _quantile(size, Q_HIGH)
        if bound <= 0:  # mostly zeros (cells a patch cannot reach): scale to what did change
            bound = _quantile(size[size > 0], Q_HIGH)
        bound = bound if bound > 0 else 1e-6
        return -bound, bound
    if ranging == "prob":
        lo, hi = 0.0, _quantile(v, Q_HIGH)
    else:
        lo, hi = _quantile(v, Q_LOW), _quantile(v, Q_HIGH)
    if hi <= lo:  # (nearly) constant: widen to the data, then keep the scale non-degenerate
        hi = max(hi, float(v.max())) if v.numel() else hi
        hi = hi if hi > lo else lo + 1e-6
    return lo, hi


def embedding_entry_is_apart(rows: Sequence[Sequence[float]], *, log: bool = False) -> bool:
    """Whether entry 0's median lies over three interquartile ranges outside the quartiles of the later medians.

    ``rows`` is ``[entry][...]``; ``log`` compares ``log1p`` of the values.
    """
    medians = []
    for row in rows:
        v = torch.tensor([x for x in row if x is not None], dtype=torch.float64)
        if log:
            v = v.sign() * v.abs().log1p()
        medians.append(float(v.median()) if v.numel() else float("nan"))
    later = torch.tensor(medians[1:], dtype=torch.float64)
    later = later[torch.isfinite(later)]
    if later.numel() < 3 or not math.isfinite(medians[0]):
        return False
    q1, q3 = _quantile(later, 0.25), _quantile(later, 0.75)
    fence = 3 * (q3 - q1)
    return medians[0] < q1 - fence or medians[0] > q3 + fence


def fill_ranges(lenses: list[dict[str, Any]], skip: Sequence[int] = (), labels: Sequence[str] = ()) -> None:
    """Give each metric of each lens its colour range, shared by its runs, without the columns in ``skip`` (BOS)
    and, for a run's own metrics, without ``0_pre`` when :func:`embedding_entry_is_apart`."""
    for lens in lenses:
        groups: dict[str, list[dict[str, Any]]] = {}
        for m in lens["metrics"]:
            groups.setdefault(m["key"], []).append(m)
        for metrics in groups.values():
            ranging = metrics[0]["_ranging"]
            n_entries = len(metrics[0]["values"])
            rows = [[v for m in metrics for p, v in enumerate(m["values"][e]) if v is not None and p not in skip]
                    for e in range(n_entries)]
            own = ranging in ("quantile", "log", "centred", "prob") and metrics[0].get("view", 0) >= 0
            left_out = [0] if own and embedding_entry_is_apart(rows, log=ranging == "log") else []
            values = [v for e, row in enumerate(rows) if e not in left_out for v in row]
            lo, hi = colour_range(values, ranging)
            lo_r, hi_r = num(lo), num(hi)
            if lo_r is None or hi_r is None or not hi_r > lo_r:  # rounding merged them
                lo_r, hi_r = lo, hi if hi > lo else lo + 1e-6
            note = _RANGES[ranging] + (" of this lens" if ranging != "fixed" else "")
            excluded = (["BOS"] if skip and ranging != "fixed" else []) + [
                labels[e] if e < len(labels) else f"entry {e}" for e in left_out]
            if excluded:
                note += f", {' and '.join(excluded)} left out"
            for m in metrics:
                m["min"], m["max"] = lo_r, hi_r
                m["rangeNote"] = note
                m["clipLow"] = any(v is not None and v < lo_r for row in m["values"] for v in row)
                m["clipHigh"] = any(v is not None and v > hi_r for row in m["values"] for v in row)
                del m["_ranging"]
