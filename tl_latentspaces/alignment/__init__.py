"""Subspace alignment of the residual stream with the embedding space, streamed over a corpus.

At every residual-stack entry: principal angles and variance fractions of the top-``k`` subspaces
against ``W_E`` / ``W_U`` and random-subspace nulls, linear CKA (biased and debiased), Procrustes
errors, and each position's cosine and embedding-lens rank to its own token (``docs/alignment.md``).
:func:`alignment_suite` runs over a corpus, :func:`alignment_from_cache` over an ``ActivationCache``.
"""

from tl_latentspaces.alignment.accumulator import DEFAULT_QUANTILES, AlignmentAccumulator
from tl_latentspaces.alignment.results import (
    AlignmentResult, CKAResult, ProcrustesErrors, SubspaceAngles, TokenDrift, VarianceFractions,
)
from tl_latentspaces.alignment.suite import alignment_from_cache, alignment_suite

__all__ = [
    "AlignmentAccumulator", "AlignmentResult", "SubspaceAngles", "VarianceFractions", "CKAResult", "ProcrustesErrors",
    "TokenDrift", "alignment_suite", "alignment_from_cache", "DEFAULT_QUANTILES",
]
