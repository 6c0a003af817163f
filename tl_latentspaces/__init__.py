"""tl_latentspaces: watch the residual stream drift away from the embedding space.

Read every layer of a TransformerLens model (``HookedTransformer`` or ``TransformerBridge``)
through the logit lens, the embedding lens, tuned lenses and Jacobian lenses, compare the residual stream's
subspaces with those of ``W_E`` and ``W_U``, and see it all in CircuitsVis views.
"""

from tl_latentspaces.alignment import AlignmentAccumulator, AlignmentResult, alignment_from_cache, alignment_suite
from tl_latentspaces.stats import linear_cka, principal_angles, procrustes
from tl_latentspaces.default_model import default_cache_dir, load_default_model, load_model
from tl_latentspaces.evaluation import LensEvalAccumulator, LensEvaluation, evaluate_lenses
from tl_latentspaces.fitting import fit_tuned_lens
from tl_latentspaces.hooks import HookSession, hook_counts
from tl_latentspaces.jacobian_lens import JacobianLens, fit_jacobian_lens
from tl_latentspaces.lenses import (
    CenteredEmbeddingLens,
    EmbeddingLens,
    Lens,
    LensSession,
    LogitLens,
    centered_embedding_lens,
    embedding_lens,
    lens_session,
    logit_lens,
    read_lenses,
)
from tl_latentspaces.model import ModelAccess
from tl_latentspaces.results import LensDiff, LensResult
from tl_latentspaces.runner import CorpusRunner
from tl_latentspaces.cached_lenses import default_tuned_lens, tuned_lens_for
from tl_latentspaces.translators import TunedLens

# `tl_latentspaces.tuned_lens` is the submodule, made callable: tuned_lens(model, input, lens).
from tl_latentspaces import tuned_lens  # noqa: E402,F401
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
    "AlignmentAccumulator",
    "AlignmentResult",
    "CorpusRunner",
    "LensEvaluation",
    "TunedLens",
    "JacobianLens",
    "fit_jacobian_lens",
    "alignment_from_cache",
    "alignment_suite",
    "default_tuned_lens",
    "tuned_lens_for",
    "evaluate_lenses",
    "LensEvalAccumulator",
    "fit_tuned_lens",
    "linear_cka",
    "load_model",
    "principal_angles",
    "procrustes",
    "tuned_lens",
    "HTMLView",
    "cka_matrix_view",
    "drift_tokens",
    "layer_curves_view",
    "layer_predictions",
    "lens_grid",
    "EmbeddingLens",
    "CenteredEmbeddingLens",
    "centered_embedding_lens",
    "HookSession",
    "LensDiff",
    "Lens",
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
