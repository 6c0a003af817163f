"""Lenses and the calls that read a model through them.

* :class:`LogitLens`: the model's own readout, ``ln_final(x) @ W_U + b_U``;
* :class:`EmbeddingLens`: cosine with every token's *input* embedding, as ``softmax(cos * sqrt(d_model) / T)``
  (a random direction has cosine std ``1/sqrt(d_model)``: flat for noise, sharp on one token's embedding);
* :class:`CenteredEmbeddingLens` (from :func:`centered_embedding_lens`): the same after subtracting the
  stream's mean per entry, read as ``"embedding_centered"``.

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
