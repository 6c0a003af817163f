"""The ``tl-latentspaces`` command line: ``lens`` (the default), ``report``, ``fit-tuned-lens``, ``eval``, ``align``.

Every place a command writes is checked before any work starts (exit statuses: :data:`EPILOG`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

import tl_latentspaces as tll
from tl_latentspaces import default_model, files, report
from tl_latentspaces.alignment import AlignmentAccumulator
from tl_latentspaces.cached_lenses import tuned_lens_for
from tl_latentspaces.corpus import check_corpus_file, default_corpus
from tl_latentspaces.distributed import finish_distributed, init_distributed
from tl_latentspaces.evaluation import evaluate_lenses
from tl_latentspaces.fitting import fit_tuned_lens
from tl_latentspaces.jacobian_lens import JacobianLens
from tl_latentspaces.runner import CorpusRunner
from tl_latentspaces.translators import CONFIG_FILE, TunedLens

__all__ = ["main", "build_parser", "DEFAULT_PROMPT", "EPILOG"]

EPILOG = """\
exit status:
  0    done
  1    the work was done, but its results could not be written where asked (disk full, read-only
       folder); they are kept in a new temporary folder (or printed) and the message says where
  2    an error: a bad argument, a missing or unreadable file or model, an output path that cannot be
       written (every output path and the cache folder are checked before any work starts)
  130  interrupted (Ctrl-C)
Errors are one line on stderr, 'tl-latentspaces: error: ...'; set TL_LATENTSPACES_TRACEBACK=1 to see
the full traceback instead."""

DEFAULT_PROMPT = "The Eiffel Tower is in the city of"
_DTYPES = ("bfloat16", "float16", "float32", "float64")


def _fmt_token(s: str, width: int = 14) -> str:
    text = repr(s)[1:-1]
    return (text[: width - 1] + "…") if len(text) > width else text


def lens_table(results: dict[str, Any], pos: int) -> str:
    """A per-layer text table of the logit and embedding lenses at one position."""
    logit, emb = results["logit"], results["embedding"]
    p = logit.positions.index(pos)
    lines = [f"{'entry':>10}  {'logit top-1':<16}{'p':>6}{'KL':>8}   {'embedding top-1':<16}{'cos':>6}{'KL':>8}"
             f"{'own cos':>9}"]
    top_l, top_e = logit.top_tokens(), emb.top_tokens()
    for e, label in enumerate(logit.labels):
        lines.append(
            f"{label:>10}  {_fmt_token(top_l[e][0][p]):<16}{float(logit.top_probs[e, 0, p, 0]):>6.2f}"
            f"{float(logit.kl_to_final[e, 0, p]):>8.2f}   {_fmt_token(top_e[e][0][p]):<16}"
            f"{float(emb.top_scores[e, 0, p, 0]):>6.2f}{float(emb.kl_to_final[e, 0, p]):>8.2f}"
            f"{float(emb.own_scores[e, 0, p]):>9.2f}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------- shared pieces
def _load(args: argparse.Namespace) -> Any:
    dtype = None if args.dtype is None else getattr(torch, args.dtype)
    if args.model == "default" and args.device == "cpu" and dtype is None:
        return tll.load_default_model(cache_dir=args.cache_dir, progress=not args.quiet)
    return default_model.load_model(args.model, device=args.device, dtype=dtype, cache_dir=args.cache_dir,
                                    progress=not args.quiet)


def _corpus(args: argparse.Namespace, split: str = "heldout") -> Any:
    if not getattr(args, "corpus", None):
        return default_corpus(split)
    # Each file is checked up to its first text now, and read lazily later, as far as the token budget goes.
    return [check_corpus_file(path) for path in args.corpus]


def _start(args: argparse.Namespace, split: str = "heldout") -> tuple[Any, Any, Any]:
    """Join the process group (under torchrun), then check the corpus and load the model."""
    ctx = init_distributed()
    corpus = _corpus(args, split)
    return ctx, corpus, _load(args)


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"--prompts-file {str(path)!r} does not exist.")
        prompts += [line for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"--prompts-file {str(path)!r} holds no prompt (one per line).")
    return prompts


# ---------------------------------------------------------------------- output paths
class _ResultsNotWritten(Exception):
    """The work is done but its results could not be written where asked; the message says where they are."""


#: Suffixes that name a file, which a command that writes a folder refuses.
_FILE_SUFFIXES = (".json", ".jsonl", ".html", ".htm", ".txt", ".csv", ".safetensors", ".pt", ".png", ".gguf")


def _one_line(err: BaseException) -> str:
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return text or type(err).__name__


def _check_json_out(value: str) -> None:
    """An ``--out`` JSON file: a ``.json`` name, not a folder, in a folder that is or can be made writable."""
    p = Path(value).expanduser()
    what = f"--out {value!r}"
    if p.suffix.lower() != ".json":
        suffix = repr(p.suffix) if p.suffix else "no suffix"
        raise ValueError(f"{what} must name a .json file (got {suffix}), e.g. --out results.json.")
    if p.is_dir():
        example = str(p / "results.json")
        raise ValueError(f"{what} is an existing folder; name a .json file, e.g. --out {example!r}.")
    files.check_can_write_in(p.parent, what, "Pass a path in a writable folder.")


def _check_folder_out(value: str, option: str, *, marker: Optional[str] = None) -> None:
    """A folder target; an existing non-empty one must hold ``marker`` (a lens's config) when given."""
    p = Path(value).expanduser()
    what = f"{option} {value!r}"
    if p.exists():
        if not p.is_dir():
            raise ValueError(f"{what} is an existing file, but this writes a folder there; pass a folder path.")
        if marker is not None and any(p.iterdir()) and not (p / marker).is_file():
            raise ValueError(f"{what} is a folder that holds other files but no {marker}, so it is not a lens folder "
                             "to write into; pass a new or empty folder path.")
    elif p.suffix.lower() in _FILE_SUFFIXES:
        raise ValueError(f"{what} names a {p.suffix} file, but this writes a folder; pass a folder path, e.g. "
                         f"{option} {str(p.with_suffix(''))!r}.")
    files.check_can_write_in(p, what, "Pass a path in a writable folder.")


def _check_targets(args: argparse.Namespace) -> None:
    """Check every path the command will write (and the inputs that are only read late) before any work."""
    if args.command == "report":
        _check_folder_out(args.out, "--out")
        report.check_report_folder(args.out)
    elif args.command == "fit-tuned-lens":
        _check_folder_out(args.out, "--out", marker=CONFIG_FILE)
    elif args.command in ("eval", "align") and args.out is not None:
        _check_json_out(args.out)
    if getattr(args, "checkpoint_dir", None):
        _check_folder_out(args.checkpoint_dir, "--checkpoint-dir")
    if getattr(args, "lens", None) and not Path(args.lens).expanduser().is_dir():
        raise FileNotFoundError(f"--lens {args.lens!r} is not a folder; pass a folder written by fit-tuned-lens.")
    for path in getattr(args, "jacobian_lens", None) or ():
        if not Path(path).expanduser().is_dir():
            raise FileNotFoundError(f"--jacobian-lens {path!r} is not a folder; pass a folder written by "
                                    "JacobianLens.save.")
    # The default model's cache and the default tuned lens are written in the cache folder.
    tuned_auto = args.command in ("report", "eval") and not args.no_tuned and not getattr(args, "lens", None)
    if args.model == "default" or tuned_auto:
        cache = default_model.default_cache_dir(args.cache_dir)
        if args.cache_dir is not None:
            what = f"--cache-dir {args.cache_dir!r}"
        elif os.environ.get("TL_LATENTSPACES_CACHE"):
            what = f"TL_LATENTSPACES_CACHE={os.environ['TL_LATENTSPACES_CACHE']!r}"
        else:
            what = f"the cache folder {str(cache)!r}"
        if cache.exists() and not cache.is_dir():
            raise ValueError(f"{what} is a file, not a folder. Pass --cache-dir or set TL_LATENTSPACES_CACHE to a "
                             "folder.")
        files.check_can_write_in(cache, what, "Pass --cache-dir or set TL_LATENTSPACES_CACHE to a writable folder.")


def _write_or_keep(target: Path, write: Callable[[Path], Path], dump: Optional[Callable[[], str]] = None) -> Path:
    """``write(target)``; on an ``OSError``, write to a new temporary folder instead, or print ``dump()``,
    and raise :class:`_ResultsNotWritten` saying where the results are."""
    try:
        return write(target)
    except OSError as err:
        reason = _one_line(err)
    name = target.name or Path.cwd().name or "tl_latentspaces_out"
    fallback: Optional[Path] = None
    try:
        fallback = Path(tempfile.mkdtemp(prefix="tl-latentspaces-"))
        kept = write(fallback / name)
    except OSError:
        if fallback is not None:
            shutil.rmtree(fallback, ignore_errors=True)
        if dump is None:
            raise _ResultsNotWritten(f"could not write {str(target)!r} ({reason}), nor a copy in the temporary folder "
                                     f"{tempfile.gettempdir()!r}; the results are lost.") from None
        print(dump())
        raise _ResultsNotWritten(f"could not write {str(target)!r} ({reason}); the results are printed above "
                                 "instead.") from None
    raise _ResultsNotWritten(f"could not write {str(target)!r} ({reason}); the results were written to "
                             f"{str(kept)!r} instead.")


def _print_table(out: Optional[str], result: Any, to_data: Callable[[Any], Any]) -> None:
    """Print ``result``'s table and write ``to_data(result)`` as JSON to ``out`` when given."""
    print(result.to_dataframe().round(3).to_string())
    if out:
        blob = json.dumps(to_data(result), indent=1, allow_nan=False).encode("utf-8")
        written = _write_or_keep(Path(out).expanduser(), lambda p: files.write_bytes_atomic(p, blob),
                                 dump=blob.decode)
        print(f"\nwrote {written}")


# ---------------------------------------------------------------------- subcommands
def _cmd_lens(args: argparse.Namespace) -> int:
    model = _load(args)
    results = tll.read_lenses(model, args.prompt, lenses=("logit", "embedding"), top_k=args.top_k,
                              prepend_bos=not args.no_bos)
    logit = results["logit"]
    seq = logit.tokens.shape[1]
    pos = args.pos + seq if args.pos < 0 else args.pos
    if not 0 <= pos < seq:
        raise ValueError(f"--pos {args.pos} is out of range for a prompt of {seq} tokens (valid: -{seq}..{seq - 1}).")
    tokens = logit.str_tokens[0]
    print(f"model: {logit.model_name}   prompt tokens: {tokens}")
    print(f"position {pos} (token {tokens[pos]!r}); the model predicts {logit.top_tokens()[-1][0][pos]!r}")
    print("KL = KL(final || lens) in nats; own cos = cosine to the position's own input embedding\n")
    print(lens_table(results, pos))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    ctx = init_distributed()
    prompts = _prompts(args) or list(report.DEFAULT_PROMPTS)
    corpus = _corpus(args)
    model = _load(args)
    extra = [JacobianLens.load(path, model) for path in args.jacobian_lens or ()]
    result = report.build_report(model, prompts=prompts, corpus=corpus, tuned=None if args.no_tuned else "auto",
                                 lenses=extra, eval_tokens=args.eval_tokens, align_tokens=args.align_tokens,
                                 cache_dir=args.cache_dir, progress=not args.quiet)
    if not ctx.is_main:
        return 0
    ev = result.data["evaluation"]
    print(f"{'entry':>10}" + "".join(f"{'KL ' + n:>14}" for n in ev["lenses"]))
    for e, label in enumerate(ev["labels"]):
        print(f"{label:>10}" + "".join(f"{ev['kl_to_final'][i][e]:>14.3f}" for i in range(len(ev["lenses"]))))
    out = _write_or_keep(Path(args.out).expanduser(), lambda p: report.write_report(result, p)[0].parent,
                         dump=lambda: json.dumps(result.data, indent=1))
    print(f"\nwrote {out / 'report.html'} and {out / 'report.json'}")
    return 0


def _cmd_fit(args: argparse.Namespace) -> int:
    ctx, corpus, model = _start(args, "train")
    lens = fit_tuned_lens(model, corpus, max_tokens=args.max_tokens, checkpoint_dir=args.checkpoint_dir, seed=args.seed,
                          progress=not args.quiet)
    if ctx.is_main:
        print(f"saved the tuned lens to {_write_or_keep(Path(args.out).expanduser(), lens.save)}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    ctx, corpus, model = _start(args)
    lenses: list[Any] = ["logit"]
    if args.lens:
        lenses.append(TunedLens.load(args.lens, model))
    elif not args.no_tuned:
        lenses.append(tuned_lens_for(model, cache_dir=args.cache_dir, progress=not args.quiet))
    evaluation = evaluate_lenses(model, lenses, corpus, max_tokens=args.max_tokens, progress=not args.quiet,
                                 readout_dtype=getattr(torch, args.readout_dtype))
    if ctx.is_main:
        _print_table(args.out, evaluation, report.to_jsonable)
    return 0


def _cmd_align(args: argparse.Namespace) -> int:
    """The alignment suite through the corpus runner: resumable, and data-parallel under torchrun."""
    ctx, corpus, model = _start(args)
    runner = CorpusRunner(model, corpus, seq_len=args.seq_len, batch_size=args.batch_size, max_tokens=args.max_tokens,
                          checkpoint_dir=args.checkpoint_dir, progress=not args.quiet, desc="alignment suite")
    stats = runner.run({"align": AlignmentAccumulator(model).empty})["align"]
    if ctx.is_main:
        _print_table(args.out, stats.result(progress=not args.quiet), report.alignment_data)
    return 0


# ---------------------------------------------------------------------- parser
def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default",
                   help="'default' (SmolLM2-135M-Instruct, offline), a Hugging Face model folder, a .gguf file, "
                        "or a TransformerLens model name (needs the hub)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default cpu)")
    p.add_argument("--dtype", default=None, choices=_DTYPES, help="model dtype (default float32)")
    p.add_argument("--cache-dir", default=None, help="cache folder (default ~/.cache/tl_latentspaces)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _lens_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"text to read (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--pos", type=int, default=-1, help="position to print (default: the last)")
    p.add_argument("--top-k", type=int, default=5, help="top tokens kept per cell (default 5)")
    p.add_argument("--no-bos", action="store_true", help="do not prepend the BOS token")


class _SubParser(argparse.ArgumentParser):
    """A subcommand's parser: the model options, and the exit statuses at the end of its help."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("epilog", EPILOG)
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(**kwargs)
        _model_options(self)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tl-latentspaces",
        description="Read every layer of a language model through the logit, tuned and embedding lenses.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _model_options(parser)
    _lens_options(parser)
    sub = parser.add_subparsers(dest="command", parser_class=_SubParser)

    lens = sub.add_parser("lens", help="per-layer logit-lens and embedding-lens tokens for a prompt (default)")
    _lens_options(lens)

    rep = sub.add_parser("report", help="lens grids, logit vs tuned lens, alignment suite: report.html + report.json")
    rep.add_argument("--out", default="tl_latentspaces_report", help="output folder (default ./tl_latentspaces_report)")
    rep.add_argument("--prompt", action="append", help="a prompt for the lens grids (repeatable)")
    rep.add_argument("--prompts-file", default=None, help="a file of prompts, one per line")
    rep.add_argument("--corpus", action="append", help="held-out text: a .txt or .jsonl file (repeatable)")
    rep.add_argument("--eval-tokens", type=int, default=1024, help="held-out tokens for logit vs tuned (default 1024)")
    rep.add_argument("--align-tokens", type=int, default=1024, help="tokens for the alignment suite (default 1024)")
    rep.add_argument("--no-tuned", action="store_true", help="leave the tuned lens out")
    rep.add_argument("--jacobian-lens", action="append", default=None, metavar="DIR",
                     help="a saved Jacobian lens folder (JacobianLens.save) to read and evaluate beside the other "
                          "lenses (repeatable)")

    fit = sub.add_parser("fit-tuned-lens", help="fit a tuned lens and save it")
    fit.add_argument("--out", required=True, help="folder to save the lens in")
    fit.add_argument("--corpus", action="append",
                     help="training text: .txt or .jsonl files (default: the offline corpus)")
    fit.add_argument("--max-tokens", type=int, default=65536, help="training tokens (default 65536)")
    fit.add_argument("--checkpoint-dir", default=None, help="save checkpoints here and resume from them")
    fit.add_argument("--seed", type=int, default=0)

    ev = sub.add_parser("eval", help="held-out metrics per layer: logit lens vs tuned lens")
    ev.add_argument("--lens", default=None,
                    help="a saved tuned lens folder (default: the cached one, fitted if missing)")
    ev.add_argument("--no-tuned", action="store_true", help="evaluate the logit lens only")
    ev.add_argument("--corpus", action="append", help="held-out text: .txt or .jsonl files")
    ev.add_argument("--max-tokens", type=int, default=8192)
    ev.add_argument("--readout-dtype", default="float32", choices=("float32", "bfloat16"),
                    help="score products: float32 (default, exact) or bfloat16 (faster on CPUs with bfloat16 "
                         "units; float32 accumulation)")
    ev.add_argument("--out", default=None, help="also write the numbers to this .json file")

    al = sub.add_parser("align", help="the alignment suite over a corpus")
    al.add_argument("--corpus", action="append", help="text: .txt or .jsonl files")
    al.add_argument("--max-tokens", type=int, default=16384)
    al.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    al.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    al.add_argument("--checkpoint-dir", default=None, help="save progress here and resume from it")
    al.add_argument("--out", default=None, help="also write the numbers to this .json file")
    return parser


_COMMANDS = {None: _cmd_lens, "lens": _cmd_lens, "report": _cmd_report, "fit-tuned-lens": _cmd_fit,
             "eval": _cmd_eval, "align": _cmd_align}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``tl-latentspaces`` console script; returns the exit status (see :data:`EPILOG`).

    Exceptions other than a user's mistake (bad argument, missing file or model, unwritable path) keep
    their traceback.
    """
    args = build_parser().parse_args(argv)
    try:
        _check_targets(args)
        code = _COMMANDS[args.command](args)
        finish_distributed()  # under torchrun: every rank waits for rank 0's writes, then leaves the group
        return code
    except _ResultsNotWritten as err:
        return _fail(err, 1)
    except KeyboardInterrupt as err:
        return _fail(err, 130, "interrupted")
    # OSError covers a missing or unreadable file, a full disk, a read-only folder and the hub's errors
    # for a model name that cannot be fetched; ImportError a missing optional dependency.
    except (ValueError, TypeError, OSError, ImportError, RuntimeError) as err:
        return _fail(err, 2)


def _fail(err: BaseException, code: int, message: Optional[str] = None) -> int:
    if os.environ.get("TL_LATENTSPACES_TRACEBACK", "") not in ("", "0"):
        raise err
    print(f"tl-latentspaces: {message or 'error: ' + _one_line(err)}", file=sys.stderr)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
