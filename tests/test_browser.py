"""The views in a real browser: headless Chromium opens saved pages with the network off.

Needs the PyPI package ``playwright`` (its driver only: no browser download) and a Chromium
binary (Debian: ``apt-get install chromium``; elsewhere set ``TLL_CHROMIUM`` to one). Without
either, every test here is skipped with the reason. Each page must render with no console error,
no uncaught exception and no request other than the page's own file. Screenshots go to
``out/browser/`` (or ``$TLL_ARTIFACTS``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

import tl_latentspaces as tll
from tl_latentspaces import views

from conftest import EIFFEL, FLAVOURS
from test_views import byte_tokenizer

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # the unit tier runs without it
    sync_playwright = None

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("TLL_ARTIFACTS", REPO / "out" / "browser"))
# As root, Chromium needs --no-sandbox; the rest keeps it from phoning home (which, offline,
# floods the log with refused connections).
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
]
POSITIVE = (30, 136, 229)  # js/src/colors.ts POSITIVE
NEGATIVE = (216, 27, 96)  # js/src/colors.ts NEGATIVE
DOCS_IMG = REPO / "docs" / "img"
TARGETS = [5, 7]


def _chromium() -> str | None:
    if os.environ.get("TLL_CHROMIUM"):
        return os.environ["TLL_CHROMIUM"] if os.path.exists(os.environ["TLL_CHROMIUM"]) else None
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def browser():
    if sync_playwright is None:
        pytest.skip("the Python package playwright is not installed (pip install playwright; no browser download needed)")
    exe = _chromium()
    if exe is None:
        pytest.skip("no Chromium binary found (apt-get install chromium, or set TLL_CHROMIUM)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


class Page:
    """A saved view opened offline; records console errors, uncaught exceptions and requests."""

    def __init__(self, browser, path: Path, width: int = 1400, height: int = 1000):
        self.problems: list[str] = []
        self.context = browser.new_context(offline=True, viewport={"width": width, "height": height})
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.on("console", lambda m: self.problems.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.problems.append(f"uncaught: {e}"))
        self.page.on("requestfailed", lambda r: self.problems.append(f"request failed: {r.url}"))
        self.url = path.resolve().as_uri()
        self.page.goto(self.url)

    def _route(self, route):
        if route.request.url == self.url:
            route.continue_()
        else:
            self.problems.append(f"request: {route.request.url}")
            route.abort()

    def assert_clean(self) -> None:
        assert self.problems == [], "\n".join(self.problems)

    def cells(self, root: str = "") -> list[tuple[int, int, str]]:
        return self.page.eval_on_selector_all(
            f"{root} [data-testid=cell]".strip(),
            "els => els.map(e => [+e.dataset.entry, +e.dataset.pos,"
            " e.querySelector('[data-testid=cell-token]').textContent])",
        )

    def cell(self, e: int, p: int, root: str = ""):
        return self.page.locator(f'{root} [data-testid=cell][data-entry="{e}"][data-pos="{p}"]'.strip())

    def topk(self) -> list[list[tuple[str, str]]]:
        """The details panel's top-k tables: per table, (token, probability text) rows."""
        return self.page.eval_on_selector_all(
            "[data-testid=topk]",
            "els => els.map(t => [...t.querySelectorAll('[data-testid=topk-row]')].map(r =>"
            " [r.querySelector('[data-testid=topk-token]').textContent,"
            " r.querySelector('[data-testid=topk-prob]').textContent]))",
        )

    def background(self, e: int, p: int) -> tuple[int, ...]:
        css = self.cell(e, p).evaluate("el => getComputedStyle(el).backgroundColor")
        return tuple(int(x) for x in re.findall(r"\d+", css)[:3])

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / name
        self.page.screenshot(path=str(path), full_page=True)
        return path


@pytest.fixture
def open_page(browser):
    pages: list[Page] = []

    def opener(path: Path, **kwargs) -> Page:
        page = Page(browser, path, **kwargs)
        pages.append(page)
        return page

    yield opener
    for page in pages:
        page.context.close()
    for page in pages:
        page.assert_clean()


JS_WHITESPACE = "\t\n\v\f\r \u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"


def shown(token: str) -> str:
    """What the grid draws for a token (js/src/LensGrid.tsx displayToken)."""
    if token == "":
        return "\u2205"
    s = token.replace("\r", "\u240d").replace("\n", "\u21b5").replace("\t", "\u21e5")
    if not all(c in JS_WHITESPACE for c in s):
        return s
    return "".join({" ": "\u2423", "\u00a0": "\u237d"}.get(c, "\u00b7") for c in s)


def expected_colour(value: float, metric: dict) -> tuple[int, ...]:
    """A metric's cell colour (js/src/colors.ts), written again from its definition."""
    squash = (lambda x: math.copysign(math.log1p(abs(x)), x)) if metric["log"] else (lambda x: x)  # noqa: E731
    lo, hi = squash(metric["min"]), squash(metric["max"])
    if metric["scale"] == "diverging":
        t = min(max(squash(value) / max(abs(lo), abs(hi)), -1.0), 1.0)
        t = -t if metric["reverse"] else t
    else:
        t = min(max((squash(value) - lo) / (hi - lo), 0.0), 1.0)
        t = 1 - t if metric["reverse"] else t
    colour = POSITIVE if t >= 0 else NEGATIVE
    return tuple(math.floor(255 + (c - 255) * abs(t) + 0.5) for c in colour)


def intensity_of(rgb: tuple[int, ...]) -> float:
    """The signed intensity a cell colour stands for: + blue, - red, 0 white."""
    r, g, b = rgb[:3]
    if b >= r:
        return (255 - r) / (255 - POSITIVE[0])
    return -(255 - g) / (255 - NEGATIVE[1])


def shown_number(value: float, unit: str = "") -> str:
    """js/src/format.ts formatNumber, for the legend."""
    a = abs(value)
    text = "0" if a == 0 else f"{value:.1f}" if a >= 100 else f"{value:.3f}" if a >= 0.01 else f"{value:.2g}"
    return text + (f" {unit}" if unit else "")


def _percent(text: str) -> float:
    return float(text.rstrip("%"))


def _model():
    return FLAVOURS[0][1]()


def _perturb(act, hook=None):
    return act + 3.0 * torch.sin(torch.arange(act.shape[-1], dtype=act.dtype))


@pytest.fixture(scope="module")
def runs():
    tokens = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(7))
    clean = tll.read_lenses(_model(), tokens, targets=TARGETS)
    patched_model = _model()
    patched_model.add_hook("blocks.1.hook_resid_post", _perturb)
    return clean, tll.read_lenses(patched_model, tokens, targets=TARGETS)


def _top1(r, b: int = 0) -> dict[tuple[int, int], str]:
    """Each cell's top-1 token as drawn (byte tokens as escapes: test_views checks TokenText)."""
    words = views.TokenText(r.decode)
    return {(e, p): shown(words.text(int(i))) for e, row in enumerate(r.top_ids[:, b, :, 0].tolist()) for p, i in enumerate(row)}


# ---------------------------------------------------------------------- lens grid
def test_grid_cells_and_lens_switch(open_page, runs, tmp_path):
    clean, _ = runs
    logit, emb = clean["logit"], clean["embedding"]
    E, _, P, _ = logit.top_ids.shape
    pg = open_page(views.lens_grid(clean).save(tmp_path / "grid.html"))
    pg.page.wait_for_selector("[data-testid=cell]")
    cells = pg.cells()
    assert len(cells) == E * P
    assert {(e, p) for e, p, _ in cells} == {(e, p) for e in range(E) for p in range(P)}
    assert {(e, p): text for e, p, text in cells} == _top1(logit)
    headers = pg.page.locator("[data-testid=row-header]").all_text_contents()
    assert headers == logit.labels
    columns = pg.page.locator("[data-testid=col-header]").all_text_contents()
    assert columns == [f"{p}{shown(t)}" for p, t in zip(logit.positions, logit.str_tokens[0])]

    assert _top1(emb) != _top1(logit)  # otherwise the switch could not show anything
    pg.page.click('[data-testid=lens-button][data-name="embedding"]')
    pg.page.wait_for_selector('[data-testid=lens-grid][data-lens="embedding"]')
    assert {(e, p): text for e, p, text in pg.cells()} == _top1(emb)
    assert pg.page.get_attribute('[data-testid=lens-button][data-name="embedding"]', "aria-pressed") == "true"
    # The embedding lens adds its own metrics; back on the logit lens they are gone again.
    metrics = pg.page.eval_on_selector_all("[data-testid=metric-button]", "els => els.map(e => e.dataset.value)")
    assert "own_cosine" in metrics and "own_rank" in metrics
    pg.page.click('[data-testid=lens-button][data-name="logit"]')
    assert {(e, p): text for e, p, text in pg.cells()} == _top1(logit)
    pg.assert_clean()


def test_whitespace_tokens_are_visible(open_page, runs, tmp_path):
    import dataclasses

    clean, _ = runs
    specials = ["\n", " ", "  ", "\u00a0", "", "a\tb", " Paris", "\r\n", "\u3000"]
    r = dataclasses.replace(clean["logit"], decode=lambda i: specials[int(i) % len(specials)])
    pg = open_page(views.lens_grid(r).save(tmp_path / "spaces.html"))
    pg.page.wait_for_selector("[data-testid=cell]")
    texts = {(e, p): t for e, p, t in pg.cells()}
    assert texts == _top1(r)
    assert all(t.strip() for t in texts.values())  # no cell looks empty
    assert [shown(t) for t in specials] == ["\u21b5", "\u2423", "\u2423\u2423", "\u237d", "\u2205", "a\u21e5b", " Paris",
                                            "\u240d\u21b5", "\u00b7"]
    pg.assert_clean()


def test_hover_and_click_show_topk(open_page, runs, tmp_path):
    clean, _ = runs
    r = clean["logit"]
    k = r.top_ids.shape[-1]
    pg = open_page(views.lens_grid(clean).save(tmp_path / "grid.html"))
    pg.page.wait_for_selector("[data-testid=cell]")
    assert "Hover over a cell" in pg.page.text_content("[data-testid=details]")

    def expected(e, p):
        return [shown(r.decode(int(i))) for i in r.top_ids[e, 0, p]], [100 * float(x) for x in r.top_probs[e, 0, p]]

    pg.cell(2, 4).hover()
    (table,) = pg.topk()
    tokens, probs = expected(2, 4)
    assert len(table) == k and [t for t, _ in table] == tokens
    assert [_percent(x) for _, x in table] == pytest.approx(probs, abs=0.051)
    details = pg.page.text_content("[data-testid=details]")
    assert details.startswith(f"{r.labels[2]} · position 4")
    assert "top-1 probability" in details
    pg.screenshot("lens_grid_tiny_hover.png")

    # Moving away clears it; a click keeps a cell shown until it is clicked again.
    pg.page.hover("[data-testid=legend]")
    assert pg.topk() == []
    pg.cell(3, 1).click()
    pg.page.hover("[data-testid=legend]")
    assert [t for t, _ in pg.topk()[0]] == expected(3, 1)[0]
    pg.cell(0, 0).hover()
    assert [t for t, _ in pg.topk()[0]] == expected(0, 0)[0]
    pg.cell(3, 1).click()
    pg.page.hover("[data-testid=legend]")
    assert pg.topk() == []
    pg.assert_clean()


def test_metric_switch_recolours(open_page, runs, tmp_path):
    clean, _ = runs
    view = views.lens_grid(clean)
    lens = view.props["lenses"][0]
    metric = {m["key"]: m for m in lens["metrics"]}
    pg = open_page(view.save(tmp_path / "grid.html"))
    pg.page.wait_for_selector("[data-testid=cell]")
    some = [(0, 0), (1, 3), (2, 8), (3, 5)]

    def check(key):
        m = metric[key]
        for e, p in some:
            got, want = pg.background(e, p), expected_colour(m["values"][e][p], m)
            assert all(abs(a - b) <= 1 for a, b in zip(got, want)), (key, e, p, got, want)

    check("top1_prob")
    assert pg.page.text_content("[data-testid=legend-max]") == f"{100 * metric['top1_prob']['max']:.1f}%"
    pg.page.click('[data-testid=metric-button][data-value="kl_to_final"]')
    check("kl_to_final")
    m = metric["kl_to_final"]
    assert pg.page.text_content("[data-testid=legend-max]") == shown_number(m["max"], "nats")
    assert pg.page.text_content("[data-testid=legend-range]") == f"({m['rangeNote']})"
    assert "log scale" in m["rangeNote"]
    assert pg.page.locator("[data-testid=legend-clip-high]").count() == int(m["clipHigh"])
    pg.page.click('[data-testid=metric-button][data-value="entropy"]')
    check("entropy")
    pg.page.click('[data-testid=metric-button][data-value="target1_prob"]')
    check("target1_prob")
    assert 'probability of the target "<7>"' in pg.page.text_content("[data-testid=legend]")
    pg.page.click('[data-testid=lens-button][data-name="embedding"]')
    pg.page.click('[data-testid=metric-button][data-value="own_cosine"]')
    own = {m["key"]: m for m in view.props["lenses"][1]["metrics"]}["own_cosine"]
    for e, p in some:
        got, want = pg.background(e, p), expected_colour(own["values"][e][p], own)
        assert all(abs(a - b) <= 1 for a, b in zip(got, want)), ("own_cosine", e, p, got, want)
    pg.assert_clean()


def test_difference_mode(open_page, runs, tmp_path):
    clean, patched = runs
    base, other = clean["logit"], patched["logit"]
    d = base.diff(other)
    pg = open_page(views.lens_grid(clean, patched, diff=True).save(tmp_path / "diff.html"))
    pg.page.wait_for_selector("[data-testid=cell]")
    assert pg.page.locator("[data-testid=view-button]").all_text_contents() == [
        "difference (patched − clean)", "clean", "patched"]
    assert {(e, p): t for e, p, t in pg.cells()} == _top1(other)
    changed = pg.page.eval_on_selector_all(
        "[data-testid=cell][data-changed=true]",
        "els => els.map(e => [+e.dataset.entry, +e.dataset.pos,"
        " e.querySelector('[data-testid=cell-base-token]').textContent])")
    want = {(e, p) for e, p in d.top1_changed[:, 0].nonzero().tolist()}
    assert want and {(e, p) for e, p, _ in changed} == want
    assert all(text == _top1(base)[(e, p)] for e, p, text in changed)
    # The struck-through base token is as large as the cell's own token, and dark.
    sizes = pg.page.eval_on_selector(
        "[data-testid=cell][data-changed=true]",
        "el => [el.querySelector('[data-testid=cell-token]'), el.querySelector('[data-testid=cell-base-token]')]"
        ".map(x => [parseFloat(getComputedStyle(x).fontSize), getComputedStyle(x).opacity])")
    assert sizes[0][0] == sizes[1][0] >= 12 and sizes[1][1] == "1"
    e, p = sorted(want)[0]
    pg.cell(e, p).hover()
    tables = pg.topk()
    assert [[t for t, _ in tab] for tab in tables] == [
        [shown(r.decode(int(i))) for i in r.top_ids[e, 0, p]] for r in (base, other)]
    assert pg.page.locator("[data-testid=topk]").evaluate_all("els => els.map(e => e.dataset.run)") == ["0", "1"]
    pg.screenshot("lens_grid_tiny_diff.png")
    pg.page.click('[data-testid=view-button][data-name="clean"]')
    assert {(e, p): t for e, p, t in pg.cells()} == _top1(base)
    assert pg.page.locator("[data-testid=cell][data-changed=true]").count() == 0
    pg.assert_clean()


def test_two_grids_and_other_views_share_a_notebook_page(open_page, runs, tmp_path):
    """Like notebook outputs: several views' HTML on one page, each rendering on its own."""
    clean, _ = runs
    ids = clean["logit"].tokens
    r = tll.logit_lens(_model(), ids, targets=ids.roll(-1, dims=1))
    fragments = [
        views.lens_grid(clean, title="first"),
        views.lens_grid(clean["embedding"], clean["logit"], title="second"),
        views.drift_tokens(clean["embedding"]),
        views.cka_matrix_view(torch.eye(4), clean["logit"].labels),
    ]
    page = views.HTMLView("\n".join(v._repr_html_() for v in fragments), title="notebook").to_html()
    path = tmp_path / "notebook.html"
    path.write_text(page, encoding="utf-8")
    pg = open_page(path)
    pg.page.wait_for_selector("[data-testid=cell]")
    roots = pg.page.locator("[data-testid=lens-grid-root]")
    assert roots.count() == 2
    E, _, P, _ = clean["logit"].top_ids.shape
    assert pg.page.locator("[data-testid=cell]").count() == 2 * E * P
    first, second = (f"#{roots.nth(i).evaluate('el => el.parentElement.id')}" for i in range(2))
    assert {(e, p): t for e, p, t in pg.cells(second)} == _top1(clean["embedding"])
    pg.page.click(f'{first} [data-testid=lens-button][data-name="embedding"]')
    assert {(e, p): t for e, p, t in pg.cells(first)} == _top1(clean["embedding"])
    assert {(e, p): t for e, p, t in pg.cells(second)} == _top1(clean["embedding"])  # untouched
    pg.page.click(f'{second} [data-testid=lens-button][data-name="logit"]')
    assert {(e, p): t for e, p, t in pg.cells(second)} == _top1(clean["logit"])
    assert pg.page.locator("[data-testid=matrix-cell]").count() == 16
    pg.assert_clean()


def test_views_on_one_page_keep_one_copy_of_each_bundle(open_page, runs, tmp_path):
    """A page of several views (the report's way) holds each bundle once, and every view still draws."""
    clean, _ = runs
    ids = clean["logit"].tokens
    r = tll.logit_lens(_model(), ids, targets=ids.roll(-1, dims=1))
    fragments = [
        views.lens_grid(clean, title="first"),
        views.drift_tokens(clean["embedding"]),
        views.cka_matrix_view(torch.eye(4), clean["logit"].labels),
        views.layer_predictions(r, "2_pre"),
        views.lens_grid(clean["embedding"], clean["logit"], title="second"),
        views.layer_curves_view(clean["logit"].labels[:4], {"a": [0.1, 0.2, 0.3, 0.4]}),
        views.layer_predictions(r, "final_post"),
    ]
    body = views.one_bundle_per_page([v.local_src for v in fragments])
    ours, theirs = views.bundle_source(), views.render.circuitsvis_bundle_source()
    assert body.count(ours) == 1 and body.count(theirs) == 1
    assert len(body) < len(ours) + len(theirs) + sum(len(v.local_src) for v in fragments) / 5  # the copies are gone
    path = tmp_path / "page.html"
    path.write_text(views.HTMLView(body, title="page").to_html(), encoding="utf-8")
    pg = open_page(path)
    pg.page.wait_for_selector("[data-testid=cell]")
    E, _, P, _ = clean["logit"].top_ids.shape
    assert pg.page.locator("[data-testid=lens-grid-root]").count() == 2
    assert pg.page.locator("[data-testid=cell]").count() == 2 * E * P
    assert pg.page.locator("[data-testid=matrix-cell]").count() == 16
    drawn = pg.page.evaluate(
        "() => Array.from(document.querySelectorAll('div[id^=circuits-vis-], div[id^=tl-latentspaces-]'))"
        ".map(d => [d.id.split('-')[0], d.childElementCount])"
    )
    assert sorted(kind for kind, _ in drawn) == ["circuits"] * 2 + ["tl"] * 5
    assert all(children > 0 for _, children in drawn), drawn  # every view drew into its own root
    pg.assert_clean()


def test_byte_tokens_ids_bos_compact_and_zoom(open_page, runs, tmp_path):
    clean, _ = runs
    tok, decode = byte_tokenizer()
    ids = [0] + tok("é🙂aï", add_special_tokens=False)["input_ids"]
    r = dataclasses.replace(clean["logit"], tokens=torch.tensor([ids, ids]), decode=decode)
    view = views.lens_grid(r)
    pg = open_page(view.save(tmp_path / "bytes.html"))
    pg.page.wait_for_selector("[data-testid=cell]")
    assert "\ufffd" not in pg.page.text_content("body")
    E = len(r.labels)
    # The BOS column is hidden at first; the toggle shows it.
    headers = pg.page.locator("[data-testid=col-header]")
    assert headers.all_text_contents() == [f"{p}{t}" for p, t in zip(range(1, 9), ["é", "🙂", "…🙂", "…🙂", "…🙂", "a", "ï", "…ï"])]
    assert pg.page.locator("[data-testid=cell]").count() == E * 8
    assert headers.nth(2).get_attribute("title") == f"id {ids[3]} · bytes 9F, part of “🙂”"
    pg.page.click("[data-testid=bos-button]")
    assert headers.count() == 9 and headers.first.text_content() == "0<bos>"
    assert pg.page.locator("[data-testid=cell]").count() == E * 9
    pg.page.click("[data-testid=bos-button]")
    assert headers.count() == 8
    # Ids on hover: the input token's and the top-k's.
    pg.cell(1, 2).hover()
    assert pg.page.text_content("[data-testid=details-token-id]").strip() == f"id {ids[2]}"
    assert pg.page.locator("[data-testid=topk-id]").all_text_contents() == [str(i) for i in r.top_ids[1, 0, 2].tolist()]
    assert pg.cell(1, 2).get_attribute("title").endswith(f"(id {int(r.top_ids[1, 0, 2, 0])})")
    # Compact mode and zoom size the columns (content width + padding + border).
    width = lambda: pg.cell(1, 2).bounding_box()["width"]  # noqa: E731
    assert pg.page.get_attribute("[data-testid=lens-grid]", "data-compact") == "false"
    assert width() == pytest.approx(76 + 8 + 1, abs=1.5)
    pg.page.click("[data-testid=compact-button]")
    assert width() == pytest.approx(34 + 4 + 1, abs=1.5)
    pg.page.locator("[data-testid=zoom]").fill("2")
    assert width() == pytest.approx(68 + 4 + 1, abs=1.5) and pg.page.text_content("[data-testid=zoom-value]") == "200%"
    pg.screenshot("lens_grid_tiny_bytes.png")
    pg.assert_clean()


def test_long_prompts_open_compact(open_page, runs, tmp_path):
    clean, _ = runs
    r = clean["logit"]
    n = views.COMPACT_FROM + 6
    tokens = torch.arange(n).remainder(100).expand(2, n)
    long = dataclasses.replace(r, tokens=tokens, positions=list(range(n)), mask=torch.ones(2, n, dtype=torch.bool),
                               **{f: getattr(r, f).repeat_interleave(4, dim=2)[:, :, :n] for f in (
                                   "top_ids", "top_probs", "top_scores", "entropy", "kl_to_final", "target_probs",
                                   "target_ranks")},
                               target_ids=r.target_ids.repeat_interleave(4, dim=1)[:, :n], final_top1=tokens)
    pg = open_page(views.lens_grid(long).save(tmp_path / "long.html"), width=1400)
    pg.page.wait_for_selector("[data-testid=cell]")
    assert pg.page.get_attribute("[data-testid=lens-grid]", "data-compact") == "true"
    compact = pg.page.locator("[data-testid=lens-grid]").bounding_box()["width"]
    pg.page.click("[data-testid=compact-button]")
    assert pg.page.get_attribute("[data-testid=lens-grid]", "data-compact") == "false"
    full = pg.page.locator("[data-testid=lens-grid]").bounding_box()["width"]
    assert compact < 0.5 * full
    pg.assert_clean()


def test_drift_view(open_page, runs, tmp_path):
    clean, _ = runs
    emb = clean["embedding"]
    own = torch.full_like(emb.own_scores, 0.05)
    own[0] = 1.0
    own[:, 0] += torch.linspace(-0.01, 0.01, own.shape[-1])
    own[2, 0] = torch.linspace(-0.5, 0.5, own.shape[-1])
    view = views.drift_tokens(dataclasses.replace(emb, own_scores=own))
    p = view.props
    m = p["metric"]
    assert p["initialEntry"] == 2
    pg = open_page(view.save(tmp_path / "drift.html"), width=1200, height=600)
    pg.page.wait_for_selector("[data-testid=drift-token]")
    assert pg.page.text_content("[data-testid=drift-title]") == p["title"]
    assert pg.page.text_content("[data-testid=drift-entry]") == emb.labels[2]
    assert pg.page.text_content("[data-testid=legend-name]") == "own-token cosine"
    assert "centred on 0" in pg.page.text_content("[data-testid=legend-range]")
    assert "0_pre" in m["rangeNote"]  # the entry of cosines 1 does not set the bounds

    def colours():
        return pg.page.eval_on_selector_all(
            "[data-testid=drift-token]", "els => els.map(e => getComputedStyle(e).backgroundColor)")

    def check(entry):
        got = [tuple(int(x) for x in re.findall(r"\d+", c)[:3]) for c in colours()]
        want = [expected_colour(v, m) for v in p["values"][entry]]
        assert all(abs(a - b) <= 1 for g, w in zip(got, want) for a, b in zip(g, w)), (entry, got, want)

    check(2)
    assert len({c for c in colours()}) == len(p["tokens"])  # a spread of colours, not a sign map
    pg.page.click('[data-testid=drift-entry-button][data-name="0_pre"]')
    assert pg.page.text_content("[data-testid=drift-entry]") == "0_pre"
    check(0)
    pg.page.locator("[data-testid=drift-slider]").fill("1")
    assert pg.page.text_content("[data-testid=drift-entry]") == "1_pre"
    check(1)
    pg.page.locator("[data-testid=drift-token]").nth(3).hover()
    values = pg.page.locator("[data-testid=drift-details-value]").all_text_contents()
    assert len(values) == len(emb.labels) and values[2] == f"{p['values'][2][3]:+.3f}"
    pg.screenshot("drift_tiny.png")
    pg.assert_clean()


# ---------------------------------------------------------------------- the other views
def test_circuitsvis_views_render_offline(open_page, runs, tmp_path):
    clean, _ = runs
    emb = clean["embedding"]
    pg = open_page(views.drift_tokens(emb).save(tmp_path / "drift.html"))
    pg.page.wait_for_selector("text=final_post")
    body = pg.page.text_content("body")
    assert all(label in body for label in emb.labels)
    assert all(tok in body for tok in emb.str_tokens[0])
    pg.assert_clean()

    ids = clean["logit"].tokens
    r = tll.logit_lens(_model(), ids, targets=ids.roll(-1, dims=1))
    pg = open_page(views.layer_predictions(r, "2_pre").save(tmp_path / "predictions.html"))
    pg.page.wait_for_selector(f"text={r.str_tokens[0][1]}")
    body = pg.page.text_content("body")
    assert all(tok in body for tok in r.str_tokens[0][1:])
    pg.assert_clean()


VIRIDIS = ["#440154", "#482475", "#414487", "#355f8d", "#2a788e", "#21918c",
           "#22a884", "#44bf70", "#7ad151", "#bddf26", "#fde725"]  # js/src/colors.ts VIRIDIS
MISSING = (229, 229, 229)  # js/src/colors.ts MISSING


def viridis(t: float) -> tuple[int, ...]:
    """js/src/colors.ts viridis, written again from its definition."""
    x = min(max(t, 0.0), 1.0) * (len(VIRIDIS) - 1)
    i = min(int(x), len(VIRIDIS) - 2)
    f = x - i
    a, b = ([int(h[k:k + 2], 16) for k in (1, 3, 5)] for h in VIRIDIS[i:i + 2])
    return tuple(math.floor(p + (q - p) * f + 0.5) for p, q in zip(a, b))


def _rgb(css: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", css)[:3])


def _lightness(rgb: tuple[int, ...]) -> float:
    r, g, b = rgb
    return 0.299 * r + 0.587 * g + 0.114 * b


def test_matrix_heatmap(open_page, tmp_path):
    labels = ["0_pre", "1_pre", "2_pre", "final_post"]
    m = torch.tensor([[1.0, 0.81, 0.52, float("nan")], [0.8, 1.0, 0.73, 0.41], [0.5, 0.7, 1.0, 0.62],
                      [0.02, 0.43, 0.64, 1.0]])
    view = views.cka_matrix_view(m, labels, title="CKA of four entries")
    pg = open_page(view.save(tmp_path / "cka.html"), width=700, height=500)
    pg.page.wait_for_selector("[data-testid=matrix-cell]")
    assert pg.page.text_content("[data-testid=matrix-title]") == "CKA of four entries"
    cells = pg.page.eval_on_selector_all(
        "[data-testid=matrix-cell]", "els => els.map(e => [+e.dataset.row, +e.dataset.col, getComputedStyle(e).fill])")
    assert len(cells) == 16 and {(i, j) for i, j, _ in cells} == {(i, j) for i in range(4) for j in range(4)}
    colour = {(i, j): _rgb(css) for i, j, css in cells}
    for (i, j), got in colour.items():
        v = view.props["matrix"][i][j]
        want = MISSING if v is None else viridis(v)  # the range is [0, 1]
        assert all(abs(a - b) <= 1 for a, b in zip(got, want)), ((i, j), v, got, want)
    # Lighter means larger: sorted by value, the cells get lighter.
    ordered = sorted((v, colour[(i, j)]) for i, row in enumerate(view.props["matrix"]) for j, v in enumerate(row)
                     if v is not None)
    lightness = [_lightness(c) for _, c in ordered]
    assert all(a < b for (va, _), (vb, _), a, b in zip(ordered, ordered[1:], lightness, lightness[1:]) if va < vb)
    # Labels, the colour bar and its bounds, the key of the grey cell.
    assert pg.page.locator("[data-testid=matrix-row-label]").all_text_contents() == labels
    assert pg.page.locator("[data-testid=matrix-col-label]").all_text_contents() == labels
    assert pg.page.text_content("[data-testid=matrix-bar-max]") == "1"
    assert pg.page.text_content("[data-testid=matrix-bar-min]") == "0"
    bar = pg.page.eval_on_selector_all("[data-testid=matrix-bar] rect[fill^=rgb]", "els => els.map(e => e.getAttribute('fill'))")
    assert _lightness(_rgb(bar[0])) > _lightness(_rgb(bar[-1])) and len(bar) >= 20  # light at the top
    top, low = (pg.page.locator(f"[data-testid=matrix-bar-{k}]").bounding_box()["y"] for k in ("max", "min"))
    assert top < low
    assert pg.page.locator("[data-testid=matrix-missing-key]").count() == 1
    # Hover shows row, column and value; the diagonal says so; a click keeps a cell shown.
    assert "Hover over a cell" in pg.page.text_content("[data-testid=matrix-details]")
    cell = lambda i, j: pg.page.locator(f'[data-testid=matrix-cell][data-row="{i}"][data-col="{j}"]')  # noqa: E731
    cell(3, 0).hover()
    assert pg.page.text_content("[data-testid=matrix-details]") == "final_post × 0_pre: 0.02"
    assert pg.page.text_content("[data-testid=matrix-details-value]") == "0.02"
    cell(0, 3).hover()
    assert pg.page.text_content("[data-testid=matrix-details-value]") == "n/a"
    cell(1, 1).hover()
    assert "an entry with itself" in pg.page.text_content("[data-testid=matrix-details]")
    cell(2, 1).hover()
    assert pg.page.text_content("[data-testid=matrix-details]") == "2_pre × 1_pre: 0.7"
    pg.screenshot("matrix_heatmap_tiny.png")
    cell(2, 1).click()
    pg.page.hover("[data-testid=matrix-title]")
    assert pg.page.text_content("[data-testid=matrix-details-row]") == "2_pre"
    cell(2, 1).click()
    pg.page.hover("[data-testid=matrix-title]")
    assert "Hover over a cell" in pg.page.text_content("[data-testid=matrix-details]")
    pg.assert_clean()

    # A fixed range: values beyond it take the end colours, and the bar says so.
    clipped = views.cka_matrix_view(m, labels, vmin=0.3, vmax=0.9)
    pg = open_page(clipped.save(tmp_path / "clipped.html"), width=700, height=500)
    pg.page.wait_for_selector("[data-testid=matrix-cell]")
    assert pg.page.text_content("[data-testid=matrix-bar-max]") == "≥ 0.9"
    assert pg.page.text_content("[data-testid=matrix-bar-min]") == "≤ 0.3"
    low = pg.page.locator('[data-testid=matrix-cell][data-row="3"][data-col="0"]').evaluate("e => getComputedStyle(e).fill")
    assert _rgb(low) == viridis(0.0)
    pg.assert_clean()

    # The report's size: 31 entries, every cell drawn, cells and labels readable.
    big_labels = [f"{i}_pre" for i in range(30)] + ["final_post"]
    big = views.cka_matrix_view(torch.rand(31, 31, generator=torch.Generator().manual_seed(0)), big_labels)
    pg = open_page(big.save(tmp_path / "big.html"), width=900, height=800)
    pg.page.wait_for_selector("[data-testid=matrix-cell]")
    assert pg.page.locator("[data-testid=matrix-cell]").count() == 31 * 31
    box = pg.page.locator("[data-testid=matrix-cell]").first.bounding_box()
    assert box["width"] >= 12 and box["height"] >= 12
    assert pg.page.locator("[data-testid=matrix-row-label]").all_text_contents() == big_labels
    pg.assert_clean()


def test_layer_curves(open_page, tmp_path):
    labels = ["0_pre", "1_pre", "2_pre", "final_post"]
    curves = {"angle": torch.tensor([0.9, 0.5, float("nan"), 0.2]), "variance": [0.1, 0.2, 0.3, 0.4]}
    null = {"angle": (0.3, 0.05), "variance": (0.25, torch.tensor([0.1, 0.1, 0.1, 0.1]))}
    view = views.layer_curves_view(labels, curves, null, ylabel="cosine", title="alignment")
    p = view.props
    pg = open_page(view.save(tmp_path / "curves.html"), width=900, height=500)
    pg.page.wait_for_selector("[data-testid=curve-path]")
    assert pg.page.text_content("[data-testid=curves-title]") == "alignment"
    assert pg.page.text_content("[data-testid=curves-ylabel]") == "cosine"
    # One path per series; the NaN splits the angle curve into two pieces of one path.
    paths = pg.page.eval_on_selector_all("[data-testid=curve-path]", "els => els.map(e => [e.dataset.name, e.getAttribute('d')])")
    assert [name for name, _ in paths] == ["angle", "variance"]
    assert paths[0][1].count("M") == 2 and paths[1][1].count("M") == 1
    colours = pg.page.eval_on_selector_all("[data-testid=curve-path]", "els => els.map(e => getComputedStyle(e).stroke)")
    assert len(set(colours)) == 2
    # Points sit where their values are: y is linear in the value, larger is higher.
    pts = pg.page.eval_on_selector_all(
        "[data-testid=curve-point]", "els => els.map(e => [e.dataset.name, +e.dataset.index, +e.getAttribute('cy')])")
    assert [(n, i) for n, i, _ in pts] == [("angle", 0), ("angle", 1), ("angle", 3)] + [("variance", i) for i in range(4)]
    ys = {(n, i): y for n, i, y in pts}
    per_unit = (ys[("variance", 0)] - ys[("variance", 3)]) / 0.3
    assert per_unit > 100
    values = {s["name"]: s["values"] for s in p["series"]}
    for (n, i), y in ys.items():
        v = values[n][i]
        assert y == pytest.approx(ys[("variance", 0)] - (v - 0.1) * per_unit, abs=0.05), (n, i)
    # The null bands: one per baseline, a standard deviation either side of a dashed mean.
    bands = pg.page.locator("[data-testid=null-band]")
    assert bands.evaluate_all("els => els.map(e => e.dataset.name)") == ["angle", "variance"]
    assert pg.page.locator("[data-testid=null-mean]").count() == 2
    scale = per_unit * pg.page.locator("svg[role=img]").bounding_box()["height"] / float(
        pg.page.get_attribute("svg[role=img]", "height"))
    assert bands.nth(0).bounding_box()["height"] == pytest.approx(0.1 * scale, abs=1.0)
    assert bands.nth(1).bounding_box()["height"] == pytest.approx(0.2 * scale, abs=1.0)
    legend = pg.page.locator("[data-testid=curves-legend-item], [data-testid=curves-legend-null]").all_text_contents()
    assert legend == ["angle", "angle (null ± 1 sd)", "variance", "variance (null ± 1 sd)"]
    assert pg.page.locator("[data-testid=curves-x-tick]").all_text_contents() == labels
    assert pg.page.locator("[data-testid=curves-y-tick]").all_text_contents() == [
        f"{t:.{p['yDecimals']}f}" for t in p["yTicks"]]
    # Hover picks an entry and shows every curve's value there, and its baseline.
    assert "Hover over the plot" in pg.page.text_content("[data-testid=curves-details]")
    column = lambda i: pg.page.locator(f'[data-testid=curves-column][data-index="{i}"]')  # noqa: E731
    column(1).hover()
    assert pg.page.text_content("[data-testid=curves-details-label]") == "1_pre"
    assert pg.page.locator("[data-testid=curves-details-value]").all_text_contents() == ["0.5", "0.2"]
    assert pg.page.locator("[data-testid=curves-details-null]").all_text_contents() == [
        " (null 0.3 ± 0.05)", " (null 0.25 ± 0.1)"]
    assert pg.page.locator("[data-testid=curves-cursor]").count() == 1
    pg.screenshot("layer_curves_tiny.png")
    column(2).hover()
    assert pg.page.locator("[data-testid=curves-details-value]").all_text_contents() == ["n/a", "0.3"]
    column(3).click()
    pg.page.hover("[data-testid=curves-title]")
    assert pg.page.text_content("[data-testid=curves-details-label]") == "final_post"
    pg.assert_clean()

    # A fixed y range clips what lies beyond it to the plot.
    fixed = views.layer_curves_view(labels, {"a": [0.0, 5.0, -1.0, 1.0]}, ymin=0, ymax=10)
    pg = open_page(fixed.save(tmp_path / "fixed.html"), width=900, height=500)
    pg.page.wait_for_selector("[data-testid=curve-path]")
    hit = ("e => { const b = e.getBoundingClientRect(); const at = document.elementFromPoint(b.x + b.width / 2,"
           " b.y + b.height / 2); return at ? (at.dataset.testid || at.tagName) : null; }")
    point = lambda i: pg.page.locator(f'[data-testid=curve-point][data-index="{i}"]')  # noqa: E731
    assert point(1).evaluate(hit) == "curves-column"  # inside the plot: the hover target lies on top
    plot, figure, below = (pg.page.locator(s).first.bounding_box() for s in (
        "[data-testid=curves-column]", "svg[role=img]", '[data-testid=curve-point][data-index="2"]'))
    assert plot["y"] + plot["height"] < below["y"] < figure["y"] + figure["height"]  # in the figure, under the plot
    assert point(2).evaluate(hit) not in ("curves-column", "curve-point")  # -1 < ymin: clipped away
    assert pg.page.locator("[data-testid=null-band]").count() == 0
    assert pg.page.locator("[data-testid=curves-y-tick]").all_text_contents() == ["0", "2", "4", "6", "8", "10"]
    pg.assert_clean()


# ---------------------------------------------------------------------- the real model
@pytest.mark.integration
def test_eiffel_grid_reads_paris(open_page, smol, tmp_path):
    results = tll.read_lenses(smol, EIFFEL, targets=" Paris")
    logit = results["logit"]
    view = views.lens_grid(results, metric="target0_rank")
    pg = open_page(view.save(tmp_path / "eiffel.html"))
    pg.page.wait_for_selector("[data-testid=cell]")
    E, _, P, _ = logit.top_ids.shape
    # The BOS column is hidden at first.
    assert view.props["bos"] and len(pg.cells()) == E * (P - 1) == 31 * (len(smol.to_tokens(EIFFEL, prepend_bos=True)[0]) - 1)
    pg.page.click("[data-testid=bos-button]")
    assert len(pg.cells()) == E * P
    final = logit.labels.index("final_post")
    last = pg.cell(final, P - 1)
    assert last.locator("[data-testid=cell-token]").text_content() == " Paris"
    assert {(e, p): t for e, p, t in pg.cells()} == _top1(logit)
    last.hover()
    (table,) = pg.topk()
    assert table[0][0] == " Paris" and 30 < _percent(table[0][1]) < 60
    assert pg.page.text_content("[data-testid=details-metric]") == 'rank(" Paris"): 0'
    path = pg.screenshot("lens_grid_eiffel.png")
    assert path.stat().st_size > 10_000
    pg.page.click('[data-testid=lens-button][data-name="embedding"]')
    assert {(e, p): t for e, p, t in pg.cells()} == _top1(results["embedding"])
    pg.assert_clean()


UNICODE_PROMPT = "Café crème brûlée 🙂 — naïve Zoë visited Tokyo (東京) and then the Eiffel Tower in the city of"


def _strings(x):
    """Every string in nested props."""
    if isinstance(x, str):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _strings(v)
    elif isinstance(x, list):
        for v in x:
            yield from _strings(v)


def _row_intensities(pg: Page) -> list[list[float]]:
    """The signed colour intensity of every drawn cell, by row."""
    cells = pg.page.eval_on_selector_all(
        "[data-testid=cell]", "els => els.map(e => [+e.dataset.entry, getComputedStyle(e).backgroundColor])")
    rows: dict[int, list[float]] = {}
    for e, css in cells:
        rows.setdefault(e, []).append(intensity_of(tuple(int(x) for x in re.findall(r"\d+", css)[:3])))
    return [rows[e] for e in sorted(rows)]


def _assert_readable(rows: list[list[float]], what: str) -> None:
    """Colours that vary across rows: neither saturated nor blank over most of the grid."""
    flat = [abs(t) for row in rows for t in row]
    saturated = sum(t > 0.97 for t in flat) / len(flat)
    blank = sum(t < 0.03 for t in flat) / len(flat)
    means = torch.tensor([sum(row) / len(row) for row in rows])
    assert saturated < 0.5, f"{what}: {saturated:.0%} of the cells saturated"
    assert blank < 0.5, f"{what}: {blank:.0%} of the cells blank"
    assert float(means.std()) > 0.05, f"{what}: rows look alike (row means {means.tolist()})"
    assert len({round(float(m), 2) for m in means}) > len(rows) // 3, f"{what}: row means {means.tolist()}"


@pytest.mark.integration
def test_real_prompt_with_emoji_and_accents(open_page, smol, tmp_path):
    results = tll.read_lenses(smol, UNICODE_PROMPT, targets=" Paris", prepend_bos=True)
    view = views.lens_grid(results, title="Lens grid · SmolLM2-135M-Instruct")
    # The tokenizer itself decodes several of these tokens to U+FFFD; the view never shows it.
    assert any("\ufffd" in t for t in results["logit"].str_tokens[0])
    assert not any("\ufffd" in s for s in _strings(view.props))
    assert "🙂" in "".join(view.props["tokens"]) and "東" in view.props["tokens"]
    pg = open_page(view.save(tmp_path / "unicode.html"), width=1900, height=1150)
    pg.page.wait_for_selector("[data-testid=cell]")
    assert "\ufffd" not in pg.page.text_content("body")
    assert pg.page.locator("[data-testid=col-header]").count() == len(view.props["tokens"]) - 1  # BOS hidden
    pg.page.click('[data-testid=metric-button][data-value="kl_to_final"]')
    _assert_readable(_row_intensities(pg), "KL to final, logit lens")
    pg.cell(20, 12).click()
    assert "\ufffd" not in pg.page.text_content("body")
    pg.screenshot("lens_grid_unicode_kl.png")
    pg.page.click('[data-testid=lens-button][data-name="embedding"]')
    pg.page.click('[data-testid=metric-button][data-value="own_cosine"]')
    _assert_readable(_row_intensities(pg), "own-token cosine, embedding lens")
    pg.page.click('[data-testid=metric-button][data-value="kl_to_final"]')
    _assert_readable(_row_intensities(pg), "KL to final, embedding lens")
    pg.cell(3, 21).hover()
    assert "\ufffd" not in pg.page.text_content("body")
    pg.page.click('[data-testid=metric-button][data-value="own_cosine"]')
    pg.screenshot("lens_grid_unicode_cosine.png")
    pg.assert_clean()

    drift = views.drift_tokens(results["embedding"])
    assert drift.props["labels"][drift.props["initialEntry"]] != "0_pre"
    pg = open_page(drift.save(tmp_path / "drift.html"), width=1300, height=720)
    pg.page.wait_for_selector("[data-testid=drift-token]")
    assert "\ufffd" not in pg.page.text_content("body")
    pg.page.locator("[data-testid=drift-token]").nth(10).hover()
    pg.screenshot("drift_unicode.png")
    pg.assert_clean()


@pytest.mark.integration
def test_real_difference_grid(open_page, smol, tmp_path):
    clean = tll.read_lenses(smol, EIFFEL, targets=" Paris", prepend_bos=True, lenses=("logit",))
    pos = clean["logit"].str_tokens[0].index(" Tower")

    def ablate(act, hook=None):
        act[:, pos] = 0.0
        return act

    name = "blocks.8.hook_resid_post"
    before = len(smol.hook_dict[name].fwd_hooks)
    smol.add_hook(name, ablate)
    try:
        patched = tll.read_lenses(smol, EIFFEL, targets=" Paris", prepend_bos=True, lenses=("logit",))
    finally:
        smol.hook_dict[name].remove_hooks()
    assert len(smol.hook_dict[name].fwd_hooks) == before
    view = views.lens_grid(clean, patched, diff=True, run_names=("clean", "Tower ablated at 8_post"))
    pg = open_page(view.save(tmp_path / "diff.html"), width=1500, height=1000)
    pg.page.wait_for_selector("[data-testid=cell][data-changed=true]")
    sizes = pg.page.eval_on_selector(
        "[data-testid=cell][data-changed=true]",
        "el => [el.querySelector('[data-testid=cell-token]'), el.querySelector('[data-testid=cell-base-token]')]"
        ".map(x => parseFloat(getComputedStyle(x).fontSize))")
    assert sizes[0] == sizes[1] >= 12
    final = clean["logit"].labels.index("final_post")
    pg.cell(final, len(clean["logit"].positions) - 1).click()
    pg.screenshot("lens_grid_diff.png")
    pg.assert_clean()
