"""The embedding lens with and without centring, on the default model.

Estimates the residual stream's mean per stack entry on the training split of the default corpus
(:func:`tl_latentspaces.centered_embedding_lens`, BOS positions left out), then reads held-out
text through three lenses:

* ``plain``: the default ``"embedding"`` lens, cosine of the raw residual with raw ``W_E`` rows;
* ``stream-centred``: the residual's mean subtracted, ``W_E`` left as it is (the default of
  :func:`~tl_latentspaces.centered_embedding_lens`);
* ``both centred``: both the residual's mean and the mean ``W_E`` row subtracted
  (``center_embedding=True``);
* ``standardized`` (computed here, not a library lens): the centred vectors, residual and ``W_E``
  rows alike, divided coordinate-wise by the stream's standard deviation at that entry (the same
  training tokens), so that no dimension weighs more than its spread. Its centred part is checked
  against the library lens's cosines.

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
from tl_latentspaces.runner import stream_residuals  # noqa: E402
from tl_latentspaces.model import ModelAccess  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "embedding_lens_centering.md"
ENTRIES = ["0_pre", "1_pre", "2_pre", "5_pre", "10_pre", "15_pre", "20_pre", "25_pre", "29_pre", "final_post"]
TOP_ENTRIES = ["1_pre", "5_pre", "15_pre", "29_pre", "final_post"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fit-tokens", type=int, default=2048, help="training-split tokens for the means")
    parser.add_argument("--sequences", type=int, default=4, help="held-out sequences read")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per held-out sequence, BOS included")
    parser.add_argument("--positions", type=int, nargs=2, default=[12, 40], help="positions whose top-5 is shown")
    parser.add_argument("--skip-positions", type=int, default=1, help="leading positions left out of the means")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.manual_seed(0)

    model = tll.load_default_model()
    t0 = time.perf_counter()
    centred = tll.centered_embedding_lens(
        model, max_tokens=args.fit_tokens, skip_positions=args.skip_positions, center_embedding=True
    )
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
        "stream-centred": tll.read_lenses(model, tokens, lenses=(resid_only,), **read)["embedding_centered"],
        "both centred": both["embedding_centered"],
    }
    tok = model.tokenizer
    d_vocab = model.cfg.d_vocab

    # The standardized variant, by hand: per-dimension spread of the stream at each entry.
    access = ModelAccess(model)
    names = {label: name for label, name in access.stack_sites() if label in ENTRIES}
    fit_ids = tokenize_corpus(model, default_corpus("train"), seq_len=128, max_tokens=args.fit_tokens)
    s1 = torch.zeros(len(ENTRIES), model.cfg.d_model, dtype=torch.float64)
    s2 = torch.zeros_like(s1)
    n = 0
    for _, stack in stream_residuals(access, fit_ids, names, progress=False):
        body = stack[:, :, args.skip_positions:].double()
        s1 += body.sum((1, 2))
        s2 += (body**2).sum((1, 2))
        n += body.shape[1] * body.shape[2]
    mean = s1 / n
    std = (s2 / n - mean**2).clamp_min(0).sqrt()
    rows = [centred.labels.index(label) for label in ENTRIES]
    mean_gap = float((mean - centred.means[rows]).abs().max())
    _, resid = next(stream_residuals(access, tokens, names, batch_size=len(tokens), progress=False))
    resid = resid[:, :, 1:].double().reshape(len(ENTRIES), -1, model.cfg.d_model)
    own_ids = tokens[:, 1:].reshape(-1)
    W = model.W_E.detach().double()
    W = W - W.mean(0)
    manual = {"both centred": ([], []), "standardized": ([], [])}
    for i in range(len(ENTRIES)):
        for key, scale in (("both centred", torch.ones_like(std[i])), ("standardized", std[i].clamp_min(1e-6))):
            x = (resid[i] - mean[i]) / scale
            w = W / scale
            cos = (x / x.norm(dim=-1, keepdim=True)) @ (w / w.norm(dim=-1, keepdim=True)).T
            own = cos.gather(1, own_ids[:, None])
            manual[key][0].append(own.squeeze(1))
            manual[key][1].append((cos > own).sum(-1))
    gap = max(float((manual["both centred"][0][i] - results["both centred"].own_scores[i].reshape(-1)).abs().max())
              for i in range(len(ENTRIES)))

    lines = [
        "# The embedding lens with and without centring (SmolLM2-135M-Instruct)",
        "",
        f"Means from {centred.n_tokens} training-split tokens (first {args.skip_positions} position(s) of each "
        f"sequence left out) of the default corpus ({fit_s:.1f} s); read on "
        f"{tokens.shape[0]} held-out sequences of {tokens.shape[1]} tokens (BOS left out: "
        f"{tokens.shape[0] * (tokens.shape[1] - 1)} positions). Rank 0 = own embedding nearest; chance "
        f"is about {(d_vocab - 1) / 2:.0f} of {d_vocab}.",
        "",
        "Command: `TL_LATENTSPACES_CACHE=... python benchmarks/embedding_lens_centering.py "
        + " ".join(sys.argv[1:]) + "`",
        "",
        "Own-token cosine and rank, mean over positions (median rank in brackets):",
        "",
        "| entry | cos plain | cos stream-centred | cos both centred | cos standardized | rank plain "
        "| rank stream-centred | rank both centred | rank standardized |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, label in enumerate(ENTRIES):
        row = [label]
        row += [f"{results[k].own_scores[i].float().mean():.3f}" for k in results]
        row.append(f"{manual['standardized'][0][i].mean():.3f}")
        ranks = [results[k].own_ranks[i].reshape(-1).float() for k in results]
        ranks.append(manual["standardized"][1][i].float())
        row += [f"{r.mean():.0f} ({r.median():.0f})" for r in ranks]
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        f"Checks: the benchmark's own float64 means differ from the lens's by at most {mean_gap:.1e}; its "
        f"centred cosines from the lens's by at most {gap:.1e}.",
    ]
    seq = tokens[0]
    for p in args.positions:
        lines += [
            "",
            f"Top-5 at position {p} of the first sequence (own token {tok.decode([int(seq[p])])!r}; "
            f"context ...{tok.decode(seq[max(1, p - 8) : p + 1].tolist())!r}):",
            "",
            "| entry | plain | stream-centred | both centred |",
            "|---|---|---|---|",
        ]
        for label in TOP_ENTRIES:
            i = ENTRIES.index(label)
            cells = []
            for k in ("plain", "stream-centred", "both centred"):
                ids = results[k].top_ids[i, 0, p - 1].tolist()  # pos starts at 1
                cells.append(" ".join(repr(tok.decode([t])) for t in ids).replace("|", "\\|"))
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
