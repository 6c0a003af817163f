"""How a view becomes HTML: a ``<div>`` plus a script calling ``TLLatentSpaces.render(id, Component, props)``, as
CircuitsVis renders its components, with the bundle inlined in a script of its own (:class:`HTMLView`)."""

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

# Saved pages may run their inline scripts and styles and nothing else: no request leaves the page.
PAGE_CSP = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; font-src data:"


class HTMLView(RenderedHTML):
    """A CircuitsVis ``RenderedHTML`` that renders offline and never probes the network.

    ``local_src`` (also ``str(view)``) is the HTML with its JavaScript inlined; ``cdn_src`` is CircuitsVis's CDN
    fragment for its own components, else the same. ``component`` names the React component (None for joined
    views), ``props`` its data as plain lists and numbers.
    """

    def __init__(self, local_src: str, cdn_src: Optional[str] = None, *, title: str = "",
                 component: Optional[str] = None, props: Optional[dict[str, Any]] = None):
        super().__init__(local_src, local_src if cdn_src is None else cdn_src)
        self.title = title
        self.component = component
        self.props = props

    @property
    def svg(self) -> str:
        """Removed: the figures are components of the bundle, drawn in the browser."""
        raise AttributeError("HTMLView.svg is gone: cka_matrix_view and layer_curves_view now render the bundle's "
                             "MatrixHeatmap and LayerCurves components, drawn by the browser. Their data is in "
                             "view.props; view.save(path) writes a page that opens offline.")

    def _repr_html_(self) -> str:
        return self.local_src

    __html__ = __str__ = _repr_html_

    def __repr__(self) -> str:
        title = f": {self.title}" if self.title else ""
        return f"<HTMLView {self.component or 'HTML'}{title} ({len(self.local_src):,} chars)>"

    def to_html(self) -> str:
        """One complete, self-contained HTML page holding the view."""
        return ('<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
                f'<meta http-equiv="Content-Security-Policy" content="{PAGE_CSP}">\n'
                '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
                f"<title>{html.escape(self.title or 'tl_latentspaces view')}</title>\n"
                f'</head>\n<body style="background: white; margin: 8px;">\n{self.local_src}\n</body>\n</html>\n')

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write :meth:`to_html` to ``path`` atomically (an existing file survives a failed write); returns the path."""
        return write_bytes_atomic(path, self.to_html().encode("utf-8"), make_parents=False)


def bundle_source() -> str:
    """The JavaScript bundle of our components, as shipped in the package."""
    try:
        text = resources.files("tl_latentspaces").joinpath("static", BUNDLE).read_text(encoding="utf-8")
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
    """CircuitsVis's own bundle, as its package ships it, with ``</script`` written ``<\\/script`` to inline it."""
    text = resources.files("circuitsvis").joinpath("dist", "cdn", "iife.js").read_text(encoding="utf-8")
    return text.replace("</script", "<\\/script")


def bundle_script(circuitsvis: bool = False) -> str:
    """The classic ``<script>`` element that defines a bundle's page global (ours, or CircuitsVis's)."""
    return f"<script>\n{circuitsvis_bundle_source() if circuitsvis else bundle_source()}\n</script>\n"


def one_bundle_per_page(fragments: Sequence[str]) -> str:
    """Views' HTML joined into one page body, each bundle's script kept once (where it first appears)."""
    scripts = (bundle_script(False), bundle_script(True))
    seen: set[str] = set()
    out = []
    for fragment in fragments:
        for script in scripts:
            if script in fragment:
                head, _, tail = fragment.partition(script)
                fragment = head + ("" if script in seen else script) + tail.replace(script, "")
                seen.add(script)
        out.append(fragment)
    return "\n".join(out)


def render_component(component: str, props: dict[str, Any], *, title: str, circuitsvis: bool = False) -> HTMLView:
    """Render a component as CircuitsVis's ``render_local`` does, offline; ``circuitsvis``: one of CircuitsVis's."""
    if not isinstance(title, str):
        raise TypeError(f"a view's title must be a string, got {type(title).__name__} ({title!r:.80}).")
    prefix, name = ("circuits-vis-", "CircuitsVis") if circuitsvis else ("tl-latentspaces-", BUNDLE_GLOBAL)
    uid = prefix + uuid.uuid4().hex[:13]
    src = (f'<div id="{uid}" style="margin: 15px 0;"></div>\n{bundle_script(circuitsvis)}'
           f'<script>\n{name}.render(\n  "{uid}",\n  {name}.{component},\n  {js_json(props)}\n)\n</script>')
    cdn = render_cdn(component, **props) if circuitsvis else None
    return HTMLView(src, cdn, title=title, component=component, props=props)
