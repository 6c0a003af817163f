"""Benchmark: the streaming logit-lens readout against TransformerLens 4.3 and the matmul floor.

Work: the default model (SmolLM2-135M-Instruct), one 512-token sequence of held-out text, all 31
stack entries, top-5 + entropy + KL to final for every (entry, position).

* ``ours``: ``tl_latentspaces.logit_lens(model, tokens, cache=cache, top_k=5)``.
* ``transformer_lens``: TransformerLens 4.3's ``tools.analysis.logit_lens`` producing the same
  quantities. It needs two calls: ``top_k=5`` (top-5 and entropy) and ``return_type="log_probs"``
  over the whole vocabulary, from which KL to final is computed.
* ``floor``: the bare ``[31*512, 576] @ [576, 49152]`` float32 matmul on already-normalized
  inputs (one shot), the least any exact readout has to do.
* ``floor_tiled``: the same products as the readout's own tiles (512 rows x ``TILE_COLS``
  columns, into one reused buffer) and nothing else; it beats the one-shot floor on this CPU,
  because it never writes a 1.8 GiB output. Ratios use the faster floor.

Times are medians over ``--repeats`` rounds, each round running every method once (interleaved,
so a slow spell of a shared machine hits every method alike); peak extra memory is the highest
resident set size seen during the call (sampled every 2 ms from /proc/self/statm) minus the size at its start.

Run:  python benchmarks/readout.py [--repeats 5] [--out benchmarks/results/readout.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

import tl_latentspaces as tll
from tl_latentspaces.corpus import default_corpus, tokenize_corpus
from tl_latentspaces.readout import TILE_COLS, vocab_major

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """Samples the resident set size in a thread; ``extra`` is the peak minus the start."""

    def __enter__(self):
        self.start = rss()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())
        self.extra = self.peak - self.start


def write_result(path: str, text: str) -> None:
    """Write a results file atomically (temp file in the same folder, then rename)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, out)


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from importlib.metadata import version

    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"transformer-lens {version('transformer-lens')}, Python {platform.python_version()}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--out", default="benchmarks/results/readout.md")
    parser.add_argument("--no-transformer-lens", action="store_true", help="skip the slow TransformerLens rows")
    args = parser.parse_args()

    from transformer_lens.tools.analysis import logit_lens as tl_logit_lens

    model = tll.load_default_model(progress=False)
    access = tll.ModelAccess(model)
    tokens = tokenize_corpus(model, default_corpus("heldout"), seq_len=args.tokens)[:1]
    names = [name for _, name in access.stack_sites()]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    E = len(names)
    normed = torch.cat([access.final_norm(cache[n][0]) for n in names])  # for the floor only
    W_U = access.W_U.detach().contiguous()

    def ours():
        return tll.logit_lens(model, tokens, cache=cache, top_k=5)

    def transformer_lens():
        with torch.no_grad():
            top = tl_logit_lens(model, cache=cache, positions=None, top_k=5, return_type="probs")
            full = tl_logit_lens(model, cache=cache, positions=None, return_type="log_probs")
            log_q = full.readout.values  # [E, 1, pos, d_vocab]
            log_p = log_q[-1:]
            kl = (log_p.exp() * (log_p - log_q)).sum(-1)
        return top, kl

    def floor():
        with torch.no_grad():
            return normed @ W_U

    wt = vocab_major(W_U).T  # [d_vocab, d_model], the layout the readout multiplies by
    tile_buf = torch.empty(512, TILE_COLS)

    def floor_tiled():
        with torch.no_grad():
            for start in range(0, normed.shape[0], 512):
                y = normed[start : start + 512]
                for a in range(0, wt.shape[0], TILE_COLS):
                    b = min(a + TILE_COLS, wt.shape[0])
                    torch.mm(y, wt[a:b].T, out=tile_buf[: y.shape[0], : b - a])

    # Same answers before timing anything.
    agreement = "Agreement with TransformerLens: not checked (run without --no-transformer-lens)."
    if not args.no_transformer_lens:
        r = ours()
        top, kl = transformer_lens()
        if not torch.equal(r.top_ids, top.readout.top_ids):
            raise SystemExit("top-5 ids differ from TransformerLens: the timings would compare different work")
        prob_err = (r.top_probs - top.readout.values).abs().max().item()
        kl_err = (r.kl_to_final - kl).abs().max().item()
        ent_err = (r.entropy - top.readout.entropy).abs().max().item()
        # Which KL is closer to the truth: both against float64 on every third entry.
        with torch.no_grad():
            W64 = W_U.double()
            lp_f = torch.log_softmax(access.final_norm(cache[names[-1]][0]).double() @ W64, -1)
            ours_err = tl_err = 0.0
            for e in range(0, E, 3):
                lq = torch.log_softmax(access.final_norm(cache[names[e]][0]).double() @ W64, -1)
                exact = (lp_f.exp() * (lp_f - lq)).sum(-1)
                ours_err = max(ours_err, (r.kl_to_final[e, 0].double() - exact).abs().max().item())
                tl_err = max(tl_err, (kl[e, 0].double() - exact).abs().max().item())
        agreement = (
            f"Agreement with TransformerLens on this input: identical top-5 ids; max |Δ top-5 prob| = {prob_err:.1e}, "
            f"max |Δ entropy| = {ent_err:.1e} nats, max |Δ KL to final| = {kl_err:.1e} nats. Against a float64 "
            f"KL (every third entry): ours is off by at most {ours_err:.1e} nats, TransformerLens's by {tl_err:.1e}."
        )
        del r, top, kl

    load_start = os.getloadavg()[0]
    methods = [("floor", floor), ("floor_tiled", floor_tiled), ("ours", ours), ("transformer_lens", transformer_lens)]
    if args.no_transformer_lens:
        methods.pop()
    times: dict[str, list[float]] = {name: [] for name, _ in methods}
    extras: dict[str, list[int]] = {name: [] for name, _ in methods}
    # Interleaved: repeat r runs every method once, so a slow spell of the machine hits all alike.
    for _ in range(args.repeats):
        for name, fn in methods:
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                out = fn()
                times[name].append(time.perf_counter() - t0)
            extras[name].append(mem.extra)
            del out
    rows = [
        (name, statistics.median(times[name]), min(times[name]), max(times[name]), statistics.median(extras[name]))
        for name, _ in methods
    ]
    floor_t = min(rows[0][1], rows[1][1])  # the faster of the two bare-matmul floors
    lines = [
        "# Logit-lens readout: 31 entries x 512 tokens, top-5 + entropy + KL to final",
        "",
        f"Machine: {machine()}.",
        f"Load average at the start: {load_start:.1f} (1 min); other jobs on the machine inflate every row alike, "
        "not evenly: compare rows of one run only.",
        f"Command: `python benchmarks/readout.py --repeats {args.repeats} --tokens {args.tokens}`; "
        f"{E} stack entries x {tokens.shape[1]} tokens of held-out text; medians over {args.repeats} interleaved rounds.",
        "",
        "| method | median s | min s | max s | x floor | peak extra memory |",
        "|---|---|---|---|---|---|",
    ]
    for name, med, lo, hi, extra in rows:
        lines.append(f"| {name} | {med:.2f} | {lo:.2f} | {hi:.2f} | {med / floor_t:.2f} | {extra / 2**20:,.0f} MiB |")
    lines += [
        "",
        agreement,
        "",
        "floor: the one-shot float32 matmul of the already-normalized stack with W_U (its output alone is "
        f"{E * tokens.shape[1] * W_U.shape[1] * 4 / 2**30:.1f} GiB). floor_tiled: the same products as "
        f"512-row x {TILE_COLS}-column tiles into one reused buffer, the matmuls the readout itself does, "
        "with nothing else. `x floor` divides by the faster of the two. transformer_lens: two calls of "
        "`tools.analysis.logit_lens` (top_k=5; full-vocabulary log-probs for KL).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    write_result(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
