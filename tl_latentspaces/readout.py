"""Streaming readout: reduce lens scores ``z = project(x) @ weight + bias`` over the vocabulary without storing them.

:func:`read_stack` sweeps the vocabulary in tiles of :data:`TILE_COLS` columns, one matmul per tile for the
lenses sharing a weight, and folds each ``[rows, tile]`` score tile into running reductions (top-k, an online
softmax, rank counts, the KL's cross term) while in cache: no ``[..., d_vocab]`` tensor is materialized.

KL to final without cancellation: with ``w = (z - m) log2(e)`` (``m`` the row's running maximum),
``s = sum 2^w`` and ``X_q = sum_v 2^{w_f,v} w_q,v`` (``f`` the final row of the same position)::

    KL(p_f || q) = ln(2) (X_f - X_q) / s_f + ln s_q - ln s_f

Each term sums same-signed float32 products per tile, in float64 across tiles, so a row equal to the final
row gets exactly 0; float32 reads also correct the matmul's rounding to first order (:func:`_kl_rounding`).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol, Sequence

import torch
from jaxtyping import Float, Int

__all__ = [
    "Readout", "ReadoutBuffers", "ReadoutTensors", "StackReadout", "read_stack", "tensor_key", "token_ranks",
    "vocab_major",
]


class Readout(Protocol):
    """What the readout needs from a lens: ``scores = project(x, entry) @ weight + bias``.

    ``weight`` is ``[d_in, d_vocab]`` float32 (lenses with the same weight tensor share a matmul),
    ``bias`` ``[d_vocab]`` or None; ``top_scores`` reports scores divided by ``score_scale``.
    """

    name: str
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    score_scale: float

    def project(self, x: Float[torch.Tensor, "n d_model"], entry: int) -> Float[torch.Tensor, "n d_in"]:
        ...


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


@dataclass(frozen=True)
class StackReadout:
    """What :func:`read_stack` returns: one :class:`ReadoutTensors` per lens, in the order given, and
    ``[N]`` the final distribution's top-1 token per row."""

    lenses: list[ReadoutTensors]
    final_top1: Int[torch.Tensor, " N"]


#: Vocabulary columns per score tile.
TILE_COLS = 2048
#: Rows per block of a read (each block sweeps all of ``W_U`` once): 2048 rows took 0.95x the time of 512 on
#: 512 held-out tokens (``benchmarks/results/readout.md``), for 16 MiB per float32 score tile.
DEFAULT_CHUNK_ROWS = 2048
#: Matmuls get at least this many rows (zero rows pad a smaller block): below that the CPU BLAS switches
#: kernels and a row's scores would depend on how many rows were read with it.
MIN_ROWS = 16

LOG2E = 1.4426950408889634  # exp(w) = exp2(w * log2(e)); exp2 is the faster kernel on the CPU
LN2 = math.log(2.0)


def vocab_major(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (``[d_in, d_vocab]``) as the transposed view of a contiguous ``[d_vocab, d_in]`` tensor, so
    each column tile is a contiguous block (no copy when it already is: a tied ``W_E.T``)."""
    return weight if weight.T.is_contiguous() else weight.T.contiguous().T


def tensor_key(t: torch.Tensor) -> tuple:
    """A cheap key that changes when ``t`` is replaced or changed, for caches derived from weights: storage,
    layout and version counter, and a float64 sum of a strided sample (catches writes through ``.data``)."""
    in_memory_order = t.detach().permute(sorted(range(t.ndim), key=lambda dim: -t.stride(dim)))
    sample = in_memory_order[tuple(slice(None, None, 7 + 6 * i) for i in range(t.ndim))].contiguous()
    return (
        t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, str(t.device), t._version,
        float(sample.sum(dtype=torch.float64)),
    )


_LOW_PRECISION: dict[tuple, torch.Tensor] = {}


def _low_precision(wt: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # converted once per weight; the two most recent are kept
    if wt.dtype == dtype:
        return wt
    key = (tensor_key(wt), dtype)
    if key not in _LOW_PRECISION:
        while len(_LOW_PRECISION) >= 2:
            _LOW_PRECISION.pop(next(iter(_LOW_PRECISION)))
        _LOW_PRECISION[key] = wt.to(dtype).contiguous()
    return _LOW_PRECISION[key]


def _fp32_math_setting() -> Optional[object]:
    """torch's float32 matmul precision setting for oneDNN (torch >= 2.4), or None where it has none."""
    setting = getattr(torch.backends.mkldnn, "matmul", None)
    return setting if getattr(setting, "fp32_precision", None) is not None else None


@contextlib.contextmanager
def _bf16_products(on: bool):
    """Float32 CPU matmuls inside take bfloat16 products with float32 accumulation and output where ``on``
    (``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``, restored on exit; the setting is process-wide
    while it lasts). Where oneDNN has no bfloat16 path (AVX2-only CPUs) the products stay float32."""
    setting = _fp32_math_setting() if on else None
    if setting is None:
        yield
        return
    before = setting.fp32_precision
    setting.fp32_precision = "bf16"
    try:
        yield
    finally:
        setting.fp32_precision = before


def _tiles(d_vocab: int) -> list[tuple[int, int]]:
    return [(a, min(a + TILE_COLS, d_vocab)) for a in range(0, d_vocab, TILE_COLS)]


def _tile_scores(bias: Optional[torch.Tensor], y: torch.Tensor, wt: torch.Tensor, a: int, b: int,
                 out: torch.Tensor) -> torch.Tensor:
    """Float32 scores of vocabulary columns ``a:b`` into ``out``; ``wt`` is ``[d_vocab, d_in]``."""
    if y.dtype != torch.float32:
        out.copy_(torch.mm(y, wt[a:b].T))
        return out if bias is None else out.add_(bias[a:b])
    if bias is None:
        return torch.mm(y, wt[a:b].T, out=out)
    return torch.addmm(bias[a:b], y, wt[a:b].T, out=out)


def _exact_scores(bias: Optional[torch.Tensor], y: torch.Tensor, wt: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Scores of the token ``ids`` (``[n, T]``) for each row, bit for bit as the tiles compute them (a matmul
    of at least 64 columns takes the tiles' kernel on the CPU, so a token's exact duplicates tie with it)."""
    uniq, inverse = torch.unique(ids, return_inverse=True)
    cols = uniq if uniq.numel() >= 64 else torch.cat([uniq, uniq[:1].expand(64 - uniq.numel())])
    z = (y @ wt[cols].T).to(torch.float32)
    if bias is not None:
        z += bias[cols]
    return torch.gather(z, 1, inverse)


def _sum64(e: torch.Tensor) -> torch.Tensor:
    """Float64 sums over the last dimension: pieces of 128 columns in float32 (relative error about 4e-8),
    their sums in float64."""
    width = e.shape[-1]
    if width % 128:
        return e.sum(-1, dtype=torch.float64)
    return e.view(*e.shape[:-1], width // 128, 128).sum(-1).sum(-1, dtype=torch.float64)


def _fold(z: torch.Tensor, m: torch.Tensor, e_f: torch.Tensor, L: int) -> tuple[torch.Tensor, ...]:
    """One tile's sums, float64: ``s = sum 2^w`` and ``t = sum 2^w w`` (``[R]``) with ``w = (z - m) log2(e)``,
    and the KL's cross term ``sum 2^{w_f} w`` (``[R // L, L]``) against ``e_f`` (``[R // L, width]``, the
    final rows' ``2^w``). Pure, so that ``torch.compile`` fuses it into one pass."""
    w = (z - m) * LOG2E
    e = torch.exp2(w)
    # pairwise sums of same-signed products: a sequential matrix-vector product lost 6.6e-4 nats at KLs near 200
    return _sum64(e), _sum64(e * w), _sum64(w.view(e_f.shape[0], L, -1) * e_f.unsqueeze(1))


def _fold_in_place(z: torch.Tensor, m: torch.Tensor, e_f: torch.Tensor, L: int,
                   scratch: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """:func:`_fold` bit for bit, eagerly, overwriting ``z`` and ``scratch`` (like ``z``) instead of allocating."""
    w = z.sub_(m).mul_(LOG2E)
    e = torch.exp2(w, out=scratch)
    s = _sum64(e)
    t = _sum64(e.mul_(w))
    by_position = (e_f.shape[0], L, -1)
    return s, t, _sum64(torch.mul(w.view(by_position), e_f.unsqueeze(1), out=scratch.view(by_position)))


def _gathered_products(y: torch.Tensor, wt: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Float64 products ``y[r] . wt[ids[r, c]]`` (``[rows, c]``), for ``torch.compile`` to fuse the gather."""
    return (y.double().unsqueeze(1) * wt[ids].double()).sum(-1)


#: Reads of at least this many rows run :func:`_fold` and :func:`_gathered_products` through ``torch.compile`` on
#: the CPU (seconds the first time in a process, then about 0.4x the eager time per tile);
#: ``TL_LATENTSPACES_COMPILE=0`` turns it off.
FUSE_MIN_ROWS = 8192
_COMPILED: dict[str, object] = {}


def _compiled(fn: Callable[..., object], *args: object) -> object:
    """``fn(*args)`` through ``torch.compile``, or eagerly from the first time compiling fails."""
    compiled = _COMPILED.get(fn.__name__)
    if compiled is None:
        compiled = _COMPILED[fn.__name__] = torch.compile(fn, dynamic=False)
    if compiled is False:
        return fn(*args)
    try:
        return compiled(*args)
    except Exception as exc:  # no C++ compiler, or a compiler failure: the eager function is the same arithmetic
        warnings.warn(f"torch.compile of the readout's {fn.__name__} failed ({type(exc).__name__}: {exc}); "
                      "reading on eagerly.", RuntimeWarning, stacklevel=2)
        _COMPILED[fn.__name__] = False
        return fn(*args)


class _SoftmaxStats:
    """Online softmax over vocabulary tiles: the running maximum ``m`` (float32), and float64 ``s = sum 2^w``
    and ``t = sum 2^w w``, ``w = (z - m) log2(e)``; ``shift`` (``<= 0``) and ``alpha = 2^shift`` let other
    running sums follow the maximum's last move."""

    def __init__(self, n: int, like: torch.Tensor):
        dev = like.device
        self.m = torch.full((n, 1), -math.inf, dtype=torch.float32, device=dev)
        self.s = torch.zeros(n, 1, dtype=torch.float64, device=dev)
        self.t = torch.zeros(n, 1, dtype=torch.float64, device=dev)
        self.shift = torch.zeros_like(self.s)
        self.alpha = torch.ones_like(self.s)
        self._first = True

    def advance(self, tile_max: torch.Tensor) -> torch.Tensor:
        """Take in a tile's row maxima; returns the new running maximum, for the tile's sums."""
        m_new = torch.maximum(self.m, tile_max)
        if not self._first:
            self.shift = (self.m.to(torch.float64) - m_new.to(torch.float64)) * LOG2E
            self.alpha = torch.exp2(self.shift)
        self._first = False
        self.m = m_new
        return m_new

    def absorb(self, s_tile: torch.Tensor, t_tile: torch.Tensor) -> None:
        """Add the tile's ``s`` and ``t`` (``[n]``, against the maximum :meth:`advance` returned)."""
        self.t = self.alpha * (self.t + self.shift * self.s) + t_tile.unsqueeze(1)
        self.s = self.alpha * self.s + s_tile.unsqueeze(1)

    def logsumexp(self) -> torch.Tensor:
        return self.m.to(torch.float64) + self.s.log()

    def entropy(self) -> torch.Tensor:
        return self.s.log() - self.t * LN2 / self.s


#: A tile's top-k candidates are the ``GROUP_ROWS * k`` members of its ``k`` column groups with the largest maxima.
GROUP_ROWS = 16


def _tile_candidates(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores and column indices that include each row's top-``k`` of the tile ``z``, and the row maxima."""
    n, width = z.shape
    C = width // GROUP_ROWS
    if width % GROUP_ROWS or k >= C:
        top = torch.topk(z, min(k, width), dim=-1, sorted=False)
        return top.values, top.indices, top.values.amax(-1, keepdim=True)
    group_max = z.view(n, GROUP_ROWS, C).amax(1)  # group c holds columns c, c + C, c + 2C, ...
    best = torch.topk(group_max, k, dim=-1, sorted=False)
    cols = (best.indices.unsqueeze(-1) + _group_offsets(width, C, z.device)).view(n, k * GROUP_ROWS)
    return torch.gather(z, 1, cols), cols, best.values.amax(-1, keepdim=True)


@functools.lru_cache(maxsize=None)
def _group_offsets(width: int, C: int, device: torch.device) -> torch.Tensor:
    return torch.arange(0, width, C, device=device)


class ReadoutBuffers:
    """Tile-sized scratch space, allocated once per call and reused by every block."""

    def __init__(self, rows: int, ranked: bool, device: torch.device):
        rows = max(rows, MIN_ROWS)
        self.z = torch.empty(rows * TILE_COLS, dtype=torch.float32, device=device)
        self.e = torch.empty(rows * TILE_COLS, dtype=torch.float32, device=device)
        self.b = torch.empty(rows * TILE_COLS, dtype=torch.float32, device=device) if ranked else None  # 0/1 masks


def _count_above(z: torch.Tensor, a: int, ranked_ids: torch.Tensor, ranked_scores: torch.Tensor, counts: torch.Tensor,
                 gt: torch.Tensor) -> None:
    """Add to ``counts`` (``[n, R]``) the columns of tile ``z`` (vocabulary ``a:a + width``) scoring above each id."""
    width = z.shape[1]
    for j in range(ranked_ids.shape[1]):
        # a float32 mask sums without the conversion copy a bool mask's integer sum makes (exact: <= 2^24 columns)
        counts[:, j] += torch.gt(z, ranked_scores[:, j : j + 1], out=gt).sum(-1).to(torch.int32)
    # a token never outranks itself, even where this tile's kernel rounded it higher
    local = ranked_ids - a
    inside = (local >= 0) & (local < width)
    own_z = torch.gather(z, 1, local.clamp(0, width - 1))
    counts -= ((own_z > ranked_scores) & inside).to(torch.int32)


def token_ranks(lens: Readout, y: torch.Tensor, wt: torch.Tensor, ids: torch.Tensor,
                bufs: ReadoutBuffers) -> torch.Tensor:
    """``[n, R]`` int32 ranks (tokens scoring strictly higher; 0 = top) of ``ids`` under ``lens`` for the
    projected rows ``y``, as :func:`read_stack` ranks them; ``wt`` is ``[d_vocab, d_in]``, ``bufs`` has ``n`` rows."""
    rows = y.shape[0]
    y, ids = _pad_rows(y), _pad_rows(ids)
    n = y.shape[0]
    scores = _exact_scores(lens.bias, y, wt, ids)
    counts = torch.zeros(n, ids.shape[1], dtype=torch.int32, device=y.device)
    for a, b in _tiles(wt.shape[0]):
        width = b - a
        z = _tile_scores(lens.bias, y, wt, a, b, bufs.z[: n * width].view(n, width))
        _count_above(z, a, ids, scores, counts, bufs.b[: n * width].view(n, width))
    return counts[:rows]


def _pad_rows(t: torch.Tensor) -> torch.Tensor:
    if t.shape[0] >= MIN_ROWS:
        return t
    return torch.cat([t, t.new_zeros(MIN_ROWS - t.shape[0], *t.shape[1:])])


@dataclass
class _Slot:
    """One kind of row in a block: lens ``lens`` reading stack slab ``e_pos`` (entry ``entry``); ``lens == -1``
    is the reference lens reading the final residual, where no read row is that."""

    lens: int
    e_pos: int
    entry: int


@dataclass
class _Group:
    """Lenses that share one weight and bias: their rows are one matmul per tile."""

    wt: torch.Tensor  # [d_vocab, d_in], vocabulary-major
    bias: Optional[torch.Tensor]
    wt_mm: torch.Tensor  # wt in the dtype of the products
    bf16_math: bool = False  # float32 operands, bfloat16 products (:func:`_bf16_products`)
    slots: list[_Slot] = field(default_factory=list)
    own: bool = False  # some lens of the group reports own-token scores and ranks


class _GroupBlock:
    """One group's running reductions over the vocabulary tiles, for one block of positions."""

    def __init__(self, group: _Group, y: torch.Tensor, ids: Optional[torch.Tensor], n: int, bufs: ReadoutBuffers):
        self.group = group
        self.n, self.L = n, len(group.slots)
        self.rows = n * self.L
        self.y = y  # [R, d_in] padded, in the products' dtype
        self.ids = ids  # [R, T (+1)] or None
        self.bufs = bufs
        R = y.shape[0]
        self.stats = _SoftmaxStats(self.rows, y)
        self.cand_v: list[torch.Tensor] = []
        self.cand_i: list[torch.Tensor] = []
        self.x = torch.zeros(n, self.L, dtype=torch.float64, device=y.device)  # the KL's cross term
        if ids is not None:
            with _bf16_products(group.bf16_math):
                self.exact = _exact_scores(group.bias, y, group.wt_mm, ids)
            self.counts = torch.zeros(R, ids.shape[1], dtype=torch.int32, device=y.device)

    def tile(self, a: int, b: int, top_k: int) -> None:
        """Scores of columns ``a:b``; fold them into ranks and candidates, and take in their row maxima."""
        R, width = self.y.shape[0], b - a
        with _bf16_products(self.group.bf16_math):
            z = _tile_scores(self.group.bias, self.y, self.group.wt_mm, a, b, self.bufs.z[: R * width].view(R, width))
        if self.ids is not None:
            _count_above(z, a, self.ids, self.exact, self.counts, self.bufs.b[: R * width].view(R, width))
        v, i, tile_max = _tile_candidates(z, top_k)
        self.cand_v.append(v)
        self.cand_i.append(i + a)
        self.z = z[: self.rows]
        self.m = self.stats.advance(tile_max[: self.rows])

    def final_rows(self, slot: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The final rows' (slot ``slot``) ``2^{w_f}`` for this tile, ``alpha``, and ``s`` before this tile."""
        n, L = self.n, self.L
        pick = lambda t: t.view(n, L, *t.shape[1:])[:, slot]  # noqa: E731
        return torch.exp2((pick(self.z) - pick(self.m)) * LOG2E), pick(self.stats.alpha), pick(self.stats.s)

    def fold(self, e_f: torch.Tensor, alpha_f: torch.Tensor, s_before_f: torch.Tensor, fused: bool) -> None:
        """Add this tile to the softmax sums and to ``X_q = sum 2^{w_f} w_q`` (see :meth:`final_rows`)."""
        if fused:
            s, t, tile_x = _compiled(_fold, self.z, self.m, e_f, self.L)
        else:
            s, t, tile_x = _fold_in_place(self.z, self.m, e_f, self.L, self.bufs.e[: self.z.numel()].view_as(self.z))
        self.stats.absorb(s, t)
        shift = self.stats.shift.view(self.n, self.L)
        # earlier tiles: w_q moves by the row's shift, 2^{w_f} scales by the final row's alpha
        self.x = alpha_f * (self.x + shift * s_before_f) + tile_x


def _empty_output(E: int, N: int, top_k: int, T: Optional[int], own: bool,
                  device: torch.device) -> ReadoutTensors:
    """One lens's per-(entry, row) output tensors, filled block by block; ``None`` where not asked for."""
    def new(*shape: int, dtype: torch.dtype = torch.float32, when: bool = True) -> Optional[torch.Tensor]:
        return torch.empty(E, N, *shape, dtype=dtype, device=device) if when else None

    targeted = T is not None
    return ReadoutTensors(
        top_ids=new(top_k, dtype=torch.long), top_probs=new(top_k), top_scores=new(top_k), entropy=new(),
        kl_to_final=new(), target_probs=new(T, when=targeted), target_ranks=new(T, dtype=torch.long, when=targeted),
        own_scores=new(when=own), own_ranks=new(dtype=torch.long, when=own), target_log_probs=new(T, when=targeted),
    )


def read_stack(
    stack: Float[torch.Tensor, "E N d_model"], entries: Sequence[int], lenses: Sequence[Readout], *,
    final: Float[torch.Tensor, "N d_model"], final_entry: int, reference: Readout, top_k: int,
    targets: Optional[Int[torch.Tensor, "N T"]] = None, own_ids: Optional[Int[torch.Tensor, " N"]] = None,
    own: Optional[Sequence[bool]] = None, chunk_rows: int = DEFAULT_CHUNK_ROWS,
    readout_dtype: torch.dtype = torch.float32,
) -> StackReadout:
    """Read every slab of ``stack`` through every lens in one sweep over the vocabulary.

    Args:
        stack: Residual vectors, one ``[N, d_model]`` slab per read entry (any float dtype).
        entries: The stack index of each slab, passed to ``lens.project`` (a tuned lens picks its
            translator by it).
        final: The final residual ``[N, d_model]``: the final distribution is ``softmax(reference(final))``.
            A slab at ``final_entry`` read by ``reference`` is that distribution's read (no second one).
        targets: Per-row target ids ``[N, T]`` whose probabilities and ranks are reported.
        own_ids: Per-row ids (each position's input token) whose score and rank are reported for the
            lenses flagged in ``own`` (one flag per lens).
        chunk_rows: Rows per matmul: a block holds ``chunk_rows // rows-per-position`` positions (at least one).
        readout_dtype: ``torch.float32`` or ``torch.bfloat16`` for the score matmuls (reductions stay float32/64);
            bfloat16 products accumulate in float32 (on the CPU: float32 operands in oneDNN's bfloat16 mode).

    Returns:
        A :class:`StackReadout`, on the stack's device.
    """
    if readout_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"readout_dtype must be torch.float32 or torch.bfloat16, got {readout_dtype!r}.")
    E, N, _ = stack.shape
    dev = stack.device
    # on the CPU a bfloat16 read multiplies float32 operands in oneDNN's bfloat16 mode: float32 accumulation
    # and output (a bfloat16 matmul would round its output to bfloat16)
    bf16_math = readout_dtype == torch.bfloat16 and dev.type == "cpu" and _fp32_math_setting() is not None
    mm_dtype = torch.float32 if bf16_math else readout_dtype
    own = list(own) if own is not None else [False] * len(lenses)
    if any(own) and own_ids is None:
        raise ValueError("own-token ranks were asked for without own_ids.")
    by_key: dict[tuple, _Group] = {}
    layouts: dict[int, torch.Tensor] = {}  # one vocabulary-major layout per weight, even where it copies

    def group_of(lens: Readout) -> _Group:
        if id(lens.weight) not in layouts:
            layouts[id(lens.weight)] = vocab_major(lens.weight).T
        wt, bias = layouts[id(lens.weight)], lens.bias
        b = None if bias is None else (bias.data_ptr(), tuple(bias.shape), bias.stride(), bias.dtype)
        key = (wt.data_ptr(), tuple(wt.shape), wt.stride(), wt.dtype, str(wt.device), b)
        if key not in by_key:
            by_key[key] = _Group(wt, bias, _low_precision(wt, mm_dtype), bf16_math=bf16_math)
        return by_key[key]

    ref_group = group_of(reference)  # first: its final rows feed every group's KL term
    for li, lens in enumerate(lenses):
        g = group_of(lens)
        g.own = g.own or own[li]
        g.slots += [_Slot(li, e_pos, entry) for e_pos, entry in enumerate(entries)]
    final_slot = next((j for j, s in enumerate(ref_group.slots)
                       if lenses[s.lens] is reference and s.entry == final_entry), None)
    if final_slot is None:
        ref_group.slots.append(_Slot(-1, -1, final_entry))
        final_slot = len(ref_group.slots) - 1
    groups = [g for g in by_key.values() if g.slots]

    T = None if targets is None else targets.shape[1]
    outs = [_empty_output(E, N, top_k, T, own[li], dev) for li in range(len(lenses))]
    final_top1 = torch.empty(N, dtype=torch.long, device=dev)
    per_block = max(1, chunk_rows // max(len(g.slots) for g in groups))
    fused = (dev.type == "cpu" and N * sum(len(g.slots) for g in groups) >= FUSE_MIN_ROWS
             and os.environ.get("TL_LATENTSPACES_COMPILE", "1") != "0")
    bufs = [ReadoutBuffers(min(per_block, N) * len(g.slots), targets is not None or g.own, dev) for g in groups]
    for start in range(0, N, per_block):
        stop = min(start + per_block, N)
        n = stop - start
        fused_block = fused and n == per_block  # one compiled shape per read: full blocks of full tiles
        blocks = []
        for g, buf in zip(groups, bufs):
            L = len(g.slots)
            y = torch.empty(n, L, g.wt.shape[1], dtype=torch.float32, device=dev)
            for j, slot in enumerate(g.slots):
                lens = reference if slot.lens < 0 else lenses[slot.lens]
                x = final[start:stop] if slot.lens < 0 else stack[slot.e_pos, start:stop]
                y[:, j] = lens.project(x.to(torch.float32), slot.entry)
            y = _pad_rows(y.view(n * L, -1)).to(mm_dtype)
            ranked = [] if targets is None else [targets[start:stop]]
            if g.own:
                ranked.append(own_ids[start:stop, None])
            ids = None
            if ranked:
                ids = _pad_rows(torch.cat(ranked, 1).unsqueeze(1).expand(n, L, -1).reshape(n * L, -1))
            blocks.append(_GroupBlock(g, y, ids, n, buf))
        ref = blocks[0]
        for a, b in _tiles(ref_group.wt.shape[0]):
            for blk in blocks:
                blk.tile(a, b, top_k)
            final_rows = ref.final_rows(final_slot)
            for blk in blocks:
                blk.fold(*final_rows, fused_block and b - a == TILE_COLS)
        for blk in blocks:
            blk.log_s = blk.stats.s.view(n, blk.L).log()
        # one log for the final rows and every other row: a row equal to the final one gets exactly 0
        x_f, log_s_f = ref.x[:, final_slot : final_slot + 1], ref.log_s[:, final_slot : final_slot + 1]
        s_f = ref.stats.s.view(n, ref.L)[:, final_slot : final_slot + 1]
        exact_kl = readout_dtype == torch.float32
        for blk in blocks:
            _finish(blk, lenses, outs, slice(start, stop), top_k, T, x_f, s_f, log_s_f,
                    (ref, final_slot, fused_block) if exact_kl else None)
        final_top1[start:stop] = ref.top_ids[: ref.rows].view(n, ref.L, -1)[:, final_slot, 0]
    return StackReadout(lenses=outs, final_top1=final_top1)


def _kl_rounding(blk: _GroupBlock, kl: torch.Tensor, lse: torch.Tensor, ref: _GroupBlock, slot: int,
                 fused: bool) -> torch.Tensor:
    """How much the float32 rounding of the scores moved each row's KL, to first order: ``[n, L]``.

    With ``dz = z32 - z64`` (tile scores minus float64 products of the same rows) and ``l = log p - log q``,
    ``KL(z32) - KL(z64) ~ sum_v (q_v - p_v) dz_q,v + p_v (l_v - KL) dz_f,v``, summed over each row's top-k
    and the final distribution's top-k, where both weights carry their mass.
    """
    n, L, rows = blk.n, blk.L, blk.rows
    f_rows = ref.y[: ref.rows].view(n, ref.L, -1)[:, slot]  # [n, d_ref], float32
    ids = torch.cat([blk.top_ids[:rows].view(n, L, -1),
                     ref.top_ids[: ref.rows].view(n, ref.L, -1)[:, slot : slot + 1].expand(n, L, -1)], -1)
    ids = ids.reshape(rows, -1)
    # each token once per row: later repeats of an id get zero weight
    srt, order = ids.sort(-1)
    repeat = torch.zeros_like(srt, dtype=torch.bool)
    repeat[:, 1:] = srt[:, 1:] == srt[:, :-1]
    once = (~repeat).gather(-1, order.argsort(-1)).view(n, L, -1)

    def scores(group: _Group, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z32 = _exact_scores(group.bias, _pad_rows(y), group.wt, _pad_rows(ids))[:rows].double()
        if fused:
            z64 = _compiled(_gathered_products, y, group.wt, ids)
        else:
            z64 = torch.einsum("rd,rcd->rc", y.double(), group.wt[ids].double())
        if group.bias is not None:
            z64 += group.bias[ids].double()
        return z32.view(n, L, -1), (z32 - z64).view(n, L, -1)

    zq, dq = scores(blk.group, blk.y[:rows])
    zf, df = scores(ref.group, f_rows.repeat_interleave(L, 0))
    lse_f = ref.stats.logsumexp().view(n, ref.L, 1)[:, slot : slot + 1]
    log_q, log_p = zq - lse, zf - lse_f
    p = log_p.exp()
    terms = (log_q.exp() - p) * dq + p * (log_p - log_q - kl.unsqueeze(-1)) * df
    return (terms * once).sum(-1)


def _finish(blk: _GroupBlock, lenses: Sequence[Readout], outs: list[ReadoutTensors], cols: slice, top_k: int,
            T: Optional[int], x_f: torch.Tensor, s_f: torch.Tensor, log_s_f: torch.Tensor,
            final: Optional[tuple[_GroupBlock, int, bool]] = None) -> None:
    """Write a finished block's top-k, probabilities, entropy and KL into each lens's output; ``final`` (the
    reference block, the final rows' slot, whether to compile) turns on :func:`_kl_rounding`."""
    n, L, rows = blk.n, blk.L, blk.rows
    top_v, pick = torch.topk(torch.cat(blk.cand_v, 1), top_k, dim=-1, sorted=True)
    blk.top_ids = torch.gather(torch.cat(blk.cand_i, 1), 1, pick)
    lse = blk.stats.logsumexp().view(n, L, 1)
    entropy = blk.stats.entropy().view(n, L)
    kl = LN2 * (x_f - blk.x) / s_f + blk.log_s - log_s_f
    if final is not None:
        kl = kl - _kl_rounding(blk, kl, lse, *final)
    kl = kl.clamp_min_(0.0)
    top_v, top_i = top_v[:rows].view(n, L, -1), blk.top_ids[:rows].view(n, L, -1)
    probs = (top_v.to(torch.float64) - lse).exp()
    if blk.ids is not None:
        exact = blk.exact[:rows].view(n, L, -1)
        counts = blk.counts[:rows].view(n, L, -1)
    for j, slot in enumerate(blk.group.slots):
        if slot.lens < 0:
            continue
        out, e, scale = outs[slot.lens], slot.e_pos, lenses[slot.lens].score_scale
        out.top_ids[e, cols] = top_i[:, j]
        out.top_probs[e, cols] = probs[:, j]
        out.top_scores[e, cols] = top_v[:, j] / scale
        out.entropy[e, cols] = entropy[:, j]
        out.kl_to_final[e, cols] = kl[:, j]
        if T is not None:
            logp = exact[:, j, :T].to(torch.float64) - lse[:, j]
            out.target_log_probs[e, cols] = logp
            out.target_probs[e, cols] = logp.exp()
            out.target_ranks[e, cols] = counts[:, j, :T]
        if out.own_scores is not None:
            out.own_scores[e, cols] = exact[:, j, -1] / scale
            out.own_ranks[e, cols] = counts[:, j, -1]
