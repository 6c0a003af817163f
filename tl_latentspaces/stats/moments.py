"""Streaming first and second moments: the one statistics store of the alignment suite.

Every batch is centred on its own mean and folded in with the parallel update of Chan, Golub and
LeVeque (1979), which is also how two stores merge: data with a large mean and a small spread keep
full precision, unlike ``E[xx^T] - m m^T``.

Example:
    >>> import torch
    >>> m = Moments(2, pairs=[(0, 0), (0, 1)])
    >>> x = torch.tensor([[0.0, 0.0], [2.0, 2.0], [4.0, -2.0]])
    >>> m.update([x[:2], -x[:2]]); m.update([x[2:], -x[2:]])
    >>> m.n, m.means[0].tolist(), m.cov(0).tolist(), m.cov(0, 1).tolist()
    (3, [2.0, 0.0], [[4.0, -2.0], [-2.0, 4.0]], [[-4.0, 2.0], [2.0, -4.0]])
"""

from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from jaxtyping import Float
from torch import Tensor

from tl_latentspaces.checks import as_float64, check_bool, check_int, type_name

__all__ = ["Moments"]

_F64 = torch.float64
Pair = Tuple[int, int]


class Moments:
    """Streaming float64 means and centred cross-moments of ``n_inputs`` representations of the same rows.

    Args:
        n_inputs: Representations per update (``update`` takes one ``[n, d_i]`` tensor of each).
        pairs: The ``(i, j)`` blocks to keep, each stored once (``(j, i)`` is the transpose;
            ``(i, i)`` gives a covariance). Memory: ``8 d_i d_j`` bytes a block.
        variances: Also keep per-dimension centred sums of squares (spreads without the blocks).

    Attributes:
        n: Rows seen. means: ``[d_i]`` float64 means. blocks: ``{(i, j): [d_i, d_j]}`` centred
        cross-moments (sums, not averages). sq_sums: ``[d_i]`` centred sums of squares, if kept.
    """

    def __init__(self, n_inputs: int, pairs: Iterable[Pair] = (), *, variances: bool = False):
        self.n_inputs = check_int(n_inputs, "n_inputs", minimum=1)
        self.pairs: List[Pair] = []
        for p in pairs:
            if not (isinstance(p, tuple) and len(p) == 2 and all(isinstance(i, int) for i in p)):
                raise TypeError(f"every pair must be a tuple (i, j) of ints, got {p!r}.")
            if not all(0 <= i < self.n_inputs for i in p):
                raise ValueError(f"pair {p} names an input outside [0, {self.n_inputs}).")
            self.pairs.append((min(p), max(p)))
        self.pairs = sorted(set(self.pairs))
        self.variances = check_bool(variances, "variances")
        self.n = 0
        self.means: List[Tensor] = []
        self.blocks: Dict[Pair, Tensor] = {}
        self.sq_sums: List[Tensor] = []

    def update(self, xs: Sequence[Float[Tensor, "n d"]]) -> None:
        """Add rows: ``xs[i]`` is the ``[n, d_i]`` representation ``i`` (a ``[n_inputs, n, d]`` tensor works too).

        Raises ``TypeError``/``ValueError`` for a wrong count, non-float or non-finite input,
        different row counts, or widths that changed.
        """
        if not isinstance(xs, (list, tuple, Tensor)):
            raise TypeError(f"xs must be a list of {self.n_inputs} [n, d] tensors, got {type_name(xs)}.")
        if len(xs) != self.n_inputs:
            raise ValueError(f"xs must hold {self.n_inputs} tensors (n_inputs), got {len(xs)}.")
        xs = [as_float64(x, f"xs[{i}]", ndim=2, shape_hint="[n, d]").detach() for i, x in enumerate(xs)]
        rows, dims = [x.shape[0] for x in xs], [x.shape[1] for x in xs]
        if len(set(rows)) != 1:
            raise ValueError(f"every tensor in xs must have the same rows (the same samples), got row counts {rows}.")
        if self.n and dims != self.dims:
            raise ValueError(f"xs has widths {dims}, but earlier updates had widths {self.dims}.")
        if rows[0] == 0:
            return
        device = self.means[0].device if self.n else xs[0].device
        xs = [x.to(device) for x in xs]
        means = [x.mean(0) for x in xs]
        xc = [x - m for x, m in zip(xs, means)]
        blocks = {(i, j): xc[i].mT @ xc[j] for i, j in self.pairs}
        sq_sums = [x.square().sum(0) for x in xc] if self.variances else []
        self._absorb(rows[0], means, blocks, sq_sums)

    def merge(self, other: "Moments") -> "Moments":
        """Fold in another store of the same inputs and pairs (another process's rows); returns ``self``."""
        if not isinstance(other, Moments):
            raise TypeError(f"can only merge a Moments, got {type_name(other)}.")
        mine = (self.n_inputs, self.pairs, self.variances)
        theirs = (other.n_inputs, other.pairs, other.variances)
        if mine != theirs:
            raise ValueError(f"cannot merge Moments with (n_inputs, pairs, variances) {theirs} into {mine}.")
        if self.n and other.n and self.dims != other.dims:
            raise ValueError(f"cannot merge: widths {self.dims} vs {other.dims}.")
        if other.n:
            dev = self.means[0].device if self.n else other.means[0].device
            self._absorb(
                other.n,
                [m.to(dev) for m in other.means],
                {p: b.to(dev) for p, b in other.blocks.items()},
                [s.to(dev) for s in other.sq_sums],
            )
        return self

    def _absorb(self, n_b: int, means: List[Tensor], blocks: Dict[Pair, Tensor], sq_sums: List[Tensor]) -> None:
        """The one merge rule: add centred statistics of ``n_b`` rows (Chan et al.'s parallel update)."""
        if self.n == 0:
            self.means = [m.clone() for m in means]
            self.blocks = {p: b.clone() for p, b in blocks.items()}
            self.sq_sums = [s.clone() for s in sq_sums]
            self.n = n_b
            return
        n = self.n + n_b
        w = self.n * n_b / n
        deltas = [mb - ma for ma, mb in zip(self.means, means)]
        for (i, j), blk in self.blocks.items():
            blk += blocks[(i, j)] + w * torch.outer(deltas[i], deltas[j])
        for s, s_b, delta in zip(self.sq_sums, sq_sums, deltas):
            s += s_b + w * delta.square()
        for m, delta in zip(self.means, deltas):
            m += delta * (n_b / n)
        self.n = n

    @property
    def dims(self) -> List[int]:
        """Widths ``d_i`` of the inputs (empty before the first row)."""
        return [int(m.shape[0]) for m in self.means]

    def comoment(self, i: int, j: int) -> Float[Tensor, "di dj"]:
        """Centred cross-moment ``sum (x_i - m_i)(x_j - m_j)^T`` (a stored block or its transpose)."""
        self._need(1)
        if (min(i, j), max(i, j)) not in self.blocks:
            raise ValueError(f"block ({i}, {j}) is not kept; this store keeps {self.pairs}.")
        return self.blocks[(i, j)] if i <= j else self.blocks[(j, i)].mT

    def cov(self, i: int, j: Optional[int] = None, *, ddof: int = 1) -> Float[Tensor, "di dj"]:
        """Covariance of input ``i`` (with ``j``: cross-covariance), ``comoment / (n - ddof)``, as ``numpy.cov``."""
        ddof = check_int(ddof, "ddof", minimum=0)
        self._need(ddof + 1, f"cov(ddof={ddof})")
        c = self.comoment(i, i if j is None else j)
        if j is None or j == i:
            c = 0.5 * (c + c.mT)
        return c / (self.n - ddof)

    def _need(self, minimum: int, what: str = "a statistic") -> None:
        if self.n < minimum:
            raise ValueError(f"{what} needs at least {minimum} row(s); saw n={self.n}.")

    def state_dict(self) -> Dict[str, Any]:
        """``{"n", "means", "blocks", "sq_sums"}``: plain tensors, ints and lists (merge states, do not sum them)."""
        return {
            "n": self.n,
            "means": [m.clone() for m in self.means],
            "blocks": {f"{i}_{j}": b.clone() for (i, j), b in self.blocks.items()},
            "sq_sums": [s.clone() for s in self.sq_sums],
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` of a store with the same inputs and pairs."""
        if not isinstance(state, dict) or not {"n", "means", "blocks", "sq_sums"} <= set(state):
            got = sorted(state) if isinstance(state, dict) else type_name(state)
            raise ValueError(f"Moments.load_state_dict expects the dict from Moments.state_dict(), got {got}.")
        n = check_int(int(state["n"]) if isinstance(state["n"], Tensor) else state["n"], "state['n']", minimum=0)
        means, blocks, sq_sums = list(state["means"]), dict(state["blocks"]), list(state["sq_sums"])
        want_blocks = {f"{i}_{j}" for i, j in self.pairs}
        if n and (len(means) != self.n_inputs or set(blocks) != want_blocks
                  or len(sq_sums) != (self.n_inputs if self.variances else 0)):
            raise ValueError(
                f"state holds {len(means)} means, blocks {sorted(blocks)} and {len(sq_sums)} variances; this store "
                f"keeps {self.n_inputs} inputs, blocks {sorted(want_blocks)}, variances={self.variances}."
            )
        if not all(isinstance(t, Tensor) for t in [*means, *blocks.values(), *sq_sums]):
            raise TypeError("Moments.load_state_dict: every statistic in the state must be a Tensor.")
        dims = [int(m.shape[0]) for m in means]
        for key, b in blocks.items():
            i, j = (int(s) for s in key.split("_"))
            if tuple(b.shape) != (dims[i], dims[j]):
                raise ValueError(f"state block {key} has shape {tuple(b.shape)}, expected {(dims[i], dims[j])}.")
        f64 = lambda t: t.detach().to(_F64).clone()  # noqa: E731
        self.n = n
        self.means = [f64(m) for m in means] if n else []
        self.blocks = {tuple(int(s) for s in k.split("_")): f64(b) for k, b in blocks.items()} if n else {}
        self.sq_sums = [f64(s) for s in sq_sums] if n else []
