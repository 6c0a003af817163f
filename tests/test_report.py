"""The report command: both files written, numbers equal to direct API calls, offline page, bad input."""

from __future__ import annotations

import json
import re

import pytest
import torch

import tl_latentspaces as tll
from tl_latentspaces import cli
from conftest import EIFFEL
from test_browser import Page, browser  # noqa: F401  (browser is a fixture)

SMALL = ["--eval-tokens", "512", "--align-tokens", "512", "--quiet"]


@pytest.fixture(scope="module")
def report_dir(smol, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    mp = pytest.MonkeyPatch()
    mp.setattr(tll, "load_default_model", lambda *a, **k: smol)
    try:
        assert cli.main(["report", "--out", str(out), "--prompt", EIFFEL, *SMALL]) == 0
    finally:
        mp.undo()
    return out


@pytest.mark.integration
def test_report_writes_page_and_json(report_dir):
    assert sorted(p.name for p in report_dir.iterdir()) == ["report.html", "report.json"]
    data = json.loads((report_dir / "report.json").read_text())
    assert data["model"]["name"] == "SmolLM2-135M-Instruct"
    assert [g["prompt"] for g in data["grids"]] == [EIFFEL]
    assert set(data["grids"][0]["lenses"]) == {"logit", "tuned", "embedding"}
    page = (report_dir / "report.html").read_text()
    # nothing external is loaded (URLs inside the bundled code's comments are not requests; the
    # Chromium test below fails on any request)
    assert not re.search(r"""(src|href)\s*=\s*["']?https?://""", page)
    assert "default-src 'none'" in page
    assert page.count(tll.views.bundle_source()) == 1  # every view draws from one copy of the bundle


@pytest.mark.integration
def test_report_numbers_equal_the_python_api(report_dir, smol):
    from tl_latentspaces.alignment import alignment_suite
    from tl_latentspaces.corpus import default_corpus
    from tl_latentspaces.evaluation import evaluate_lenses
    from tl_latentspaces.tuned_lens import default_tuned_lens

    data = json.loads((report_dir / "report.json").read_text())
    lens = default_tuned_lens(smol, progress=False)
    direct = tll.read_lenses(smol, EIFFEL, lenses=("logit", lens, "embedding"), prepend_bos=True)
    grid = data["grids"][0]
    for name, r in direct.items():
        got = grid["lenses"][name]
        assert got["top_ids"] == r.top_ids[:, 0].tolist()
        torch.testing.assert_close(torch.tensor(got["entropy"]), r.entropy[:, 0], atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(got["kl_to_final"]), r.kl_to_final[:, 0], atol=1e-5, rtol=0)
    held = default_corpus("heldout")
    ev = evaluate_lenses(smol, ["logit", lens], held, max_tokens=512, progress=False)
    torch.testing.assert_close(torch.tensor(data["evaluation"]["kl_to_final"]), ev.kl_to_final.float(), atol=1e-5, rtol=1e-6)
    suite = alignment_suite(smol, held, max_tokens=512, progress=False)
    torch.testing.assert_close(torch.tensor(data["alignment"]["cka"]["embed"], dtype=torch.float64), suite.cka.embed.double(), atol=1e-9, rtol=0)
    torch.testing.assert_close(torch.tensor(data["alignment"]["variance"]["embed"], dtype=torch.float64), suite.variance.embed.double(), atol=1e-9, rtol=0)


@pytest.mark.integration
def test_report_in_chromium(report_dir, browser):

    page = Page(browser, report_dir / "report.html")
    page.page.wait_for_selector("[data-testid=cell]")
    assert len(page.cells()) == 31 * 9 and "svg" in page.page.content()  # the BOS column hidden at first
    page.screenshot("report.png")
    page.assert_clean()


def test_bad_input_leaves_no_files(tmp_path, capsys):
    out = tmp_path / "out"
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    assert cli.main(["report", "--out", str(out), "--corpus", str(empty), *SMALL]) == 2
    assert "holds no text" in capsys.readouterr().err
    assert cli.main(["report", "--out", str(out), "--corpus", str(tmp_path / "missing.txt"), *SMALL]) == 2
    assert "does not exist" in capsys.readouterr().err
    notlm = tmp_path / "bert"
    notlm.mkdir()
    (notlm / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    code = cli.main(["report", "--out", str(out), "--model", str(notlm), *SMALL])
    assert code == 2
    err = capsys.readouterr().err
    # the 2.x loader names the missing weights first; both are one clear line
    assert "not a causal language model" in err or "TransformerLens >= 3.0" in err or "holds no weights" in err
    assert cli.main(["report", "--out", str(out), "--device", "cuda:7", *SMALL]) == 2
    assert "CUDA is not available" in capsys.readouterr().err or torch.cuda.is_available()
    with pytest.raises(SystemExit):
        cli.main(["report", "--out", str(out), "--dtype", "int8"])
    assert not out.exists() or list(out.iterdir()) == []


@pytest.mark.integration
def test_report_puts_a_jacobian_lens_beside_the_others(smol, tmp_path):
    from tl_latentspaces.report import build_report, write_report

    jlens = tll.fit_jacobian_lens(smol, max_tokens=20, seq_len=20, skip_first_positions=8, dim_batch=96,
                                  progress=False)
    folder = tmp_path / "jlens"
    jlens.save(folder)
    out = tmp_path / "r"
    assert cli.main(["report", "--out", str(out), "--prompt", EIFFEL, "--no-tuned", "--jacobian-lens", str(folder),
                     *SMALL]) == 0
    data = json.loads((out / "report.json").read_text())
    assert data["evaluation"]["lenses"] == ["logit", "jacobian"]
    assert set(data["grids"][0]["lenses"]) == {"logit", "jacobian", "embedding"}
    # the J-lens's held-out numbers are those evaluate_lenses gives for the same lens and text
    from tl_latentspaces.corpus import default_corpus
    from tl_latentspaces.evaluation import evaluate_lenses

    ev = evaluate_lenses(smol, ["logit", tll.JacobianLens.load(folder, smol)], default_corpus("heldout"),
                         max_tokens=512, progress=False)
    torch.testing.assert_close(torch.tensor(data["evaluation"]["kl_to_final"]), ev.kl_to_final.float(), atol=1e-5, rtol=1e-6)
