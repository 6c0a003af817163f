"""The alignment suite's streaming fitter: :class:`AlignmentAccumulator`, fed one batch at a time.

Its float64 statistics do not grow with the tokens (``E`` entries; index ``E`` is ``W_E[token]``):
one :class:`~tl_latentspaces.stats.Moments` store of the ``E + 1`` means, covariances and the
cross-moments with the embeddings, the next and the final entry (``~4E d_model^2`` doubles, 330 MB
for the default model; 1.4 GB with ``layer_cka_biased=True``); the summed unbiased HSIC of blocks of
sequences; the own-token cosine's moments and histograms of the cosine and the embedding-lens rank.
"""

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

import tl_latentspaces.alignment.analysis as analysis
from tl_latentspaces.alignment.options import INT_DTYPES, Settings, check_seq_len
from tl_latentspaces.alignment.results import AlignmentResult
from tl_latentspaces.checks import type_name
from tl_latentspaces.lenses import EmbeddingLens
from tl_latentspaces.model import ModelAccess
from tl_latentspaces.readout import ReadoutBuffers, token_ranks, vocab_major
from tl_latentspaces.stats import Moments, orthonormal_basis, unbiased_hsic_matrix

__all__ = ["AlignmentAccumulator", "DEFAULT_QUANTILES", "COS_BINS"]

_F64 = torch.float64

#: Quantile levels reported for the per-token drift.
DEFAULT_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
COS_BINS = 2000  # histogram of cosines in [-1, 1]: quantiles resolved to 0.001
_RANK_CHUNK_ROWS = 512  # rows per block of the tiled rank count (the readout's default chunk)
# Sums over disjoint data: merge adds them.
_SUMMED = ("hsic_sum", "n_blocks", "cos_hist", "rank_hist", "n_rank", "_n_sequences")


def _check_scale(scale: Any, shape: Tuple[int, int]) -> Tensor:
    if not isinstance(scale, Tensor) or not scale.dtype.is_floating_point:
        raise TypeError(
            f"standardize_scale must be a float tensor of shape {shape} (one row per entry, the last "
            f"for the embeddings), got {type_name(scale)}."
        )
    if tuple(scale.shape) != shape:
        raise ValueError(f"standardize_scale must have shape {shape} ([entry + 1, d_model]), got {tuple(scale.shape)}.")
    scale = scale.detach().to("cpu", _F64)
    if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
        raise ValueError(
            "standardize_scale must be finite and positive everywhere (it divides each dimension); "
            f"got min {float(scale.min()):.3g}. Fix: replace zero spreads by 1."
        )
    return scale


def _described(x: Any) -> str:
    return f"dtype {x.dtype} and shape {tuple(x.shape)}" if isinstance(x, Tensor) else type_name(x)


def _check_batch(acc: "AlignmentAccumulator", ids: Any, stack: Any) -> None:
    if not isinstance(ids, Tensor) or ids.dtype not in INT_DTYPES or ids.ndim != 2:
        raise TypeError(f"ids must be an integer tensor [batch, seq], got {_described(ids)}.")
    if not isinstance(stack, Tensor) or not stack.dtype.is_floating_point or stack.ndim != 4:
        got = _described(stack)
        raise TypeError(f"stack must be a float tensor [entry, batch, seq, d_model], got {got}.")
    expected = (acc.n_entries, ids.shape[0], ids.shape[1], acc.d_model)
    if tuple(stack.shape) != expected:
        raise ValueError(
            f"stack has shape {tuple(stack.shape)}, expected {expected} ([entry, batch, seq, d_model] for "
            f"ids of shape {tuple(ids.shape)} and the {acc.n_entries} entries {acc.labels[0]}.."
            f"{acc.labels[-1]}). Fix: pass the residual stack of these ids at every stack_sites() entry."
        )
    check_seq_len(ids.shape[1], acc.settings.skip_positions)
    if ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= acc.d_vocab:
            raise ValueError(f"token ids must lie in [0, {acc.d_vocab}), got values in [{lo}, {hi}].")
    bad = ~torch.isfinite(stack)
    if bool(bad.any()):
        e, b, p, _ = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"the residual stream holds NaN or inf at {acc.labels[e]} (sequence {b}, position {p}); {int(bad.sum())} "
            "value(s) in all. Check the model's weights and any hook that edits the stream before this entry."
        )


def _weight_basis(M: Tensor, k: int, name: str) -> Float[Tensor, "d k"]:
    """Top-``k`` left singular vectors of a ``[d, n]`` weight via ``M^T = Q R``: 4 s instead of the SVD's 26 s
    at ``576 x 49,152`` on two cores."""
    M = M.detach().to("cpu", _F64)
    if M.shape[1] > M.shape[0]:
        M = torch.linalg.qr(M.mT, mode="r").R.mT
    try:
        return orthonormal_basis(M, k)
    except ValueError as err:
        raise ValueError(f"cannot take the top-{k} singular subspace of {name}: {err}") from err


def _own_token_cosines(rows: Float[Tensor, "rep batch seq d"]) -> Float[Tensor, "entry n"]:
    """Cosine of each entry's residual (rows ``0..E-1``) with its own token's embedding (row ``E``)."""
    E = rows.shape[0] - 1
    emb = rows[E]
    emb_norm = emb.norm(dim=-1)
    cos = torch.empty(E, emb_norm.numel(), dtype=_F64)
    for e in range(E):  # per entry: a [batch, seq, d] temporary, not [entry, batch, seq, d]
        dot = (rows[e] * emb).sum(-1)
        norms = rows[e].norm(dim=-1) * emb_norm
        # an untrained all-zero embedding row has no direction: cosine 0, as the lens reports
        cos[e] = torch.where(norms > 0, dot / norms.clamp_min(1e-300), torch.zeros_like(dot)).reshape(-1).cpu()
    return cos


def _own_token_rank_hist(
    lens: EmbeddingLens, x: Tensor, tok: Tensor, every: int, V: int
) -> Int[Tensor, "entry d_vocab"]:
    """Histogram of each entry's own-token rank under the embedding lens."""
    E, d = x.shape[0], x.shape[-1]
    xr = x[:, :, ::every]
    own = tok[:, ::every].reshape(-1, 1)
    n = own.shape[0]
    wt = vocab_major(lens.weight).T
    bufs = ReadoutBuffers(min(_RANK_CHUNK_ROWS, n), ranked=True, device=x.device)
    hist = torch.zeros(E, V, dtype=torch.long)
    for e in range(E):
        slab = xr[e].reshape(n, d)
        ranks = torch.empty(n, dtype=torch.long, device=x.device)
        for start in range(0, n, _RANK_CHUNK_ROWS):
            stop = min(start + _RANK_CHUNK_ROWS, n)
            y = lens.project(slab[start:stop].to(torch.float32), e)
            ranks[start:stop] = token_ranks(lens, y, wt, own[start:stop], bufs)[:, 0]
        hist[e] = torch.bincount(ranks.cpu(), minlength=V)
    return hist


class AlignmentAccumulator:
    """Streaming statistics of the alignment suite, fed one batch of residuals at a time.

    ``update(ids, stack)`` takes what :func:`~tl_latentspaces.runner.stream_residuals` yields;
    ``result()`` computes every analysis. Accumulators over disjoint parts of a corpus ``merge``
    into the accumulator of the whole; ``state_dict`` gives plain tensors and ints.

    Args:
        model: A ``HookedTransformer`` / ``TransformerBridge`` (or a :class:`ModelAccess`).
        k, skip_positions, center, cka_block_sequences, layer_cka_biased: As in
            :func:`~tl_latentspaces.alignment.alignment_suite`.
        standardize_scale: ``[entry + 1, d_model]`` positive per-dimension scales (the last row for
            ``W_E[token]``), or None.
        rank_every: Compute the embedding-lens rank (the bulk of the time on a large vocabulary) at
            every ``rank_every``-th kept position; cosines are computed at every position.

    Example:
        >>> acc = AlignmentAccumulator(model, k=8)  # doctest: +SKIP
        >>> for ids, stack in stream_residuals(model, seqs, dict(ModelAccess(model).stack_sites())):  # doctest: +SKIP
        ...     acc.update(ids, stack)
        >>> acc.result().to_dataframe()  # doctest: +SKIP
    """

    def __init__(
        self, model: Any, *, k: Optional[int] = None, skip_positions: int = 2, center: bool = True,
        standardize_scale: Optional[Tensor] = None, cka_block_sequences: int = 4, layer_cka_biased: bool = False,
        rank_every: int = 4,
    ):
        access = ModelAccess.of(model)
        self.access = access
        self.settings = Settings.check(
            access, k=k, skip_positions=skip_positions, center=center, cka_block_sequences=cka_block_sequences,
            layer_cka_biased=layer_cka_biased, rank_every=rank_every,
        )
        sites = access.stack_sites()
        self.labels = [label for label, _ in sites]
        self.hook_names = dict(sites)
        E, d = len(self.labels), access.d_model
        self.n_entries, self.d_model, self.d_vocab = E, d, access.d_vocab
        self.scale = None if standardize_scale is None else _check_scale(standardize_scale, (E + 1, d))

        # Weight subspaces first: a k the weights cannot support fails before any forward pass.
        k = self.settings.k
        self.basis_embed = _weight_basis(access.W_E.mT, k, "W_E")
        if access.W_U.shape == access.W_E.mT.shape and torch.equal(access.W_U, access.W_E.mT):
            self.basis_unembed = self.basis_embed  # tied embeddings: the same matrix
        else:
            self.basis_unembed = _weight_basis(access.W_U, k, "W_U")
        self.lens = EmbeddingLens(access)
        self._W_E = access.W_E.detach()
        self._zero()

    def _zero(self) -> None:
        E = self.n_entries
        pairs = {(i, i) for i in range(E + 1)} | {(i, E) for i in range(E)}
        pairs |= {(i, i + 1) for i in range(E - 1)} | {(i, E - 1) for i in range(E - 1)}
        if self.settings.layer_cka_biased:
            pairs |= {(i, j) for i in range(E) for j in range(i, E)}
        self.moments = Moments(E + 1, sorted(pairs))
        self.cos = Moments(1, variances=True)  # rows: one own-token cosine per entry
        self.hsic_sum = torch.zeros(E + 1, E + 1, dtype=_F64)  # unbiased HSIC summed over finished blocks
        self.n_blocks = 0
        self._pending: List[Tensor] = []  # rows of the block of sequences being filled
        self._pending_sequences = 0
        self.cos_hist = torch.zeros(E, COS_BINS, dtype=torch.long)
        self.rank_hist = torch.zeros(E, self.d_vocab, dtype=torch.long)
        self.n_rank = 0
        self._n_sequences = 0

    def empty(self) -> "AlignmentAccumulator":
        """A new accumulator with nothing added, sharing the weight subspaces and the lens: the runner's factory."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new._zero()
        return new

    @property
    def n_tokens(self) -> int:
        """Positions seen so far (after ``skip_positions``)."""
        return self.moments.n

    @property
    def n_sequences(self) -> int:
        """Sequences seen so far."""
        return self._n_sequences

    def update(self, ids: Int[Tensor, "batch seq"], stack: Float[Tensor, "entry batch seq d_model"]) -> None:
        """Add one batch: ``ids`` ``[batch, seq]`` and their residuals ``[entry, batch, seq, d_model]``.

        Raises:
            TypeError: non-tensor input or wrong dtypes.
            ValueError: mismatched shapes, sequences too short for the debiased estimator, token
                ids outside the vocabulary, or NaN/inf in the residuals (naming the entry).
        """
        _check_batch(self, ids, stack)
        E, skip = self.n_entries, self.settings.skip_positions
        if ids.shape[0] == 0:
            return
        with torch.no_grad():
            tok = ids[:, skip:].to(self._W_E.device).long()
            x = stack[:, :, skip:]
            rows = torch.empty((E + 1, *x.shape[1:]), dtype=_F64, device=x.device)
            rows[:E].copy_(x)
            rows[E].copy_(self._W_E[tok])
            self.rank_hist += _own_token_rank_hist(self.lens, x, tok, self.settings.rank_every, self.d_vocab)
            self.n_rank += x[:, :, :: self.settings.rank_every].shape[1:3].numel()
            cos = _own_token_cosines(rows)
            self.cos.update([cos.mT])
            idx = ((cos.clamp(-1.0, 1.0) + 1.0) * (COS_BINS / 2)).long().clamp_(0, COS_BINS - 1)
            idx += torch.arange(E).unsqueeze(1) * COS_BINS
            self.cos_hist += torch.bincount(idx.reshape(-1), minlength=E * COS_BINS).view(E, COS_BINS)
            self.moments.update(rows.view(E + 1, -1, self.d_model))
            self._update_blocks(rows)
        self._n_sequences += ids.shape[0]

    def _update_blocks(self, rows: Tensor) -> None:
        """Group whole sequences into fixed blocks for the debiased CKA, whatever the batch size."""
        block, B = self.settings.cka_block_sequences, rows.shape[1]
        start = 0
        while start < B:
            take = min(block - self._pending_sequences, B - start)
            part = rows[:, start : start + take].reshape(self.n_entries + 1, -1, self.d_model)
            # a copy, so the pending block does not keep the whole batch alive
            self._pending.append(part.clone() if self.scale is None else part / self.scale[:, None].to(part.device))
            self._pending_sequences += take
            start += take
            if self._pending_sequences == block:
                self.close_block()

    def blocks_so_far(self) -> Tuple[Tensor, int]:
        """The HSIC sum and block count with the unfinished block counted as a block of its own."""
        if not self._pending:
            return self.hsic_sum.clone(), self.n_blocks
        h = unbiased_hsic_matrix(list(torch.cat(self._pending, 1)), method="gram").cpu()
        return self.hsic_sum + h, self.n_blocks + 1

    def close_block(self) -> None:
        """Close the unfinished block (``merge`` does, so that blocks never span two processes)."""
        self.hsic_sum, self.n_blocks = self.blocks_so_far()
        self._pending, self._pending_sequences = [], 0

    def merge(self, other: "AlignmentAccumulator") -> "AlignmentAccumulator":
        """Fold in another accumulator's statistics; returns ``self``.

        Each side's unfinished debiased-CKA block is closed as a block of its own, so streams that
        end on a block boundary merge into exactly the statistics of the concatenated stream.
        """
        if not isinstance(other, AlignmentAccumulator):
            raise TypeError(f"can only merge an AlignmentAccumulator, got {type_name(other)}.")
        mine = (self.labels, self.d_model, self.d_vocab, self.settings)
        theirs = (other.labels, other.d_model, other.d_vocab, other.settings)
        if mine != theirs:
            raise ValueError(f"cannot merge accumulators with different settings: {mine} vs {theirs}.")
        scales = (self.scale, other.scale)
        if (scales[0] is None) != (scales[1] is None) or (scales[0] is not None and not torch.equal(*scales)):
            raise ValueError("cannot merge accumulators with different standardize_scale.")
        self.close_block()
        self._pending = list(other._pending)
        self.close_block()
        self.moments.merge(other.moments)
        self.cos.merge(other.cos)
        for name in _SUMMED:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self

    def state_dict(self) -> Dict[str, Any]:
        """Every statistic as plain tensors, ints and (nested) dicts, for ``torch.save`` or a reduction."""
        return {
            "moments": self.moments.state_dict(),
            "cos": self.cos.state_dict(),
            "hsic_sum": self.hsic_sum.clone(),
            "n_blocks": self.n_blocks,
            "pending": None if not self._pending else torch.cat(self._pending, 1).clone(),
            "pending_sequences": self._pending_sequences,
            "cos_hist": self.cos_hist.clone(),
            "rank_hist": self.rank_hist.clone(),
            "n_rank": self.n_rank,
            "n_sequences": self._n_sequences,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` of an accumulator built with the same model and options."""
        if not isinstance(state, dict):
            raise TypeError(f"load_state_dict expects the dict from state_dict(), got {type_name(state)}.")
        missing = [key for key in self.state_dict() if key not in state]
        if missing:
            raise ValueError(f"state is missing keys {missing}. Fix: pass AlignmentAccumulator.state_dict().")
        E, V = self.n_entries, self.d_vocab
        shapes = {"hsic_sum": (E + 1, E + 1), "cos_hist": (E, COS_BINS), "rank_hist": (E, V)}
        for key, shape in shapes.items():
            if not isinstance(state[key], Tensor) or tuple(state[key].shape) != shape:
                got = tuple(state[key].shape) if isinstance(state[key], Tensor) else type_name(state[key])
                raise ValueError(
                    f"state[{key!r}] is {got}, expected shape {shape}: the state is for a different stack or "
                    f"vocabulary (this accumulator has {E} entries, d_vocab={V})."
                )
        try:
            self.moments.load_state_dict(state["moments"])
            self.cos.load_state_dict(state["cos"])
        except ValueError as err:
            raise ValueError(f"state does not match this accumulator's stack and layer_cka_biased: {err}") from err
        self._pending = [] if state["pending"] is None else [state["pending"].clone()]
        self._pending_sequences = int(state["pending_sequences"])
        self.hsic_sum = state["hsic_sum"].to(_F64).clone()
        self.cos_hist = state["cos_hist"].clone()
        self.rank_hist = state["rank_hist"].clone()
        self.n_blocks = int(state["n_blocks"])
        self.n_rank = int(state["n_rank"])
        self._n_sequences = int(state["n_sequences"])

    def result(
        self, *, n_null_samples: int = 200, seed: int = 0, quantiles: Sequence[float] = DEFAULT_QUANTILES,
        progress: bool = False,
    ) -> AlignmentResult:
        """Compute every analysis from the statistics so far (the accumulator stays usable).

        ``n_null_samples`` Haar-random subspaces (>= 2, seeded by ``seed``) make the null baselines;
        ``quantiles`` are the drift's levels in ``[0, 1]``.

        Raises:
            ValueError: if fewer tokens were seen than ``k`` principal directions need, an entry's
                covariance has numerical rank below ``k``, or a representation has zero variance.
        """
        return analysis.alignment_result(self, n_null_samples=n_null_samples, seed=seed, quantiles=quantiles,
                                         progress=progress)
