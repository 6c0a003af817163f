"""tl_latentspaces: watch the residual stream drift away from the embedding space.

Read every layer of a TransformerLens model (``HookedTransformer`` or ``TransformerBridge``)
through the logit lens, the embedding lens and tuned lenses, compare the residual stream's
subspaces with those of ``W_E`` and ``W_U``, and see it all in CircuitsVis views.
"""

from tl_latentspaces.default_model import default_cache_dir, load_default_model
from tl_latentspaces.hooks import HookSession, hook_counts
from tl_latentspaces.lenses import (
    EmbeddingLens,
    LensSession,
    LogitLens,
    embedding_lens,
    lens_session,
    logit_lens,
    read_lenses,
)
from tl_latentspaces.model import ModelAccess
from tl_latentspaces.results import LensDiff, LensResult
from tl_latentspaces.views import (
    HTMLView,
    cka_matrix_view,
    drift_tokens,
    layer_curves_view,
    layer_predictions,
    lens_grid,
)

__version__ = "0.1.0"

__all__ = [
    "HTMLView",
    "cka_matrix_view",
    "drift_tokens",
    "layer_curves_view",
    "layer_predictions",
    "lens_grid",
    "EmbeddingLens",
    "HookSession",
    "LensDiff",
    "LensResult",
    "LensSession",
    "LogitLens",
    "ModelAccess",
    "default_cache_dir",
    "embedding_lens",
    "hook_counts",
    "lens_session",
    "load_default_model",
    "logit_lens",
    "read_lenses",
]
