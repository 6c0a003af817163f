"""Streaming readout: reduce lens scores over the vocabulary without storing them.

A lens maps a residual vector ``x`` to vocabulary scores ``z = project(x) @ weight + bias``. The
readout walks the residual stack in blocks of rows and the vocabulary in tiles of
:data:`TILE_COLS` columns. Each ``[rows, tile]`` score tile is computed once, folded into running
reductions (top-k, an online softmax for entropy and log-normalizer, counts of tokens scoring
above each ranked token) while it is still in cache, and discarded. At most one tile of scores
exists at a time; ``[layers, batch, pos, d_vocab]`` is never materialized, nor even one row
block's ``[rows, d_vocab]``.

KL from the final distribution needs no stored final probabilities. For a lens whose scores are
linear in ``y = project(x)``::

    KL(p_final || softmax(z)) = sum p_f log p_f - p_f . z + logsumexp(z)
    p_f . z = y . (weight @ p_f) + bias . p_f

so one ``d_in`` vector ``u = weight @ p_f`` per position (computed once, in the pass over the
final entry) replaces a ``d_vocab`` dot product per entry. Everything is computed in float32,
whatever the model's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Protocol, Sequence

import torch
from jaxtyping import Float, Int

__all__ = ["Lens", "FinalDistribution", "ReadoutTensors", "final_distribution", "stream_readout"]


class Lens(Protocol):
    """What the readout needs from a lens: ``scores = project(x, entry) @ weight + bias``.

    Attributes:
        name: Short name (``"logit"``, ``"embedding"``, ``"tuned"``).
        weight: ``[d_in, d_vocab]`` float32.
        bias: ``[d_vocab]`` float32 or None.
        score_scale: Divides scores into the values reported as ``top_scores`` (1 for logits).
    """

    name: str
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    score_scale: float

    def project(self, x: Float[torch.Tensor, "n d_model"], entry: int) -> Float[torch.Tensor, "n d_in"]:
        ...


@dataclass(frozen=True)
class FinalDistribution:
    """What the readout keeps of the model's final distribution, per position.

    Attributes:
        neg_entropy: ``[n]`` sum of ``p_f log p_f``.
        top1: ``[n]`` the final top-1 token id.
        u: one ``[n, d_in]`` tensor per lens: ``p_f @ weight.T``.
        c: one ``[n]`` tensor per lens: ``p_f @ bias`` (zeros without a bias).
        reference: The lens that defined the distribution, and ``entry`` its stack index.
        readout: The reference lens's own readout of that entry (``E = 1``), made in the same
            pass, so :func:`stream_readout` need not read the entry a second time; None when not
            asked for.
        targets: The targets that readout was made with.
    """

    neg_entropy: torch.Tensor
    top1: torch.Tensor
    u: list[torch.Tensor]
    c: list[torch.Tensor]
    reference: Optional["Lens"] = None
    entry: int = -1
    readout: Optional["ReadoutTensors"] = None
    targets: Optional[torch.Tensor] = None

    def readout_for(self, lens: "Lens", entry: int, top_k: int, targets: Optional[torch.Tensor]) -> Optional["ReadoutTensors"]:
        """The stored readout when it is exactly the one asked for, else None."""
        if self.readout is None or lens is not self.reference or entry != self.entry:
            return None
        if self.readout.top_ids.shape[-1] != top_k or targets is not self.targets:
            return None
        return self.readout


@dataclass
class ReadoutTensors:
    """Per-(entry, row) readout of one lens. Shapes use ``E`` entries and ``N`` rows."""

    top_ids: Int[torch.Tensor, "E N k"]
    top_probs: Float[torch.Tensor, "E N k"]
    top_scores: Float[torch.Tensor, "E N k"]
    entropy: Float[torch.Tensor, "E N"]
    kl_to_final: Float[torch.Tensor, "E N"]
    target_probs: Optional[torch.Tensor]
    target_ranks: Optional[torch.Tensor]
    own_scores: Optional[torch.Tensor]
    own_ranks: Optional[torch.Tensor]
    target_log_probs: Optional[torch.Tensor] = None  # [E, N, T]; finite where the probability underflows


TILE_COLS = 2048
"""Vocabulary columns per score tile: a ``[512, 2048]`` float32 tile (4 MiB) stays in cache
while every reduction reads it, where a whole ``[rows, d_vocab]`` row block would not."""


def vocab_major(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (``[d_in, d_vocab]``) as the transposed view of a contiguous ``[d_vocab, d_in]`` tensor.

    The readout multiplies by column tiles of the weight; with one row per token each tile is a
    contiguous block, and the matmul against its transpose ran fastest in our benchmark. No copy
    is made when the weight already has that layout (a tied ``W_E.T``, a ``lm_head.weight.T``).
    """
    return weight if weight.T.is_contiguous() else weight.T.contiguous().T


def _tiles(d_vocab: int) -> list[tuple[int, int]]:
    return [(a, min(a + TILE_COLS, d_vocab)) for a in range(0, d_vocab, TILE_COLS)]


def _tile_scores(lens: Lens, y: torch.Tensor, wt: torch.Tensor, a: int, b: int, out: torch.Tensor) -> torch.Tensor:
    """Scores of vocabulary columns ``a:b``; ``wt`` is the lens weight in ``[d_vocab, d_in]`` layout."""
    if lens.bias is None:
        return torch.mm(y, wt[a:b].T, out=out)
    return torch.addmm(lens.bias[a:b], y, wt[a:b].T, out=out)


def _exact_scores(lens: Lens, y: torch.Tensor, wt: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Scores of the token ``ids`` (``[n, T]``) for each row, bit for bit as the tiles compute them.

    The distinct ids are gathered into one tile-like matrix: a matmul of at least 64 columns takes
    the same kernel as the tiles on the CPU, so exact duplicates of a token (tied embedding rows)
    compare equal to it and do not count in its rank. The token itself is excluded separately.
    """
    uniq, inverse = torch.unique(ids, return_inverse=True)
    cols = uniq if uniq.numel() >= 64 else torch.cat([uniq, uniq[:1].expand(64 - uniq.numel())])
    z = y @ wt[cols].T
    if lens.bias is not None:
        z += lens.bias[cols]
    return torch.gather(z, 1, inverse)


LOG2E = 1.4426950408889634  # exp(w) = exp2(w * log2(e)); exp2 is the faster kernel on the CPU


class _SoftmaxStats:
    """Online softmax statistics over vocabulary tiles, for a block of rows.

    Keeps the running maximum ``m``, ``s = sum exp(z - m)`` and ``t = sum exp(z - m) (z - m)``
    (``t`` in base-2 units); at the end ``logsumexp(z) = m + log s`` and the entropy is
    ``log s - t ln(2) / s``. Per-tile partial sums keep the float32 error at the level of a blocked
    summation.
    """

    def __init__(self, n: int, like: torch.Tensor):
        self.m = torch.full((n, 1), -math.inf, dtype=torch.float32, device=like.device)
        self.s = torch.zeros(n, 1, dtype=torch.float32, device=like.device)
        self.t = torch.zeros(n, 1, dtype=torch.float32, device=like.device)

    def update(self, z: torch.Tensor, tile_max: torch.Tensor, e_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fold in the tile ``z`` (overwritten); returns ``exp(z - m)`` and the rescale factor of the old sums."""
        m_new = torch.maximum(self.m, tile_max)
        shift = (self.m - m_new) * LOG2E  # <= 0; -inf before the first tile
        alpha = torch.exp2(shift)
        # rescale the old sums to the new maximum: t' = alpha (t + shift s); nothing to rescale at first
        self.t = torch.where(self.s > 0, alpha * (self.t + shift * self.s), self.t)
        self.s = alpha * self.s
        self.m = m_new
        w = z.sub_(m_new).mul_(LOG2E)
        e = torch.exp2(w, out=e_out)
        self.s += e.sum(-1, keepdim=True)
        self.t += torch.linalg.vecdot(e, w).unsqueeze(1)
        return e, alpha

    def logsumexp(self) -> torch.Tensor:
        return self.m + self.s.log()

    def entropy(self) -> torch.Tensor:
        return self.s.log() - self.t * math.log(2.0) / self.s


GROUP_ROWS = 16
"""Top-k candidates of a tile come from its top-k column groups: the tile, viewed
``[rows, 16, width/16]``, is reduced to group maxima by a vectorized max, and only the ``16 k``
members of the ``k`` best groups are kept for the final ``topk`` (a scalar scan), not all
``width`` scores."""


def _tile_candidates(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores and column indices that include each row's top-``k`` of the tile ``z``, and the row maxima.

    The ``k`` largest scores lie in the ``k`` groups with the largest maxima: a score outside
    those groups is exceeded by each of their ``k`` maxima.
    """
    n, width = z.shape
    C = width // GROUP_ROWS
    if width % GROUP_ROWS or k >= C:
        top = torch.topk(z, min(k, width), dim=-1, sorted=False)
        return top.values, top.indices, top.values.amax(-1, keepdim=True)
    group_max = z.view(n, GROUP_ROWS, C).amax(1)  # group c holds columns c, c + C, c + 2C, ...
    best = torch.topk(group_max, k, dim=-1, sorted=False)
    cols = (best.indices.unsqueeze(-1) + _group_offsets(width, C, z.device)).view(n, k * GROUP_ROWS)
    return torch.gather(z, 1, cols), cols, best.values.amax(-1, keepdim=True)


_OFFSETS: dict[tuple[int, int, str], torch.Tensor] = {}


def _group_offsets(width: int, C: int, device: torch.device) -> torch.Tensor:
    key = (width, C, str(device))
    if key not in _OFFSETS:
        _OFFSETS[key] = torch.arange(0, width, C, device=device)
    return _OFFSETS[key]


@dataclass
class _Block:
    """One row block read through a lens over every vocabulary tile."""

    top_values: torch.Tensor  # [n, k], sorted
    top_ids: torch.Tensor  # [n, k]
    lse: torch.Tensor  # [n, 1]
    entropy: torch.Tensor  # [n, 1]
    ranked_scores: Optional[torch.Tensor]  # [n, R] scores of the ranked ids
    ranks: Optional[torch.Tensor]  # [n, R] int32: tokens scoring strictly higher
    u: list[torch.Tensor]  # per accumulated weight: [n, d_in] p @ weight.T
    c: list[torch.Tensor]  # per accumulated weight: [n, 1] p @ bias


class _Buffers:
    """Tile-sized scratch space, allocated once per call and reused by every block."""

    def __init__(self, rows: int, ranked: bool, device: torch.device):
        self.z = torch.empty(rows * TILE_COLS, dtype=torch.float32, device=device)
        self.e = torch.empty(rows * TILE_COLS, dtype=torch.float32, device=device)
        self.b = torch.empty(rows * TILE_COLS, dtype=torch.bool, device=device) if ranked else None


def _count_above(
    z: torch.Tensor, a: int, ranked_ids: torch.Tensor, ranked_scores: torch.Tensor, counts: torch.Tensor,
    gt: torch.Tensor,
) -> None:
    """Add to ``counts`` (``[n, R]``) the columns of tile ``z`` (vocabulary ``a:a + width``) that
    score strictly higher than each ranked id; ``gt`` is a boolean scratch tile."""
    width = z.shape[1]
    for j in range(ranked_ids.shape[1]):
        counts[:, j] += torch.gt(z, ranked_scores[:, j : j + 1], out=gt).sum(-1, dtype=torch.int32)
    # a token never outranks itself, even where this tile's kernel rounded it higher
    local = ranked_ids - a
    inside = (local >= 0) & (local < width)
    own_z = torch.gather(z, 1, local.clamp(0, width - 1))
    counts -= ((own_z > ranked_scores) & inside).to(torch.int32)


def token_ranks(lens: Lens, y: torch.Tensor, wt: torch.Tensor, ids: torch.Tensor, bufs: "_Buffers") -> torch.Tensor:
    """Ranks of the token ``ids`` (``[n, R]``) under ``lens`` for the projected rows ``y``.

    The rank is the number of vocabulary tokens scoring strictly higher (0 = top), counted tile by
    tile exactly as :func:`stream_readout` ranks targets and own tokens, without the softmax.
    ``wt`` is the lens weight in ``[d_vocab, d_in]`` layout; ``bufs`` holds at least ``n`` rows.
    Returns ``[n, R]`` int32.
    """
    n = y.shape[0]
    scores = _exact_scores(lens, y, wt, ids)
    counts = torch.zeros(n, ids.shape[1], dtype=torch.int32, device=y.device)
    for a, b in _tiles(wt.shape[0]):
        width = b - a
        z = _tile_scores(lens, y, wt, a, b, bufs.z[: n * width].view(n, width))
        _count_above(z, a, ids, scores, counts, bufs.b[: n * width].view(n, width))
    return counts


def _read_block(
    lens: Lens,
    y: torch.Tensor,
    wt: torch.Tensor,
    top_k: int,
    ranked_ids: Optional[torch.Tensor],
    bufs: _Buffers,
    accumulate: Sequence[tuple[torch.Tensor, Optional[torch.Tensor]]] = (),
) -> _Block:
    """Read the projected rows ``y`` through ``lens``, one vocabulary tile at a time.

    ``accumulate`` lists ``(wt_i, bias_i)`` pairs (vocabulary-major weights): for each, the
    block also returns ``p @ wt_i`` and ``p @ bias_i`` under this lens's distribution ``p``.
    """
    n = y.shape[0]
    dev = y.device
    V = wt.shape[0]
    if ranked_ids is not None:
        ranked_scores = _exact_scores(lens, y, wt, ranked_ids)
        counts = torch.zeros(n, ranked_ids.shape[1], dtype=torch.int32, device=dev)
    stats = _SoftmaxStats(n, y)
    u_acc = [torch.zeros(n, w.shape[1], dtype=torch.float32, device=dev) for w, _ in accumulate]
    c_acc = [torch.zeros(n, 1, dtype=torch.float32, device=dev) for _ in accumulate]
    cand_v, cand_i = [], []
    for a, b in _tiles(V):
        width = b - a
        z = _tile_scores(lens, y, wt, a, b, bufs.z[: n * width].view(n, width))
        if ranked_ids is not None:
            _count_above(z, a, ranked_ids, ranked_scores, counts, bufs.b[: n * width].view(n, width))
        tile_v, tile_i, tile_max = _tile_candidates(z, top_k)
        cand_v.append(tile_v)
        cand_i.append(tile_i + a)
        e, alpha = stats.update(z, tile_max, bufs.e[: n * width].view(n, width))
        for (w_i, b_i), u_i, c_i in zip(accumulate, u_acc, c_acc):
            u_i.mul_(alpha).addmm_(e, w_i[a:b])
            if b_i is not None:
                c_i.mul_(alpha).addmm_(e, b_i[a:b, None])
    top_v, pick = torch.topk(torch.cat(cand_v, 1), top_k, dim=-1, sorted=True)
    return _Block(
        top_values=top_v,
        top_ids=torch.gather(torch.cat(cand_i, 1), 1, pick),
        lse=stats.logsumexp(),
        entropy=stats.entropy(),
        ranked_scores=ranked_scores if ranked_ids is not None else None,
        ranks=counts if ranked_ids is not None else None,
        u=[u_i / stats.s for u_i in u_acc],
        c=[c_i / stats.s for c_i in c_acc],
    )


class _Output:
    """The per-(entry, row) output tensors of one lens, filled block by block."""

    def __init__(self, E: int, N: int, top_k: int, T: Optional[int], own: bool, device: torch.device):
        f32 = dict(dtype=torch.float32, device=device)
        self.top_ids = torch.empty(E, N, top_k, dtype=torch.long, device=device)
        self.top_probs = torch.empty(E, N, top_k, **f32)
        self.top_scores = torch.empty(E, N, top_k, **f32)
        self.entropy = torch.empty(E, N, **f32)
        self.kl = torch.empty(E, N, **f32)
        self.t_probs = torch.empty(E, N, T, **f32) if T is not None else None
        self.t_logp = torch.empty(E, N, T, **f32) if T is not None else None
        self.t_ranks = torch.empty(E, N, T, dtype=torch.long, device=device) if T is not None else None
        self.o_scores = torch.empty(E, N, **f32) if own else None
        self.o_ranks = torch.empty(E, N, dtype=torch.long, device=device) if own else None

    def fill(self, e: int, rows: slice, blk: _Block, kl: torch.Tensor, score_scale: float) -> None:
        self.top_ids[e, rows] = blk.top_ids
        self.top_probs[e, rows] = (blk.top_values - blk.lse).exp()
        self.top_scores[e, rows] = blk.top_values / score_scale
        self.entropy[e, rows] = blk.entropy.squeeze(1)
        self.kl[e, rows] = kl
        T = 0 if self.t_probs is None else self.t_probs.shape[-1]
        if self.t_probs is not None:
            self.t_ranks[e, rows] = blk.ranks[:, :T]
            self.t_logp[e, rows] = blk.ranked_scores[:, :T] - blk.lse
            self.t_probs[e, rows] = self.t_logp[e, rows].exp()
        if self.o_scores is not None:
            self.o_ranks[e, rows] = blk.ranks[:, T]
            self.o_scores[e, rows] = blk.ranked_scores[:, T] / score_scale

    def copy_entry(self, e: int, src: ReadoutTensors) -> None:
        """Take entry 0 of an already-made readout as entry ``e``."""
        self.top_ids[e], self.top_probs[e], self.top_scores[e] = src.top_ids[0], src.top_probs[0], src.top_scores[0]
        self.entropy[e], self.kl[e] = src.entropy[0], src.kl_to_final[0]
        if self.t_probs is not None:
            self.t_probs[e], self.t_ranks[e] = src.target_probs[0], src.target_ranks[0]
            self.t_logp[e] = src.target_log_probs[0]

    def tensors(self) -> ReadoutTensors:
        return ReadoutTensors(
            top_ids=self.top_ids,
            top_probs=self.top_probs,
            top_scores=self.top_scores,
            entropy=self.entropy,
            kl_to_final=self.kl,
            target_probs=self.t_probs,
            target_ranks=self.t_ranks,
            own_scores=self.o_scores,
            own_ranks=self.o_ranks,
            target_log_probs=self.t_logp,
        )


def _kl(neg_entropy: torch.Tensor, y: torch.Tensor, u: torch.Tensor, c: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """``KL(p_f || softmax(z)) = sum p_f log p_f - (y . u + c) + logsumexp(z)``, clamped at 0."""
    pz = torch.linalg.vecdot(y, u) + c
    return (neg_entropy - pz + lse.squeeze(1)).clamp_min_(0.0)


def final_distribution(
    final_resid: Float[torch.Tensor, "N d_model"],
    reference: Lens,
    lenses: Sequence[Lens],
    *,
    entry: int,
    chunk_rows: int = 512,
    top_k: Optional[int] = None,
    targets: Optional[Int[torch.Tensor, "N T"]] = None,
) -> FinalDistribution:
    """Summarize the final distribution ``softmax(reference(final_resid))`` for ``lenses``.

    ``reference`` is the logit lens read at the final stack entry (index ``entry``): the model's
    own prediction. The vocabulary is walked in tiles; ``u = p_f @ weight.T`` accumulates from
    ``exp(z - m)`` tile by tile and is rescaled whenever the running maximum moves.

    With ``top_k`` given, the reference lens's full readout of this entry (with ``targets``) is
    kept too, and :func:`stream_readout` reuses it instead of reading the entry again.
    """
    n = final_resid.shape[0]
    dev = final_resid.device
    ref_wt = vocab_major(reference.weight).T
    keep = top_k is not None
    acc_lenses = list(lenses)
    ref_index = next((i for i, lens in enumerate(lenses) if lens is reference), None)
    if keep and ref_index is None:  # the reference's own u is needed for its KL column
        ref_index = len(acc_lenses)
        acc_lenses.append(reference)
    accumulate = [(vocab_major(lens.weight).T, lens.bias) for lens in acc_lenses]
    neg_h = torch.empty(n, dtype=torch.float32, device=dev)
    top1 = torch.empty(n, dtype=torch.long, device=dev)
    us = [torch.empty(n, lens.weight.shape[0], dtype=torch.float32, device=dev) for lens in lenses]
    cs = [torch.zeros(n, dtype=torch.float32, device=dev) for _ in lenses]
    out = _Output(1, n, top_k, None if targets is None else targets.shape[1], False, dev) if keep else None
    bufs = _Buffers(min(chunk_rows, n), keep and targets is not None, dev)
    for start in range(0, n, chunk_rows):
        stop = min(start + chunk_rows, n)
        y = reference.project(final_resid[start:stop].to(torch.float32), entry)
        ranked = targets[start:stop] if keep and targets is not None else None
        blk = _read_block(reference, y, ref_wt, top_k or 1, ranked, bufs, accumulate)
        neg_h[start:stop] = -blk.entropy.squeeze(1)
        top1[start:stop] = blk.top_ids[:, 0]
        for i, lens in enumerate(lenses):
            us[i][start:stop] = blk.u[i]
            if lens.bias is not None:
                cs[i][start:stop] = blk.c[i].squeeze(1)
        if keep:
            kl = _kl(neg_h[start:stop], y, blk.u[ref_index], blk.c[ref_index].squeeze(1), blk.lse)
            out.fill(0, slice(start, stop), blk, kl, reference.score_scale)
    return FinalDistribution(
        neg_entropy=neg_h,
        top1=top1,
        u=us,
        c=cs,
        reference=reference if keep else None,
        entry=entry,
        readout=out.tensors() if keep else None,
        targets=targets if keep else None,
    )


def stream_readout(
    stack: Float[torch.Tensor, "E N d_model"],
    lens: Lens,
    entries: Sequence[int],
    final: FinalDistribution,
    lens_index: int,
    *,
    top_k: int,
    targets: Optional[Int[torch.Tensor, "N T"]] = None,
    own_ids: Optional[Int[torch.Tensor, " N"]] = None,
    chunk_rows: int = 512,
) -> ReadoutTensors:
    """Read every entry of ``stack`` through ``lens`` in blocks of ``chunk_rows`` rows.

    Args:
        stack: Residual vectors, one ``[N, d_model]`` slab per entry (any float dtype).
        lens: The lens to read through.
        entries: The stack index of each slab, passed to ``lens.project`` (a tuned lens picks
            its translator by it).
        final: The final distribution from :func:`final_distribution`.
        lens_index: Which of ``final.u`` / ``final.c`` belongs to ``lens``.
        top_k: Number of top tokens to keep.
        targets: Per-row target ids ``[N, T]``: their probabilities and ranks are reported.
        own_ids: Per-row ids whose score and rank are reported (each position's input token).
        chunk_rows: Rows per block.

    Returns:
        The per-(entry, row) tensors, on the stack's device.
    """
    E, N, _ = stack.shape
    dev = stack.device
    wt = vocab_major(lens.weight).T
    out = _Output(E, N, top_k, None if targets is None else targets.shape[1], own_ids is not None, dev)
    # Ranked ids: the targets, then each row's own token. rank = how many tokens score strictly higher.
    ranked = [t for t in (targets, None if own_ids is None else own_ids[:, None]) if t is not None]
    ranked_ids = torch.cat(ranked, 1) if ranked else None
    bufs = _Buffers(min(chunk_rows, N), ranked_ids is not None, dev)
    u, c = final.u[lens_index], final.c[lens_index]
    for e_pos, entry in enumerate(entries):
        done = final.readout_for(lens, entry, top_k, targets) if own_ids is None else None
        if done is not None:
            out.copy_entry(e_pos, done)
            continue
        for start in range(0, N, chunk_rows):
            stop = min(start + chunk_rows, N)
            y = lens.project(stack[e_pos, start:stop].to(torch.float32), entry)
            ids = None if ranked_ids is None else ranked_ids[start:stop]
            blk = _read_block(lens, y, wt, top_k, ids, bufs)
            kl = _kl(final.neg_entropy[start:stop], y, u[start:stop], c[start:stop], blk.lse)
            out.fill(e_pos, slice(start, stop), blk, kl, lens.score_scale)
    return out.tensors()
