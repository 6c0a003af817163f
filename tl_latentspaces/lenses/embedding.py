"""The embedding lenses: the residual's cosine with every token's *input* embedding (``W_E`` row), plain or
after subtracting the stream's mean per stack entry (:func:`centered_embedding_lens`)."""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch

from tl_latentspaces.checks import check_bool, check_float, check_int
from tl_latentspaces.corpus import default_corpus, tokenize_corpus
from tl_latentspaces.lenses.protocol import cached_weight
from tl_latentspaces.model import ModelAccess, ModelIdentity
from tl_latentspaces.runner import stream_residuals

__all__ = ["EmbeddingLens", "CenteredEmbeddingLens", "centered_embedding_lens"]


def _centered_normalized_embedding(W_E: torch.Tensor) -> torch.Tensor:
    W = W_E.to(torch.float64)
    live = W.norm(dim=-1) > 0  # never-trained all-zero rows stay zero and stay out of the mean
    W = torch.where(live[:, None], W - W[live].mean(0), W)
    return _normalized_embedding(W)


def _normalized_embedding(W_E: torch.Tensor) -> torch.Tensor:
    W_E = W_E.to(torch.float32)
    # never-trained all-zero rows get cosine 0, not NaN
    return (W_E / W_E.norm(dim=-1, keepdim=True).clamp_min(1e-12)).T  # [d_model, d_vocab], one row per token underneath


class EmbeddingLens:
    """Cosine similarity of the residual with every token's input embedding (``W_E`` rows).

    Args:
        access: The model.
        temperature: Divides the chance-scaled cosines ``cos * sqrt(d_model)`` before the softmax;
            ``top_scores`` stay the plain cosines whatever the temperature.
        center: Optional ``[n_entries, d_model]``, row ``e`` subtracted from the residual of the entry
            the readout calls ``e`` (usually from :func:`centered_embedding_lens`).
        center_embedding: Subtract the mean ``W_E`` row from every row first (all-zero rows, tokens
            never trained, stay zero and are left out of the mean).

    With either option the lens is named ``"embedding_centered"``, beside the plain ``"embedding"``.
    """

    name = "embedding"

    def __init__(self, access: ModelAccess, temperature: float = 1.0, *,
                 center: Optional[torch.Tensor] = None, center_embedding: bool = False):
        temperature = check_float(temperature, "temperature", minimum=0.0, open_minimum=True)
        if check_bool(center_embedding, "center_embedding"):
            self.weight = cached_weight(access, "W_E centered normalized", access.W_E, _centered_normalized_embedding)
        else:
            self.weight = cached_weight(access, "W_E normalized", access.W_E, _normalized_embedding)
        self.bias = None
        self.score_scale = math.sqrt(access.d_model) / float(temperature)
        self.center = None if center is None else _check_center(center, access.d_model).to(access.device)
        if center is not None or center_embedding:
            self.name = "embedding_centered"

    def project(self, x: torch.Tensor, entry: int) -> torch.Tensor:
        if self.center is not None:
            if not 0 <= entry < self.center.shape[0]:
                raise ValueError(
                    f"stack entry {entry} has no center row: the center holds {self.center.shape[0]} "
                    "entries. Build the lens with one row per stack entry read."
                )
            x = x.to(torch.float32) - self.center[entry]
        return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12) * self.score_scale


def _check_center(center: Any, d_model: int) -> torch.Tensor:
    if not isinstance(center, torch.Tensor):
        raise ValueError(
            f"center must be a [n_entries, d_model] tensor, got {type(center).__name__}. Build one with "
            "tl_latentspaces.centered_embedding_lens(model), or pass None for the plain lens."
        )
    if center.ndim != 2 or center.shape[1] != d_model or not center.dtype.is_floating_point:
        raise ValueError(
            f"center must be a floating [n_entries, d_model={d_model}] tensor (one row per stack "
            f"entry), got dtype {center.dtype} and shape {tuple(center.shape)}."
        )
    if not torch.isfinite(center).all():
        raise ValueError("center holds NaN or inf values; estimate it again from finite residuals.")
    return center.detach().to(torch.float32)


class CenteredEmbeddingLens:
    """The embedding lens read after subtracting the stream's mean per stack entry: a lens for ``lenses=``.

    Built by :func:`centered_embedding_lens`; read as ``"embedding_centered"``. Where the stream has a large
    mean direction (on the default model 21% of ``E|x|^2`` at ``1_pre``, 73% at ``29_pre``) the plain cosine
    measures mostly that direction (``docs/alignment.md``, "A centred embedding lens").

    Attributes:
        labels: Stack labels, one per row of ``means``.
        means: ``[n_entries, d_model]`` float64 means of the residual at each entry.
        n_tokens: Tokens averaged (the leading ``skip_positions`` of each sequence left out).
        center_embedding: Whether ``W_E`` rows are centred too.
        identity: The model the means were estimated on (sizes and unembedding hash).
    """

    name = "embedding_centered"

    def __init__(self, labels: Sequence[str], means: torch.Tensor, *, n_tokens: int, identity: ModelIdentity,
                 center_embedding: bool = False):
        labels = list(labels)
        if not isinstance(means, torch.Tensor):
            raise ValueError(
                f"means must be a [n_labels, d_model] tensor, got {type(means).__name__}. Estimate them "
                "with tl_latentspaces.centered_embedding_lens(model)."
            )
        if means.ndim != 2 or means.shape[0] != len(labels) or means.shape[1] != identity.d_model:
            raise ValueError(
                f"means must be [n_labels={len(labels)}, d_model={identity.d_model}], got {tuple(means.shape)}."
            )
        self.labels = labels
        self.means = means.detach().to("cpu", torch.float64)
        self.n_tokens = int(n_tokens)
        self.center_embedding = check_bool(center_embedding, "center_embedding")
        self.identity = identity

    def __repr__(self) -> str:
        return (
            f"CenteredEmbeddingLens({self.identity.name!r}, {len(self.labels)} entries, "
            f"{self.n_tokens} tokens, center_embedding={self.center_embedding})"
        )

    def bind(self, access: ModelAccess, *, temperature: float = 1.0,
             labels: Optional[Sequence[str]] = None) -> EmbeddingLens:
        """An :class:`EmbeddingLens` for ``access`` (the sizes and unembedding the means were taken on), its
        center rows in ``labels`` order: the stack labels the readout calls ``0, 1, ...`` (default the
        ``incl_mid=False`` stack)."""
        problems = self.identity.mismatches(ModelIdentity.of(access, weights=False))
        if problems:
            raise ValueError(
                f"this centred embedding lens was estimated on {self.identity.name!r} and does not fit "
                f"{access.name!r}: {'; '.join(problems)}. Estimate it on this model with "
                "tl_latentspaces.centered_embedding_lens(model)."
            )
        if labels is None:
            labels = [label for label, _ in access.stack_sites()]
        missing = [label for label in labels if label not in self.labels]
        if missing:
            raise ValueError(
                f"this centred embedding lens has no mean for stack entries {missing}; it holds "
                f"{self.labels}. Estimate it again with the entries you read."
            )
        rows = torch.tensor([self.labels.index(label) for label in labels])
        return EmbeddingLens(
            access, temperature, center=self.means[rows].to(torch.float32), center_embedding=self.center_embedding
        )


def centered_embedding_lens(model: Any, corpus: Any = None, *, max_tokens: int = 2048, seq_len: int = 128,
                            batch_size: int = 8, center_embedding: bool = False, skip_positions: int = 1,
                            progress: bool = False) -> CenteredEmbeddingLens:
    """Estimate the residual stream's mean per stack entry (``_mid`` included, float64 sums) as a centred lens.

    Args:
        model: A ``HookedTransformer`` or ``TransformerBridge`` in eval mode.
        corpus: Texts, file paths, a ``datasets`` object or a ``[n, seq_len]`` token tensor
            (:func:`~tl_latentspaces.corpus.tokenize_corpus`); default the training split of the
            offline default corpus.
        max_tokens: Tokens read (whole sequences of ``seq_len``, BOS included).
        batch_size: Sequences per forward pass.
        center_embedding: Centre the ``W_E`` rows too (see :class:`EmbeddingLens`). Off by default:
            on the default model it keeps every own token nearest at ``0_pre`` and ranks own
            tokens better (``docs/alignment.md``, "A centred embedding lens").
        skip_positions: Leading positions of every sequence left out of the means (1: BOS, whose
            residual norms are outliers by orders of magnitude on many models).
        progress: Show a progress bar.

    Example:
        >>> lens = tll.centered_embedding_lens(model)  # doctest: +SKIP
        >>> r = tll.read_lenses(model, "The Eiffel Tower", lenses=("embedding", lens))  # doctest: +SKIP
        >>> r["embedding_centered"].own_ranks.float().mean()  # doctest: +SKIP
    """
    access = ModelAccess.of(model)
    access.require_eval("estimating the residual mean")
    max_tokens = check_int(max_tokens, "max_tokens", minimum=1)
    seq_len = check_int(seq_len, "seq_len", minimum=2)
    skip_positions = check_int(
        skip_positions, "skip_positions", minimum=0, maximum=seq_len - 1, why=" (seq_len - 1: keep a position)"
    )
    center_embedding = check_bool(center_embedding, "center_embedding")
    sequences = tokenize_corpus(
        access, default_corpus("train") if corpus is None else corpus, seq_len=seq_len, max_tokens=max_tokens
    )
    sites = access.stack_sites(incl_mid=True)
    sums = torch.zeros(len(sites), access.d_model, dtype=torch.float64)
    n = 0
    for _, stack in stream_residuals(access, sequences, dict(sites), batch_size=batch_size, progress=progress,
                                     desc="residual mean"):
        body = stack[:, :, skip_positions:]
        sums += body.to("cpu", torch.float64).sum(dim=(1, 2))
        n += body.shape[1] * body.shape[2]
    if not torch.isfinite(sums).all():
        raise ValueError("the residual stream holds NaN or inf on this corpus; the mean is undefined.")
    return CenteredEmbeddingLens(
        [label for label, _ in sites], sums / n, n_tokens=n,
        identity=ModelIdentity.of(access, weights=False), center_embedding=center_embedding,
    )

