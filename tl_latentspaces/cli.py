"""The ``tl-latentspaces`` command line.

With no arguments it loads the default model and prints, for a default prompt, every layer's top
logit-lens and embedding-lens tokens with their KL to the model's final distribution.

Example:
    $ tl-latentspaces
    $ tl-latentspaces lens --prompt "The capital of France is" --pos -1 --top-k 3
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Optional, Sequence

__all__ = ["main", "DEFAULT_PROMPT"]

DEFAULT_PROMPT = "The Eiffel Tower is in the city of"


def _fmt_token(s: str, width: int = 14) -> str:
    text = repr(s)[1:-1]
    return (text[: width - 1] + "…") if len(text) > width else text


def lens_table(results: dict[str, Any], pos: int) -> str:
    """A per-layer text table of the logit and embedding lenses at one position."""
    logit, emb = results["logit"], results["embedding"]
    p = logit.positions.index(pos)
    lines = [
        f"{'entry':>10}  {'logit top-1':<16}{'p':>6}{'KL':>8}   {'embedding top-1':<16}{'cos':>6}{'KL':>8}{'own cos':>9}",
    ]
    top_l, top_e = logit.top_tokens(), emb.top_tokens()
    for e, label in enumerate(logit.labels):
        lines.append(
            f"{label:>10}  {_fmt_token(top_l[e][0][p]):<16}{float(logit.top_probs[e, 0, p, 0]):>6.2f}"
            f"{float(logit.kl_to_final[e, 0, p]):>8.2f}   {_fmt_token(top_e[e][0][p]):<16}"
            f"{float(emb.top_scores[e, 0, p, 0]):>6.2f}{float(emb.kl_to_final[e, 0, p]):>8.2f}"
            f"{float(emb.own_scores[e, 0, p]):>9.2f}"
        )
    return "\n".join(lines)


def _cmd_lens(args: argparse.Namespace) -> int:
    import tl_latentspaces as tll

    model = tll.load_default_model(cache_dir=args.cache_dir, progress=not args.quiet)
    results = tll.read_lenses(
        model, args.prompt, lenses=("logit", "embedding"), top_k=args.top_k, prepend_bos=not args.no_bos
    )
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tl-latentspaces",
        description="Read every layer of a language model through the logit and embedding lenses.",
    )
    sub = parser.add_subparsers(dest="command")
    lens = sub.add_parser("lens", help="per-layer logit-lens and embedding-lens tokens for a prompt (default)")
    for p in (parser, lens):
        p.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"text to read (default: {DEFAULT_PROMPT!r})")
        p.add_argument("--pos", type=int, default=-1, help="position to print (default: the last)")
        p.add_argument("--top-k", type=int, default=5, help="top tokens kept per cell (default 5)")
        p.add_argument("--no-bos", action="store_true", help="do not prepend the BOS token")
        p.add_argument("--cache-dir", default=None, help="model cache folder (default: ~/.cache/tl_latentspaces)")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``tl-latentspaces`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _cmd_lens(args)
    except (ValueError, ModuleNotFoundError, FileNotFoundError, ImportError) as err:
        print(f"tl-latentspaces: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
