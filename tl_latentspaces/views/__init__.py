"""Views: lens readouts and alignment results as CircuitsVis-style HTML, in a notebook or a saved page.

Every function here returns an :class:`HTMLView`, a subclass of CircuitsVis's ``RenderedHTML``:
a notebook displays it like any CircuitsVis component, and ``view.save("grid.html")`` writes one
self-contained page. Unlike CircuitsVis, nothing here ever touches the network: the JavaScript is
always inlined (CircuitsVis's ``_repr_html_`` probes the internet on every display and then
imports its script from a CDN; ours never does), and saved pages forbid fetching by their
Content-Security-Policy.

* :func:`lens_grid`: the layer x position grid of a lens's top-1 tokens (our own React component,
  shipped as ``tl_latentspaces/static/views.iife.js``, built from ``js/``), with a lens switch, a
  metric switch, top-k on hover and a difference mode for two runs.
* :func:`drift_tokens`: one per-token metric across layers (own-token cosine, KL to final, ...)
  with our ``TokenDrift`` component.
* :func:`layer_predictions`: one layer's next-token predictions with CircuitsVis's
  ``TokenLogProbs``.
* :func:`cka_matrix_view`, :func:`layer_curves_view`: figures of alignment results (our
  ``MatrixHeatmap`` and ``LayerCurves`` components), with values on hover.

One module per component, as CircuitsVis has: ``render`` (the view object and the bundle),
``lens_grid``, ``tokens`` (token text, drift, predictions), ``figures``; ``scales`` holds the
colour ranges and metric names, ``data`` the conversions from result tensors.

Example:
    >>> import tl_latentspaces as tll
    >>> model = tll.load_default_model()  # doctest: +SKIP
    >>> results = tll.read_lenses(model, "The Eiffel Tower is in the city of", targets=" Paris")  # doctest: +SKIP
    >>> grid = tll.lens_grid(results)  # doctest: +SKIP
    >>> grid.save("eiffel.html")  # doctest: +SKIP
"""

from tl_latentspaces.views.data import Selector
from tl_latentspaces.views.figures import cka_matrix_view, layer_curves_view, nice_ticks
from tl_latentspaces.views.lens_grid import COMPACT_FROM, lens_grid
from tl_latentspaces.views.render import BUNDLE, BUNDLE_GLOBAL, PAGE_CSP, HTMLView, bundle_source, one_bundle_per_page
from tl_latentspaces.views.scales import colour_range, embedding_entry_is_apart
from tl_latentspaces.views.tokens import TokenText, drift_tokens, layer_predictions

__all__ = [
    "HTMLView",
    "lens_grid",
    "drift_tokens",
    "layer_predictions",
    "cka_matrix_view",
    "layer_curves_view",
    "TokenText",
    "bundle_source",
    "one_bundle_per_page",
    "colour_range",
    "embedding_entry_is_apart",
    "nice_ticks",
    "BUNDLE",
    "BUNDLE_GLOBAL",
    "COMPACT_FROM",
    "PAGE_CSP",
    "Selector",
]
