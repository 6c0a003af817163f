"""The console script's default run on the default model."""

from __future__ import annotations

import pytest

from tl_latentspaces import cli


@pytest.mark.integration
def test_default_run_prints_every_layer(smol, monkeypatch, capsys):
    import tl_latentspaces as tll

    monkeypatch.setattr(tll, "load_default_model", lambda *a, **k: smol)
    assert cli.main(["--quiet"]) == 0
    out = capsys.readouterr().out
    assert "the model predicts ' Paris'" in out
    rows = [line for line in out.splitlines() if line.strip().split(" ")[0].endswith(("_pre", "final_post"))]
    assert len(rows) == 31
    assert rows[-1].split()[0] == "final_post" and "Paris" in rows[-1]


@pytest.mark.integration
def test_bad_position_is_a_clear_error(smol, monkeypatch, capsys):
    import tl_latentspaces as tll

    monkeypatch.setattr(tll, "load_default_model", lambda *a, **k: smol)
    assert cli.main(["--quiet", "--pos", "40"]) == 2
    assert "--pos 40 is out of range for a prompt of 10 tokens" in capsys.readouterr().err


def test_parser_defaults():
    args = cli.build_parser().parse_args([])
    assert args.prompt == cli.DEFAULT_PROMPT and args.pos == -1 and args.top_k == 5
