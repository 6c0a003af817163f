"""The alignment suite's results: frozen dataclasses of tensors, each with ``to_dataframe()`` (one row per label)."""

import math
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

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
        embed, unembed: ``[entry, k]`` ascending angles (radians) to the top-``k`` subspace of W_E / W_U.
        pk_embed, pk_unembed: ``[entry]`` projection kernel ``||Q^T B||_F^2 / k`` (mean squared cosine).
        null_mean, null_std: ``[k]`` mean and spread of each angle between two Haar-random ``k``-dim
            subspaces (Monte Carlo); ``null_pk_*`` the same for the kernel (mean ``k / d``).
        centered: Whether the subspaces are of the centred covariance (else the second moment).
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
        """Per-entry mean and smallest angle (degrees), projection kernel, and the null."""
        deg, columns = 180.0 / math.pi, {}
        for t in ("embed", "unembed"):
            angles = getattr(self, t)
            columns[f"angle_{t}_mean_deg"] = angles.mean(-1) * deg
            columns[f"angle_{t}_min_deg"] = angles[:, 0] * deg
            columns[f"pk_{t}"] = getattr(self, f"pk_{t}")
        return label_frame(self.labels, {
            **columns, "angle_null_mean_deg": float(self.null_mean.mean() * deg),
            "angle_null_min_deg": float(self.null_mean[0] * deg), "pk_null_mean": float(self.null_pk_mean),
            "pk_null_std": float(self.null_pk_std),
        })


@dataclass(frozen=True, eq=False)
class VarianceFractions:
    """Fraction of each entry's variance inside the top-``k`` singular subspaces of ``W_E`` / ``W_U``.

    Attributes:
        embed, unembed: ``[entry]`` ``tr(P C P) / tr(C)``, ``P`` the projector onto the subspace.
        null_mean: 0-d what a uniformly random ``k``-dim subspace holds on average: exactly ``k / d``.
        null_std: ``[entry]`` the spread of that fraction over random subspaces for this entry's covariance.
        centered: Whether ``C`` is the centred covariance (else the second moment).
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
        """Per-entry fractions with the null mean, spread and z-scores (NaN where random subspaces all hold the
        same fraction, as at ``k = d_model`` or for an isotropic covariance: no spread to measure against)."""
        std = torch.where(self.null_std > 1e-9, self.null_std, torch.full_like(self.null_std, math.nan))
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

    Biased values are exact over the whole stream. Debiased values are minibatch CKA: the unbiased
    HSIC of each block of ``block_sequences`` consecutive sequences, averaged over the ``n_blocks`` blocks.

    Attributes:
        embed, embed_debiased: ``[entry]`` CKA with ``W_E[token]`` of the same positions.
        next: ``[entry]`` biased CKA with the next entry (NaN at the last). final: with ``final_post``.
        layer_debiased: ``[entry, entry]`` debiased CKA between every pair of entries.
        layer_biased: ``[entry, entry]`` biased CKA, or None unless run with ``layer_cka_biased=True``.
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
        """Per-entry CKA with the embeddings, the next entry and the final entry, biased and debiased."""
        columns = {f"cka_{t}{s}": getattr(self, t + s) for t in ("embed", "next", "final") for s in ("", "_debiased")}
        return label_frame(self.labels, columns)


@dataclass(frozen=True, eq=False)
class ProcrustesErrors:
    """Orthogonal Procrustes fits ``X R ~ Y`` of each entry ``X`` onto a target ``Y``.

    ``*_error`` is ``||X R - Y||_F / ||Y||_F`` with the best orthogonal ``R``; ``*_scaled_error``
    allows the best isotropic scale too (what to read when the residual norm grows with depth).
    0 means ``Y`` is a rotation of ``X``. Targets, each ``[entry]``: ``embed`` (``W_E[token]`` of
    the same positions), ``next`` (the next entry; NaN at the last), ``final`` (``final_post``).
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
        targets = ("embed", "next", "final")
        columns = {f"procrustes_{t}{s}": getattr(self, f"{t}{s}_error") for t in targets for s in ("", "_scaled")}
        return label_frame(self.labels, columns)


@dataclass(frozen=True, eq=False)
class TokenDrift:
    """How far each position's residual has drifted from its own token's input embedding.

    The cosine is between the raw residual and ``W_E[token]``; the rank is that token's rank among
    all ``W_E`` rows by cosine (0 = nearest), as the embedding lens reads it.

    Attributes:
        quantile_levels: The levels of the ``*_quantiles`` columns.
        cos_mean, cos_std: Exact mean and standard deviation of the cosine.
        cos_quantiles: Cosine quantiles, resolved to the 0.001-wide bins of ``cos_hist``.
        cos_hist: ``[entry, 2000]`` counts of the cosine in equal bins over ``[-1, 1]``.
        rank_mean, rank_quantiles: Exact mean and quantiles (``inverted_cdf``) of the rank.
        rank0_fraction: Fraction of positions whose own token is the nearest.
        rank_hist: Counts of each rank.
        n_cos, n_rank: Positions in the cosine and the rank statistics.
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

        def quantiles(name: str, values: Tensor) -> dict:
            return {f"{name}_q{round(100 * q):02d}": values[:, i] for i, q in enumerate(self.quantile_levels)}

        return label_frame(self.labels, {
            "cos_mean": self.cos_mean, "cos_std": self.cos_std, **quantiles("cos", self.cos_quantiles),
            "rank_mean": self.rank_mean, **quantiles("rank", self.rank_quantiles), "rank0_frac": self.rank0_fraction,
        })


@dataclass(frozen=True, eq=False)
class AlignmentResult:
    """The alignment suite's results, one row per residual-stack entry (``"0_pre"`` ... ``"final_post"``).

    Attributes:
        k: Subspace dimension of the angle and variance analyses.
        n_tokens: Positions that entered the statistics (after ``skip_positions``).
        center: Whether subspaces, variance fractions and Procrustes used centred data.
        standardized: Whether CKA and Procrustes used per-dimension z-scored data.
        angles, variance, cka, procrustes, drift: The five analyses.
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
        parts = (self.angles, self.variance, self.cka, self.procrustes, self.drift)
        return pd.concat([part.to_dataframe() for part in parts], axis=1)
