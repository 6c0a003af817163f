"""Lenses and the calls that read a model through them.

A lens maps a residual vector to vocabulary scores:

* :class:`LogitLens`: the model's own readout, ``ln_final(x) @ W_U + b_U``, with the final norm
  applied exactly as the model applies it;
* :class:`EmbeddingLens`: the residual against the *input* embedding ``W_E``: cosine similarity
  with every token's embedding. Its distribution is ``softmax(cos * sqrt(d_model) / T)``: a random
  direction has cosine of standard deviation ``1/sqrt(d_model)`` with any embedding, so the scores
  are cosines in units of chance and the default temperature ``T = 1`` gives a distribution that
  is flat for noise and sharp for a vector that sits on one token's embedding;
* :class:`CenteredEmbeddingLens` (from :func:`centered_embedding_lens`): the same cosine after the
  residual stream's mean at each entry (estimated on a corpus) is subtracted, read as
  ``"embedding_centered"`` beside the plain lens. Where the stream has a large mean direction,
  the plain cosine measures mostly that direction.

Data flows one way: model + input -> residual stack (from hooks or a cache) -> lens ->
:mod:`~tl_latentspaces.readout` -> :class:`~tl_latentspaces.results.LensResult`.

Example:
    >>> import tl_latentspaces as tll
    >>> model = tll.load_default_model()  # doctest: +SKIP
    >>> result = tll.logit_lens(model, "The Eiffel Tower is in the city of", top_k=5)  # doctest: +SKIP
    >>> result.top_tokens()[-1][0][-1]  # doctest: +SKIP
    ' Paris'
"""

from tl_latentspaces.lenses.embedding import CenteredEmbeddingLens, EmbeddingLens, centered_embedding_lens
from tl_latentspaces.lenses.protocol import Lens, LogitLens, TranslatedLens
from tl_latentspaces.lenses.reading import (
    LensSession,
    build_lenses,
    embedding_lens,
    lens_session,
    logit_lens,
    read_lenses,
)

__all__ = [
    "Lens",
    "TranslatedLens",
    "LogitLens",
    "EmbeddingLens",
    "CenteredEmbeddingLens",
    "centered_embedding_lens",
    "logit_lens",
    "embedding_lens",
    "read_lenses",
    "LensSession",
    "lens_session",
    "build_lenses",
]
