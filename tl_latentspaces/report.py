"""The report: the lens grids of a few prompts, held-out lens metrics per layer and the alignment suite with its
null baselines, as one offline HTML page (``report.html``) and every number in it (``report.json``):
``write_report(build_report(model), "out/")``.
"""

from __future__ import annotations

import dataclasses
import datetime
import html
import json
import math
from pathlib import Path
from typing import Any, Sequence, Union

import torch

from tl_latentspaces.alignment import AlignmentAccumulator
from tl_latentspaces.cached_lenses import tuned_lens_for
from tl_latentspaces.checks import check_int
from tl_latentspaces.corpus import default_corpus
from tl_latentspaces.evaluation import LensEvalAccumulator
from tl_latentspaces.files import write_files_atomic
from tl_latentspaces.lenses import read_lenses
from tl_latentspaces.model import ModelAccess
from tl_latentspaces.narrative import tell_story
from tl_latentspaces.runner import CorpusRunner
from tl_latentspaces.views import (
    PAGE_CSP, cka_matrix_view, drift_tokens, layer_curves_view, lens_grid, one_bundle_per_page
)

__all__ = [
    "Report", "alignment_data", "build_report", "check_report_folder", "write_report", "DEFAULT_PROMPTS", "to_jsonable",
    "tuned_lens_for",
]

DEFAULT_PROMPTS = (
    "The Eiffel Tower is in the city of",
    "The opposite of hot is",
    "def add(a, b):\n    return a +",
)


def to_jsonable(obj: Any) -> Any:
    """Tensors, dataclasses, dicts and lists as JSON values (NaN and infinities become None)."""
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        values = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
        return {k: to_jsonable(v) for k, v in values.items() if not callable(v)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (int, str, bool)) or obj is None:
        return obj
    if hasattr(obj, "item"):
        return to_jsonable(obj.item())
    return str(obj)


@dataclasses.dataclass(frozen=True)
class Report:
    """A built report: ``data`` (what ``report.json`` holds) and ``html`` (the page)."""

    data: dict[str, Any]
    html: str


def _grid_data(results: dict[str, Any]) -> dict[str, Any]:
    first = next(iter(results.values()))
    out: dict[str, Any] = {
        "tokens": first.str_tokens[0],
        "token_ids": first.tokens[0].tolist(),
        "labels": first.labels,
        "final_top1": first.final_top1[0].tolist(),
        "lenses": {},
    }
    for name, r in results.items():
        lens: dict[str, Any] = {
            "top1": [row[0] for row in r.top_tokens()],
            "top_ids": r.top_ids[:, 0],
            "top_probs": r.top_probs[:, 0],
            "top_scores": r.top_scores[:, 0],
            "entropy": r.entropy[:, 0],
            "kl_to_final": r.kl_to_final[:, 0],
        }
        if r.own_scores is not None:  # named as in LensResult.to_dataframe() and the views
            lens["own_cosine"] = r.own_scores[:, 0]
            lens["own_rank"] = r.own_ranks[:, 0]
        out["lenses"][name] = to_jsonable(lens)
    return out


def _table(frame: Any, digits: int = 3) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in [frame.index.name or ""] + list(frame.columns))
    rows = []
    for idx, row in frame.iterrows():
        cells = []
        for v in row.tolist():
            if isinstance(v, float):
                cells.append("<td></td>" if math.isnan(v) else f"<td>{v:.{digits}f}</td>")
            else:
                cells.append(f"<td>{html.escape(str(v))}</td>")
        rows.append(f"<tr><th>{html.escape(str(idx))}</th>{''.join(cells)}</tr>")
    return f'<table class="numbers"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


_STYLE = """
body { font-family: system-ui, sans-serif; color: #222; max-width: 1400px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table.numbers { border-collapse: collapse; font-size: 12px; margin: 8px 0; }
table.numbers th, table.numbers td { border: 1px solid #ddd; padding: 2px 6px; text-align: right; }
table.numbers thead th { background: #f4f4f4; }
details { margin: 8px 0; } .meta { color: #666; font-size: 0.9em; }
.guide { color: #335; font-size: 0.9em; font-style: italic; margin: 4px 0; }
.story { background: #f7f9fc; border: 1px solid #dde3ee; padding: 4px 16px; }
.story h2 { margin-top: 0.5em; border: none; }
"""


def _guide(text: str) -> str:
    """A one-line reading guide above a figure."""
    return f'<p class="guide">{html.escape(text)}</p>'


def build_report(model: Any, *, prompts: Sequence[str] = DEFAULT_PROMPTS, corpus: Any = None, tuned: Any = "auto",
                 lenses: Sequence[Any] = (), eval_tokens: int = 1024, align_tokens: int = 1024, top_k: int = 5,
                 prepend_bos: bool = True, cache_dir: Union[str, Path, None] = None, progress: bool = True) -> Report:
    """Run the report's analyses on ``model`` (in eval mode) and assemble its JSON data and HTML page.

    Args:
        corpus: Held-out text for the corpus metrics and the alignment suite (texts, files or a token tensor);
            default the held-out split of the offline default corpus.
        tuned: ``"auto"`` (the cached tuned lens, fitted if missing), a ``TunedLens``, or None to leave it out.
        lenses: More lenses beside the logit and tuned lenses, in the grids and the held-out table (a
            :class:`~tl_latentspaces.JacobianLens`, another ``TunedLens``, a :class:`~tl_latentspaces.Lens`).
        eval_tokens, align_tokens: Tokens of ``corpus`` for the lens metrics and for the alignment suite.
        cache_dir: Cache folder for the tuned lens.
    """
    access = ModelAccess.of(model)
    access.require_eval("the report")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of non-empty strings, got {prompts!r:.200}.")
    eval_tokens = check_int(eval_tokens, "eval_tokens", minimum=256)
    align_tokens = check_int(align_tokens, "align_tokens", minimum=256)
    if corpus is None:
        corpus = default_corpus("heldout")
    lens = tuned_lens_for(access, cache_dir=cache_dir, progress=progress) if tuned == "auto" else tuned
    eval_lenses: list[Any] = ["logit"] + ([lens] if lens is not None else []) + list(lenses)
    grid_lenses = eval_lenses + ["embedding"]
    grids = [(p, read_lenses(access.model, p, lenses=grid_lenses, top_k=top_k, prepend_bos=prepend_bos))
             for p in prompts]
    # one corpus pass feeds both when their token budgets agree; under torchrun each process takes its share
    passes: dict[int, dict[str, Any]] = {}
    passes.setdefault(eval_tokens, {})["evaluation"] = LensEvalAccumulator(access, eval_lenses).empty
    passes.setdefault(align_tokens, {})["alignment"] = AlignmentAccumulator(access).empty
    stats: dict[str, Any] = {}
    for budget, consumers in passes.items():
        runner = CorpusRunner(access, corpus, seq_len=128, batch_size=8, max_tokens=budget, progress=progress,
                              desc="report: " + " and ".join(consumers))
        stats.update(runner.run(consumers))
    evaluation = stats["evaluation"].result()
    alignment = stats["alignment"].result(progress=progress)
    first = grids[0][1]["logit"]
    norms = first.inputs.resid[:, 0].norm(dim=-1) if first.inputs is not None else None
    story = tell_story(access, evaluation, alignment, resid_norms=norms, bos=bool(prepend_bos))

    data = {
        "story": story.to_dict(),
        "model": {"name": access.name, "n_layers": access.n_layers, "d_model": access.d_model,
                  "d_vocab": access.d_vocab, "unembedding_fingerprint": access.unembedding_fingerprint()},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": {"prompts": prompts, "top_k": top_k, "prepend_bos": prepend_bos,
                     "eval_tokens": eval_tokens, "align_tokens": align_tokens, "tuned_lens": lens is not None},
        "grids": [dict(prompt=p, **_grid_data(r)) for p, r in grids],
        "evaluation": to_jsonable(evaluation),
        "alignment": alignment_data(alignment),
    }

    labels = evaluation.labels
    parts = [
        f"<h1>tl_latentspaces report: {html.escape(access.name)}</h1>",
        f'<p class="meta">{access.n_layers} layers, d_model {access.d_model}, vocabulary {access.d_vocab}; '
        f"created {data['created']}. Every number shown is in report.json.</p>",
        story.to_html(),
        f"<h2>{' vs '.join(evaluation.lenses)} lens on held-out text</h2>",
        f'<p class="meta">{evaluation.n_positions} positions of {evaluation.n_sequences} held-out sequences, '
        "BOS left out. KL = KL(final || lens) in nats. Prediction depth: the first entry from which "
        "the lens's top-1 stays equal to the final top-1.</p>",
        _table(evaluation.summary()),
        _guide("Lower is better: how far each lens's distribution is from the model's final one, layer by "
               "layer. Where a curve drops, that lens starts to read what the model will say."),
        layer_curves_view(labels, {f"KL to final, {name} lens": evaluation.kl_to_final[i]
                                   for i, name in enumerate(evaluation.lenses)},
                          ylabel="nats", title="KL(final || lens) per stack entry").local_src,
        "<details><summary>Per-entry table</summary>" + _table(evaluation.to_dataframe()) + "</details>",
        "<h2>Lens grids</h2>",
        _guide("Rows are stack entries (embedding at the top), columns input positions; each cell is "
               "the lens's top-1 guess for the next token. Switch lens and colour metric above the "
               "grid; hover a cell for its top-k."),
    ]
    for prompt, results in grids:
        parts.append(f"<h3>{html.escape(repr(prompt))}</h3>")
        parts.append(lens_grid(results, title=prompt).local_src)
        if "embedding" in results:
            parts.append(_guide("Per-token drift: each input token coloured by the cosine between its residual and "
                                "its own input embedding, at the entry the slider picks; hover for every entry."))
            drift = drift_tokens(results["embedding"], "own_cosine", title=f"Drift from the own token: {prompt}")
            parts.append(drift.local_src)
    parts += [
        "<h2>Alignment with the embedding and unembedding spaces</h2>",
        f'<p class="meta">{alignment.n_tokens} tokens of {alignment.n_sequences} held-out sequences '
        f"(first {alignment.skip_positions} position(s) of each left out), subspace dimension k = {alignment.k}. "
        "Dashed lines and bands: what random subspaces give (mean ± 1 sd).</p>",
    ]
    parts += _alignment_figures(alignment)
    parts.append("<details><summary>Per-entry table</summary>" + _table(alignment.to_dataframe()) + "</details>")
    page = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f'<meta http-equiv="Content-Security-Policy" content="{PAGE_CSP}">\n'
            f"<title>{html.escape(f'tl_latentspaces report: {access.name}')}</title>\n<style>{_STYLE}</style>\n"
            f"</head>\n<body>\n{one_bundle_per_page(parts)}\n</body>\n</html>\n")
    return Report(data=data, html=page)


def _alignment_figures(alignment: Any) -> list[str]:
    labels = alignment.labels
    a, v, c, d = alignment.angles, alignment.variance, alignment.cka, alignment.drift
    guides = [
        "Angles near 0 mean the residual's main directions lie inside the embedding's; near the dashed "
        "null they are as unrelated as random subspaces.",
        "The share of the residual's variance inside the top-k embedding directions; the dashed line "
        "is what any random k-dim subspace holds.",
        "The own-token cosine is 1 at 0_pre, where each position is its own token's embedding; the fall "
        "shows how fast the stream leaves its token behind.",
        "Bright squares on the diagonal are blocks of layers that represent the text alike; a dark "
        "seam is a layer that rewrites the stream.",
    ]
    angle_names = ("mean angle to W_E subspace", "mean angle to W_U subspace")
    variance_names = ("variance in W_E subspace", "variance in W_U subspace")
    k = alignment.k
    figs = [
        # the null of the mean angle: random subspaces' mean angle, banded by one angle's sd
        layer_curves_view(labels, dict(zip(angle_names, (a.embed.mean(-1), a.unembed.mean(-1)))),
                          null={name: (float(a.null_mean.mean()), float(a.null_std.mean())) for name in angle_names},
                          ylabel="radians",
                          title=f"Principal angles: top-{k} residual subspace vs top-{k} singular subspaces"),
        layer_curves_view(labels, dict(zip(variance_names, (v.embed, v.unembed))),
                          null={name: (v.null_mean, v.null_std) for name in variance_names},
                          ylabel="fraction of variance",
                          title=f"Residual variance inside the top-{k} embedding and unembedding subspaces"),
        layer_curves_view(labels, {"own-token cosine (mean)": d.cos_mean}, ylabel="cosine",
                          title="Drift: cosine between each position's residual and its own input embedding"),
        cka_matrix_view(c.layer_debiased, labels, title="Debiased linear CKA between stack entries"),
    ]
    return [_guide(g) + f.local_src for g, f in zip(guides, figs)]


def alignment_data(alignment: Any) -> Any:
    """The suite's numbers for the JSON file, without the full histograms (the page shows quantiles)."""
    data = to_jsonable(alignment)
    for key in ("cos_hist", "rank_hist"):
        data["drift"].pop(key, None)
    return data


def _written_by_a_report(path: Path) -> bool:
    """Whether ``path`` (a ``report.json`` or ``report.html``) is a report this package wrote."""
    try:
        if path.suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            return isinstance(data, dict) and "evaluation" in data
        with path.open(encoding="utf-8", errors="replace") as fh:
            return "tl_latentspaces report" in fh.read(4096)
    except (OSError, ValueError):
        return False


def check_report_folder(out_dir: Union[str, Path]) -> None:
    """Refuse a folder that is a file, or whose ``report.json``/``report.html`` no report wrote (they would be
    replaced); a report written there before is replaced."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a folder; pass a folder path.")
    foreign = [name for name in ("report.json", "report.html")
               if (out / name).exists() and not _written_by_a_report(out / name)]
    if foreign:
        raise FileExistsError(f"{str(out)!r} holds {foreign}, which no tl_latentspaces report wrote; the report "
                              "would replace them. Pass another folder, or move those files.")


def write_report(report: Report, out_dir: Union[str, Path]) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.json`` into ``out_dir`` (created if needed) atomically; return their paths.
    Files of those names that no report wrote are refused (:func:`check_report_folder`)."""
    out = Path(out_dir)
    check_report_folder(out)
    write_files_atomic(out, {
        "report.json": json.dumps(report.data, indent=1, allow_nan=False).encode("utf-8"),
        "report.html": report.html.encode("utf-8"),
    })
    return out / "report.html", out / "report.json"
