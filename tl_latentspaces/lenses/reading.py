"""Reading a model through lenses: ``read_lenses``, ``logit_lens``, ``embedding_lens``, ``lens_session``.

Every call plans first (bad input fails before any forward pass), builds a readout per lens, collects the
residual stack from hooks or a cache, and reads it with :func:`~tl_latentspaces.readout.read_stack`.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch

from tl_latentspaces.checks import check_bool, check_cache, check_int, warn_user
from tl_latentspaces.hooks import HookSession, ResidualCollector
from tl_latentspaces.jacobian_lens import JacobianLens, is_transformer_lens_jacobian_lens
from tl_latentspaces.lenses.embedding import CenteredEmbeddingLens, EmbeddingLens
from tl_latentspaces.lenses.protocol import Lens, LogitLens, TranslatedLens
from tl_latentspaces.model import ModelAccess, Tokens
from tl_latentspaces.readout import DEFAULT_CHUNK_ROWS, Readout, read_stack
from tl_latentspaces.results import LensInputs, LensResult
from tl_latentspaces.translators import TunedLens

__all__ = ["build_lenses", "embedding_lens", "lens_session", "LensSession", "logit_lens", "read_lenses"]

Input = Union[str, Sequence[str], torch.Tensor]
Targets = Union[str, int, Sequence[Union[str, int]], torch.Tensor, None]
Positions = Union[int, slice, Sequence[int], None]
LayerSel = Union[Sequence[Union[int, str]], None]


def _index(x: Any) -> Optional[int]:
    """``x`` as an int if it is an integer scalar (a Python, numpy or 0-d tensor integer; not a bool), else None."""
    if isinstance(x, bool) or (isinstance(x, torch.Tensor) and x.ndim != 0):
        return None
    try:
        return operator.index(x)
    except TypeError:
        return None


def _select_entries(all_labels: list[str], layers: LayerSel) -> list[int]:
    if layers is None:
        return list(range(len(all_labels)))
    if isinstance(layers, str) or _index(layers) is not None:
        layers = [layers]
    if not isinstance(layers, (list, tuple, range)):
        raise ValueError(
            f"layers must be an int, a label, or a list of them, got {type(layers).__name__} {layers!r:.80}."
        )
    if len(layers) == 0:
        raise ValueError(f"layers is empty: nothing to read. Pass None for every entry, or some of {all_labels}.")
    out = []
    for item in layers:
        if isinstance(item, str):
            if item not in all_labels:
                raise ValueError(f"unknown stack entry {item!r}; valid labels are {all_labels}.")
            out.append(all_labels.index(item))
        elif (i := _index(item)) is not None:
            idx = i + len(all_labels) if i < 0 else i
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
    if _index(pos) is not None:
        items = [pos]
    elif isinstance(pos, (list, tuple, range)) or (isinstance(pos, torch.Tensor) and pos.ndim == 1):
        items = list(pos)
    else:
        raise ValueError(f"pos must be an int, a slice or a list of ints, got {type(pos).__name__} ({pos!r:.80}).")
    out = []
    for item in items:
        if (p := _index(item)) is None:
            raise ValueError(f"positions must be ints, got {item!r}.")
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
        if t.shape[2] == 0:
            raise ValueError(f"the target tensor has no targets (shape {tuple(targets.shape)}); pass None for none.")
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= access.d_vocab:
            raise ValueError(f"target ids must lie in [0, {access.d_vocab}), got values in [{lo}, {hi}].")
        return t
    if isinstance(targets, str) or _index(targets) is not None:
        items = [targets if isinstance(targets, str) else _index(targets)]
    elif isinstance(targets, (list, tuple)):
        items = [t if isinstance(t, str) or (i := _index(t)) is None else i for t in targets]
    else:
        raise ValueError(f"targets must be a token string, a token id, a list of them or a [batch, pos(, T)] id "
                         f"tensor, got {type(targets).__name__} ({targets!r:.80}).")
    if not items:
        raise ValueError("targets is empty; pass a token, a list of tokens, or None.")
    ids = torch.tensor([access.to_single_token(t) for t in items], dtype=torch.long)
    return ids.view(1, 1, -1).expand(B, P, -1).contiguous()


def _stack_from_cache(cache: Any, sites: dict[str, str], tokens: Tokens, d_model: int) -> torch.Tensor:
    check_cache(cache)
    slabs = []
    for label, name in sites.items():
        try:
            act = cache[name]
        except (KeyError, ValueError) as err:
            raise ValueError(
                f"the cache has no activation {name!r} (needed for {label}). Cache the residual "
                f"stream, e.g. model.run_with_cache(tokens, names_filter=lambda n: 'resid' in n)."
            ) from err
        if not isinstance(act, torch.Tensor):
            raise TypeError(f"cached {name} must be a tensor, got {type(act).__name__}.")
        if act.ndim == 3 and tuple(act.shape[:2]) == tuple(tokens.ids.shape) and act.shape[2] != d_model:
            raise ValueError(f"cached {name} has {act.shape[2]} features, but this model's d_model is {d_model}: "
                             "the cache comes from another model. Pass a cache of this model's run.")
        if act.ndim != 3 or tuple(act.shape[:2]) != tuple(tokens.ids.shape):
            raise ValueError(
                f"cached {name} has shape {tuple(act.shape)}, but the input tokenizes to "
                f"{tuple(tokens.ids.shape)}; pass the input the cache was made from (mind prepend_bos)."
            )
        if not torch.isfinite(act).all():
            raise ValueError(f"the residual stream holds NaN or inf at {label} ({name}) in the cache.")
        slabs.append(act.detach())
    return torch.stack(slabs, 0)


@dataclass
class _Plan:
    """Everything checked before a forward pass is paid for."""

    access: ModelAccess
    tokens: Tokens
    all_labels: list[str]
    sites: dict[str, str]  # hook name by stack label, for the entries read and the final one, in stack order
    entries: list[int]
    top_k: int
    targets: Optional[torch.Tensor]  # [batch, positions, T] ids, resolved once
    positions: list[int]
    chunk_rows: int

    def collector(self, session: HookSession) -> ResidualCollector:
        return ResidualCollector(session, self.sites, expect=self.tokens.ids)


def _plan(model: Any, input: Input, *, operation: str, top_k: int, targets: Targets, prepend_bos: Optional[bool],
          layers: LayerSel, incl_mid: bool, pos: Positions, chunk_rows: int) -> _Plan:
    access = ModelAccess.of(model)
    access.require_eval(operation)
    chunk_rows = check_int(chunk_rows, "chunk_rows", minimum=1)
    if input is None:
        raise ValueError(f"{operation} needs an input: a string, a list of strings or a token tensor.")
    check_bool(incl_mid, "incl_mid")
    top_k = check_int(top_k, "top_k", minimum=1, maximum=access.d_vocab, why=" (the vocabulary size)")
    tokens = access.to_tokens(input, prepend_bos=prepend_bos)
    sites = access.stack_sites(incl_mid=incl_mid)
    all_labels = [label for label, _ in sites]
    entries = _select_entries(all_labels, layers)
    positions = _select_positions(pos, tokens.ids.shape[1])
    if pos is not None and (padded := (~tokens.mask[:, positions]).any(1).nonzero().flatten().tolist()):
        warn_user(f"pos={pos!r} selects padding in batch rows {padded}: those prompts are shorter, and texts are "
                  "right-padded, so a position counted from the end is not their last token. The cells have mask "
                  "False (summary() leaves them out). Fix: read prompts of different lengths one by one, or "
                  "select positions from the start.")
    collect = set(all_labels[i] for i in entries) | {all_labels[-1]}
    collected = {label: name for label, name in sites if label in collect}
    resolved = _resolve_targets(access, targets, (tokens.ids.shape[0], len(positions)))
    return _Plan(access, tokens, all_labels, collected, entries, top_k, resolved, positions, chunk_rows)


def _read(plan: _Plan, stack: torch.Tensor, lenses: Sequence[Readout]) -> dict[str, LensResult]:
    """Read a collected ``[entry, batch, seq, d]`` stack (``plan.sites`` order) through lenses at once."""
    access, tokens, positions, targets = plan.access, plan.tokens, list(plan.positions), plan.targets
    E, B, P = len(plan.entries), tokens.ids.shape[0], len(positions)
    by_label = {label: i for i, label in enumerate(plan.sites)}
    read_rows = [by_label[plan.all_labels[i]] for i in plan.entries]
    dev = access.device

    def per_read(t: Optional[torch.Tensor], *extra: int) -> Optional[torch.Tensor]:
        return None if t is None else t.reshape(E, B, P, *extra).cpu()

    with torch.no_grad():
        stack = stack[:, :, positions].to(dev)
        flat = stack.reshape(stack.shape[0], B * P, stack.shape[-1])
        reference = next((lens for lens in lenses if isinstance(lens, LogitLens)), None) or LogitLens(access)
        out = read_stack(
            flat[read_rows], plan.entries, lenses, final=flat[by_label[plan.all_labels[-1]]],
            final_entry=len(plan.all_labels) - 1, reference=reference, top_k=plan.top_k,
            targets=None if targets is None else targets.reshape(B * P, -1).to(dev),
            own_ids=tokens.ids[:, positions].reshape(-1).to(dev),
            own=[isinstance(lens, EmbeddingLens) for lens in lenses], chunk_rows=plan.chunk_rows,
        )
        final_top1 = out.final_top1.reshape(B, P).cpu()
        resid = per_read(flat[read_rows], -1)  # kept for LensDiff.divergence
        return {
            lens.name: LensResult(
                lens=lens.name,
                labels=[plan.all_labels[i] for i in plan.entries],
                tokens=tokens.ids.cpu(),
                positions=positions,
                mask=tokens.mask[:, positions].cpu(),
                top_ids=per_read(r.top_ids, -1),
                top_probs=per_read(r.top_probs, -1),
                top_scores=per_read(r.top_scores, -1),
                entropy=per_read(r.entropy),
                kl_to_final=per_read(r.kl_to_final),
                final_top1=final_top1,
                target_ids=None if targets is None else targets.cpu(),
                target_probs=per_read(r.target_probs, -1),
                target_ranks=per_read(r.target_ranks, -1),
                own_scores=per_read(r.own_scores),
                own_ranks=per_read(r.own_ranks),
                model_name=access.name,
                decode=access.decoder(),
                inputs=LensInputs(resid=resid, lens=lens, entries=list(plan.entries)),
            )
            for lens, r in zip(lenses, out.lenses)
        }


def build_lenses(access: ModelAccess, lenses: Sequence[Any], temperature: float,
                 labels: Optional[Sequence[str]] = None) -> list[Readout]:
    """The readouts of ``lenses`` (``"logit"``, ``"embedding"``, any :class:`Lens`, a CenteredEmbeddingLens or a
    TransformerLens ``JacobianLens``) on ``access``'s model.

    ``labels`` are the stack labels by entry number (default ``"0_pre"`` ... ``"final_post"``); every lens is
    tried on each. Raises ValueError on an unknown, empty or repeated lens, or a label a lens refuses.
    """
    if isinstance(lenses, (str, torch.nn.Module)) or isinstance(lenses, Lens) or not hasattr(lenses, "__iter__"):
        lenses = [lenses]
    lenses = list(lenses)
    if len(lenses) == 0:
        raise ValueError("lenses is empty: nothing to read. Pass some of 'logit', 'embedding' or a TunedLens, "
                         "e.g. lenses=('logit',).")
    if labels is None:
        labels = [f"{layer}_pre" for layer in range(access.n_layers)] + ["final_post"]
    built: list[Readout] = []
    for lens in lenses:
        if is_transformer_lens_jacobian_lens(lens):
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
        stack = _stack_from_cache(cache, plan.sites, plan.tokens, plan.access.d_model)
        if check_bool(verify_cache, "verify_cache"):
            plan.access.check_cache_tokens(cache, plan.tokens.ids)
        return stack
    with HookSession(plan.access) as session:
        collector = plan.collector(session)
        with torch.no_grad():
            plan.access.forward(plan.tokens.ids)
    return collector.stack(list(plan.sites))


def read_lenses(model: Any, input: Input, *, lenses: Sequence[Any] = ("logit", "embedding"), top_k: int = 5,
                targets: Targets = None, prepend_bos: Optional[bool] = None, cache: Any = None,
                verify_cache: bool = True, layers: LayerSel = None, incl_mid: bool = False, pos: Positions = None,
                temperature: float = 1.0, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> dict[str, LensResult]:
    """Read several lenses from one forward pass (or one cache): ``{lens name: LensResult}``.

    Args:
        input: A string, a list of strings (right-padded) or a ``[batch, pos]`` token tensor.
        lenses: Any of ``"logit"``, ``"embedding"`` and :class:`~tl_latentspaces.Lens` objects.
        targets: Tokens whose probability and rank to report: a token string (one token), an id, a list of them
            (shared by every position), or a ``[batch, pos(, T)]`` id tensor.
        prepend_bos: ``None`` means True for text; a token tensor is used as given.
        cache: An ``ActivationCache`` of ``input``'s residual stream, read instead of a forward pass; its
            embeddings are compared with the input's unless ``verify_cache=False``.
        layers: Stack entries to read (indices, negative allowed, or labels like ``"5_pre"``).
        incl_mid: Also read every layer's ``resid_mid``.
        pos: Positions to read (an int, a slice, a list), default all.
        temperature: The embedding lens's softmax temperature.
        chunk_rows: Rows per matmul of the streaming readout.

    The forward pass is the model's own, so hooks the user registered fire; the capture hooks are removed
    afterwards, even on error.
    """
    plan = _plan(model, input, operation="read_lenses", top_k=top_k, targets=targets, prepend_bos=prepend_bos,
                 layers=layers, incl_mid=incl_mid, pos=pos, chunk_rows=chunk_rows)
    built = build_lenses(plan.access, lenses, temperature, plan.all_labels)
    return _read(plan, _collect(plan, cache, verify_cache), built)


def logit_lens(model: Any, input: Input, *, top_k: int = 5, targets: Targets = None,
               prepend_bos: Optional[bool] = None, cache: Any = None, verify_cache: bool = True,
               layers: LayerSel = None, incl_mid: bool = False, pos: Positions = None,
               chunk_rows: int = DEFAULT_CHUNK_ROWS) -> LensResult:
    """Read every residual-stack entry through the final norm and unembedding (arguments as in :func:`read_lenses`).

    The ``final_post`` entry reproduces the model's own log-probabilities.

    Example:
        >>> r = logit_lens(model, "The Eiffel Tower is in the city of", targets=" Paris")  # doctest: +SKIP
        >>> r.summary()  # doctest: +SKIP
    """
    return read_lenses(
        model, input, lenses=("logit",), top_k=top_k, targets=targets, prepend_bos=prepend_bos,
        cache=cache, verify_cache=verify_cache, layers=layers, incl_mid=incl_mid, pos=pos,
        chunk_rows=chunk_rows,
    )["logit"]


def embedding_lens(model: Any, input: Input, *, top_k: int = 5, targets: Targets = None,
                   prepend_bos: Optional[bool] = None, cache: Any = None, verify_cache: bool = True,
                   layers: LayerSel = None, incl_mid: bool = False, pos: Positions = None, temperature: float = 1.0,
                   chunk_rows: int = DEFAULT_CHUNK_ROWS) -> LensResult:
    """Compare every residual-stack entry with the input embedding ``W_E`` (arguments as in :func:`read_lenses`).

    ``top_scores`` are cosines; ``own_scores``/``own_ranks`` give each position's cosine to and rank of its own
    input token. The lens's distribution is ``softmax(cos * sqrt(d_model) / temperature)``.
    """
    return read_lenses(
        model, input, lenses=("embedding",), top_k=top_k, targets=targets, prepend_bos=prepend_bos,
        cache=cache, verify_cache=verify_cache, layers=layers, incl_mid=incl_mid, pos=pos,
        temperature=temperature, chunk_rows=chunk_rows,
    )["embedding"]


class LensSession:
    """Lenses attached to a live model as hooks, read from a forward pass the user runs (see :func:`lens_session`).

    Inside the ``with`` block run the model on ``session.tokens`` in any way; on leaving it the hooks are removed
    and ``results`` holds ``{lens name: LensResult}`` for the last pass on ``session.tokens`` (passes on other
    tokens are ignored). Each entry is read after every hook on its hook point. On an exception no result is
    computed.
    """

    def __init__(self, plan: _Plan, lenses: list[Readout]):
        self._plan = plan
        self._lenses = lenses
        self._open: Optional[tuple[HookSession, ResidualCollector]] = None
        self.results: dict[str, LensResult] = {}

    @property
    def tokens(self) -> torch.Tensor:
        """The token ids to run the model on."""
        return self._plan.tokens.ids

    def __enter__(self) -> "LensSession":
        if self._open is not None:
            raise RuntimeError("this lens session is already open: a session object can be entered once at a "
                               "time. Make a second one with lens_session(...) to nest readouts.")
        session = HookSession(self._plan.access)
        try:
            self._open = (session, self._plan.collector(session))
        except BaseException:
            session.remove()
            raise
        self.results = {}
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._open is None:
            raise RuntimeError("this lens session was not entered: use it as `with lens_session(...) as s:`.")
        (session, collector), self._open = self._open, None
        session.remove()
        if exc_type is None:
            self.results = _read(self._plan, collector.stack(list(self._plan.sites)), self._lenses)


def lens_session(model: Any, input: Input, *, lenses: Sequence[Any] = ("logit", "embedding"), top_k: int = 5,
                 targets: Targets = None, prepend_bos: Optional[bool] = None, layers: LayerSel = None,
                 incl_mid: bool = False, pos: Positions = None, temperature: float = 1.0,
                 chunk_rows: int = DEFAULT_CHUNK_ROWS) -> LensSession:
    """Attach lenses to ``model`` as hooks for a forward pass the caller runs (arguments as in :func:`read_lenses`).

    Example:
        >>> with lens_session(model, "The Eiffel Tower is in", lenses=("logit", "embedding")) as s:  # doctest: +SKIP
        ...     model.run_with_hooks(s.tokens, fwd_hooks=[("blocks.3.hook_attn_out", ablate)])
        >>> s.results["logit"].summary()  # doctest: +SKIP
    """
    plan = _plan(model, input, operation="lens_session", top_k=top_k, targets=targets, prepend_bos=prepend_bos,
                 layers=layers, incl_mid=incl_mid, pos=pos, chunk_rows=chunk_rows)
    return LensSession(plan, build_lenses(plan.access, lenses, temperature, plan.all_labels))

