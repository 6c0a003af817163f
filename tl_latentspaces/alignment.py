"""Subspace alignment of the residual stream with the embedding space, streamed over a corpus.

The embedding space is the residual stream's first coordinate system: at ``0_pre`` every position
holds its token's row of ``W_E`` (plus a positional embedding on GPT-like models). At every entry
of the residual stack (labels ``"0_pre"`` ... ``"final_post"``) this module measures how far the
stream has moved away from that space, and towards the unembedding ``W_U``:

1. **Principal angles** between the entry's top-``k`` principal subspace (over the corpus) and the
   top-``k`` singular subspaces of ``W_E`` and ``W_U``, with the projection-kernel overlap score
   (mean squared cosine), against random ``k``-dimensional subspaces.
2. **Linear CKA**, biased and minibatch-debiased, with the input embeddings ``W_E[token]`` of the
   same tokens and between entries.
3. **Orthogonal Procrustes** of the entry onto the input embeddings, the next entry and the final
   entry: the normalized residual error, with and without the optimal isotropic scale.
4. **Variance in the embedding subspace**: the fraction of the entry's variance inside the ``W_E``
   (and ``W_U``) subspace, against ``k / d`` and the spread of random subspaces.
5. **Per-token drift**: cosine between each position's residual and its own token's input
   embedding, and that token's rank under the embedding lens, summarized per entry.

Everything streams. :class:`AlignmentAccumulator` takes one batch of residuals at a time (from the
plugin's hooks inside the model's own forward pass, or from an ``ActivationCache``) and keeps
float64 sufficient statistics whose size does not depend on the number of tokens; all of them can
be merged (``merge``) and checkpointed (``state_dict``) for a later multi-process reduction.
:func:`alignment_suite` runs the whole suite on a model and a corpus; :func:`alignment_from_cache`
on a cache the user already has.

What is kept, and why (``E`` entries, ``d = d_model``, ``V = d_vocab``):

* one centred covariance per entry and for the embeddings (``(E + 1) d^2`` doubles): principal
  subspaces, variance fractions, the CKA denominators;
* the centred cross-covariance of each entry with the embeddings, the next entry and the final
  entry (``~3E d^2`` doubles): exact biased CKA and Procrustes for those pairs over the whole
  stream. About 330 MB for the default model (``E = 31``, ``d = 576``).
* the biased CKA of *every* pair of entries needs every cross-covariance (``E(E+1)/2 d^2``
  doubles: 1.4 GB and about 23 s of float64 matmuls per 1,000 tokens on two CPU cores for the
  default model), so it is opt-in (``layer_cka_biased=True``). The default layer-by-layer matrix
  is the minibatch-debiased CKA, which needs only ``(E + 1)`` Gram matrices of ``n x n`` per block
  of ``n`` tokens and an ``(E + 1)^2`` running sum;
* exact histograms of the own-token cosine (2,000 bins) and rank (``V`` bins): means exactly,
  rank quantiles exactly, cosine quantiles to 0.001, mergeable by addition.

Example:
    >>> import tl_latentspaces as tll
    >>> model = tll.load_default_model()  # doctest: +SKIP
    >>> result = tll.alignment_suite(model, max_tokens=4096)  # doctest: +SKIP
    >>> result.to_dataframe()[["cka_embed", "var_embed", "var_null_mean", "cos_mean"]]  # doctest: +SKIP
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_latentspaces.alignment_math import (
    _CHUNK_ELEMENTS,
    CKAMatrixAccumulator,
    CovarianceAccumulator,
    ProcrustesAccumulator,
    haar_bases,
    orthonormal_basis,
    principal_angles,
    random_subspace_angles,
    random_subspace_variance_fraction,
    variance_fraction,
)
from tl_latentspaces.checks import check_bool, check_int, type_name
from tl_latentspaces.corpus import Corpus, default_corpus, tokenize_corpus
from tl_latentspaces.lenses import EmbeddingLens
from tl_latentspaces.model import ModelAccess
from tl_latentspaces.readout import ReadoutBuffers, token_ranks, vocab_major
from tl_latentspaces.results import label_frame
from tl_latentspaces.runner import stream_residuals

__all__ = [
    "AlignmentAccumulator",
    "AlignmentResult",
    "SubspaceAngles",
    "VarianceFractions",
    "CKAResult",
    "ProcrustesErrors",
    "TokenDrift",
    "alignment_suite",
    "alignment_from_cache",
    "DEFAULT_QUANTILES",
]

_F64 = torch.float64
_EPS = torch.finfo(_F64).eps
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)

#: Quantile levels reported for the per-token drift.
DEFAULT_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
_COS_BINS = 2000  # histogram of cosines in [-1, 1]: quantiles resolved to 0.001
_RANK_CHUNK_ROWS = 512  # rows per block of the tiled rank count (the readout's default chunk)
# The unbiased HSIC estimator is defined for n >= 4 rows (its normalizer is n (n - 3)).
_MIN_DEBIASED_ROWS = 4


# ---------------------------------------------------------------------------- argument checks
@dataclass(frozen=True)
class _Settings:
    """Validated options shared by the accumulator and the entry points."""

    k: int
    skip_positions: int
    center: bool
    cka_block_sequences: int
    layer_cka_biased: bool
    rank_every: int


def _settings(
    access: ModelAccess,
    *,
    k: Optional[int],
    skip_positions: int,
    center: bool,
    cka_block_sequences: int,
    layer_cka_biased: bool,
    rank_every: int,
) -> _Settings:
    d = access.d_model
    if k is None:
        k = max(1, d // 8)
    k = check_int(
        k,
        "k",
        minimum=1,
        maximum=d,
        why=f" (the subspace dimension cannot exceed d_model={d}; fix: pass k <= {d}, e.g. k={max(1, d // 8)})",
    )
    skip_positions = check_int(skip_positions, "skip_positions", minimum=0)
    cka_block_sequences = check_int(cka_block_sequences, "cka_block_sequences", minimum=1)
    rank_every = check_int(rank_every, "rank_every", minimum=1)
    return _Settings(
        k=k,
        skip_positions=skip_positions,
        center=check_bool(center, "center"),
        cka_block_sequences=cka_block_sequences,
        layer_cka_biased=check_bool(layer_cka_biased, "layer_cka_biased"),
        rank_every=rank_every,
    )


def _check_seq_len(seq_len: int, skip: int) -> None:
    kept = seq_len - skip
    if kept < _MIN_DEBIASED_ROWS:
        raise ValueError(
            f"sequences of {seq_len} tokens keep {kept} position(s) after skip_positions={skip}, but the "
            f"debiased CKA estimator needs at least {_MIN_DEBIASED_ROWS} tokens per block (its unbiased "
            f"HSIC divides by n (n - 3)). Fix: use seq_len >= {skip + _MIN_DEBIASED_ROWS} or a smaller "
            "skip_positions."
        )


def _check_rows_for_k(n_rows: int, k: int, center: bool, where: str) -> None:
    # A centred covariance of n rows has rank <= n - 1; an uncentred second moment rank <= n.
    limit = n_rows - 1 if center else n_rows
    if k > limit:
        raise ValueError(
            f"k={k} exceeds the {'n - 1' if center else 'n'} = {limit} principal directions that "
            f"{n_rows} token(s) {where} can define ({'centred ' if center else ''}covariance rank). "
            f"Fix: pass more tokens (max_tokens) or k <= {max(limit, 0)}."
        )


# ---------------------------------------------------------------------------- helpers
@contextmanager
def _one_thread() -> Iterator[None]:
    """Run the suite's many mid-sized float64 operations on one CPU thread.

    Why: on a machine whose cores are shared with other jobs (load average 4-7 on 2 cores), two
    OpenMP threads spin-wait on each other in every short parallel region. Measured there: an SVD
    of 576 x 576 took 10.5 s against 0.1 s on one thread, a centred 576 x 576 cross-product update
    of 1,016 rows 0.21 s against 0.02 s, a block of 32 Gram matrices of 504 rows 2.9 s against
    0.33 s. On an idle machine one thread costs at most the second core on these parts. The large
    float32 GEMMs of the ranks (and the model's forward pass) keep the caller's setting, which
    is restored afterwards.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _weight_basis(M: Tensor, k: int, name: str) -> Float[Tensor, "d k"]:
    """Top-``k`` left singular vectors of a ``[d, n]`` weight matrix with ``n >> d``.

    A reduced QR first (``M^T = Q R``, so ``M = R^T Q^T`` has the left singular vectors and values
    of the ``d x d`` matrix ``R^T``) gives the same subspace as an SVD of ``M`` about six times
    faster for ``W_E``: 4 s instead of 26 s at ``576 x 49,152`` on two cores.
    """
    M = M.detach().to("cpu", _F64)
    if M.shape[1] > M.shape[0]:
        M = torch.linalg.qr(M.mT, mode="r").R.mT
    try:
        with _one_thread():
            return orthonormal_basis(M, k)
    except ValueError as err:
        raise ValueError(f"cannot take the top-{k} singular subspace of {name}: {err}") from err


def _tl_projection_kernel() -> Optional[Tuple[Callable[..., Any], Callable[..., Any]]]:
    """TransformerLens's projection kernel where it exists (4.x), else None (2.x, 3.x)."""
    try:
        from transformer_lens.tools.analysis.projection_kernel import orthonormal_subspace, projection_kernel
    except ImportError:
        return None
    return orthonormal_subspace, projection_kernel


def _projection_kernel(qa: Tensor, qb: Tensor, angles: Tensor) -> Tensor:
    """Normalized projection kernel ``||Qa^T Qb||_F^2 / sqrt(ka kb)`` (mean squared cosine for ka = kb).

    TransformerLens 4's ``projection_kernel`` computes it where installed; elsewhere it comes from
    our own principal angles (the two agree to rounding; a test checks it).
    """
    tl = _tl_projection_kernel()
    if tl is None:
        return torch.cos(angles).square().sum() / math.sqrt(qa.shape[1] * qb.shape[1])
    orthonormal_subspace, projection_kernel = tl
    pk = projection_kernel(
        orthonormal_subspace(qa, rank=qa.shape[1]), orthonormal_subspace(qb, rank=qb.shape[1])
    )
    return pk.normalized.to(_F64)


def _hist_quantiles(hist: Tensor, levels: Sequence[float], lo: float, width: float) -> Tensor:
    """Quantiles of binned continuous data: the bin holding ``q N``, interpolated linearly inside it."""
    counts = hist.to(_F64)
    cum = counts.cumsum(-1)
    total = cum[..., -1:]
    out = []
    for q in levels:
        # q = 0 reads the first non-empty bin, not the histogram's lower edge.
        target = (q * total).clamp_min(1e-9)
        b = torch.searchsorted(cum.contiguous(), target.contiguous()).clamp_max(hist.shape[-1] - 1)
        before = torch.where(b > 0, cum.gather(-1, (b - 1).clamp_min(0)), torch.zeros_like(target))
        inside = counts.gather(-1, b)
        frac = torch.where(inside > 0, (target - before) / inside.clamp_min(1.0), torch.zeros_like(target))
        out.append((lo + (b.to(_F64) + frac.clamp(0.0, 1.0)) * width).squeeze(-1))
    return torch.stack(out, -1)


def _int_hist_quantiles(hist: Tensor, levels: Sequence[float]) -> Tensor:
    """Exact quantiles of integer data from its histogram (numpy's ``method="inverted_cdf"``)."""
    cum = hist.cumsum(-1).contiguous()
    total = cum[..., -1:].to(_F64)
    out = []
    for q in levels:
        # inverted_cdf: the smallest value whose cumulative count reaches q * N (at least 1).
        target = torch.ceil(q * total).clamp_min(1.0).to(cum.dtype).contiguous()
        out.append(torch.searchsorted(cum, target).squeeze(-1))
    return torch.stack(out, -1).to(_F64)


def _nan_vector(n: int) -> Tensor:
    return torch.full((n,), float("nan"), dtype=_F64)


# ---------------------------------------------------------------------------- results
@dataclass(frozen=True, eq=False)
class SubspaceAngles:
    """Principal angles between each entry's top-``k`` principal subspace and ``W_E`` / ``W_U``.

    Attributes:
        labels: Stack labels (``"0_pre"`` ... ``"final_post"``).
        k: Subspace dimension.
        d_model: Ambient dimension.
        embed: ``[entry, k]`` ascending angles (radians) to the top-``k`` singular subspace of ``W_E``.
        unembed: ``[entry, k]`` the same for ``W_U``.
        pk_embed: ``[entry]`` normalized projection kernel ``||Q^T B||_F^2 / k`` (mean squared
            cosine of the angles; 1 = same subspace, 0 = orthogonal).
        pk_unembed: ``[entry]`` the same for ``W_U``.
        null_mean: ``[k]`` mean of each ascending angle between two independent Haar-random
            ``k``-dimensional subspaces of ``R^d`` (Monte Carlo).
        null_std: ``[k]`` standard deviation of each such angle.
        null_pk_mean: 0-d mean normalized projection kernel of random subspaces (its expectation
            is exactly ``k / d``).
        null_pk_std: 0-d its standard deviation.
        centered: Whether the principal subspaces are of the centred covariance (else of the
            uncentred second moment).
        n_null_samples: Random subspaces drawn for the null.
    """

    labels: List[str]
    k: int
    d_model: int
    embed: Float[Tensor, "entry k"]
    unembed: Float[Tensor, "entry k"]
    pk_embed: Float[Tensor, " entry"]
    pk_unembed: Float[Tensor, " entry"]
    null_mean: Float[Tensor, " k"]
    null_std: Float[Tensor, " k"]
    null_pk_mean: Float[Tensor, ""]
    null_pk_std: Float[Tensor, ""]
    centered: bool
    n_null_samples: int

    def to_dataframe(self) -> Any:
        """Per-entry summary (degrees): mean and smallest angle, projection kernel, and the null."""
        deg = 180.0 / math.pi
        return label_frame(
            self.labels,
            {
                "angle_embed_mean_deg": self.embed.mean(-1) * deg,
                "angle_embed_min_deg": self.embed[:, 0] * deg,
                "pk_embed": self.pk_embed,
                "angle_unembed_mean_deg": self.unembed.mean(-1) * deg,
                "angle_unembed_min_deg": self.unembed[:, 0] * deg,
                "pk_unembed": self.pk_unembed,
                "angle_null_mean_deg": float(self.null_mean.mean() * deg),
                "angle_null_min_deg": float(self.null_mean[0] * deg),
                "pk_null_mean": float(self.null_pk_mean),
                "pk_null_std": float(self.null_pk_std),
            },
        )


@dataclass(frozen=True, eq=False)
class VarianceFractions:
    """Fraction of each entry's variance inside the top-``k`` singular subspaces of ``W_E`` / ``W_U``.

    Attributes:
        labels: Stack labels.
        k: Subspace dimension.
        d_model: Ambient dimension.
        embed: ``[entry]`` ``tr(P C P) / tr(C)`` with ``P`` the projector onto the ``W_E`` subspace.
        unembed: ``[entry]`` the same for ``W_U``.
        null_mean: 0-d what a uniformly random ``k``-dim subspace holds on average: exactly ``k / d``
            for any covariance.
        null_std: ``[entry]`` the standard deviation of that fraction over random subspaces for this
            entry's covariance (large for a spiky spectrum, ~0 for an isotropic one).
        centered: Whether ``C`` is the centred covariance (else the uncentred second moment).
        n_null_samples: Random subspaces drawn for ``null_std``.
    """

    labels: List[str]
    k: int
    d_model: int
    embed: Float[Tensor, " entry"]
    unembed: Float[Tensor, " entry"]
    null_mean: Float[Tensor, ""]
    null_std: Float[Tensor, " entry"]
    centered: bool
    n_null_samples: int

    def to_dataframe(self) -> Any:
        """Per-entry fractions with the null mean, spread and z-scores."""
        std = self.null_std.clamp_min(1e-300)
        return label_frame(
            self.labels,
            {
                "var_embed": self.embed,
                "var_unembed": self.unembed,
                "var_null_mean": float(self.null_mean),
                "var_null_std": self.null_std,
                "var_embed_z": (self.embed - self.null_mean) / std,
                "var_unembed_z": (self.unembed - self.null_mean) / std,
            },
        )


@dataclass(frozen=True, eq=False)
class CKAResult:
    """Linear CKA of each entry with the input embeddings and with the other entries.

    Biased values are exact over the whole stream (Kornblith et al. 2019). Debiased values are
    minibatch CKA (Nguyen et al. 2021): the unbiased HSIC (Song et al. 2012) of each block of
    ``block_sequences`` consecutive sequences, averaged over blocks; they are ~0 for unrelated
    representations even when ``d`` is large against the block size. Blocks are fixed groups of
    sequences, so the values do not depend on the forward ``batch_size``.

    Attributes:
        labels: Stack labels.
        embed: ``[entry]`` biased CKA with ``W_E[token]`` of the same positions.
        embed_debiased: ``[entry]`` debiased CKA with ``W_E[token]``.
        next: ``[entry]`` biased CKA with the next entry (NaN at the last entry, which has none).
        final: ``[entry]`` biased CKA with ``final_post``.
        layer_debiased: ``[entry, entry]`` debiased CKA between every pair of entries.
        layer_biased: ``[entry, entry]`` biased CKA between every pair, or None unless the suite
            ran with ``layer_cka_biased=True``.
        block_sequences: Sequences per debiased block.
        n_blocks: Number of blocks averaged.
        standardized: Whether every representation was z-scored per dimension first.
    """

    labels: List[str]
    embed: Float[Tensor, " entry"]
    embed_debiased: Float[Tensor, " entry"]
    next: Float[Tensor, " entry"]
    final: Float[Tensor, " entry"]
    layer_debiased: Float[Tensor, "entry entry"]
    layer_biased: Optional[Float[Tensor, "entry entry"]]
    block_sequences: int
    n_blocks: int
    standardized: bool

    @property
    def next_debiased(self) -> Float[Tensor, " entry"]:
        """``[entry]`` debiased CKA with the next entry (NaN at the last)."""
        diag = torch.diagonal(self.layer_debiased, offset=1)
        return torch.cat([diag, _nan_vector(1)])

    @property
    def final_debiased(self) -> Float[Tensor, " entry"]:
        """``[entry]`` debiased CKA with ``final_post``."""
        return self.layer_debiased[:, -1].clone()

    def layer_dataframe(self, *, debiased: bool = True) -> Any:
        """The ``entry x entry`` CKA matrix as a labelled ``pandas.DataFrame``.

        Raises:
            ValueError: for ``debiased=False`` when the biased matrix was not computed.
        """
        import pandas as pd

        matrix = self.layer_debiased if debiased else self.layer_biased
        if matrix is None:
            raise ValueError(
                "the biased layer-by-layer CKA was not computed (it needs every cross-covariance: "
                "E(E+1)/2 d_model^2 doubles). Fix: rerun with layer_cka_biased=True, or use debiased=True."
            )
        return pd.DataFrame(matrix.numpy(), index=pd.Index(self.labels, name="label"), columns=self.labels)

    def to_dataframe(self) -> Any:
        """Per-entry CKA with the embeddings, the next entry and the final entry."""
        return label_frame(
            self.labels,
            {
                "cka_embed": self.embed,
                "cka_embed_debiased": self.embed_debiased,
                "cka_next": self.next,
                "cka_next_debiased": self.next_debiased,
                "cka_final": self.final,
                "cka_final_debiased": self.final_debiased,
            },
        )


@dataclass(frozen=True, eq=False)
class ProcrustesErrors:
    """Orthogonal Procrustes fits ``X R ~ Y`` of each entry ``X`` onto a target ``Y``.

    ``error`` is ``||X R - Y||_F / ||Y||_F`` with the best orthogonal ``R``; ``scaled_error``
    allows the best isotropic scale too, ``||s X R - Y||_F / ||Y||_F``, which is what to read when
    the residual norm grows with depth. 0 means ``Y`` is a rotation of ``X``.

    Attributes:
        labels: Stack labels.
        embed_error, embed_scaled_error: ``[entry]`` onto ``W_E[token]`` of the same positions.
        next_error, next_scaled_error: ``[entry]`` onto the next entry (NaN at the last).
        final_error, final_scaled_error: ``[entry]`` onto ``final_post``.
        centered: Whether both sides were mean-centred.
        standardized: Whether both sides were z-scored per dimension.
    """

    labels: List[str]
    embed_error: Float[Tensor, " entry"]
    embed_scaled_error: Float[Tensor, " entry"]
    next_error: Float[Tensor, " entry"]
    next_scaled_error: Float[Tensor, " entry"]
    final_error: Float[Tensor, " entry"]
    final_scaled_error: Float[Tensor, " entry"]
    centered: bool
    standardized: bool

    def to_dataframe(self) -> Any:
        """Per-entry normalized Procrustes errors."""
        return label_frame(
            self.labels,
            {
                "procrustes_embed": self.embed_error,
                "procrustes_embed_scaled": self.embed_scaled_error,
                "procrustes_next": self.next_error,
                "procrustes_next_scaled": self.next_scaled_error,
                "procrustes_final": self.final_error,
                "procrustes_final_scaled": self.final_scaled_error,
            },
        )


@dataclass(frozen=True, eq=False)
class TokenDrift:
    """How far each position's residual has drifted from its own token's input embedding.

    The cosine is between the raw residual and ``W_E[token]``; the rank is that token's rank
    among all ``W_E`` rows by cosine with the residual (0 = nearest), as the embedding lens reads
    it. Neither is centred or standardized: they describe the stream as the embedding lens sees it.

    Attributes:
        labels: Stack labels.
        quantile_levels: The levels of the ``*_quantiles`` columns.
        cos_mean, cos_std: ``[entry]`` exact mean and standard deviation of the cosine.
        cos_quantiles: ``[entry, q]`` cosine quantiles (resolved to the 0.001-wide histogram bins).
        cos_hist: ``[entry, 2000]`` counts of the cosine in equal bins over ``[-1, 1]``.
        rank_mean: ``[entry]`` exact mean rank.
        rank_quantiles: ``[entry, q]`` exact rank quantiles (numpy's ``inverted_cdf``).
        rank0_fraction: ``[entry]`` fraction of positions whose own token is the nearest.
        rank_hist: ``[entry, d_vocab]`` counts of each rank.
        n_cos: Positions in the cosine statistics.
        n_rank: Positions in the rank statistics.
        rank_every: The rank was computed at every ``rank_every``-th kept position of each sequence.
    """

    labels: List[str]
    quantile_levels: Tuple[float, ...]
    cos_mean: Float[Tensor, " entry"]
    cos_std: Float[Tensor, " entry"]
    cos_quantiles: Float[Tensor, "entry q"]
    cos_hist: Int[Tensor, "entry bins"]
    rank_mean: Float[Tensor, " entry"]
    rank_quantiles: Float[Tensor, "entry q"]
    rank0_fraction: Float[Tensor, " entry"]
    rank_hist: Int[Tensor, "entry d_vocab"]
    n_cos: int
    n_rank: int
    rank_every: int

    def to_dataframe(self) -> Any:
        """Per-entry mean, spread and quantiles of the own-token cosine and rank."""
        data: Dict[str, Any] = {"cos_mean": self.cos_mean, "cos_std": self.cos_std}
        for i, q in enumerate(self.quantile_levels):
            data[f"cos_q{round(100 * q):02d}"] = self.cos_quantiles[:, i]
        data["rank_mean"] = self.rank_mean
        for i, q in enumerate(self.quantile_levels):
            data[f"rank_q{round(100 * q):02d}"] = self.rank_quantiles[:, i]
        data["rank0_frac"] = self.rank0_fraction
        return label_frame(self.labels, data)


@dataclass(frozen=True, eq=False)
class AlignmentResult:
    """The alignment suite's results, one row per residual-stack entry.

    Attributes:
        labels: Stack labels (``"0_pre"`` ... ``"final_post"``).
        model_name: The model's name.
        d_model: Residual width.
        d_vocab: Vocabulary size.
        k: Subspace dimension of the angle and variance analyses.
        n_tokens: Positions that entered the statistics (after ``skip_positions``).
        n_sequences: Sequences read.
        skip_positions: Leading positions of every sequence left out.
        center: Whether subspaces, variance fractions and Procrustes used centred data.
        standardized: Whether CKA and Procrustes used per-dimension z-scored data.
        angles: :class:`SubspaceAngles`.
        variance: :class:`VarianceFractions`.
        cka: :class:`CKAResult`.
        procrustes: :class:`ProcrustesErrors`.
        drift: :class:`TokenDrift`.
    """

    labels: List[str]
    model_name: str
    d_model: int
    d_vocab: int
    k: int
    n_tokens: int
    n_sequences: int
    skip_positions: int
    center: bool
    standardized: bool
    angles: SubspaceAngles
    variance: VarianceFractions
    cka: CKAResult
    procrustes: ProcrustesErrors
    drift: TokenDrift

    def index(self, label: str) -> int:
        """Stack index of ``label``; an unknown label is an error listing the valid ones."""
        if label not in self.labels:
            raise ValueError(f"unknown stack label {label!r}; this result has {self.labels}.")
        return self.labels.index(label)

    def to_dataframe(self) -> Any:
        """Every per-entry number of the suite, one row per stack label, null baselines included."""
        import pandas as pd

        return pd.concat(
            [
                self.angles.to_dataframe(),
                self.variance.to_dataframe(),
                self.cka.to_dataframe(),
                self.procrustes.to_dataframe(),
                self.drift.to_dataframe(),
            ],
            axis=1,
        )


# ---------------------------------------------------------------------------- streaming
class _ScaleAccumulator:
    """Per-dimension mean and variance of every representation (Chan et al. merge, float64).

    Used by the first pass of ``standardize=True``: the z-scoring scale must be known before the
    debiased CKA's Gram matrices are formed.
    """

    def __init__(self) -> None:
        self.n = 0
        self.mean: Optional[Tensor] = None
        self.m2: Optional[Tensor] = None

    def update(self, rows: Float[Tensor, "rep n d"]) -> None:
        n_b = rows.shape[1]
        if n_b == 0:
            return
        mean = rows.mean(1)
        m2 = (rows - mean.unsqueeze(1)).square().sum(1)
        if self.n == 0:
            self.n, self.mean, self.m2 = n_b, mean, m2
            return
        n = self.n + n_b
        delta = mean - self.mean
        self.m2 = self.m2 + m2 + delta.square() * (self.n * n_b / n)
        self.mean = self.mean + delta * (n_b / n)
        self.n = n

    def scale(self) -> Float[Tensor, "rep d"]:
        if self.n < 2 or self.m2 is None:
            raise ValueError(f"standardization needs at least 2 tokens to estimate a spread; saw {self.n}.")
        std = torch.sqrt(self.m2 / self.n)
        # A dimension that never varies carries no information after centring; leaving it
        # unscaled avoids dividing by zero (and keeps its mean as it is when center=False).
        floor = 1e3 * _EPS * std.amax(-1, keepdim=True)
        return torch.where(std > floor, std, torch.ones_like(std)).cpu()


class AlignmentAccumulator:
    """Streaming statistics of the alignment suite, fed one batch of residuals at a time.

    ``update(ids, stack)`` takes the token ids ``[batch, seq]`` and the residual stack
    ``[entry, batch, seq, d_model]`` (what :func:`~tl_latentspaces.runner.stream_residuals`
    yields); ``result()`` computes every analysis. Memory does not grow with the number of tokens
    (see the module docstring for what is kept). Accumulators over disjoint parts of a corpus merge
    into the accumulator of the whole (``merge``); ``state_dict`` gives plain tensors and ints.

    Options and the pitfalls they exist for:
    * ``skip_positions`` (default 2): the first positions of a sequence carry "massive
      activations" that would dominate every covariance, CKA and Procrustes fit. Measured on the
      default model over 16K held-out tokens at ``15_pre``: BOS (position 0) always has a residual
      norm near 25,000 and the first token after it (position 1) about 10,000 in 4% of sequences,
      against a median of 150 elsewhere and no later position above 1,000. With BOS alone left
      out, position 1 still held 60% of the centred variance there, almost all of it from those
      5 tokens. The first ``skip_positions`` positions are left out of every statistic.
    * ``center`` (default True): the residual stream has a large mean direction (on the default
      model the mean alone holds 21% of ``E||x||^2`` at ``1_pre``, 51% at ``15_pre``, 73% at
      ``29_pre``) that would be the top direction of an uncentred second moment; centring
      measures how the tokens vary. CKA is always centred (by definition); the drift
      statistics never are (they are what the embedding lens reads).
    * ``standardize_scale``: per-dimension z-scoring against rogue dimensions (a few coordinates
      whose variance dwarfs the rest dominate CKA and Procrustes). Pass the ``[entry + 1,
      d_model]`` standard deviations (the last row for the embeddings ``W_E[token]``);
      :func:`alignment_suite` with ``standardize=True`` streams them in a first pass. It applies to
      CKA and Procrustes, which compare representations of the same tokens; the angle and
      variance analyses stay in the model's coordinates, where ``W_E`` and ``W_U`` are defined.

    Args:
        model: A ``HookedTransformer`` / ``TransformerBridge`` (or a :class:`ModelAccess`).
        k: Subspace dimension for the angle and variance analyses, default ``d_model // 8``.
        skip_positions: Leading positions of every sequence to leave out.
        center: Centre before principal subspaces, variance fractions and Procrustes.
        standardize_scale: ``[entry + 1, d_model]`` positive per-dimension scales, or None.
        cka_block_sequences: Consecutive sequences per block of the debiased CKA estimator.
        layer_cka_biased: Also keep every cross-covariance for the full biased layer-by-layer CKA
            (``E(E+1)/2 d_model^2`` doubles: 1.4 GB for the default model).
        rank_every: Compute the embedding-lens rank at every ``rank_every``-th kept position (the
            rank needs a ``[rows, d_vocab]`` score matrix per entry: the bulk of the suite's time on
            a large vocabulary). Cosines are computed at every position.

    Example:
        >>> acc = AlignmentAccumulator(model, k=8)  # doctest: +SKIP
        >>> for ids, stack in stream_residuals(model, seqs, dict(ModelAccess(model).stack_sites())):  # doctest: +SKIP
        ...     acc.update(ids, stack)
        >>> acc.result().to_dataframe()  # doctest: +SKIP
    """

    def __init__(
        self,
        model: Any,
        *,
        k: Optional[int] = None,
        skip_positions: int = 2,
        center: bool = True,
        standardize_scale: Optional[Tensor] = None,
        cka_block_sequences: int = 4,
        layer_cka_biased: bool = False,
        rank_every: int = 4,
    ):
        access = model if isinstance(model, ModelAccess) else ModelAccess(model)
        self.access = access
        self.settings = _settings(
            access,
            k=k,
            skip_positions=skip_positions,
            center=center,
            cka_block_sequences=cka_block_sequences,
            layer_cka_biased=layer_cka_biased,
            rank_every=rank_every,
        )
        sites = access.stack_sites()
        self.labels = [label for label, _ in sites]
        self.hook_names = dict(sites)
        E, d = len(self.labels), access.d_model
        self.n_entries, self.d_model, self.d_vocab = E, d, access.d_vocab
        if standardize_scale is not None:
            standardize_scale = self._check_scale(standardize_scale)
        self.scale = standardize_scale

        # Weight subspaces first: a k the weights cannot support fails before any forward pass.
        k = self.settings.k
        self.basis_embed = _weight_basis(access.W_E.mT, k, "W_E")
        if access.W_U.shape == access.W_E.mT.shape and torch.equal(access.W_U, access.W_E.mT):
            self.basis_unembed = self.basis_embed  # tied embeddings: the same matrix
        else:
            self.basis_unembed = _weight_basis(access.W_U, k, "W_U")
        self._lens = EmbeddingLens(access)
        self._W_E = access.W_E.detach()
        self._zero()

    def _zero(self) -> None:
        """The statistics, empty: everything ``update`` adds to and ``state_dict`` holds."""
        E, d = self.n_entries, self.d_model
        # Index E stands for the token embeddings W_E[token].
        self._cov = [CovarianceAccumulator(d) for _ in range(E + 1)]
        pairs = {(i, E) for i in range(E)} | {(i, i + 1) for i in range(E - 1)} | {(i, E - 1) for i in range(E - 1)}
        self._pairs = {p: ProcrustesAccumulator(center=True) for p in sorted(pairs)}
        self._hsic = CKAMatrixAccumulator(E + 1, track_biased=False, track_debiased=True, method="gram")
        self._full = (
            CKAMatrixAccumulator(E + 1, track_biased=True, track_debiased=False, method="features")
            if self.settings.layer_cka_biased
            else None
        )
        self._pending: List[Tensor] = []
        self._pending_sequences = 0
        self._cos_mean = torch.zeros(E, dtype=_F64)
        self._cos_m2 = torch.zeros(E, dtype=_F64)  # centred sum of squares (Chan merge: exact 0 spread stays 0)
        self._cos_hist = torch.zeros(E, _COS_BINS, dtype=torch.long)
        self._rank_hist = torch.zeros(E, self.d_vocab, dtype=torch.long)
        self._n_tokens = 0
        self._n_rank = 0
        self._n_sequences = 0

    def empty(self) -> "AlignmentAccumulator":
        """A new accumulator with nothing added, for the same model and settings.

        The weight subspaces (an SVD each) and the embedding lens are shared, not computed again:
        use it as the corpus runner's factory (``{"align": acc.empty}``), which calls it once per
        process and again to merge processes.
        """
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new._zero()
        return new

    # ------------------------------------------------------------------ properties
    @property
    def n_tokens(self) -> int:
        """Positions seen so far (after ``skip_positions``)."""
        return self._n_tokens

    @property
    def n_sequences(self) -> int:
        """Sequences seen so far."""
        return self._n_sequences

    # ------------------------------------------------------------------ checks
    def _check_scale(self, scale: Any) -> Tensor:
        shape = (self.n_entries + 1, self.d_model)
        if not isinstance(scale, Tensor) or not scale.dtype.is_floating_point:
            raise TypeError(
                f"standardize_scale must be a float tensor of shape {shape} (one row per entry, the last "
                f"for the embeddings), got {type_name(scale)}."
            )
        if tuple(scale.shape) != shape:
            raise ValueError(
                f"standardize_scale must have shape {shape} ([entry + 1, d_model]), got {tuple(scale.shape)}."
            )
        scale = scale.detach().to("cpu", _F64)
        if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
            raise ValueError(
                "standardize_scale must be finite and positive everywhere (it divides each dimension); "
                f"got min {float(scale.min()):.3g}. Fix: replace zero spreads by 1."
            )
        return scale

    def _check_batch(self, ids: Any, stack: Any) -> Tuple[Tensor, Tensor]:
        if not isinstance(ids, Tensor) or ids.dtype not in _INT_DTYPES or ids.ndim != 2:
            got = f"dtype {ids.dtype} and shape {tuple(ids.shape)}" if isinstance(ids, Tensor) else type_name(ids)
            raise TypeError(f"ids must be an integer tensor [batch, seq], got {got}.")
        if not isinstance(stack, Tensor) or not stack.dtype.is_floating_point or stack.ndim != 4:
            got = (
                f"dtype {stack.dtype} and shape {tuple(stack.shape)}"
                if isinstance(stack, Tensor)
                else type_name(stack)
            )
            raise TypeError(f"stack must be a float tensor [entry, batch, seq, d_model], got {got}.")
        expected = (self.n_entries, ids.shape[0], ids.shape[1], self.d_model)
        if tuple(stack.shape) != expected:
            raise ValueError(
                f"stack has shape {tuple(stack.shape)}, expected {expected} ([entry, batch, seq, d_model] for "
                f"ids of shape {tuple(ids.shape)} and the {self.n_entries} entries {self.labels[0]}.."
                f"{self.labels[-1]}). Fix: pass the residual stack of these ids at every stack_sites() entry."
            )
        _check_seq_len(ids.shape[1], self.settings.skip_positions)
        if ids.numel():
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.d_vocab:
                raise ValueError(f"token ids must lie in [0, {self.d_vocab}), got values in [{lo}, {hi}].")
        bad = ~torch.isfinite(stack)
        if bool(bad.any()):
            e, b, p, _ = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"the residual stream holds NaN or inf at {self.labels[e]} (sequence {b}, position {p}); "
                f"{int(bad.sum())} value(s) in all. Check the model's weights and any hook that edits the "
                "stream before this entry."
            )
        return ids, stack

    # ------------------------------------------------------------------ update
    def update(self, ids: Int[Tensor, "batch seq"], stack: Float[Tensor, "entry batch seq d_model"]) -> None:
        """Add one batch of sequences.

        Args:
            ids: ``[batch, seq]`` token ids.
            stack: ``[entry, batch, seq, d_model]`` residuals at every ``stack_sites()`` entry.

        Raises:
            TypeError: non-tensor input or wrong dtypes.
            ValueError: mismatched shapes, sequences too short for the debiased estimator, token
                ids outside the vocabulary, or NaN/inf in the residuals (naming the entry).
        """
        ids, stack = self._check_batch(ids, stack)
        E, skip = self.n_entries, self.settings.skip_positions
        B = ids.shape[0]
        if B == 0:
            return
        with torch.no_grad():
            tok = ids[:, skip:].to(self._W_E.device).long()
            x = stack[:, :, skip:]
            # One float64 copy of the batch: entries, then the embeddings W_E[token] as row E.
            rows = torch.empty((E + 1, *x.shape[1:]), dtype=_F64, device=x.device)
            rows[:E].copy_(x)
            rows[E].copy_(self._W_E[tok])
            self._update_ranks(x, tok)  # large float32 GEMMs: every thread the caller allows
            flat = rows.view(E + 1, -1, self.d_model)
            with _one_thread():  # many mid-sized float64 products: see _one_thread
                self._update_cos(rows)
                for i, acc in enumerate(self._cov):
                    acc.update(flat[i])
                for (i, j), acc in self._pairs.items():
                    acc.update(flat[i], flat[j])
                if self._full is not None:
                    self._full.update([self._scale_rows(flat[i], i) for i in range(E + 1)])
                self._update_blocks(rows)
        self._n_tokens += flat.shape[1]
        self._n_sequences += B

    def _scale_rows(self, x: Tensor, i: int) -> Tensor:
        """Rows of representation ``i`` divided by its per-dimension scale (unchanged without one)."""
        return x if self.scale is None else x / self.scale[i].to(x.device)

    def _update_cos(self, rows: Tensor) -> None:
        E = self.n_entries
        emb = rows[E]
        emb_norm = emb.norm(dim=-1)
        cos = torch.empty(E, emb_norm.numel(), dtype=_F64)
        for e in range(E):  # per entry: a [batch, seq, d] temporary, not [entry, batch, seq, d]
            dot = (rows[e] * emb).sum(-1)
            norms = rows[e].norm(dim=-1) * emb_norm
            # A zero vector (an untrained embedding row) has no direction: cosine 0, as the lens reports.
            cos[e] = torch.where(norms > 0, dot / norms.clamp_min(1e-300), torch.zeros_like(dot)).reshape(-1).cpu()
        mean = cos.mean(1)
        self._merge_cos(cos.shape[1], mean, (cos - mean.unsqueeze(1)).square().sum(1))
        idx = ((cos.clamp(-1.0, 1.0) + 1.0) * (_COS_BINS / 2)).long().clamp_(0, _COS_BINS - 1)
        idx += torch.arange(E).unsqueeze(1) * _COS_BINS
        self._cos_hist += torch.bincount(idx.reshape(-1), minlength=E * _COS_BINS).view(E, _COS_BINS)

    def _update_ranks(self, x: Tensor, tok: Tensor) -> None:
        # Ranks exactly as the embedding lens reads them: the same projection, weight and tiles.
        E, every = self.n_entries, self.settings.rank_every
        xr = x[:, :, ::every]
        own = tok[:, ::every].reshape(-1, 1)
        n = own.shape[0]
        lens = self._lens
        wt = vocab_major(lens.weight).T
        bufs = ReadoutBuffers(min(_RANK_CHUNK_ROWS, n), ranked=True, device=x.device)
        for e in range(E):
            slab = xr[e].reshape(n, self.d_model)
            ranks = torch.empty(n, dtype=torch.long, device=x.device)
            for start in range(0, n, _RANK_CHUNK_ROWS):
                stop = min(start + _RANK_CHUNK_ROWS, n)
                y = lens.project(slab[start:stop].to(torch.float32), e)
                ranks[start:stop] = token_ranks(lens, y, wt, own[start:stop], bufs)[:, 0]
            self._rank_hist[e] += torch.bincount(ranks.cpu(), minlength=self.d_vocab)
        self._n_rank += n

    def _merge_cos(self, n_b: int, mean: Tensor, m2: Tensor) -> None:
        n_a = self._n_tokens
        n = n_a + n_b
        delta = mean - self._cos_mean
        self._cos_m2 += m2 + delta.square() * (n_a * n_b / n)
        self._cos_mean += delta * (n_b / n)

    def _update_blocks(self, rows: Tensor) -> None:
        """Group whole sequences into fixed blocks for the debiased CKA, whatever the batch size."""
        block, B = self.settings.cka_block_sequences, rows.shape[1]
        start = 0
        while start < B:
            take = min(block - self._pending_sequences, B - start)
            part = rows[:, start : start + take].reshape(self.n_entries + 1, -1, self.d_model)
            # stack copies, so the pending block does not keep the whole batch alive
            self._pending.append(torch.stack([self._scale_rows(part[i], i) for i in range(len(part))]))
            self._pending_sequences += take
            start += take
            if self._pending_sequences == block:
                self._hsic.update(list(torch.cat(self._pending, 1)))
                self._pending, self._pending_sequences = [], 0

    # ------------------------------------------------------------------ merge / state
    def _check_compatible(self, other: "AlignmentAccumulator") -> None:
        if not isinstance(other, AlignmentAccumulator):
            raise TypeError(f"can only merge an AlignmentAccumulator, got {type_name(other)}.")
        mine = (self.labels, self.d_model, self.d_vocab, self.settings)
        theirs = (other.labels, other.d_model, other.d_vocab, other.settings)
        if mine != theirs:
            raise ValueError(f"cannot merge accumulators with different settings: {mine} vs {theirs}.")
        same_scale = (self.scale is None and other.scale is None) or (
            self.scale is not None and other.scale is not None and torch.equal(self.scale, other.scale)
        )
        if not same_scale:
            raise ValueError("cannot merge accumulators with different standardize_scale.")

    def merge(self, other: "AlignmentAccumulator") -> "AlignmentAccumulator":
        """Fold in another accumulator's statistics (e.g. another process's share); returns ``self``.

        Each side's unfinished debiased-CKA block is closed as a block of its own (as ``result()``
        would close it), so merging accumulators whose streams end on a block boundary gives exactly
        the statistics of the concatenated stream.
        """
        self._check_compatible(other)
        self._flush_pending_into(self._hsic)
        self._pending, self._pending_sequences = [], 0
        other._flush_pending_into(self._hsic)
        for mine, theirs in zip(self._cov, other._cov):
            mine.merge(theirs)
        for p, acc in self._pairs.items():
            acc.merge(other._pairs[p])
        self._hsic.merge(other._hsic)
        if self._full is not None and other._full is not None:
            self._full.merge(other._full)
        if other._n_tokens:
            self._merge_cos(other._n_tokens, other._cos_mean, other._cos_m2)
        self._cos_hist += other._cos_hist
        self._rank_hist += other._rank_hist
        self._n_tokens += other._n_tokens
        self._n_rank += other._n_rank
        self._n_sequences += other._n_sequences
        return self

    def _flush_pending_into(self, target: CKAMatrixAccumulator) -> None:
        if self._pending:
            target.update(list(torch.cat(self._pending, 1)))

    def state_dict(self) -> Dict[str, Any]:
        """Every statistic as plain tensors and ints (nested dicts), for ``torch.save`` or a reduction."""
        return {
            "n_tokens": self._n_tokens,
            "n_rank": self._n_rank,
            "n_sequences": self._n_sequences,
            "cov": [acc.state_dict() for acc in self._cov],
            "pairs": {f"{i}_{j}": acc.state_dict() for (i, j), acc in self._pairs.items()},
            "hsic": self._hsic.state_dict(),
            "full": None if self._full is None else self._full.state_dict(),
            "pending": None if not self._pending else torch.cat(self._pending, 1).clone(),
            "pending_sequences": self._pending_sequences,
            "cos_mean": self._cos_mean.clone(),
            "cos_m2": self._cos_m2.clone(),
            "cos_hist": self._cos_hist.clone(),
            "rank_hist": self._rank_hist.clone(),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` of an accumulator built with the same model and options."""
        required = ["n_tokens", "n_rank", "n_sequences", "cov", "pairs", "hsic", "full", "pending",
                    "pending_sequences", "cos_mean", "cos_m2", "cos_hist", "rank_hist"]
        if not isinstance(state, dict):
            raise TypeError(f"load_state_dict expects the dict from state_dict(), got {type_name(state)}.")
        missing = [key for key in required if key not in state]
        if missing:
            raise ValueError(f"state is missing keys {missing}. Fix: pass AlignmentAccumulator.state_dict().")
        if len(state["cov"]) != len(self._cov) or set(state["pairs"]) != {f"{i}_{j}" for i, j in self._pairs}:
            raise ValueError(
                f"state is for a different stack: {len(state['cov']) - 1} entries, this accumulator has "
                f"{self.n_entries}."
            )
        if (state["full"] is None) != (self._full is None):
            raise ValueError(
                f"state has layer_cka_biased={state['full'] is not None}, this accumulator "
                f"{self._full is not None}."
            )
        for acc, s in zip(self._cov, state["cov"]):
            acc.load_state_dict(s)
        for (i, j), acc in self._pairs.items():
            acc.load_state_dict(state["pairs"][f"{i}_{j}"])
        self._hsic.load_state_dict(state["hsic"])
        if self._full is not None:
            self._full.load_state_dict(state["full"])
        pending = state["pending"]
        self._pending = [] if pending is None else [pending.clone()]
        self._pending_sequences = int(state["pending_sequences"])
        self._cos_mean = state["cos_mean"].clone()
        self._cos_m2 = state["cos_m2"].clone()
        self._cos_hist = state["cos_hist"].clone()
        self._rank_hist = state["rank_hist"].clone()
        self._n_tokens = int(state["n_tokens"])
        self._n_rank = int(state["n_rank"])
        self._n_sequences = int(state["n_sequences"])

    # ------------------------------------------------------------------ result
    def result(
        self,
        *,
        n_null_samples: int = 200,
        seed: int = 0,
        quantiles: Sequence[float] = DEFAULT_QUANTILES,
        progress: bool = False,
    ) -> AlignmentResult:
        """Compute every analysis from the statistics so far (the accumulator stays usable).

        Args:
            n_null_samples: Haar-random subspaces in the Monte-Carlo null baselines (>= 2).
            seed: Seed of the null baselines' random generator.
            quantiles: Levels in ``[0, 1]`` for the drift quantiles.
            progress: Show a progress bar over the entries.

        Raises:
            ValueError: if fewer tokens were seen than ``k`` principal directions need, an entry's
                covariance has numerical rank below ``k``, or a representation has zero variance.
        """
        n_null_samples = check_int(
            n_null_samples, "n_null_samples", minimum=2, why=" (a standard deviation needs 2 samples)"
        )
        seed = check_int(seed, "seed", minimum=0)
        levels = tuple(float(q) for q in quantiles)
        if not levels or any(not 0.0 <= q <= 1.0 for q in levels):
            raise ValueError(f"quantiles must be a non-empty sequence of levels in [0, 1], got {quantiles!r}.")
        n = self._n_tokens
        if n == 0:
            raise ValueError("no tokens were seen: call update() with at least one batch first.")
        _check_rows_for_k(n, self.settings.k, self.settings.center, "seen so far")
        with _one_thread():
            return self._compute(levels, n_null_samples, seed, progress)

    def _compute(self, levels: Tuple[float, ...], n_null_samples: int, seed: int, progress: bool) -> AlignmentResult:
        from tqdm.auto import tqdm

        n, st = self._n_tokens, self.settings
        E, d, k = self.n_entries, self.d_model, st.k
        comoment = [(acc.cov(ddof=0) * n).cpu() for acc in self._cov]  # centred sums of outer products
        means = [acc.mean.cpu() for acc in self._cov]
        bar = tqdm(total=E, desc="alignment: subspaces and fits", disable=not progress)

        # ---------- 1 + 4: principal subspaces, angles, variance fractions
        angles_e, angles_u, pk_e, pk_u, var_e, var_u, eigvals = [], [], [], [], [], [], []
        for e in range(E):
            second = comoment[e] / n if st.center else comoment[e] / n + torch.outer(means[e], means[e])
            second = 0.5 * (second + second.mT)
            evals, evecs = torch.linalg.eigh(second)
            evals = evals.clamp_min(0.0)
            tol = float(evals[-1]) * d * _EPS
            rank = int((evals > tol).sum())
            if rank < k:
                raise ValueError(
                    f"the {'covariance' if st.center else 'second moment'} of {self.labels[e]} has numerical "
                    f"rank {rank} < k={k} over {n} tokens, so its top-{k} principal subspace is not defined. "
                    f"Fix: pass k <= {max(rank, 1)} or more (varied) tokens."
                )
            q = evecs[:, -k:].flip(-1)
            a_e = principal_angles(q, self.basis_embed)
            a_u = principal_angles(q, self.basis_unembed)
            angles_e.append(a_e)
            angles_u.append(a_u)
            pk_e.append(_projection_kernel(q, self.basis_embed, a_e))
            pk_u.append(_projection_kernel(q, self.basis_unembed, a_u))
            var_e.append(variance_fraction(second, self.basis_embed))
            var_u.append(variance_fraction(second, self.basis_unembed))
            eigvals.append(evals)
            bar.update(1)
        bar.close()

        null = random_subspace_angles(d, k, k, n_samples=n_null_samples, generator=torch.Generator().manual_seed(seed))
        null_pk = torch.cos(null.samples).square().sum(-1) / k
        var_null_std = self._variance_null_std(torch.stack(eigvals), n_null_samples, seed)

        angles = SubspaceAngles(
            labels=list(self.labels),
            k=k,
            d_model=d,
            embed=torch.stack(angles_e),
            unembed=torch.stack(angles_u),
            pk_embed=torch.stack(pk_e),
            pk_unembed=torch.stack(pk_u),
            null_mean=null.mean,
            null_std=null.std,
            null_pk_mean=null_pk.mean(),
            null_pk_std=null_pk.std(),
            centered=st.center,
            n_null_samples=n_null_samples,
        )
        variance = VarianceFractions(
            labels=list(self.labels),
            k=k,
            d_model=d,
            embed=torch.stack(var_e),
            unembed=torch.stack(var_u),
            null_mean=random_subspace_variance_fraction(d, k),
            null_std=var_null_std,
            centered=st.center,
            n_null_samples=n_null_samples,
        )
        return AlignmentResult(
            labels=list(self.labels),
            model_name=self.access.name,
            d_model=d,
            d_vocab=self.d_vocab,
            k=k,
            n_tokens=n,
            n_sequences=self._n_sequences,
            skip_positions=st.skip_positions,
            center=st.center,
            standardized=self.scale is not None,
            angles=angles,
            variance=variance,
            cka=self._cka_result(comoment),
            procrustes=self._procrustes_result(comoment),
            drift=self._drift_result(levels),
        )

    def _variance_null_std(self, eigvals: Float[Tensor, "entry d"], n_samples: int, seed: int) -> Tensor:
        """Spread of the variance fraction held by Haar-random ``k``-dim subspaces, per entry.

        The Haar law is rotation invariant, so the fraction ``tr(Q^T C Q) / tr(C)`` has the same
        distribution for ``C`` and for ``diag(eigenvalues of C)``; with ``w_i = ||row i of Q||^2``
        it is ``w . lambda / sum(lambda)``. One set of random bases then serves every entry (common
        random numbers): exactly ``variance_fraction_null(torch.diag(eigenvalues), k, n_samples,
        Generator().manual_seed(seed))``, drawn in the same chunks, without 31 separate ``d x d x k``
        products per sample.
        """
        d, k = self.d_model, self.settings.k
        generator = torch.Generator().manual_seed(seed)
        chunk = max(1, _CHUNK_ELEMENTS // (d * k))
        weights = []
        for start in range(0, n_samples, chunk):
            q = haar_bases(min(chunk, n_samples - start), d, k, generator)
            weights.append(q.square().sum(-1))  # [b, d]
        w = torch.cat(weights)  # [n_samples, d]
        samples = (w @ eigvals.mT) / eigvals.sum(-1)  # [n_samples, entry]
        return samples.std(0)

    def _scaled(self, block: Tensor, i: int, j: int) -> Tensor:
        if self.scale is None:
            return block
        return block / torch.outer(self.scale[i], self.scale[j])

    def _cross(self, i: int, j: int, comoment: List[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
        """Centred cross-moment ``sum (x_i - m_i)(x_j - m_j)^T`` and the two means."""
        if i == j:
            return comoment[i], self._cov[i].mean.cpu(), self._cov[i].mean.cpu()
        state = self._pairs[(i, j)].state_dict()
        return state["xty"].cpu(), state["mean_x"].cpu(), state["mean_y"].cpu()

    def _name(self, i: int) -> str:
        return self.labels[i] if i < self.n_entries else "the token embeddings W_E[token]"

    def _cka_result(self, comoment: List[Tensor]) -> CKAResult:
        E, n = self.n_entries, self._n_tokens
        if n < 2:
            raise ValueError(f"biased CKA needs at least 2 tokens; saw {n}.")
        sq_norm = []
        for i in range(E + 1):
            v = float(self._scaled(comoment[i], i, i).square().sum())
            # Centring a constant representation leaves rounding noise, not zero (scale-free test).
            noise = (1e3 * _EPS) ** 2 * float(self._cov[i].mean.square().sum()) * n
            if not v > 0 or float(torch.trace(comoment[i])) <= noise:
                raise ValueError(
                    f"{self._name(i)} has zero variance over the {n} tokens seen, so CKA is undefined. "
                    "Fix: check that the activations vary across tokens (not padding or BOS only)."
                )
            sq_norm.append(math.sqrt(v))

        def biased(i: int, j: int) -> float:
            c, _, _ = self._cross(min(i, j), max(i, j), comoment)
            return float(self._scaled(c, min(i, j), max(i, j)).square().sum()) / (sq_norm[i] * sq_norm[j])

        embed = torch.tensor([biased(i, E) for i in range(E)], dtype=_F64)
        nxt = torch.cat([torch.tensor([biased(i, i + 1) for i in range(E - 1)], dtype=_F64), _nan_vector(1)])
        final = torch.tensor([biased(i, E - 1) for i in range(E)], dtype=_F64)

        hsic = CKAMatrixAccumulator(E + 1, track_biased=False, track_debiased=True, method="gram")
        hsic.load_state_dict(self._hsic.state_dict())
        self._flush_pending_into(hsic)  # the unfinished block counts as a block of its own
        if hsic.n_batches < 1:
            raise ValueError("debiased CKA needs at least one block of >= 4 tokens; none was seen.")
        h = hsic.state_dict()["hsic_u_sum"] / hsic.n_batches
        for i in range(E + 1):
            if not float(h[i, i]) > 0:
                raise ValueError(
                    f"the mean unbiased HSIC of {self._name(i)} with itself is {float(h[i, i]):.3g} (must be "
                    f"> 0), so debiased CKA is undefined: it has (near-)zero variance within the "
                    f"{hsic.n_batches} block(s). Fix: check the activations vary across tokens, or use "
                    "more sequences per block (cka_block_sequences)."
                )
        debiased = hsic.result(debiased=True).cpu()
        layer_biased = None
        if self._full is not None:
            layer_biased = self._full.result(debiased=False).cpu()[:E, :E]
        return CKAResult(
            labels=list(self.labels),
            embed=embed,
            embed_debiased=debiased[:E, E].clone(),
            next=nxt,
            final=final,
            layer_debiased=debiased[:E, :E].clone(),
            layer_biased=layer_biased,
            block_sequences=self.settings.cka_block_sequences,
            n_blocks=hsic.n_batches,
            standardized=self.scale is not None,
        )

    def _procrustes_fit(self, i: int, j: int, comoment: List[Tensor]) -> Tuple[float, float]:
        if i == j:
            # X onto itself: R = I fits exactly; the norm formula would leave ~1e-8 of rounding.
            return 0.0, 0.0
        n, center = self._n_tokens, self.settings.center
        c, m_i, m_j = self._cross(i, j, comoment)
        d_i, d_j = torch.diagonal(comoment[i]), torch.diagonal(comoment[j])
        if center:
            xty, sx, sy = c, d_i, d_j
        else:
            xty = c + n * torch.outer(m_i, m_j)
            sx, sy = d_i + n * m_i.square(), d_j + n * m_j.square()
        if self.scale is not None:
            xty = self._scaled(xty, i, j)
            sx, sy = sx / self.scale[i].square(), sy / self.scale[j].square()
        # Statistics of the (centred, scaled) rows are exactly the plain sums a center=False
        # accumulator keeps, so its result() is the fit on those rows.
        fit = ProcrustesAccumulator(center=False)
        zeros = torch.zeros(self.d_model, dtype=_F64)
        sq_norms = torch.stack([sx.sum(), sy.sum()])
        fit.load_state_dict({"n": n, "center": 0, "mean_x": zeros, "mean_y": zeros, "xty": xty, "sq_norms": sq_norms})
        try:
            out = fit.result()
        except ValueError as err:
            raise ValueError(f"Procrustes of {self._name(i)} onto {self._name(j)}: {err}") from err
        return float(out.error), float(out.scaled_error)

    def _procrustes_result(self, comoment: List[Tensor]) -> ProcrustesErrors:
        E = self.n_entries
        emb = [self._procrustes_fit(i, E, comoment) for i in range(E)]
        nxt = [self._procrustes_fit(i, i + 1, comoment) for i in range(E - 1)] + [(math.nan, math.nan)]
        fin = [self._procrustes_fit(i, E - 1, comoment) for i in range(E)]
        col = lambda fits, c: torch.tensor([f[c] for f in fits], dtype=_F64)  # noqa: E731
        return ProcrustesErrors(
            labels=list(self.labels),
            embed_error=col(emb, 0),
            embed_scaled_error=col(emb, 1),
            next_error=col(nxt, 0),
            next_scaled_error=col(nxt, 1),
            final_error=col(fin, 0),
            final_scaled_error=col(fin, 1),
            centered=self.settings.center,
            standardized=self.scale is not None,
        )

    def _drift_result(self, levels: Tuple[float, ...]) -> TokenDrift:
        n, n_rank = self._n_tokens, self._n_rank
        mean = self._cos_mean.clone()
        var = (self._cos_m2 / n).clamp_min(0.0)
        ranks = torch.arange(self.d_vocab, dtype=_F64)
        return TokenDrift(
            labels=list(self.labels),
            quantile_levels=levels,
            cos_mean=mean,
            cos_std=var.sqrt(),
            cos_quantiles=_hist_quantiles(self._cos_hist, levels, -1.0, 2.0 / _COS_BINS),
            cos_hist=self._cos_hist.clone(),
            rank_mean=(self._rank_hist.to(_F64) @ ranks) / n_rank,
            rank_quantiles=_int_hist_quantiles(self._rank_hist, levels),
            rank0_fraction=self._rank_hist[:, 0].to(_F64) / n_rank,
            rank_hist=self._rank_hist.clone(),
            n_cos=n,
            n_rank=n_rank,
            rank_every=self.settings.rank_every,
        )


# ---------------------------------------------------------------------------- entry points
def _cache_entries(access: ModelAccess, cache: Any, ids: Tensor, names: Dict[str, str]) -> List[Tensor]:
    """The cached residual at every stack entry, shape-checked (not copied)."""
    acts = []
    for label, name in names.items():
        try:
            act = cache[name]
        except (KeyError, ValueError) as err:
            raise ValueError(
                f"the cache has no activation {name!r} (needed for {label}). Fix: cache the residual "
                "stream, e.g. model.run_with_cache(tokens, names_filter=lambda n: 'resid' in n)."
            ) from err
        if not isinstance(act, Tensor) or act.ndim != 3 or tuple(act.shape) != (*ids.shape, access.d_model):
            got = tuple(act.shape) if isinstance(act, Tensor) else type_name(act)
            raise ValueError(
                f"cached {name} has shape {got}, but tokens {tuple(ids.shape)} need "
                f"{(*ids.shape, access.d_model)}. Fix: pass the token ids the cache was made from (mind BOS)."
            )
        acts.append(act.detach())
    return acts


def _as_ids(tokens: Any, access: ModelAccess) -> Tensor:
    if not isinstance(tokens, Tensor) or tokens.dtype not in _INT_DTYPES:
        raise TypeError(
            f"tokens must be an integer tensor [batch, seq] of the ids the cache was made from, got "
            f"{type_name(tokens) if not isinstance(tokens, Tensor) else tokens.dtype}."
        )
    ids = tokens.unsqueeze(0) if tokens.ndim == 1 else tokens
    if ids.ndim != 2 or ids.numel() == 0:
        raise ValueError(f"tokens must be a non-empty [batch, seq] tensor, got shape {tuple(tokens.shape)}.")
    return ids.long()


def _scales(access: ModelAccess, batches: Any, E: int, skip: int) -> Tensor:
    """First pass of ``standardize=True``: the per-dimension spread of every representation."""
    W_E = access.W_E.detach()
    acc = _ScaleAccumulator()
    with torch.no_grad():
        for ids, stack in batches:
            tok = ids[:, skip:].to(W_E.device).long()
            rows = torch.cat([stack[:, :, skip:].to(_F64), W_E[tok].to(_F64).unsqueeze(0)], 0)
            if not bool(torch.isfinite(rows).all()):
                raise ValueError("the residual stream holds NaN or inf; check the model and any hook that edits it.")
            acc.update(rows.reshape(E + 1, -1, rows.shape[-1]))
    return acc.scale()


def _run(
    access: ModelAccess,
    batches: Callable[[str], Any],
    *,
    standardize: bool,
    settings_kwargs: Dict[str, Any],
    n_null_samples: int,
    seed: int,
    progress: bool,
) -> AlignmentResult:
    scale = None
    if standardize:
        E = len(access.stack_sites())
        scale = _scales(access, batches("alignment: per-dimension spread"), E, settings_kwargs["skip_positions"])
    acc = AlignmentAccumulator(access, standardize_scale=scale, **settings_kwargs)
    for ids, stack in batches("alignment"):
        acc.update(ids, stack)
    return acc.result(n_null_samples=n_null_samples, seed=seed, progress=progress)


def _check_common(
    access: ModelAccess,
    *,
    k: Optional[int],
    skip_positions: int,
    center: bool,
    standardize: bool,
    cka_block_sequences: int,
    layer_cka_biased: bool,
    rank_every: int,
    batch_size: int,
    n_null_samples: int,
    seed: int,
    progress: bool,
) -> _Settings:
    settings = _settings(
        access,
        k=k,
        skip_positions=skip_positions,
        center=center,
        cka_block_sequences=cka_block_sequences,
        layer_cka_biased=layer_cka_biased,
        rank_every=rank_every,
    )
    check_bool(standardize, "standardize")
    check_bool(progress, "progress")
    check_int(batch_size, "batch_size", minimum=1)
    check_int(n_null_samples, "n_null_samples", minimum=2, why=" (a standard deviation needs 2 samples)")
    check_int(seed, "seed", minimum=0)
    return settings


def alignment_suite(
    model: Any,
    corpus: Optional[Corpus] = None,
    *,
    k: Optional[int] = None,
    max_tokens: Optional[int] = 16384,
    seq_len: Optional[int] = None,
    prepend_bos: bool = True,
    batch_size: int = 8,
    skip_positions: int = 2,
    center: bool = True,
    standardize: bool = False,
    cka_block_sequences: int = 4,
    layer_cka_biased: bool = False,
    rank_every: int = 4,
    n_null_samples: int = 200,
    seed: int = 0,
    progress: bool = True,
) -> AlignmentResult:
    """Run the whole alignment suite on a model over a corpus, streaming the residual stream.

    The corpus is packed into sequences (:func:`~tl_latentspaces.corpus.tokenize_corpus`) and run
    through the model's own forward pass in batches; the plugin's capture hooks feed an
    :class:`AlignmentAccumulator` and are removed, exactly, after every batch. Hooks the user
    registered fire as usual, so the suite measures what the patched model does. No activations
    are stored beyond one batch. Every argument is checked before the first forward pass.

    Args:
        model: A ``HookedTransformer`` or ``TransformerBridge`` in eval mode.
        corpus: Text, a list of texts, file paths (``.txt``/``.jsonl``) or a ``[n_seq, seq_len]``
            token tensor; default: the held-out split of the offline default corpus.
        k: Subspace dimension of the angle and variance analyses; default ``d_model // 8``.
        max_tokens: Token budget (whole sequences, BOS included); None reads the whole corpus.
        seq_len: Tokens per sequence; default 128 for text, the width of a token tensor.
        prepend_bos: Start every text sequence with BOS (ignored for a token tensor).
        batch_size: Sequences per forward pass (memory only: results do not depend on it).
        skip_positions: Leading positions of every sequence left out of every statistic (default
            2: BOS and the first token after it, whose massive activations would dominate every
            covariance; see :class:`AlignmentAccumulator`).
        center: Centre before principal subspaces, variance fractions and Procrustes.
        standardize: z-score every representation per dimension (spread streamed in a first pass,
            which doubles the forward passes) before CKA and Procrustes, against rogue dimensions.
        cka_block_sequences: Sequences per block of the debiased CKA estimator.
        layer_cka_biased: Also compute the full biased layer-by-layer CKA (1.4 GB and ~23 s per
            1,000 tokens extra on two CPU cores for the default model).
        rank_every: Compute the embedding-lens rank at every ``rank_every``-th kept position.
        n_null_samples: Haar-random subspaces in the null baselines.
        seed: Seed of the null baselines.
        progress: Show tqdm progress bars.

    Returns:
        :class:`AlignmentResult`; ``.to_dataframe()`` gives one row per stack entry.

    Raises:
        ValueError: a model in training mode, ``k`` larger than ``d_model`` or than the tokens can
            support, sequences too short for the debiased estimator, a corpus too small, NaN in the
            residual stream (naming the entry), or any bad option.

    Example:
        >>> import tl_latentspaces as tll
        >>> result = tll.alignment_suite(model, max_tokens=4096)  # doctest: +SKIP
        >>> result.to_dataframe().loc["0_pre", ["cka_embed", "cos_mean", "rank_q50"]]  # doctest: +SKIP
    """
    access = model if isinstance(model, ModelAccess) else ModelAccess(model)
    access.require_eval("alignment_suite")
    settings = _check_common(
        access, k=k, skip_positions=skip_positions, center=center, standardize=standardize,
        cka_block_sequences=cka_block_sequences, layer_cka_biased=layer_cka_biased, rank_every=rank_every,
        batch_size=batch_size, n_null_samples=n_null_samples, seed=seed, progress=progress,
    )
    if max_tokens is not None:
        max_tokens = check_int(max_tokens, "max_tokens", minimum=1)
    if corpus is None:
        corpus = default_corpus("heldout")
    if seq_len is None:
        seq_len = int(corpus.shape[1]) if isinstance(corpus, Tensor) and corpus.ndim == 2 else 128
    seq_len = check_int(
        seq_len, "seq_len", minimum=2, maximum=access.n_ctx, why=f" (the model's n_ctx={access.n_ctx})"
    )
    _check_seq_len(seq_len, settings.skip_positions)
    seqs = tokenize_corpus(access, corpus, seq_len=seq_len, prepend_bos=prepend_bos, max_tokens=max_tokens)
    n_rows = seqs.shape[0] * (seq_len - settings.skip_positions)
    _check_rows_for_k(n_rows, settings.k, settings.center, "in this corpus")
    names = dict(access.stack_sites())

    def batches(desc: str) -> Any:
        return stream_residuals(access, seqs, names, batch_size=batch_size, progress=progress, desc=desc)

    return _run(
        access, batches, standardize=standardize,
        settings_kwargs=dict(
            k=settings.k, skip_positions=settings.skip_positions, center=settings.center,
            cka_block_sequences=settings.cka_block_sequences, layer_cka_biased=settings.layer_cka_biased,
            rank_every=settings.rank_every,
        ),
        n_null_samples=n_null_samples, seed=seed, progress=progress,
    )


def alignment_from_cache(
    model: Any,
    cache: Any,
    tokens: Int[Tensor, "batch seq"],
    *,
    k: Optional[int] = None,
    batch_size: int = 8,
    skip_positions: int = 2,
    center: bool = True,
    standardize: bool = False,
    cka_block_sequences: int = 4,
    layer_cka_biased: bool = False,
    rank_every: int = 4,
    n_null_samples: int = 200,
    seed: int = 0,
    progress: bool = False,
    verify_cache: bool = True,
) -> AlignmentResult:
    """Run the alignment suite on an ``ActivationCache`` the user already has (no forward pass).

    The cache must hold the residual stream at every ``stack_sites()`` entry (``resid_pre`` of
    every layer and the last ``resid_post``) for ``tokens``. Every position is used after
    ``skip_positions``: pass unpadded sequences. Options as in :func:`alignment_suite`; a cache
    of other tokens is refused (by its token embedding) unless ``verify_cache=False``.

    Example:
        >>> _, cache = model.run_with_cache(tokens)  # doctest: +SKIP
        >>> tll.alignment_from_cache(model, cache, tokens, k=8).to_dataframe()  # doctest: +SKIP
    """
    access = model if isinstance(model, ModelAccess) else ModelAccess(model)
    settings = _check_common(
        access, k=k, skip_positions=skip_positions, center=center, standardize=standardize,
        cka_block_sequences=cka_block_sequences, layer_cka_biased=layer_cka_biased, rank_every=rank_every,
        batch_size=batch_size, n_null_samples=n_null_samples, seed=seed, progress=progress,
    )
    ids = _as_ids(tokens, access)
    _check_seq_len(ids.shape[1], settings.skip_positions)
    _check_rows_for_k(ids.shape[0] * (ids.shape[1] - settings.skip_positions), settings.k, settings.center, "in tokens")
    names = dict(access.stack_sites())
    acts = _cache_entries(access, cache, ids, names)
    if check_bool(verify_cache, "verify_cache"):
        access.check_cache_tokens(cache, ids)

    def batches(desc: str) -> Any:
        # One batch at a time, so the float64 working copies stay bounded whatever the cache size.
        for start in range(0, ids.shape[0], batch_size):
            stop = start + batch_size
            yield ids[start:stop], torch.stack([act[start:stop] for act in acts], 0)

    return _run(
        access, batches, standardize=standardize,
        settings_kwargs=dict(
            k=settings.k, skip_positions=settings.skip_positions, center=settings.center,
            cka_block_sequences=settings.cka_block_sequences, layer_cka_biased=settings.layer_cka_biased,
            rank_every=settings.rank_every,
        ),
        n_null_samples=n_null_samples, seed=seed, progress=progress,
    )
