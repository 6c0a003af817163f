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
float64 statistics whose size does not depend on the number of tokens, in one
:class:`~tl_latentspaces.stats.Moments` store; it merges (``merge``) and checkpoints
(``state_dict``) for :class:`~tl_latentspaces.runner.CorpusRunner` and multi-process runs.
:func:`alignment_suite` runs the whole suite on a model and a corpus; :func:`alignment_from_cache`
on a cache the user already has.

Modules: ``options`` (checked settings), ``accumulator`` (the streaming fitter), ``analysis``
(statistics -> results, plain functions of :mod:`tl_latentspaces.stats`), ``results`` (the frozen
dataclasses), ``suite`` (the entry points).

Example:
    >>> import tl_latentspaces as tll
    >>> model = tll.load_default_model()  # doctest: +SKIP
    >>> result = tll.alignment_suite(model, max_tokens=4096)  # doctest: +SKIP
    >>> result.to_dataframe()[["cka_embed", "var_embed", "var_null_mean", "cos_mean"]]  # doctest: +SKIP
"""

from tl_latentspaces.alignment.accumulator import DEFAULT_QUANTILES, AlignmentAccumulator
from tl_latentspaces.alignment.results import (
    AlignmentResult,
    CKAResult,
    ProcrustesErrors,
    SubspaceAngles,
    TokenDrift,
    VarianceFractions,
)
from tl_latentspaces.alignment.suite import alignment_from_cache, alignment_suite

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
