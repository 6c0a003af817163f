"""The alignment suite's results: frozen dataclasses of tensors and labels, one row per stack entry.

Every result has ``to_dataframe()`` (one row per label, ``"0_pre"`` ... ``"final_post"``);
:class:`AlignmentResult` gathers them.
"""

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_latentspaces.results import label_frame

__all__ = ["SubspaceAngles", "VarianceFractions", "CKAResult", "ProcrustesErrors", "TokenDrift", "AlignmentResult"]


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
        return torch.cat([diag, torch.full((1,), math.nan, dtype=diag.dtype)])

    @property
    def final_debiased(self) -> Float[Tensor, " entry"]:
        """``[entry]`` debiased CKA with ``final_post``."""
        return self.layer_debiased[:, -1].clone()

    def layer_dataframe(self, *, debiased: bool = True) -> Any:
        """The ``entry x entry`` CKA matrix as a labelled ``pandas.DataFrame``.

        Raises:
            ValueError: for ``debiased=False`` when the biased matrix was not computed.
        """
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

