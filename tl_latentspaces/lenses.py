"""Lenses and the calls that read a model through them.

A lens maps a residual vector to vocabulary scores:

* :class:`LogitLens`: the model's own readout, ``ln_final(x) @ W_U + b_U``, with the final norm
  applied exactly as the model applies it;
* :class:`EmbeddingLens`: the residual against the *input* embedding ``W_E``: cosine similarity
  with every token's embedding. Its distribution is ``softmax(cos * sqrt(d_model) / T)``: a random
  direction has cosine of standard deviation ``1/sqrt(d_model)`` with any embedding, so the scores
  are cosines in units of chance and the default temperature ``T = 1`` gives a distribution that
  is flat for noise and sharp for a vector that sits on one token's embedding;
* :class:`CenteredEmbeddingLens` (from :func:`centered_embedding_lens`): the same cosine after the
  residual stream's mean at each entry (estimated on a corpus) is subtracted, read as
  ``"embedding_centered"`` beside the plain lens. Where the stream has a large mean direction,
  the plain cosine measures mostly that direction.

Data flows one way: model + input -> residual stack (from hooks or a cache) -> lens ->
:mod:`~tl_latentspaces.readout` -> :class:`~tl_latentspaces.results.LensResult`.

Example:
    >>> import tl_latentspaces as tll
    >>> model = tll.load_default_model()  # doctest: +SKIP
    >>> result = tll.logit_lens(model, "The Eiffel Tower is in the city of", top_k=5)  # doctest: +SKIP
    >>> result.top_tokens()[-1][0][-1]  # doctest: +SKIP
    ' Paris'
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any, Optional, Protocol, Sequence, Union, runtime_checkable

import torch
from jaxtyping import Float

from tl_latentspaces.checks import check_bool, check_float, check_int
from tl_latentspaces.corpus import default_corpus, tokenize_corpus
from tl_latentspaces.hooks import HookSession, ResidualCollector
from tl_latentspaces.jacobian_lens import JacobianLens, is_transformer_lens_jacobian_lens
from tl_latentspaces.model import ModelAccess, ModelIdentity, Tokens
from tl_latentspaces.readout import Readout, read_stack, tensor_key, vocab_major
from tl_latentspaces.runner import stream_residuals
from tl_latentspaces.results import LensInputs, LensResult
from tl_latentspaces.translators import TunedLens

__all__ = [
    "Lens",
    "TranslatedLens",
    "LogitLens",
    "EmbeddingLens",
    "CenteredEmbeddingLens",
    "centered_embedding_lens",
    "logit_lens",
    "embedding_lens",
    "read_lenses",
    "LensSession",
    "lens_session",
    "build_lenses",
]

Input = Union[str, Sequence[str], torch.Tensor]
Targets = Union[str, int, Sequence[Union[str, int]], torch.Tensor, None]
Positions = Union[int, slice, Sequence[int], None]
LayerSel = Union[Sequence[Union[int, str]], None]

DEFAULT_CHUNK_ROWS = 512

_WEIGHTS: "weakref.WeakKeyDictionary[Any, dict[str, tuple[tuple, Any]]]" = weakref.WeakKeyDictionary()


def _cached(access: ModelAccess, kind: str, source: torch.Tensor, build: Any) -> Any:
    """``build(source)``, computed once per model and weight: rebuilt when ``source`` changes.

    The readout matrices (a float32, vocabulary-major ``W_U``; the row-normalized ``W_E``) cost a
    49K x d_model copy to build, more than a short prompt's whole readout. They are kept per model
    (weakly: they go with it), keyed by :func:`~tl_latentspaces.readout.tensor_key` of the weight
    they come from, so a weight replaced or changed in place is noticed.
    """
    per_model = _WEIGHTS.setdefault(access.model, {})
    key = tensor_key(source)
    hit = per_model.get(kind)
    if hit is None or hit[0] != key:
        hit = (key, build(source.detach()))
        per_model[kind] = hit
    return hit[1]


def _unembedding(access: ModelAccess) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``W_U`` (float32, vocabulary-major) and ``b_U`` (None when zero: a zero bias costs a pass per tile)."""
    weight = _cached(access, "W_U", access.W_U, lambda w: vocab_major(w.to(torch.float32)))
    b = access.b_U
    bias = _cached(access, "b_U", b, lambda t: None if not bool(t.any()) else t.to(torch.float32))
    return weight, bias


def _centered_normalized_embedding(W_E: torch.Tensor) -> torch.Tensor:
    W = W_E.to(torch.float64)
    live = W.norm(dim=-1) > 0  # never-trained all-zero rows stay zero and stay out of the mean
    W = torch.where(live[:, None], W - W[live].mean(0), W)
    return _normalized_embedding(W)


def _normalized_embedding(W_E: torch.Tensor) -> torch.Tensor:
    W_E = W_E.to(torch.float32)
    # Tokens never trained can have all-zero embeddings; they get cosine 0, not NaN.
    return (W_E / W_E.norm(dim=-1, keepdim=True).clamp_min(1e-12)).T  # [d_model, d_vocab], one row per token underneath


class LogitLens:
    """``ln_final(x) @ W_U + b_U``: the model's own readout applied to any residual vector.

    Args:
        access: The model.
    """

    name = "logit"
    score_scale = 1.0

    def __init__(self, access: ModelAccess):
        self.access = access
        # One row per token (no copy for the bridge, whose W_U is a transposed view), built once
        # per model and weight: see vocab_major and _cached.
        self.weight, self.bias = _unembedding(access)

    def project(self, x: torch.Tensor, entry: int) -> torch.Tensor:
        return self.access.final_norm(x)


@runtime_checkable
class Lens(Protocol):
    """What a lens is: a map from one stack entry's residuals into the final residual basis.

    Any object with a ``name`` and a ``translate`` method is a lens; the model's own readout
    (final norm, ``W_U``, ``b_U``) turns what it returns into vocabulary scores. It reads
    wherever a built-in lens does: :func:`read_lenses`, :func:`lens_session`,
    :func:`~tl_latentspaces.evaluate_lenses`, :func:`~tl_latentspaces.lens_grid` and the report.
    :class:`~tl_latentspaces.TunedLens` and :class:`~tl_latentspaces.JacobianLens` are lenses of
    this kind; ``"logit"`` is the identity one.

    Attributes:
        name: The lens's name in results (``results[name]``) and tables; unique per call.

    ``translate(x, label)`` gets ``x``, a ``[n, d_model]`` float32 tensor of residuals of the
    stack entry ``label`` (``"0_pre"`` ... ``"{n_layers-1}_pre"``, ``"{l}_mid"`` with
    ``incl_mid=True``, ``"final_post"``) and returns ``[n, d_model]``. A lens with nothing for a
    label raises ``ValueError``: every label is tried (on zero rows) before the forward pass, so
    that error comes first.

    Example (a fixed random rotation of the residual basis):
        >>> class Rotation:
        ...     name = "rotation"
        ...     def __init__(self, d_model, seed=0):
        ...         g = torch.Generator().manual_seed(seed)
        ...         self.Q = torch.linalg.qr(torch.randn(d_model, d_model, generator=g))[0]
        ...     def translate(self, x, label):
        ...         return x @ self.Q.to(x.device)
        >>> results = read_lenses(model, "The Eiffel Tower is in", lenses=("logit", Rotation(576)))  # doctest: +SKIP
        >>> results["rotation"].top_tokens()  # doctest: +SKIP
    """

    name: str

    def translate(self, x: Float[torch.Tensor, "n d_model"], label: str) -> Float[torch.Tensor, "n d_model"]:
        ...


class TranslatedLens:
    """A :class:`Lens` read through the model's own readout: ``ln_final(translate(x, label)) @ W_U + b_U``.

    The readout weights are the logit lens's own (the same tensor), so every translated lens and
    the logit lens share one sweep of ``W_U``, and the identity lens reads exactly as ``"logit"``.

    Args:
        lens: The lens.
        access: The model.
        labels: The stack labels, indexed by the readout's entry numbers; each is tried on zero
            rows now, so a label the lens refuses fails before any forward pass.
    """

    score_scale = 1.0

    def __init__(self, lens: Lens, access: ModelAccess, labels: Sequence[str]):
        self.lens, self.access, self.name = lens, access, lens.name
        self.labels = list(labels)
        self.weight, self.bias = _unembedding(access)
        empty = torch.zeros(0, access.d_model, device=access.device)
        for label in self.labels:
            self.translate(empty, label)

    def translate(self, x: Float[torch.Tensor, "n d_model"], label: str) -> Float[torch.Tensor, "n d_model"]:
        x = x.to(torch.float32)  # the protocol's promise, whatever the model's dtype
        with torch.no_grad():
            y = self.lens.translate(x, label)
        if not isinstance(y, torch.Tensor) or tuple(y.shape) != tuple(x.shape):
            got = list(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(
                f"lens {self.name!r}: translate(x, {label!r}) must return a tensor of the shape of x, "
                f"{list(x.shape)}; it returned {got}."
            )
        return y

    def project(self, x: Float[torch.Tensor, "n d_model"], entry: int) -> Float[torch.Tensor, "n d_model"]:
        return self.access.final_norm(self.translate(x, self.labels[entry]))


class EmbeddingLens:
    """Cosine similarity of the residual with every token's input embedding (``W_E`` rows).

    Args:
        access: The model.
        temperature: Divides the chance-scaled cosines ``cos * sqrt(d_model)`` before the
            softmax that defines the lens's probabilities. Scores reported as ``top_scores`` are
            the plain cosines whatever the temperature.
        center: Optional ``[n_entries, d_model]`` vectors, one per stack entry (row ``e`` for the
            entry the readout calls ``e``), subtracted from the residual before the cosine. The
            usual source is :func:`centered_embedding_lens`, which estimates the stream's mean
            per entry from a corpus.
        center_embedding: Subtract the mean ``W_E`` row from every row first, so the cosine
            compares directions relative to the typical token (all-zero rows, tokens never
            trained, stay zero and are left out of the mean).

    With either option the lens is named ``"embedding_centered"``, so it reads side by side with
    the plain ``"embedding"`` lens.
    """

    name = "embedding"

    def __init__(
        self,
        access: ModelAccess,
        temperature: float = 1.0,
        *,
        center: Optional[torch.Tensor] = None,
        center_embedding: bool = False,
    ):
        temperature = check_float(temperature, "temperature", minimum=0.0, open_minimum=True)
        if check_bool(center_embedding, "center_embedding"):
            self.weight = _cached(access, "W_E centered normalized", access.W_E, _centered_normalized_embedding)
        else:
            self.weight = _cached(access, "W_E normalized", access.W_E, _normalized_embedding)
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
    """The embedding lens read relative to the stream's typical vector: a lens for ``lenses=``.

    Holds the residual stream's mean per stack entry (estimated by
    :func:`centered_embedding_lens`); reading it subtracts that mean from the residual and, with
    ``center_embedding``, the mean ``W_E`` row from every embedding, before the cosine. Where the
    stream has a large mean direction (on the default model it holds 21% of ``E|x|^2`` at
    ``1_pre`` and 73% at ``29_pre``), the plain cosine measures mostly that direction. Its results are named ``"embedding_centered"``. What it does and does
    not recover on the default model: ``docs/alignment.md``, "A centred embedding lens".

    Attributes:
        labels: Stack labels (``"0_pre"``, ``"0_mid"``, ..., ``"final_post"``), one per row of
            ``means``.
        means: ``[n_entries, d_model]`` float64 means of the residual at each entry.
        n_tokens: Tokens averaged (the leading ``skip_positions`` of each sequence left out).
        center_embedding: Whether ``W_E`` rows are centred too.
        identity: The model the means were estimated on (sizes and unembedding hash).
    """

    name = "embedding_centered"

    def __init__(
        self,
        labels: Sequence[str],
        means: torch.Tensor,
        *,
        n_tokens: int,
        identity: ModelIdentity,
        center_embedding: bool = False,
    ):
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

    def bind(
        self, access: ModelAccess, *, temperature: float = 1.0, labels: Optional[Sequence[str]] = None
    ) -> EmbeddingLens:
        """An :class:`EmbeddingLens` for ``access``'s model, its center rows in ``labels`` order.

        Args:
            access: The model; it must have the sizes and unembedding the means were taken on.
            temperature: As for :class:`EmbeddingLens`.
            labels: The stack labels the readout calls ``0, 1, ...``; default the ``incl_mid=False``
                stack.
        """
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


def centered_embedding_lens(
    model: Any,
    corpus: Any = None,
    *,
    max_tokens: int = 2048,
    seq_len: int = 128,
    batch_size: int = 8,
    center_embedding: bool = False,
    skip_positions: int = 1,
    progress: bool = False,
) -> CenteredEmbeddingLens:
    """Estimate the residual stream's mean per stack entry and return a centred embedding lens.

    Every entry of the stack (``"{l}_pre"``, ``"{l}_mid"`` and ``"final_post"``) is averaged
    over the corpus's tokens, the first ``skip_positions`` of every sequence left out (BOS: its
    residual norms are outliers by orders of magnitude on many models), with float64 sums.

    Args:
        model: A ``HookedTransformer`` or ``TransformerBridge`` in eval mode.
        corpus: Texts, file paths, a ``datasets`` object or a ``[n, seq_len]`` token tensor
            (:func:`~tl_latentspaces.corpus.tokenize_corpus`); default the training split of the
            offline default corpus.
        max_tokens: Tokens read (whole sequences of ``seq_len``).
        seq_len: Tokens per sequence, BOS included.
        batch_size: Sequences per forward pass.
        center_embedding: Centre the ``W_E`` rows too (see :class:`EmbeddingLens`). Off by default:
            on the default model it keeps every own token nearest at ``0_pre`` and ranks own
            tokens better (``docs/alignment.md``, "A centred embedding lens").
        skip_positions: Leading positions of every sequence left out of the means (1: BOS).
        progress: Show a progress bar.

    Example:
        >>> lens = tll.centered_embedding_lens(model)  # doctest: +SKIP
        >>> r = tll.read_lenses(model, "The Eiffel Tower", lenses=("embedding", lens))  # doctest: +SKIP
        >>> r["embedding_centered"].own_ranks.float().mean()  # doctest: +SKIP
    """
    access = model if isinstance(model, ModelAccess) else ModelAccess(model)
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


# ---------------------------------------------------------------------- argument checks
def _check_top_k(top_k: Any, d_vocab: int) -> int:
    return check_int(top_k, "top_k", minimum=1, maximum=d_vocab, why=" (the vocabulary size)")


def _select_entries(all_labels: list[str], layers: LayerSel) -> list[int]:
    if layers is None:
        return list(range(len(all_labels)))
    if isinstance(layers, (int, str)):
        layers = [layers]
    if not isinstance(layers, (list, tuple, range)):
        raise ValueError(
            f"layers must be an int, a label, or a list of them, got {type(layers).__name__} {layers!r:.80}."
        )
    if len(layers) == 0:
        raise ValueError(
            f"layers is empty: nothing to read. Pass None for every entry, or some of {all_labels}."
        )
    out = []
    for item in layers:
        if isinstance(item, str):
            if item not in all_labels:
                raise ValueError(f"unknown stack entry {item!r}; valid labels are {all_labels}.")
            out.append(all_labels.index(item))
        elif isinstance(item, int) and not isinstance(item, bool):
            idx = item + len(all_labels) if item < 0 else item
            if not 0 <= idx < len(all_labels):
                raise ValueError(
                    f"layer {item} is out of range for the stack of {len(all_labels)} entries "
                    f"(valid: -{len(all_labels)}..{len(all_labels) - 1}, or a label from {all_labels})."
                )
            out.append(idx)
        else:
            raise ValueError(f"layers must hold ints or stack labels, got {item!r}.")
    return out


def _select_positions(pos: Positions, seq_len: int) -> list[int]:
    if pos is None:
        return list(range(seq_len))
    if isinstance(pos, slice):
        out = list(range(seq_len))[pos]
        if not out:
            raise ValueError(f"position slice {pos} selects nothing from a sequence of {seq_len} tokens.")
        return out
    items = [pos] if isinstance(pos, int) else list(pos)
    out = []
    for p in items:
        if isinstance(p, bool) or not isinstance(p, int):
            raise ValueError(f"positions must be ints, got {p!r}.")
        idx = p + seq_len if p < 0 else p
        if not 0 <= idx < seq_len:
            raise ValueError(
                f"position {p} is out of range for an input of {seq_len} tokens "
                f"(valid: -{seq_len}..{seq_len - 1})."
            )
        out.append(idx)
    if not out:
        raise ValueError("positions is empty; pass at least one position or None for all.")
    return out


def _resolve_targets(access: ModelAccess, targets: Targets, shape: tuple[int, int]) -> Optional[torch.Tensor]:
    """Targets as ``[batch, pos, T]`` ids: shared tokens are broadcast to every position."""
    if targets is None:
        return None
    B, P = shape
    if isinstance(targets, torch.Tensor):
        if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
            raise ValueError(
                f"a target tensor must hold integer token ids, got dtype {targets.dtype}. Convert "
                "ids with .long(); probabilities or scores are not targets."
            )
        t = targets.long()
        if t.ndim == 2:
            t = t.unsqueeze(-1)
        if t.ndim != 3 or tuple(t.shape[:2]) != (B, P):
            raise ValueError(
                f"a target tensor must be [batch, pos] or [batch, pos, T] matching the read "
                f"positions {(B, P)}, got shape {tuple(targets.shape)}."
            )
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= access.d_vocab:
            raise ValueError(f"target ids must lie in [0, {access.d_vocab}), got values in [{lo}, {hi}].")
        return t
    items = [targets] if isinstance(targets, (str, int)) else list(targets)
    if not items:
        raise ValueError("targets is empty; pass a token, a list of tokens, or None.")
    ids = torch.tensor([access.to_single_token(t) for t in items], dtype=torch.long)
    return ids.view(1, 1, -1).expand(B, P, -1).contiguous()


def _stack_from_cache(cache: Any, names: dict[str, str], labels: list[str], tokens: Tokens) -> torch.Tensor:
    slabs = []
    for label in labels:
        name = names[label]
        try:
            act = cache[name]
        except (KeyError, ValueError) as err:
            raise ValueError(
                f"the cache has no activation {name!r} (needed for {label}). Cache the residual "
                f"stream, e.g. model.run_with_cache(tokens, names_filter=lambda n: 'resid' in n)."
            ) from err
        if act.ndim != 3 or tuple(act.shape[:2]) != tuple(tokens.ids.shape):
            raise ValueError(
                f"cached {name} has shape {tuple(act.shape)}, but the input tokenizes to "
                f"{tuple(tokens.ids.shape)}; pass the input the cache was made from (mind prepend_bos)."
            )
        if not torch.isfinite(act).all():
            raise ValueError(f"the residual stream holds NaN or inf at {label} ({name}) in the cache.")
        slabs.append(act.detach())
    return torch.stack(slabs, 0)


# ---------------------------------------------------------------------- the shared reader
@dataclass
class _Plan:
    """Everything checked before a forward pass is paid for."""

    access: ModelAccess
    tokens: Tokens
    all_labels: list[str]
    names: dict[str, str]
    entries: list[int]
    collect: list[str]
    top_k: int
    targets: Targets
    pos: Positions
    chunk_rows: int

    @property
    def final_label(self) -> str:
        return self.all_labels[-1]


def _plan(
    model: Any,
    input: Input,
    *,
    operation: str,
    top_k: int,
    targets: Targets,
    prepend_bos: Optional[bool],
    layers: LayerSel,
    incl_mid: bool,
    pos: Positions,
    chunk_rows: int,
) -> _Plan:
    access = model if isinstance(model, ModelAccess) else ModelAccess(model)
    access.require_eval(operation)
    chunk_rows = check_int(chunk_rows, "chunk_rows", minimum=1)
    if input is None:
        raise ValueError(f"{operation} needs an input: a string, a list of strings or a token tensor.")
    check_bool(incl_mid, "incl_mid")
    top_k = _check_top_k(top_k, access.d_vocab)
    tokens = access.to_tokens(input, prepend_bos=prepend_bos)
    sites = access.stack_sites(incl_mid=incl_mid)
    all_labels = [label for label, _ in sites]
    names = dict(sites)
    entries = _select_entries(all_labels, layers)
    positions = _select_positions(pos, tokens.ids.shape[1])
    collect = sorted(set(all_labels[i] for i in entries) | {all_labels[-1]}, key=all_labels.index)
    # Resolve targets now so a bad target fails before the forward pass.
    _resolve_targets(access, targets, (tokens.ids.shape[0], len(positions)))
    return _Plan(access, tokens, all_labels, names, entries, collect, top_k, targets, pos, chunk_rows)


def _read(plan: _Plan, stack: torch.Tensor, lenses: Sequence[Readout]) -> dict[str, LensResult]:
    """Read a collected ``[entry, batch, seq, d]`` stack (in ``plan.collect`` order) through lenses.

    Every lens and every entry is read in one sweep over the vocabulary (see
    :func:`~tl_latentspaces.readout.read_stack`); the logit lens's read of the final entry is the
    final distribution itself.
    """
    access, tokens = plan.access, plan.tokens
    positions = _select_positions(plan.pos, tokens.ids.shape[1])
    B, P = tokens.ids.shape[0], len(positions)
    by_label = {label: i for i, label in enumerate(plan.collect)}
    dev = access.device
    with torch.no_grad():
        stack = stack[:, :, positions].to(dev)
        flat = stack.reshape(stack.shape[0], B * P, stack.shape[-1])
        reference = next((lens for lens in lenses if isinstance(lens, LogitLens)), None) or LogitLens(access)
        targets = _resolve_targets(access, plan.targets, (B, P))
        flat_targets = None if targets is None else targets.reshape(B * P, -1).to(dev)
        own = tokens.ids[:, positions].reshape(-1).to(dev)
        read_rows = [by_label[plan.all_labels[i]] for i in plan.entries]
        out = read_stack(
            flat[read_rows],
            plan.entries,
            lenses,
            final=flat[by_label[plan.final_label]],
            final_entry=len(plan.all_labels) - 1,
            reference=reference,
            top_k=plan.top_k,
            targets=flat_targets,
            own_ids=own,
            own=[isinstance(lens, EmbeddingLens) for lens in lenses],
            chunk_rows=plan.chunk_rows,
        )
        E = len(plan.entries)
        shape3 = (E, B, P)
        final_top1 = out.final_top1.reshape(B, P).cpu()
        resid = flat[read_rows].reshape(E, B, P, -1).cpu()  # kept for LensDiff.divergence
        results = {}
        for lens, r in zip(lenses, out.lenses):
            opt = lambda t, extra=(): None if t is None else t.reshape(*shape3, *extra).cpu()  # noqa: E731
            results[lens.name] = LensResult(
                lens=lens.name,
                labels=[plan.all_labels[i] for i in plan.entries],
                tokens=tokens.ids.cpu(),
                positions=positions,
                mask=tokens.mask[:, positions].cpu(),
                top_ids=r.top_ids.reshape(*shape3, -1).cpu(),
                top_probs=r.top_probs.reshape(*shape3, -1).cpu(),
                top_scores=r.top_scores.reshape(*shape3, -1).cpu(),
                entropy=r.entropy.reshape(shape3).cpu(),
                kl_to_final=r.kl_to_final.reshape(shape3).cpu(),
                final_top1=final_top1,
                target_ids=None if targets is None else targets.cpu(),
                target_probs=opt(r.target_probs, (-1,)),
                target_ranks=opt(r.target_ranks, (-1,)),
                own_scores=opt(r.own_scores),
                own_ranks=opt(r.own_ranks),
                model_name=access.name,
                decode=access.decoder(),
                inputs=LensInputs(resid=resid, lens=lens, entries=list(plan.entries)),
            )
    return results


def build_lenses(
    access: ModelAccess, lenses: Sequence[Any], temperature: float, labels: Optional[Sequence[str]] = None
) -> list[Readout]:
    """The readouts of ``lenses`` on ``access``'s model: names (``"logit"``, ``"embedding"``), any
    :class:`Lens` (a TunedLens, a JacobianLens, a user's own), a CenteredEmbeddingLens or a
    TransformerLens ``JacobianLens``. ``labels`` are the stack labels by entry number (default
    ``"0_pre"`` ... ``"final_post"``); every lens is tried on each. Raises ValueError on an unknown,
    empty or repeated lens, or a label a lens refuses."""
    if isinstance(lenses, (str, torch.nn.Module)) or isinstance(lenses, Lens) or not hasattr(lenses, "__iter__"):
        lenses = [lenses]  # one lens given bare
    lenses = list(lenses)
    if len(lenses) == 0:
        raise ValueError(
            "lenses is empty: nothing to read. Pass some of 'logit', 'embedding' or a TunedLens, "
            "e.g. lenses=('logit',)."
        )
    if labels is None:
        labels = [f"{layer}_pre" for layer in range(access.n_layers)] + ["final_post"]
    built: list[Readout] = []
    for lens in lenses:
        if is_transformer_lens_jacobian_lens(lens):  # TransformerLens's own model check runs first
            lens = JacobianLens.from_transformer_lens(lens, access)
        if isinstance(lens, str) and lens == "logit":
            built.append(LogitLens(access))
        elif isinstance(lens, str) and lens == "embedding":
            built.append(EmbeddingLens(access, temperature=temperature))
        elif isinstance(lens, CenteredEmbeddingLens):
            built.append(lens.bind(access, temperature=temperature, labels=labels))
        elif isinstance(lens, Lens) and isinstance(lens.name, str) and lens.name:
            if isinstance(lens, TunedLens):
                lens.check_finite("read")
            if isinstance(lens, (TunedLens, JacobianLens)):
                lens.check_model(access)
            built.append(TranslatedLens(lens, access, labels))
        else:
            raise ValueError(
                f"unknown lens {lens!r}; pass 'logit', 'embedding', a tl_latentspaces.TunedLens, "
                "JacobianLens or CenteredEmbeddingLens, a TransformerLens JacobianLens, or your own "
                "lens: an object with a non-empty name and translate(x, label) (see tl_latentspaces.Lens)."
            )
    names = [lens.name for lens in built]
    if len(set(names)) != len(names):
        raise ValueError(f"each lens can be read once per call; got {names}.")
    return built


def _collect(plan: _Plan, cache: Any, verify_cache: bool = True) -> torch.Tensor:
    if cache is not None:
        stack = _stack_from_cache(cache, plan.names, plan.collect, plan.tokens)
        if check_bool(verify_cache, "verify_cache"):
            plan.access.check_cache_tokens(cache, plan.tokens.ids)
        return stack
    with HookSession(plan.access) as session:
        collector = ResidualCollector(
            session, {label: plan.names[label] for label in plan.collect}, expect=plan.tokens.ids
        )
        with torch.no_grad():
            plan.access.forward(plan.tokens.ids)
    return collector.stack(plan.collect)


def read_lenses(
    model: Any,
    input: Input,
    *,
    lenses: Sequence[Any] = ("logit", "embedding"),
    top_k: int = 5,
    targets: Targets = None,
    prepend_bos: Optional[bool] = None,
    cache: Any = None,
    verify_cache: bool = True,
    layers: LayerSel = None,
    incl_mid: bool = False,
    pos: Positions = None,
    temperature: float = 1.0,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> dict[str, LensResult]:
    """Read several lenses from one forward pass (or one cache): ``{lens name: LensResult}``.

    Args:
        model: A ``HookedTransformer`` or ``TransformerBridge`` in eval mode.
        input: A string, a list of strings (right-padded) or a ``[batch, pos]`` token tensor.
        lenses: Any of ``"logit"``, ``"embedding"`` and lenses (:class:`~tl_latentspaces.Lens`: a
            ``TunedLens``, a ``JacobianLens``, one of your own).
        top_k: Top tokens kept per cell.
        targets: Tokens whose probability and rank to report: a token string (one token), an
            id, a list of them (shared by every position), or a ``[batch, pos(, T)]`` id tensor.
        prepend_bos: Prepend the BOS token to string inputs. ``None`` (the default) means True
            for text; a token tensor is used as given (``True`` with one warns: nothing is added).
        cache: An ``ActivationCache`` holding the residual stream of ``input``; no forward pass
            is run then. It must come from the same tokens: its ``hook_embed`` (or
            ``blocks.0.hook_resid_pre``) is compared with the input's token embeddings.
        verify_cache: Set False to skip that check (a cache of a run whose embeddings a hook
            edited fails it).
        layers: Stack entries to read (indices, negative allowed, or labels like ``"5_pre"``).
        incl_mid: Also read every layer's ``resid_mid``.
        pos: Positions to read (an int, a slice, a list), default all.
        temperature: The embedding lens's softmax temperature.
        chunk_rows: Rows per matmul of the streaming readout: a block reads every entry and lens
            of ``chunk_rows // (entries x lenses)`` positions (at least one) against 2048-token tiles.

    The forward pass is the model's own: hooks the user registered fire, so an ablation before
    layer ``l`` changes what the lens reads from layer ``l + 1`` on. The lens's capture hooks are
    removed afterwards, exactly, even on error.
    """
    plan = _plan(
        model, input, operation="read_lenses", top_k=top_k, targets=targets, prepend_bos=prepend_bos,
        layers=layers, incl_mid=incl_mid, pos=pos, chunk_rows=chunk_rows,
    )
    built = build_lenses(plan.access, lenses, temperature, plan.all_labels)
    return _read(plan, _collect(plan, cache, verify_cache), built)


def logit_lens(
    model: Any,
    input: Input,
    *,
    top_k: int = 5,
    targets: Targets = None,
    prepend_bos: Optional[bool] = None,
    cache: Any = None,
    verify_cache: bool = True,
    layers: LayerSel = None,
    incl_mid: bool = False,
    pos: Positions = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> LensResult:
    """Read every residual-stack entry through the final norm and unembedding.

    Arguments as in :func:`read_lenses`. The ``final_post`` entry reproduces the model's own
    log-probabilities, and its KL to final is 0.

    Example:
        >>> r = logit_lens(model, "The Eiffel Tower is in the city of", targets=" Paris")  # doctest: +SKIP
        >>> r.summary()  # doctest: +SKIP
    """
    return read_lenses(
        model, input, lenses=("logit",), top_k=top_k, targets=targets, prepend_bos=prepend_bos,
        cache=cache, verify_cache=verify_cache, layers=layers, incl_mid=incl_mid, pos=pos,
        chunk_rows=chunk_rows,
    )["logit"]


def embedding_lens(
    model: Any,
    input: Input,
    *,
    top_k: int = 5,
    targets: Targets = None,
    prepend_bos: Optional[bool] = None,
    cache: Any = None,
    verify_cache: bool = True,
    layers: LayerSel = None,
    incl_mid: bool = False,
    pos: Positions = None,
    temperature: float = 1.0,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> LensResult:
    """Compare every residual-stack entry with the input embedding matrix ``W_E``.

    The top-k are the nearest tokens by cosine (``top_scores`` holds the cosines); ``own_scores``
    and ``own_ranks`` give, for every position, the cosine to and rank of its own input token's
    embedding: how far the latent vector has drifted from where it started. KL to final compares
    the model's final distribution with the lens's ``softmax(cos * sqrt(d_model) / temperature)``.
    Other arguments as in :func:`read_lenses`.
    """
    return read_lenses(
        model, input, lenses=("embedding",), top_k=top_k, targets=targets, prepend_bos=prepend_bos,
        cache=cache, verify_cache=verify_cache, layers=layers, incl_mid=incl_mid, pos=pos,
        temperature=temperature, chunk_rows=chunk_rows,
    )["embedding"]


class LensSession:
    """Lenses attached to a live model as hooks, read from a forward pass the user runs.

    Use :func:`lens_session`. Inside the ``with`` block run the model on ``session.tokens`` in any
    way (``model(...)``, with your own hooks registered, ``run_with_hooks`` on other hook points);
    on leaving the block the lens hooks are removed, exactly, and ``session.results`` holds
    ``{lens name: LensResult}`` for the last forward pass on ``session.tokens``. Each entry is read
    after every hook on its hook point, whenever and however that hook was registered, so a patch
    at the very point a lens reads shows in that entry. Forward passes on other tokens (a nested
    session's) are ignored. On an exception inside the block the hooks are removed and no result
    is computed.
    """

    def __init__(self, plan: _Plan, lenses: list[Readout]):
        self._plan = plan
        self._lenses = lenses
        self._session: Optional[HookSession] = None
        self._collector: Optional[ResidualCollector] = None
        self.results: dict[str, LensResult] = {}

    @property
    def tokens(self) -> torch.Tensor:
        """The token ids to run the model on (BOS handled as requested)."""
        return self._plan.tokens.ids

    def __enter__(self) -> "LensSession":
        if self._session is not None:
            raise RuntimeError(
                "this lens session is already open: a session object can be entered once at a "
                "time. Make a second one with lens_session(...) to nest readouts."
            )
        session = HookSession(self._plan.access)
        try:
            self._collector = ResidualCollector(
                session, {label: self._plan.names[label] for label in self._plan.collect},
                expect=self._plan.tokens.ids,
            )
        except BaseException:
            session.remove()
            raise
        self._session = session
        self.results = {}
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        session, collector = self._session, self._collector
        if session is None or collector is None:
            raise RuntimeError("this lens session was not entered: use it as `with lens_session(...) as s:`.")
        self._session = self._collector = None
        session.remove()
        if exc_type is None:
            # Only passes on session.tokens count: a nested session's pass on other tokens is
            # ignored here, so each session reads its own input.
            self.results = _read(self._plan, collector.stack(self._plan.collect), self._lenses)


def lens_session(
    model: Any,
    input: Input,
    *,
    lenses: Sequence[Any] = ("logit", "embedding"),
    top_k: int = 5,
    targets: Targets = None,
    prepend_bos: Optional[bool] = None,
    layers: LayerSel = None,
    incl_mid: bool = False,
    pos: Positions = None,
    temperature: float = 1.0,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> LensSession:
    """Attach lenses to ``model`` as hooks for a forward pass the caller runs.

    Example:
        >>> with lens_session(model, "The Eiffel Tower is in", lenses=("logit", "embedding")) as s:  # doctest: +SKIP
        ...     model.run_with_hooks(s.tokens, fwd_hooks=[("blocks.3.hook_attn_out", ablate)])
        >>> s.results["logit"].summary()  # doctest: +SKIP

    Arguments as in :func:`read_lenses`.
    """
    plan = _plan(
        model, input, operation="lens_session", top_k=top_k, targets=targets, prepend_bos=prepend_bos,
        layers=layers, incl_mid=incl_mid, pos=pos, chunk_rows=chunk_rows,
    )
    return LensSession(plan, build_lenses(plan.access, lenses, temperature, plan.all_labels))
