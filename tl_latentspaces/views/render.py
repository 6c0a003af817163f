"""How a view becomes HTML: the :class:`HTMLView` and the inlined bundle of our components.

A view is rendered as CircuitsVis renders its components, ``<div id=...>`` plus a script calling
``TLLatentSpaces.render(id, TLLatentSpaces.Component, props)``, with the bundle inlined in a script
of its own: nothing is fetched from the network, in a notebook or in a saved page, and a page of
several views keeps one copy of each bundle (:func:`one_bundle_per_page`).
"""

from __future__ import annotations

import html
import json
import os
import uuid
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from circuitsvis.utils.render import RenderedHTML, render_cdn

from tl_latentspaces.files import write_bytes_atomic

BUNDLE = "views.iife.js"
"""The bundle's file name under ``tl_latentspaces/static/``."""
BUNDLE_GLOBAL = "TLLatentSpaces"
"""The global the bundle defines (CircuitsVis's is ``CircuitsVis``)."""

# Saved pages may run their inline scripts and styles and nothing else: no request of any kind
# leaves the page (a view that tried would fail its browser test with a CSP error).
PAGE_CSP = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; font-src data:"


# ====================================================================== the view object
class HTMLView(RenderedHTML):
    """A CircuitsVis ``RenderedHTML`` that renders offline and never probes the network.

    Notebooks (Jupyter, VS Code, Colab) call ``_repr_html_`` and get the view with its script
    inlined, online or offline. ``str(view)`` is the same inlined HTML (CircuitsVis's ``str()``
    imports its script from a CDN instead); ``show_code()`` still gives CircuitsVis's CDN
    version for the views built on CircuitsVis's own components.

    Attributes:
        local_src: The HTML fragment with its JavaScript inlined.
        cdn_src: CircuitsVis's CDN fragment for CircuitsVis components; for our own components
            (no CDN hosts them) the same as ``local_src``.
        title: The saved page's title.
        component: The React component drawn (``"LensGrid"``, ``"TokenDrift"``,
            ``"MatrixHeatmap"``, ``"LayerCurves"``, ``"TokenLogProbs"``), or None for HTML put
            together from several views.
        props: The data the component receives, as plain Python lists and numbers.
    """

    def __init__(
        self,
        local_src: str,
        cdn_src: Optional[str] = None,
        *,
        title: str = "",
        component: Optional[str] = None,
        props: Optional[dict[str, Any]] = None,
    ):
        super().__init__(local_src, local_src if cdn_src is None else cdn_src)
        self.title = title
        self.component = component
        self.props = props

    @property
    def svg(self) -> str:
        """Removed: the figures are components of the bundle, drawn in the browser."""
        raise AttributeError(
            "HTMLView.svg is gone: cka_matrix_view and layer_curves_view now render the bundle's "
            "MatrixHeatmap and LayerCurves components, drawn by the browser. Their data is in "
            "view.props; view.save(path) writes a page that opens offline."
        )

    def _repr_html_(self) -> str:
        # The inlined source, always: CircuitsVis's version probes the internet first.
        return self.local_src

    def __html__(self) -> str:
        return self.local_src

    def __str__(self) -> str:
        return self.local_src

    def __repr__(self) -> str:
        kind = self.component or "HTML"
        return f"<HTMLView {kind}{': ' + self.title if self.title else ''} ({len(self.local_src):,} chars)>"

    def to_html(self) -> str:
        """One complete, self-contained HTML page holding the view."""
        return (
            "<!DOCTYPE html>\n"
            '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta http-equiv="Content-Security-Policy" content="{PAGE_CSP}">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(self.title or 'tl_latentspaces view')}</title>\n"
            "</head>\n<body style=\"background: white; margin: 8px;\">\n"
            f"{self.local_src}\n"
            "</body>\n</html>\n"
        )

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write :meth:`to_html` to ``path`` atomically; returns the path.

        The page is written to a temporary file in the same folder, then moved over ``path``,
        so a reader never sees half a page and an existing file survives a failed write.
        """
        return write_bytes_atomic(path, self.to_html().encode("utf-8"), make_parents=False)


# ====================================================================== our own components
def bundle_source() -> str:
    """The JavaScript bundle of our components, as shipped in the package."""
    ref = resources.files("tl_latentspaces").joinpath("static", BUNDLE)
    try:
        text = ref.read_text(encoding="utf-8")
    except FileNotFoundError as err:  # pragma: no cover - a broken install
        raise RuntimeError(
            f"tl_latentspaces/static/{BUNDLE} is missing from the installed package; reinstall "
            "tl_latentspaces, or in a checkout build it with `cd js && npm ci && npm run build`."
        ) from err
    if "</script" in text.lower():  # pragma: no cover - guarded by a test
        raise RuntimeError(f"{BUNDLE} contains '</script' and cannot be inlined in a page.")
    return text


def js_json(value: Any) -> str:
    """JSON that is safe inside an inline ``<script>``: no ``</script>``, no ``<!--``."""
    text = json.dumps(value, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def circuitsvis_bundle_source() -> str:
    """CircuitsVis's own JavaScript bundle, as its package ships it, ready to inline in a page.

    Its one ``</script`` (inside a JavaScript string of React DOM) is written ``<\\/script``, the
    same string to JavaScript, so that it cannot end the page's script element.
    """
    ref = resources.files("circuitsvis").joinpath("dist", "cdn", "iife.js")
    return ref.read_text(encoding="utf-8").replace("</script", "<\\/script")


def bundle_script(circuitsvis: bool = False) -> str:
    """The ``<script>`` element that defines a bundle's global (ours, or CircuitsVis's).

    A classic script, so the bundle's ``var`` becomes a page global: every view carries it (a
    notebook cell stands alone), and :func:`one_bundle_per_page` keeps only the first copy when
    several views share a page.
    """
    return f"<script>\n{circuitsvis_bundle_source() if circuitsvis else bundle_source()}\n</script>\n"


def one_bundle_per_page(fragments: Sequence[str]) -> str:
    """Views' HTML joined into one page body, each bundle's script kept once (where it first appears).

    Every view carries its bundle so that it stands alone; a page of eleven views would otherwise
    hold eleven copies of the same 170 KB. Later copies are dropped whole: the global defined by
    the first is what the later views' render calls find.
    """
    seen: set[str] = set()
    out = []
    for fragment in fragments:
        for script in (bundle_script(False), bundle_script(True)):
            if script in fragment:
                if script in seen:
                    fragment = fragment.replace(script, "")
                else:
                    seen.add(script)
                    head, _, tail = fragment.partition(script)
                    fragment = head + script + tail.replace(script, "")
        out.append(fragment)
    return "\n".join(out)


def render_component(component: str, props: dict[str, Any], *, title: str, circuitsvis: bool = False) -> HTMLView:
    """Render a component the way CircuitsVis's ``render_local`` does, offline: one renderer.

    Args:
        component: The component's name in its bundle (``"LensGrid"``, ``"TokenLogProbs"``).
        props: Its props (plain lists and numbers); written as script-safe JSON.
        title: The view's title (of a saved page).
        circuitsvis: A component of CircuitsVis's own bundle (shipped in the ``circuitsvis``
            package), rendered through its ``CircuitsVis.render``; ``show_code()`` then gives
            CircuitsVis's CDN version. Else one of ours.
    """
    prefix, name = ("circuits-vis-", "CircuitsVis") if circuitsvis else ("tl-latentspaces-", BUNDLE_GLOBAL)
    uid = prefix + uuid.uuid4().hex[:13]
    src = (
        f'<div id="{uid}" style="margin: 15px 0;"></div>\n'
        f"{bundle_script(circuitsvis)}"
        f'<script>\n{name}.render(\n  "{uid}",\n  {name}.{component},\n  {js_json(props)}\n)\n</script>'
    )
    cdn = render_cdn(component, **props) if circuitsvis else None
    return HTMLView(src, cdn, title=title, component=component, props=props)
