"""The embedding lens with and without centring, on the default model.

Estimates the residual stream's mean per stack entry on the training split of the default corpus
(:func:`tl_latentspaces.centered_embedding_lens`, BOS positions left out), then reads held-out
text through three lenses:

* ``plain``: the default ``"embedding"`` lens, cosine of the raw residual with raw ``W_E`` rows;
* ``resid-centred``: the residual's mean subtracted, ``W_E`` left as it is;
* ``centred``: both the residual's mean and the mean ``W_E`` row subtracted (the default of
  :func:`~tl_latentspaces.centered_embedding_lens`).

For every lens and a few stack entries it reports the mean own-token cosine and the mean own-token
rank (0 = the token's own embedding is the nearest; chance is about ``d_vocab / 2``), over every
non-BOS position of the held-out sequences, and the top-5 tokens at two positions of the first
sequence. It writes ``benchmarks/results/embedding_lens_centering.md`` and prints the same.

Usage:
    TL_LATENTSPACES_CACHE=.cache python benchmarks/embedding_lens_centering.py
    python benchmarks/embedding_lens_centering.py --fit-tokens 4096 --sequences 8 --seq-len 64
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package

import tl_latentspaces as tll  # noqa: E402
from tl_latentspaces.corpus import default_corpus, tokenize_corpus  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "embedding_lens_centering.md"
ENTRIES = ["0_pre", "1_pre", "2_pre", "5_pre", "10_pre", "15_pre", "20_pre", "25_pre", "29_pre", "final_post"]
TOP_ENTRIES = ["1_pre", "5_pre", "15_pre", "29_pre", "final_post"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fit-tokens", type=int, default=2048, help="training-split tokens for the means")
    parser.add_argument("--sequences", type=int, default=4, help="held-out sequences read")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per held-out sequence, BOS included")
    parser.add_argument("--positions", type=int, nargs=2, default=[12, 40], help="positions whose top-5 is shown")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.manual_seed(0)

    model = tll.load_default_model()
    t0 = time.perf_counter()
    centred = tll.centered_embedding_lens(model, max_tokens=args.fit_tokens)
    fit_s = time.perf_counter() - t0
    resid_only = tll.CenteredEmbeddingLens(
        centred.labels, centred.means, n_tokens=centred.n_tokens, identity=centred.identity, center_embedding=False
    )
    tokens = tokenize_corpus(model, default_corpus("heldout"), seq_len=args.seq_len,
                             max_tokens=args.sequences * args.seq_len)
    read = dict(layers=ENTRIES, pos=slice(1, None), prepend_bos=False, top_k=5)
    both = tll.read_lenses(model, tokens, lenses=("embedding", centred), **read)
    results = {
        "plain": both["embedding"],
        "resid-centred": tll.read_lenses(model, tokens, lenses=(resid_only,), **read)["embedding_centered"],
        "centred": both["embedding_centered"],
    }
    tok = model.tokenizer
    d_vocab = model.cfg.d_vocab

    lines = [
        "# The embedding lens with and without centring (SmolLM2-135M-Instruct)",
        "",
        f"Means from {centred.n_tokens} training-split tokens of the default corpus ({fit_s:.1f} s); read on "
        f"{tokens.shape[0]} held-out sequences of {tokens.shape[1]} tokens (BOS left out: "
        f"{tokens.shape[0] * (tokens.shape[1] - 1)} positions). Rank 0 = own embedding nearest; chance "
        f"is about {(d_vocab - 1) / 2:.0f} of {d_vocab}.",
        "",
        "Command: `TL_LATENTSPACES_CACHE=... python benchmarks/embedding_lens_centering.py "
        + " ".join(sys.argv[1:]) + "`",
        "",
        "| entry | cos plain | cos resid-centred | cos centred | rank plain | rank resid-centred | rank centred "
        "| top-1 share centred |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, label in enumerate(ENTRIES):
        row = [label]
        row += [f"{results[k].own_scores[i].float().mean():.3f}" for k in results]
        row += [f"{results[k].own_ranks[i].float().mean():.0f}" for k in results]
        row.append(f"{(results['centred'].own_ranks[i] == 0).float().mean():.0%}")
        lines.append("| " + " | ".join(row) + " |")
    seq = tokens[0]
    for p in args.positions:
        lines += [
            "",
            f"Top-5 at position {p} of the first sequence (own token {tok.decode([int(seq[p])])!r}; "
            f"context ...{tok.decode(seq[max(1, p - 8) : p + 1].tolist())!r}):",
            "",
            "| entry | plain | centred |",
            "|---|---|---|",
        ]
        for label in TOP_ENTRIES:
            i = ENTRIES.index(label)
            cells = []
            for k in ("plain", "centred"):
                ids = results[k].top_ids[i, 0, p - 1].tolist()  # pos starts at 1
                cells.append(" ".join(repr(tok.decode([t])) for t in ids).replace("|", "\\|"))
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
