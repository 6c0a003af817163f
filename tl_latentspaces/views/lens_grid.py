"""The lens grid: stack entries x positions, each cell a lens's top-1 token (our ``LensGrid`` component)."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

import torch

from tl_latentspaces.results import LensDiff, LensResult
from tl_latentspaces.views.data import batch_index, nums, real_positions, target_names
from tl_latentspaces.views.render import HTMLView, render_component
from tl_latentspaces.views.scales import diff_metrics, fill_ranges, metric_name, run_metrics
from tl_latentspaces.views.tokens import TokenText, input_tokens

__all__ = ["lens_grid"]

COMPACT_FROM = 24
"""Grids of more positions than this open in compact mode (narrow columns)."""


def _grid_runs(results: tuple[Any, ...], diff: bool, labels: Optional[Sequence[str]]
               ) -> tuple[list[str], list[list[LensResult]], list[Optional[LensDiff]]]:
    """(lens names, runs per lens, diff per lens) from lens_grid's arguments."""
    if not results:
        raise ValueError("lens_grid needs at least one LensResult (or a read_lenses dict, or a LensDiff); got none.")
    named: list[tuple[str, Any]] = []
    if diff:
        if len(results) != 2:
            raise ValueError(
                f"lens_grid(..., diff=True) compares two runs: pass exactly two results, base first "
                f"(e.g. lens_grid(clean, patched, diff=True)); got {len(results)}."
            )
        base, other = results
        if isinstance(base, LensResult) and isinstance(other, LensResult):
            named.append((base.lens, LensDiff.between(base, other)))
        elif isinstance(base, Mapping) and isinstance(other, Mapping):
            if list(base) != list(other):
                raise ValueError(
                    f"the two runs hold different lenses: {list(base)} vs {list(other)}; read both with the same lenses."
                )
            for key in base:
                if not (isinstance(base[key], LensResult) and isinstance(other[key], LensResult)):
                    raise ValueError(f"diff=True needs LensResult values; {key!r} holds {type(base[key]).__name__}.")
                named.append((str(key), LensDiff.between(base[key], other[key])))
        else:
            raise ValueError(
                "lens_grid(base, other, diff=True) takes two LensResults or two read_lenses dicts; got "
                f"{type(base).__name__} and {type(other).__name__}."
            )
    else:
        for group in results:
            for name, item in group.items() if isinstance(group, Mapping) else [("", group)]:
                if not isinstance(item, (LensResult, LensDiff)):
                    raise ValueError(
                        f"lens_grid takes LensResults, LensDiffs or read_lenses dicts of them; got "
                        f"{type(item).__name__}. To compare two runs pass "
                        "lens_grid(clean, patched, diff=True)."
                    )
                lens = item.base.lens if isinstance(item, LensDiff) else item.lens
                named.append((str(name) or lens, item))
        if len({isinstance(item, LensDiff) for _, item in named}) > 1:
            raise ValueError("lens_grid cannot mix LensResults and LensDiffs: show either readouts or differences.")
    if not named:
        raise ValueError("lens_grid needs at least one LensResult; the read_lenses dict given is empty.")
    names = [name for name, _ in named]
    if labels is not None:
        if isinstance(labels, str) or len(labels) != len(named) or not all(isinstance(s, str) for s in labels):
            raise ValueError(
                f"labels names the lens buttons: one string per result ({len(named)}: {names}), got {labels!r}."
            )
        names = list(labels)
    if len(set(names)) != len(names):
        raise ValueError(
            f"the lens buttons would have duplicate names {names}; pass labels=[...] with one distinct name per result."
        )
    runs = [[item.base, item.other] if isinstance(item, LensDiff) else [item] for _, item in named]
    diffs = [item if isinstance(item, LensDiff) else None for _, item in named]
    return names, runs, diffs


def _check_same_input(names: list[str], runs: list[list[LensResult]]) -> None:
    ref, ref_name = runs[0][0], names[0]
    for name, rs in zip(names, runs):
        for r in rs:
            problems = []
            if not torch.equal(r.tokens, ref.tokens):
                problems.append("the input tokens")
            if r.positions != ref.positions:
                problems.append(f"the read positions ({r.positions} vs {ref.positions})")
            if r.labels != ref.labels:
                problems.append(f"the stack entries ({r.labels} vs {ref.labels})")
            first = rs[0]  # the two runs of a difference share their targets (each lens may have its own)
            same_targets = (r.target_ids is None) == (first.target_ids is None) and (
                r.target_ids is None or torch.equal(r.target_ids, first.target_ids))
            if not same_targets:
                problems.append(f"the targets ({name!r}'s two runs)")
            if problems:
                raise ValueError(
                    f"lens_grid shows lenses read on one input; {name!r} differs from {ref_name!r} in "
                    f"{' and '.join(problems)}. Read them in one call, e.g. "
                    "tll.read_lenses(model, input, lenses=('logit', 'embedding', tuned)), with the same layers, "
                    "pos and targets."
                )


def lens_grid(*results: Union[LensResult, LensDiff, Mapping[str, Any]], labels: Optional[Sequence[str]] = None,
              batch: int = 0, diff: bool = False, metric: Optional[str] = None,
              run_names: Sequence[str] = ("clean", "patched"), title: Optional[str] = None) -> HTMLView:
    """The lens grid: stack entries (rows) x the real read positions of one batch row, each cell a top-1 token.

    Cells are coloured by a metric named as in :meth:`LensResult.to_dataframe` (``top1_prob``, ``entropy``,
    ``kl_to_final``, ``target{t}_prob``, ``target{t}_rank``, ``own_cosine``, ``own_rank``); hovering shows the
    top-k. Several results of one input (e.g. a :func:`~tl_latentspaces.read_lenses` dict) make a lens switch.
    Colour ranges are per lens and metric, robust to outliers, without the BOS column (hidden at first).

    ``lens_grid(clean, patched, diff=True)`` (two LensResults or two ``read_lenses`` dicts), or LensDiffs, show
    either run or their difference: ``divergence``, ``kl_delta``, ``entropy_delta``, ``target{t}_prob_delta``,
    ``target{t}_rank_delta``, ``top1_changed``.

    Args:
        labels: Names on the lens buttons, one per result (default: each result's ``lens``, or the dict keys).
        metric: Key (or button name) of the metric shown first. Default ``top1_prob``; in difference mode
            ``divergence``, else ``target0_prob_delta``, else ``kl_delta``. Old names (``"target_ranks:0"``,
            ``"own_scores"``) still work, with a DeprecationWarning.
        run_names: The two runs' names in difference mode, base first.

    Example:
        >>> r = read_lenses(model, "The Eiffel Tower is in the city of", targets=" Paris")  # doctest: +SKIP
        >>> lens_grid(r, metric="target0_rank")  # doctest: +SKIP
        >>> lens_grid(clean["logit"], patched["logit"], diff=True).save("patch.html")  # doctest: +SKIP
    """
    names, runs, diffs = _grid_runs(results, diff, labels)
    _check_same_input(names, runs)
    diff_mode = diffs[0] is not None
    if diff_mode and (isinstance(run_names, str) or len(run_names) != 2):
        raise ValueError(f"run_names names the two runs, base first, e.g. ('clean', 'patched'); got {run_names!r}.")
    ref = runs[0][0]
    b = batch_index(batch, ref.tokens.shape[0])
    keep = real_positions(ref, b)
    tokens, bos = input_tokens(ref, b, keep)

    lenses = []
    for name, rs, d in zip(names, runs, diffs):
        top_ids = [r.top_ids[:, b][:, keep].tolist() for r in rs]
        run_words = [TokenText(r.decode) for r in rs]
        decoded = [[[[w.text(i) for i in cell] for cell in row_] for row_ in ids] for w, ids in zip(run_words, top_ids)]
        targets = target_names(rs[0], b, keep)
        metrics: list[dict[str, Any]] = []
        if d is not None:
            metrics += diff_metrics(d, b, keep, targets)
        for view, r in enumerate(rs):
            metrics += run_metrics(r, view, b, keep, targets)
        lenses.append({
            "name": name,
            "scoreName": "cosine" if rs[0].lens == "embedding" else "logit",
            "topTokens": decoded,
            "topIds": top_ids,
            "topProbs": [nums(r.top_probs[:, b][:, keep]) for r in rs],
            "topScores": [nums(r.top_scores[:, b][:, keep]) for r in rs],
            "metrics": metrics,
        })
    fill_ranges(lenses, skip=(0,) if bos else (), labels=ref.labels)

    first = lenses[0]["metrics"]
    keys = list(dict.fromkeys(m["key"] for m in first))
    if metric is not None:
        metric = metric_name(metric)
    elif diff_mode:
        metric = next(k for k in ("divergence", "target0_prob_delta", "kl_delta") if k in keys)
    else:
        metric = "top1_prob"
    matches = [m for m in first if metric in (m["key"], m["name"])]
    if not matches:
        raise ValueError(f"unknown metric {metric!r}; this grid offers {keys}.")
    # In difference mode a run metric opens on the other (e.g. patched) run.
    view = -1 if any(m["view"] == -1 for m in matches) else max(m["view"] for m in matches)

    if title is None:
        title = f"Lens grid · {ref.model_name}" if ref.model_name else "Lens grid"
        if diff_mode:
            title += f" · {run_names[1]} vs {run_names[0]}"
    props: dict[str, Any] = {
        "labels": list(ref.labels), **tokens, "bos": bos, "hideBos": bos and len(keep) > 1,
        "compact": len(keep) > COMPACT_FROM, "lenses": lenses, "title": title, "initialLens": 0,
        "initialMetric": matches[0]["key"], "initialView": view,
    }
    if diff_mode:
        props["runs"] = list(run_names)
    return render_component("LensGrid", props, title=props["title"])
