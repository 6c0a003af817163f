"""The tuned lens's public names in one place; the module is callable as :func:`tuned_lens`.

Nothing in the package imports this module (no import circle).
"""

from __future__ import annotations

import sys
from typing import Any, Optional

from tl_latentspaces.cached_lenses import DEFAULT_FIT, default_lens_dir, default_tuned_lens, tuned_lens_for
from tl_latentspaces.fitting import fit_tuned_lens
from tl_latentspaces.lenses import read_lenses
from tl_latentspaces.model import ModelIdentity
from tl_latentspaces.translators import CONFIG_FILE, PARAMS_FILE, PKG_CONFIG_FILE, PKG_PARAMS_FILE, TunedLens

__all__ = ["CONFIG_FILE", "DEFAULT_FIT", "ModelIdentity", "PARAMS_FILE", "PKG_CONFIG_FILE", "PKG_PARAMS_FILE",
           "TunedLens", "default_lens_dir", "default_tuned_lens", "fit_tuned_lens", "tuned_lens", "tuned_lens_for"]


def tuned_lens(model: Any, input: Any, lens: Optional[TunedLens] = None, *, top_k: int = 5, targets: Any = None,
               prepend_bos: bool = True, cache: Any = None, layers: Any = None, pos: Any = None,
               chunk_rows: int = 256) -> Any:
    """Read every residual-stack entry through a tuned lens: a ``LensResult`` named ``"tuned"``.

    Labels, arguments and result are those of :func:`~tl_latentspaces.logit_lens`; ``final_post`` has no
    translator, so it reproduces the model's own prediction. ``lens`` must be fitted for ``model``; None reads
    the default model's cached lens (:func:`default_tuned_lens`, fitted on first use).

    Example:
        >>> import tl_latentspaces as tll
        >>> model = tll.load_default_model()  # doctest: +SKIP
        >>> r = tll.tuned_lens(model, "The Eiffel Tower is in the city of", targets=" Paris")  # doctest: +SKIP
        >>> r.summary()  # doctest: +SKIP
    """
    if lens is None:
        lens = default_tuned_lens(model)
    if not isinstance(lens, TunedLens):
        raise ValueError(f"lens must be a tl_latentspaces.TunedLens, got {type(lens).__name__}. Fit one with "
                         "tl_latentspaces.fit_tuned_lens(model, corpus) or load one with TunedLens.load(path, model).")
    return read_lenses(model, input, lenses=(lens,), top_k=top_k, targets=targets, prepend_bos=prepend_bos,
                       cache=cache, layers=layers, pos=pos, chunk_rows=chunk_rows)["tuned"]


class _CallableModule(type(sys.modules[__name__])):
    """Makes the module callable as :func:`tuned_lens`."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return tuned_lens(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
