"""The console script: the default run on the default model; output paths checked before any work; one-line
errors with an exit status; results kept when the disk is full."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from conftest import LLAMA_LIKE, TL_MAJOR, build_bridge, build_hooked
from test_corpus import CharTokenizer
from tl_latentspaces import cli, files

REPO = Path(__file__).resolve().parents[1]


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


# ---------------------------------------------------------------------- output paths, errors, write failures
def _no_model_load(monkeypatch):
    """Loading a model fails the test: the checks under test must come first."""
    import tl_latentspaces as tll
    from tl_latentspaces import default_model

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr(tll, "load_default_model", refuse)
    monkeypatch.setattr(default_model, "load_model", refuse)


def _bad_outs(tmp_path):
    """For each command, arguments whose write target is bad, and what the one-line error names."""
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("not a folder")
    folder_json = tmp_path / "folder.json"
    folder_json.mkdir()
    other = tmp_path / "someone_elses"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    return {
        "lens": [
            (["lens", "--cache-dir", str(a_file)], "is a file, not a folder"),
            (["--cache-dir", str(a_file / "sub")], "because '" + str(a_file) + "' is a file"),
        ],
        "report": [
            (["report", "--out", str(a_file)], "is an existing file"),
            (["report", "--out", str(tmp_path / "new" / "report.html")], "names a .html file"),
            (["report", "--out", str(a_file / "report")], "because '" + str(a_file) + "' is a file"),
        ],
        "fit-tuned-lens": [
            (["fit-tuned-lens", "--out", str(a_file)], "is an existing file"),
            (["fit-tuned-lens", "--out", str(other)], "holds other files but no tuned_lens.json"),
            (["fit-tuned-lens", "--out", str(tmp_path / "lens.json")], "names a .json file"),
            (["fit-tuned-lens", "--out", str(a_file / "lens")], "because '" + str(a_file) + "' is a file"),
            (["fit-tuned-lens", "--out", str(tmp_path / "lens"), "--checkpoint-dir", str(a_file)], "--checkpoint-dir"),
        ],
        "eval": [
            (["eval", "--out", str(tmp_path / "eval.txt")], "must name a .json file"),
            (["eval", "--out", str(folder_json)], "is an existing folder"),
            (["eval", "--out", str(a_file / "eval.json")], "because '" + str(a_file) + "' is a file"),
            (["eval", "--no-tuned", "--lens", str(tmp_path / "no_lens")], "--lens"),
        ],
        "align": [
            (["align", "--out", str(tmp_path / "align")], "must name a .json file"),
            (["align", "--out", str(folder_json)], "is an existing folder"),
            (["align", "--out", str(a_file / "align.json")], "because '" + str(a_file) + "' is a file"),
            (["align", "--checkpoint-dir", str(a_file)], "--checkpoint-dir"),
        ],
    }


@pytest.mark.parametrize("command", ["lens", "report", "fit-tuned-lens", "eval", "align"])
def test_bad_write_target_fails_before_the_model_loads(command, tmp_path, monkeypatch, capsys):
    _no_model_load(monkeypatch)
    cases = _bad_outs(tmp_path)[command]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    for argv, needle in cases:
        assert cli.main([*argv, "--quiet"]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("tl-latentspaces: error: ") and err.count("\n") == 1, err
        assert needle in err, (argv, err)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing created


def test_unwritable_folder_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    # Tests may run as root, for whom a chmod'ed folder stays writable: the read-only folder is simulated.
    _no_model_load(monkeypatch)
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == locked else real_access(p, mode, **k))
    for argv in (["fit-tuned-lens", "--out", str(locked / "deep" / "lens")], ["eval", "--out", str(locked / "e.json")],
                 ["report", "--out", str(locked)], ["lens", "--cache-dir", str(locked / "cache")]):
        assert cli.main([*argv, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"the folder '{locked}' is not writable" in err and err.count("\n") == 1, err


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_folder_whose_permission_bits_lie_is_refused_before_the_model_loads(monkeypatch, capsys):
    # /proc passes os.access for root, yet no file can be created in it: only a probe write tells.
    _no_model_load(monkeypatch)
    for argv in (["report", "--out", "/proc/tll-no-such/report"], ["eval", "--out", "/proc/tll-no-such/e.json"],
                 ["fit-tuned-lens", "--out", "/proc/tll-no-such/lens"]):
        assert cli.main([*argv, "--quiet"]) == 2, argv
        err = capsys.readouterr().err
        assert "cannot write in the folder '/proc'" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("command", ["lens", "report", "fit-tuned-lens", "eval", "align"])
def test_bad_out_from_the_console_is_one_line_in_seconds(command, tmp_path):
    """The acceptance check, as a user runs it: a missing model is never reached, the --out error comes first."""
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("x")
    out = ["--cache-dir", str(a_file)] if command == "lens" else ["--out", str(a_file / "x.json")]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "tl_latentspaces.cli", command, *out, "--model", "default"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("tl-latentspaces: error: ")
    assert str(a_file) in proc.stderr
    assert elapsed < 30, elapsed  # under 10 s on an idle machine; generous for a loaded one


def test_missing_model_is_one_line_without_the_network(tmp_path):
    """A missing folder or GGUF file, and a hub name while offline: one line, no traceback, no waiting on the network."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    models = (str(tmp_path / "no_such_model"), str(tmp_path / "no_such.gguf"), "gpt2")
    procs = [subprocess.Popen([sys.executable, "-m", "tl_latentspaces.cli", "--model", m, "--quiet"], cwd=tmp_path,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for m in models]
    for model, proc in zip(models, procs):
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 2, (model, err)
        assert "Traceback" not in err and err.count("\n") == 1, (model, err)
        assert err.startswith("tl-latentspaces: error: "), (model, err)


@pytest.mark.parametrize("raised, code, needle", [
    (OSError("We couldn't connect to 'https://huggingface.co'.\nCheck your internet connection."), 2,
     "error: We couldn't connect to 'https://huggingface.co'. Check your internet connection."),
    (PermissionError(errno.EACCES, "Permission denied", "/cache/x"), 2, "Permission denied: '/cache/x'"),
    (TypeError("top_k must be an int, got str"), 2, "error: top_k must be an int, got str"),
    (KeyboardInterrupt(), 130, "tl-latentspaces: interrupted"),
])
def test_user_errors_are_one_line_with_an_exit_status(raised, code, needle, monkeypatch, capsys):
    import tl_latentspaces as tll

    def load(*a, **k):
        raise raised

    monkeypatch.setattr(tll, "load_default_model", load)
    try:
        assert cli.main(["--quiet"]) == code
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped main()")
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err
    monkeypatch.setenv("TL_LATENTSPACES_TRACEBACK", "1")  # the way to see the traceback
    with pytest.raises(type(raised)):
        cli.main(["--quiet"])


def test_help_documents_the_exit_statuses(capsys):
    for argv in (["--help"], ["fit-tuned-lens", "--help"]):
        with pytest.raises(SystemExit):
            cli.main(argv)
        out = capsys.readouterr().out
        assert "exit status:" in out and "130" in out and "TL_LATENTSPACES_TRACEBACK" in out


# --- write failures after the work: a full disk loses nothing that can be kept
@pytest.fixture
def char_model(monkeypatch):
    """A tiny model with a one-id-per-character tokenizer, returned by every loader."""
    import tl_latentspaces as tll
    from tl_latentspaces import default_model

    cfg = dict(LLAMA_LIKE, n_ctx=128)
    model = build_bridge(cfg) if TL_MAJOR >= 3 else build_hooked(cfg)
    model.tokenizer = CharTokenizer()
    model.tokenizer.padding_side = "right"  # HookedTransformer.forward reads it
    monkeypatch.setattr(tll, "load_default_model", lambda *a, **k: model)
    monkeypatch.setattr(default_model, "load_model", lambda *a, **k: model)
    return model


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(f"line {i}: some words about item {i % 7}" for i in range(300)))
    return path


def _full_disk_under(folder):
    """An OSError(ENOSPC) for any path under ``folder``; the write as usual elsewhere."""
    def check(path):
        if Path(path).resolve().is_relative_to(folder.resolve()):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return check


def _kept_path(err):
    assert err.count("\n") == 1 and "No space left on device" in err, err
    return Path(err.split("were written to '")[1].split("' instead")[0])


@pytest.mark.parametrize("command, extra", [
    ("eval", ["--no-tuned", "--max-tokens", "512"]),
    ("align", ["--max-tokens", "512", "--seq-len", "16"]),
])
def test_full_disk_keeps_the_json(command, extra, char_model, corpus_file, tmp_path, monkeypatch, capsys):
    argv = [command, "--corpus", str(corpus_file), *extra, "--quiet", "--cache-dir", str(tmp_path / "cache")]
    assert cli.main([*argv, "--out", str(tmp_path / "ok.json")]) == 0
    expected = json.loads((tmp_path / "ok.json").read_text())
    capsys.readouterr()

    full = tmp_path / "full"
    write = files.write_bytes_atomic
    disk_full = _full_disk_under(full)
    monkeypatch.setattr(files, "write_bytes_atomic", lambda p, data, **k: disk_full(p) or write(p, data, **k))
    assert cli.main([*argv, "--out", str(full / "out.json")]) == 1
    err = capsys.readouterr().err
    kept = _kept_path(err)
    assert f"could not write '{full / 'out.json'}'" in err
    assert kept.name == "out.json" and json.loads(kept.read_text()) == expected
    assert not (full / "out.json").exists()

    # no writable temporary folder either: the JSON goes to stdout
    monkeypatch.setattr(tempfile, "tempdir", str(full))
    assert cli.main([*argv, "--out", str(full / "out.json")]) == 1
    out, err = capsys.readouterr()
    assert "the results are printed above instead" in err and err.count("\n") == 1
    assert json.loads(out[out.index("\n{") + 1:]) == expected


def test_full_disk_keeps_the_fitted_lens(char_model, corpus_file, tmp_path, monkeypatch, capsys):
    from tl_latentspaces.tuned_lens import TunedLens

    argv = ["fit-tuned-lens", "--corpus", str(corpus_file), "--max-tokens", "512", "--quiet"]
    assert cli.main([*argv, "--out", str(tmp_path / "ok")]) == 0
    expected = TunedLens.load(tmp_path / "ok", char_model)
    capsys.readouterr()

    full = tmp_path / "full"
    save = TunedLens.save
    disk_full = _full_disk_under(full)
    monkeypatch.setattr(TunedLens, "save", lambda self, p: disk_full(p) or save(self, p))
    assert cli.main([*argv, "--out", str(full / "lens")]) == 1
    kept = _kept_path(capsys.readouterr().err)
    assert kept.name == "lens" and not (full / "lens").exists()
    got = TunedLens.load(kept, char_model)
    assert torch.equal(got.weight, expected.weight) and torch.equal(got.bias, expected.bias)


def test_full_disk_keeps_the_report(tmp_path, monkeypatch, capsys):
    from tl_latentspaces import report as report_module

    import tl_latentspaces as tll

    monkeypatch.setattr(tll, "load_default_model", lambda *a, **k: "a model")  # build_report is replaced
    seen = {}

    def build_report(model, *, prompts, **kwargs):
        seen["prompts"] = prompts
        data = {"prompts": prompts, "evaluation": {"lenses": ["logit"], "labels": ["0_pre"], "kl_to_final": [[0.5]]}}
        return report_module.Report(data=data, html="<html>a report</html>")

    monkeypatch.setattr(report_module, "build_report", build_report)
    full = tmp_path / "full"
    write = report_module.write_files_atomic
    disk_full = _full_disk_under(full)
    monkeypatch.setattr(report_module, "write_files_atomic", lambda folder, payload: disk_full(folder) or write(folder, payload))
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("\ufeffThe first prompt\nThe second\n".encode("utf-8"))  # a BOM, as Windows editors write
    argv = ["report", "--prompts-file", str(prompts), "--no-tuned", "--quiet", "--out", str(full / "report")]
    assert cli.main(argv) == 1
    kept = _kept_path(capsys.readouterr().err)
    assert seen["prompts"] == ["The first prompt", "The second"]
    assert (kept / "report.html").read_text() == "<html>a report</html>"
    assert json.loads((kept / "report.json").read_text())["prompts"] == seen["prompts"]
    assert not (full / "report").exists()


def test_eval_reads_in_bfloat16_on_request(char_model, corpus_file, tmp_path, monkeypatch, capsys):
    """``eval --readout-dtype bfloat16`` hands the bfloat16 readout to the evaluation, and its KLs stay within
    the bfloat16 mode's error of the float32 ones; float32 is the default."""
    from tl_latentspaces import evaluation

    seen = []
    evaluate = evaluation.evaluate_lenses
    monkeypatch.setattr(cli, "evaluate_lenses", lambda *a, **k: seen.append(k["readout_dtype"]) or evaluate(*a, **k))
    argv = ["eval", "--corpus", str(corpus_file), "--no-tuned", "--max-tokens", "512", "--quiet",
            "--cache-dir", str(tmp_path / "cache")]
    results = {}
    for dtype in ("float32", "bfloat16"):
        extra = [] if dtype == "float32" else ["--readout-dtype", dtype]
        assert cli.main([*argv, *extra, "--out", str(tmp_path / f"{dtype}.json")]) == 0
        results[dtype] = json.loads((tmp_path / f"{dtype}.json").read_text())
    assert seen == [torch.float32, torch.bfloat16]
    kl32, kl16 = (torch.tensor(results[d]["kl_to_final"]) for d in ("float32", "bfloat16"))  # [lens, label]
    assert results["float32"]["lenses"] == ["logit"] and kl32.shape == kl16.shape
    torch.testing.assert_close(kl16, kl32, atol=0.05, rtol=0.05)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.main([*argv, "--readout-dtype", "float16"])
    assert "invalid choice: 'float16'" in capsys.readouterr().err


def test_report_refuses_files_of_its_names_it_did_not_write(tmp_path, monkeypatch, capsys):
    from tl_latentspaces import report as report_module

    import tl_latentspaces as tll

    monkeypatch.setattr(tll, "load_default_model", lambda *a, **k: "a model")
    runs = []

    def build_report(model, **kwargs):
        runs.append(1)
        data = {"run": len(runs), "evaluation": {"lenses": ["logit"], "labels": ["0_pre"], "kl_to_final": [[0.5]]}}
        return report_module.Report(data=data, html=f"<title>tl_latentspaces report: run {len(runs)}</title>")

    monkeypatch.setattr(report_module, "build_report", build_report)
    out = tmp_path / "out"
    argv = ["report", "--no-tuned", "--quiet", "--out", str(out)]
    assert cli.main(argv) == 0 and cli.main(argv) == 0  # a report is replaced by the next
    assert json.loads((out / "report.json").read_text())["run"] == 2
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.json").write_text('{"my": "results"}')
    capsys.readouterr()
    assert cli.main(["report", "--no-tuned", "--quiet", "--out", str(mine)]) == 2
    err = capsys.readouterr().err
    assert "holds ['report.json'], which no tl_latentspaces report wrote" in err and len(runs) == 2  # refused first
    assert (mine / "report.json").read_text() == '{"my": "results"}' and [p.name for p in mine.iterdir()] == ["report.json"]
