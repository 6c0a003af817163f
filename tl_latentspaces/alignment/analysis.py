"""From an :class:`AlignmentAccumulator`'s statistics to an :class:`AlignmentResult`: plain functions.

``standardize_scale`` divides the centred blocks by ``s_i s_j^T``: exactly what z-scoring the rows gives.
"""

import math
from typing import Any, List, Sequence, Tuple

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from tl_latentspaces.alignment.options import check_rows_for_k
from tl_latentspaces.alignment.results import (
    AlignmentResult, CKAResult, ProcrustesErrors, SubspaceAngles, TokenDrift, VarianceFractions,
)
from tl_latentspaces.checks import check_int
from tl_latentspaces.stats import (
    binned_quantiles, cka_from_hsic, integer_quantiles, linear_cka_from_moments, principal_angles, principal_subspace,
    procrustes_from_moments, random_subspace_angles, random_subspace_variance_fraction, variance_fraction,
    variance_fraction_null,
)

__all__ = ["alignment_result"]

_F64 = torch.float64
_EPS = torch.finfo(_F64).eps
_NAN = torch.full((1,), math.nan, dtype=_F64)


class _Blocks:
    """The accumulator's statistics on the CPU, read as (optionally scaled) centred co-moments."""

    def __init__(self, acc: Any):  # an AlignmentAccumulator (which imports this module)
        m, self.n, self.scale = acc.moments, acc.n_tokens, acc.scale
        self.labels, self.n_entries = acc.labels, acc.n_entries
        self.means = [x.cpu() for x in m.means]
        self.auto = [(m.cov(i, ddof=0) * self.n).cpu() for i in range(len(m.means))]
        self._cross = {p: b.cpu() for p, b in m.blocks.items()}

    def name(self, i: int) -> str:
        return self.labels[i] if i < self.n_entries else "the token embeddings W_E[token]"

    def raw(self, i: int, j: int) -> Tensor:
        """``sum (x_i - m_i)(x_j - m_j)^T`` for ``i <= j``."""
        return self.auto[i] if i == j else self._cross[(i, j)]

    def scaled(self, i: int, j: int) -> Tensor:
        block = self.raw(i, j)
        return block if self.scale is None else block / torch.outer(self.scale[i], self.scale[j])


def alignment_result(
    acc: Any, *, n_null_samples: int, seed: int, quantiles: Sequence[float], progress: bool
) -> AlignmentResult:
    """Every analysis of the suite from ``acc``'s statistics so far (``acc`` is not changed)."""
    why = " (a standard deviation needs 2 samples)"
    n_null_samples = check_int(n_null_samples, "n_null_samples", minimum=2, why=why)
    seed = check_int(seed, "seed", minimum=0)
    levels = tuple(float(q) for q in quantiles)
    if not levels or any(not 0.0 <= q <= 1.0 for q in levels):
        raise ValueError(f"quantiles must be a non-empty sequence of levels in [0, 1], got {quantiles!r}.")
    n, st = acc.n_tokens, acc.settings
    if n == 0:
        raise ValueError("no tokens were seen: call update() with at least one batch first.")
    check_rows_for_k(n, st.k, st.center, "seen so far")
    blocks = _Blocks(acc)
    angles, variance = _subspaces(acc, blocks, n_null_samples, seed, progress)
    return AlignmentResult(
        labels=list(acc.labels), model_name=acc.access.name, d_model=acc.d_model, d_vocab=acc.d_vocab, k=st.k,
        n_tokens=n, n_sequences=acc.n_sequences, skip_positions=st.skip_positions, center=st.center,
        standardized=acc.scale is not None, angles=angles, variance=variance, cka=_cka(acc, blocks),
        procrustes=_procrustes(acc, blocks), drift=_drift(acc, levels),
    )


def _subspaces(
    acc: Any, blocks: _Blocks, n_null_samples: int, seed: int, progress: bool
) -> Tuple[SubspaceAngles, VarianceFractions]:
    n, st, d, k = blocks.n, acc.settings, acc.d_model, acc.settings.k
    out: List[List[Tensor]] = [[] for _ in range(6)]  # angles e/u, kernels e/u, fractions e/u
    seconds = []
    for e in tqdm(range(acc.n_entries), desc="alignment: subspaces and fits", disable=not progress):
        second = blocks.auto[e] / n
        if not st.center:
            second = second + torch.outer(blocks.means[e], blocks.means[e])
        try:
            q = principal_subspace(second, k)
        except ValueError as err:
            what = "covariance" if st.center else "second moment"
            raise ValueError(f"the {what} of {acc.labels[e]} over {n} tokens: {err}") from err
        for col, basis in enumerate((acc.basis_embed, acc.basis_unembed)):
            a = principal_angles(q, basis)
            out[col].append(a)
            out[2 + col].append(torch.cos(a).square().sum() / math.sqrt(q.shape[1] * basis.shape[1]))
            out[4 + col].append(variance_fraction(second, basis))
        seconds.append(second)
    null = random_subspace_angles(d, k, k, n_samples=n_null_samples, generator=torch.Generator().manual_seed(seed))
    null_pk = torch.cos(null.samples).square().sum(-1) / k
    # One set of random bases for every entry (common random numbers), as variance_fraction_null draws them.
    var_null = variance_fraction_null(torch.stack(seconds), k, n_null_samples, torch.Generator().manual_seed(seed))
    common = dict(labels=list(acc.labels), k=k, d_model=d, centered=st.center, n_null_samples=n_null_samples)
    angles = SubspaceAngles(
        embed=torch.stack(out[0]), unembed=torch.stack(out[1]), pk_embed=torch.stack(out[2]),
        pk_unembed=torch.stack(out[3]), null_mean=null.mean, null_std=null.std, null_pk_mean=null_pk.mean(),
        null_pk_std=null_pk.std(), **common,
    )
    variance = VarianceFractions(
        embed=torch.stack(out[4]), unembed=torch.stack(out[5]), null_mean=random_subspace_variance_fraction(d, k),
        null_std=var_null.std, **common,
    )
    return angles, variance


def _cka(acc: Any, blocks: _Blocks) -> CKAResult:
    E, n = acc.n_entries, blocks.n
    if n < 2:
        raise ValueError(f"biased CKA needs at least 2 tokens; saw {n}.")
    for i in range(E + 1):
        # Centring a constant representation leaves rounding noise, not zero (scale-free test).
        noise = (1e3 * _EPS) ** 2 * float(blocks.means[i].square().sum()) * n
        if not float(blocks.scaled(i, i).square().sum()) > 0 or float(torch.trace(blocks.auto[i])) <= noise:
            raise ValueError(
                f"{blocks.name(i)} has zero variance over the {n} tokens seen, so CKA is undefined. "
                "Fix: check that the activations vary across tokens (not padding or BOS only)."
            )

    def biased(i: int, j: int) -> float:  # i <= j
        return float(linear_cka_from_moments(blocks.scaled(i, j), blocks.scaled(i, i), blocks.scaled(j, j)))

    hsic_sum, n_blocks = acc.blocks_so_far()
    if n_blocks < 1:
        raise ValueError("debiased CKA needs at least one block of >= 4 tokens; none was seen.")
    h = hsic_sum / n_blocks
    for i in range(E + 1):
        if not float(h[i, i]) > 0:
            raise ValueError(
                f"the mean unbiased HSIC of {blocks.name(i)} with itself is {float(h[i, i]):.3g} (must be > 0), so "
                f"debiased CKA is undefined: it has (near-)zero variance within the {n_blocks} block(s). Fix: check "
                "the activations vary across tokens, or use more sequences per block (cka_block_sequences)."
            )
    names = [blocks.name(i) for i in range(E + 1)]
    debiased = cka_from_hsic(h, "the mean unbiased HSIC", names)
    layer_biased = None
    if acc.settings.layer_cka_biased:
        hb = torch.empty(E, E, dtype=_F64)
        for i in range(E):
            for j in range(i, E):
                hb[i, j] = hb[j, i] = blocks.scaled(i, j).square().sum()
        layer_biased = cka_from_hsic(hb, "HSIC", names[:E])
    return CKAResult(
        labels=list(acc.labels),
        embed=torch.tensor([biased(i, E) for i in range(E)], dtype=_F64),
        embed_debiased=debiased[:E, E].clone(),
        next=torch.cat([torch.tensor([biased(i, i + 1) for i in range(E - 1)], dtype=_F64), _NAN]),
        final=torch.tensor([biased(i, E - 1) for i in range(E)], dtype=_F64),
        layer_debiased=debiased[:E, :E].clone(), layer_biased=layer_biased,
        block_sequences=acc.settings.cka_block_sequences, n_blocks=n_blocks, standardized=acc.scale is not None,
    )


def _procrustes_fit(acc: Any, blocks: _Blocks, i: int, j: int) -> Tuple[float, float]:
    if i == j:
        # X onto itself: R = I fits exactly; the norm formula would leave ~1e-8 of rounding.
        return 0.0, 0.0
    n = blocks.n
    xty, sx, sy = blocks.raw(i, j), torch.diagonal(blocks.auto[i]), torch.diagonal(blocks.auto[j])
    if not acc.settings.center:  # the uncentred sums, from the centred ones and the means
        m_i, m_j = blocks.means[i], blocks.means[j]
        xty = xty + n * torch.outer(m_i, m_j)
        sx, sy = sx + n * m_i.square(), sy + n * m_j.square()
    if blocks.scale is not None:
        xty = xty / torch.outer(blocks.scale[i], blocks.scale[j])
        sx, sy = sx / blocks.scale[i].square(), sy / blocks.scale[j].square()
    try:
        fit = procrustes_from_moments(xty, sx.sum(), sy.sum(), n=n)
    except ValueError as err:
        raise ValueError(f"Procrustes of {blocks.name(i)} onto {blocks.name(j)}: {err}") from err
    return float(fit.error), float(fit.scaled_error)


def _procrustes(acc: Any, blocks: _Blocks) -> ProcrustesErrors:
    E = acc.n_entries
    emb = [_procrustes_fit(acc, blocks, i, E) for i in range(E)]
    nxt = [_procrustes_fit(acc, blocks, i, i + 1) for i in range(E - 1)] + [(math.nan, math.nan)]
    fin = [_procrustes_fit(acc, blocks, i, E - 1) for i in range(E)]
    col = lambda fits, c: torch.tensor([f[c] for f in fits], dtype=_F64)  # noqa: E731
    return ProcrustesErrors(
        labels=list(acc.labels), embed_error=col(emb, 0), embed_scaled_error=col(emb, 1), next_error=col(nxt, 0),
        next_scaled_error=col(nxt, 1), final_error=col(fin, 0), final_scaled_error=col(fin, 1),
        centered=acc.settings.center, standardized=acc.scale is not None,
    )


def _drift(acc: Any, levels: Tuple[float, ...]) -> TokenDrift:
    n, n_rank, cos_bins = acc.cos.n, acc.n_rank, acc.cos_hist.shape[1]
    ranks = torch.arange(acc.d_vocab, dtype=_F64)
    var: Float[Tensor, " entry"] = (acc.cos.sq_sums[0].cpu() / n).clamp_min(0.0)
    return TokenDrift(
        labels=list(acc.labels), quantile_levels=levels, cos_mean=acc.cos.means[0].cpu().clone(), cos_std=var.sqrt(),
        cos_quantiles=binned_quantiles(acc.cos_hist, levels, -1.0, 2.0 / cos_bins), cos_hist=acc.cos_hist.clone(),
        rank_mean=(acc.rank_hist.to(_F64) @ ranks) / n_rank, rank_quantiles=integer_quantiles(acc.rank_hist, levels),
        rank0_fraction=acc.rank_hist[:, 0].to(_F64) / n_rank, rank_hist=acc.rank_hist.clone(), n_cos=n,
        n_rank=n_rank, rank_every=acc.settings.rank_every,
    )
