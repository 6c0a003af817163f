"""The report's story: sentences read off the numbers the report shows, each stating its threshold, and caveats."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from tl_latentspaces.model import ModelAccess

__all__ = ["Story", "tell_story", "readable_from", "similarity_blocks", "massive_positions", "ties_embeddings"]

#: A lens "reads" an entry when its top-1 equals the final top-1 on at least this share of held-out positions.
READABLE_AGREEMENT = 0.5
#: Consecutive entries whose pairwise debiased CKA is at least this form a block.
BLOCK_CKA = 0.9
#: A position is massive when its residual norm exceeds the median position's by this factor.
MASSIVE_FACTOR = 10.0


@dataclass(frozen=True)
class Story:
    """What the report says before its figures: ``takeaways`` and ``caveats`` (sentences), ``facts`` (their numbers)."""

    takeaways: list[str]
    caveats: list[str]
    facts: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The story as plain data (the ``"story"`` entry of ``report.json``)."""
        return {"takeaways": list(self.takeaways), "caveats": list(self.caveats), "facts": dict(self.facts)}

    def to_html(self) -> str:
        """Two short lists: the takeaways, then the caveats."""
        items = lambda xs: "".join(f"<li>{html.escape(x)}</li>" for x in xs)  # noqa: E731
        out = f'<section class="story"><h2>What this report shows</h2><ul>{items(self.takeaways)}</ul>'
        if self.caveats:
            out += f"<h3>Caveats</h3><ul>{items(self.caveats)}</ul>"
        return out + "</section>"


def readable_from(labels: Sequence[str], agreement: torch.Tensor,
                  threshold: float = READABLE_AGREEMENT) -> Optional[int]:
    """First entry from which the top-1 agreement stays at or above ``threshold``, or None."""
    ok = (agreement >= threshold).tolist()
    return next((i for i in range(len(ok)) if all(ok[i:])), None)


def similarity_blocks(matrix: torch.Tensor, threshold: float = BLOCK_CKA, min_size: int = 3) -> list[tuple[int, int]]:
    """Runs ``[start, stop]`` (inclusive) of consecutive entries whose every pair is >= ``threshold``.

    Grown left to right; runs shorter than ``min_size`` are dropped; NaN counts as dissimilar.
    """
    m = torch.nan_to_num(matrix.to(torch.float64), nan=-1.0)
    n = m.shape[0]
    blocks, start = [], 0
    for j in range(1, n + 1):
        if j < n and bool((m[j, start:j] >= threshold).all()):
            continue
        if j - start >= min_size:
            blocks.append((start, j - 1))
        start = j
    return blocks


def massive_positions(norms: torch.Tensor, factor: float = MASSIVE_FACTOR) -> list[int]:
    """Positions whose largest residual norm over entries exceeds ``factor`` x the median position's.

    ``norms`` is ``[entry, pos]``, one prompt.
    """
    peak = norms.max(0).values
    return [int(p) for p in (peak > factor * peak.median()).nonzero().flatten()]


def ties_embeddings(access: ModelAccess) -> bool:
    """Whether ``W_U`` is ``W_E`` transposed (tied embeddings), up to float error."""
    W_E, W_U = access.W_E.detach(), access.W_U.detach()
    return W_E.shape == W_U.T.shape and torch.allclose(W_E.float(), W_U.T.float(), rtol=1e-4, atol=1e-6)


def tell_story(access: ModelAccess, evaluation: Any, alignment: Any, *, resid_norms: Optional[torch.Tensor] = None,
               bos: bool = True) -> Story:
    """Read the report's findings off a :class:`~tl_latentspaces.evaluation.LensEvaluation` and an alignment result.

    ``resid_norms`` (``[entry, pos]``, one prompt) detects massive activations; ``bos`` names position 0 BOS.
    """
    labels = list(evaluation.labels)
    takeaways: list[str] = []
    caveats: list[str] = []
    thresholds = {"readable_agreement": READABLE_AGREEMENT, "block_cka": BLOCK_CKA, "massive_factor": MASSIVE_FACTOR}
    readable: dict[str, Optional[str]] = {}
    facts: dict[str, Any] = {"thresholds": thresholds, "readable_from": readable}
    for i, name in enumerate(evaluation.lenses):
        at = readable_from(labels, evaluation.top1_agreement[i])
        readable[name] = None if at is None else labels[at]
        if at is None:
            takeaways.append(f"The {name} lens never holds the model's final top-1 on {READABLE_AGREEMENT:.0%} of "
                             "held-out positions through to the end.")
        else:
            takeaways.append(
                f"The {name} lens agrees with the model's final top-1 on at least {READABLE_AGREEMENT:.0%} of "
                f"held-out positions from {labels[at]} on (KL to final there "
                f"{float(evaluation.kl_to_final[i, at]):.2f} nats; mean prediction depth "
                f"{float(evaluation.prediction_depth[i]):.1f} of {len(labels) - 1})."
            )

    # when the stream leaves the W_E subspace, against what a random subspace holds
    v = alignment.variance
    band = v.null_mean + 2 * v.null_std
    above = (v.embed > band).tolist()
    left = next((i for i in range(1, len(above)) if not any(above[i:])), None)
    k = alignment.k
    if left is None:
        takeaways.append(f"The residual stream keeps more of its variance in the top-{k} W_E subspace than a random "
                         f"{k}-dim subspace would (mean + 2 sd) through the last entry.")
    else:
        takeaways.append(
            f"The residual stream leaves the top-{k} W_E subspace by {v.labels[left]}: from there on the "
            f"variance it holds there ({float(v.embed[left]):.3f}) is within what a random {k}-dim subspace "
            f"holds (mean {float(v.null_mean):.3f} + 2 sd), against {float(v.embed[0]):.3f} at {v.labels[0]}."
        )
    facts["leaves_embedding_subspace_at"] = None if left is None else v.labels[left]

    cka = alignment.cka.layer_debiased
    blocks = similarity_blocks(cka)
    facts["cka_blocks"] = [[alignment.labels[a], alignment.labels[b]] for a, b in blocks]
    if blocks:
        parts = []
        for a, b in blocks:
            inside = float(cka[a : b + 1, a : b + 1].min())
            outside = f", {float(cka[b, b + 1]):.2f} to the next entry" if b + 1 < cka.shape[0] else ""
            names = f"{alignment.labels[a]} to {alignment.labels[b]}"
            parts.append(f"{names} (min CKA inside {inside:.2f}{outside})")
        takeaways.append(
            "Blocks of entries that represent the held-out text alike (every pair with debiased CKA >= "
            f"{BLOCK_CKA}): " + "; ".join(parts) + ". Inside a block the layers change the stream little "
            "relative to what it holds; a drop at a block's edge marks a layer that rewrites it."
        )
    else:
        takeaways.append(f"No three consecutive entries reach debiased CKA >= {BLOCK_CKA} pairwise: "
                         "the stream changes steadily.")

    tied = ties_embeddings(access)
    if tied:
        caveats.append("W_E and W_U are tied (the same matrix): their subspaces coincide, so every W_E and W_U curve "
                       "below is one curve drawn twice.")
    facts["tied_embeddings"] = tied
    if resid_norms is not None:
        massive = massive_positions(resid_norms)
        facts["massive_positions"] = massive
        if massive:
            peak = resid_norms.max(0).values
            where = ", ".join(f"position {p}{' (BOS)' if bos and p == 0 else ''}: norm {float(peak[p]):.0f}"
                              for p in massive)
            caveats.append(
                f"Massive activations: {where}, against a median position's {float(peak.median()):.0f}. A few "
                "dimensions dominate those vectors and every uncentred cosine with them; the corpus "
                "statistics leave such positions out."
            )
    caveats.append(f"Held-out statistics leave BOS out; the alignment suite also skips the first "
                   f"{alignment.skip_positions} position(s) of every sequence ({alignment.n_tokens} tokens used).")
    caveats.append("The embedding lens and the drift curves use uncentred cosines with W_E: a shared offset of the "
                   "stream (its mean direction) lowers them at every position alike.")
    return Story(takeaways=takeaways, caveats=caveats, facts=facts)
