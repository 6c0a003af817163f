"""Views: lens readouts and alignment results as CircuitsVis-style HTML, in a notebook or a saved page.

Every function returns an :class:`HTMLView` (a CircuitsVis ``RenderedHTML``); ``view.save("grid.html")``
writes one self-contained page. The JavaScript (built from ``js/`` into ``static/views.iife.js``) is inlined,
and saved pages forbid any fetch by their Content-Security-Policy.

Example:
    >>> import tl_latentspaces as tll
    >>> model = tll.load_default_model()  # doctest: +SKIP
    >>> results = tll.read_lenses(model, "The Eiffel Tower is in the city of", targets=" Paris")  # doctest: +SKIP
    >>> tll.lens_grid(results).save("eiffel.html")  # doctest: +SKIP
"""

from tl_latentspaces.views.data import Selector
from tl_latentspaces.views.figures import cka_matrix_view, layer_curves_view, nice_ticks
from tl_latentspaces.views.lens_grid import COMPACT_FROM, lens_grid
from tl_latentspaces.views.render import BUNDLE, BUNDLE_GLOBAL, PAGE_CSP, HTMLView, bundle_source, one_bundle_per_page
from tl_latentspaces.views.scales import colour_range, embedding_entry_is_apart
from tl_latentspaces.views.tokens import TokenText, drift_tokens, layer_predictions

__all__ = [
    "HTMLView", "lens_grid", "drift_tokens", "layer_predictions", "cka_matrix_view", "layer_curves_view",
    "TokenText", "bundle_source", "one_bundle_per_page", "colour_range", "embedding_entry_is_apart", "nice_ticks",
    "BUNDLE", "BUNDLE_GLOBAL", "COMPACT_FROM", "PAGE_CSP", "Selector",
]
