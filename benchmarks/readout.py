"""Benchmark: the streaming readout against the plain forward, TransformerLens 4.3 and the matmul floor.

Two tables, each measured in one run (interleaved rounds, medians), on the default model
(SmolLM2-135M-Instruct), all 31 stack entries, top-5 + entropy + KL to final for every cell:

1. One short prompt (the notebook case): ``forward`` (the plain forward pass); ``matmul`` (the bare
   float32 products of the prompt's normalized stack with ``W_U``, tiled as the readout tiles them:
   with ``forward`` the floor of any exact full-vocabulary readout); ``logit``
   (``tl_latentspaces.logit_lens``, its own forward pass included); ``logit+embedding``
   (``read_lenses(("logit", "embedding"))``); ``transformer_lens`` (TransformerLens 4.3's
   ``tools.analysis.logit_lens(top_k=5)``: top-5 and entropy, no KL, its own forward included).
2. One 512-token sequence of held-out text, read from a cache: ``floor`` (the bare
   ``[31*512, 576] @ [576, 49152]`` float32 matmul, one shot), ``floor_tiled`` (the same products
   as the readout's blocks of rows x ``TILE_COLS`` tiles: what it multiplies, nothing else),
   ``ours`` (``logit_lens(cache=...)``; its per-tile reductions go through ``torch.compile``, and its
   first call, compilation included, is timed apart), ``ours_512_rows`` (the same with ``chunk_rows=512``,
   the earlier default: blocks of 496 rows instead of 2,046), ``ours_eager`` (the same with
   ``TL_LATENTSPACES_COMPILE=0``), ``floor_tiled_bf16`` and ``ours_bf16`` (the bfloat16 readout,
   ``read_stack(readout_dtype=torch.bfloat16)``: bfloat16 products, float32 accumulation),
   ``floor_tiled_bf16_out`` (bfloat16 matmuls, whose output is rounded to bfloat16: what the bfloat16
   readout's products cost beside them), optionally ``transformer_lens`` (two calls: top-5, and full
   log-probs for KL).

Precision, on the 512 tokens: every cell's KL to final against float64 (float32 readout), and
the bfloat16 readout against the float32 one (top-1 agreement, KL error).

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
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's package, not an installed copy

import tl_latentspaces as tll  # noqa: E402
from tl_latentspaces.corpus import default_corpus, tokenize_corpus
from tl_latentspaces.readout import DEFAULT_CHUNK_ROWS, TILE_COLS, read_stack, vocab_major

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

    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        flags = []
    bf16 = sorted(f for f in flags if "bf16" in f)
    cpu += f" ({', '.join(bf16) if bf16 else 'no bfloat16 instructions: avx2' if 'avx2' in flags else 'no bfloat16 instructions'})"

    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"transformer-lens {version('transformer-lens')}, Python {platform.python_version()}"
    )


def timed(methods, repeats):
    """Medians (and min, max, peak extra memory) of interleaved rounds: ``{name: (med, lo, hi, extra)}``."""
    times = {name: [] for name, _ in methods}
    extras = {name: [] for name, _ in methods}
    for name, fn in methods:  # warm up once (caches, allocator)
        fn()
    for _ in range(repeats):
        for name, fn in methods:
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                out = fn()
                times[name].append(time.perf_counter() - t0)
            extras[name].append(mem.extra)
            del out
    return {
        name: (statistics.median(times[name]), min(times[name]), max(times[name]), statistics.median(extras[name]))
        for name, _ in methods
    }


def table(rows, base, base_label):
    lines = [f"| method | median s | min s | max s | x {base_label} | peak extra memory |", "|---|---|---|---|---|---|"]
    for name, (med, lo, hi, extra) in rows.items():
        lines.append(f"| {name} | {med:.3f} | {lo:.3f} | {hi:.3f} | {med / base:.2f} | {extra / 2**20:,.0f} MiB |")
    return lines


def block_rows(entries):
    """Rows per block of a ``DEFAULT_CHUNK_ROWS`` read of ``entries`` entries: whole positions, as ``read_stack``."""
    return max(1, DEFAULT_CHUNK_ROWS // entries) * entries


def floor_tiled(y_all, w, rows):
    """The bare products ``y_all @ w.T`` as ``rows``-row x ``TILE_COLS`` tiles: what a readout multiplies, nothing else."""
    for start in range(0, y_all.shape[0], rows):
        y = y_all[start : start + rows]
        for a in range(0, w.shape[0], TILE_COLS):
            torch.mm(y, w[a : min(a + TILE_COLS, w.shape[0])].T)


def floor_tiled_bf16(y_all, w, rows):
    """:func:`floor_tiled` with bfloat16 products accumulated in float32, as the bfloat16 readout multiplies on the
    CPU (float32 operands in oneDNN's bfloat16 mode, ``torch.backends.mkldnn.matmul.fp32_precision``)."""
    setting = torch.backends.mkldnn.matmul
    before, setting.fp32_precision = setting.fp32_precision, "bf16"
    try:
        floor_tiled(y_all, w, rows)
    finally:
        setting.fp32_precision = before


def short_floor_lines(sp):
    """The least an exact full-vocabulary readout of the prompt can take: its forward pass plus the bare products."""
    floor = sp["forward"][0] + sp["matmul"][0]
    return [
        f"- Floor of any exact readout of every entry (plain forward + bare products, `forward` + `matmul`): "
        f"{floor:.3f} s = **{floor / sp['transformer_lens'][0]:.2f}** of TransformerLens's time and "
        f"{floor / sp['forward'][0]:.2f}x the forward; ours spends {sp['logit'][0] - floor:.3f} s above it "
        f"(logit) and {sp['logit+embedding'][0] - sp['forward'][0] - 2 * sp['matmul'][0]:.3f} s "
        "(logit + embedding, two sets of products).",
    ]


def short_report(sp, prompt, access, args, load_start):
    return [
        "# Readout benchmark: the default model, all 31 stack entries, top-5 + entropy + KL to final",
        "",
        f"Machine: {machine()}.",
        f"Load average at the start: {load_start:.1f} (1 min), at the end: {os.getloadavg()[0]:.1f}. The machine is "
        "shared: other jobs inflate every row, not evenly; compare rows of one table (measured side by side, "
        "interleaved) only.",
        f"Command: `python benchmarks/readout.py --short-only --repeats {args.repeats}`; medians over "
        f"{args.repeats} interleaved rounds after one warm-up call each.",
        "",
        f"## One prompt: {prompt.shape[1]} tokens (BOS included), {len(access.stack_sites())} entries",
        "",
        *table(sp, sp["forward"][0], "forward"),
        "",
        f"- logit lens / plain forward: **{sp['logit'][0] / sp['forward'][0]:.2f}x** (target <= 3x).",
        f"- logit lens / TransformerLens `logit_lens(top_k=5)`: **{sp['logit'][0] / sp['transformer_lens'][0]:.2f}** "
        "(target <= 0.5; ours also computes KL to final, theirs does not).",
        f"- logit + embedding / logit alone: **{sp['logit+embedding'][0] / sp['logit'][0]:.2f}x** (target <= 1.5x).",
        *short_floor_lines(sp),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--prompt", default="The Eiffel Tower is in the city of")
    parser.add_argument("--out", default="benchmarks/results/readout.md")
    parser.add_argument("--short-only", action="store_true", help="only the one-prompt table")
    parser.add_argument("--transformer-lens-512", action="store_true",
                        help="also time TransformerLens on the 512 tokens (about 35 s and 9 GiB per call)")
    args = parser.parse_args()

    from transformer_lens.tools.analysis import logit_lens as tl_logit_lens

    model = tll.load_default_model(progress=False)
    access = tll.ModelAccess(model)
    load_start = os.getloadavg()[0]

    # ---------------------------------------------------------------- one short prompt
    prompt = model.to_tokens(args.prompt, prepend_bos=True)
    names = [name for _, name in access.stack_sites()]
    with torch.no_grad():
        _, short_cache = model.run_with_cache(prompt, names_filter=lambda n: n in names)
        short_normed = torch.cat([access.final_norm(short_cache[n][0]) for n in names])  # [31 x pos, d_model]
    wt = vocab_major(access.W_U.detach().contiguous()).T  # [d_vocab, d_model], the layout the readout multiplies by
    with torch.no_grad():
        short = timed(
            [
                ("forward", lambda: model(prompt)),
                ("matmul", lambda: floor_tiled(short_normed, wt, block_rows(len(names)))),
                ("logit", lambda: tll.logit_lens(model, prompt, top_k=5)),
                ("logit+embedding", lambda: tll.read_lenses(model, prompt, lenses=("logit", "embedding"), top_k=5)),
                ("transformer_lens", lambda: tl_logit_lens(model, prompt, positions=None, top_k=5, return_type="probs")),
            ],
            args.repeats,
        )
    ours = tll.logit_lens(model, prompt, top_k=5)
    theirs = tl_logit_lens(model, prompt, positions=None, top_k=5, return_type="probs")
    if not torch.equal(ours.top_ids, theirs.readout.top_ids):
        raise SystemExit("top-5 ids differ from TransformerLens on the prompt: the timings would compare different work")

    if args.short_only:
        text = "\n".join(short_report(short, prompt, access, args, load_start)) + "\n"
        print(text)
        write_result(args.out, text)
        return 0

    # ---------------------------------------------------------------- 512 tokens
    tokens = tokenize_corpus(model, default_corpus("heldout"), seq_len=args.tokens)[:1]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    E = len(names)
    normed = torch.cat([access.final_norm(cache[n][0]) for n in names])  # for the floors only
    W_U = access.W_U.detach().contiguous()
    stack = torch.stack([cache[n][0] for n in names])
    lens = tll.LogitLens(access)
    normed_bf16, wt_bf16 = normed.to(torch.bfloat16), wt.to(torch.bfloat16)

    def read(dtype):
        return read_stack(stack, list(range(E)), [lens], final=stack[-1], final_entry=E - 1, reference=lens,
                          top_k=5, readout_dtype=dtype)

    def ours():
        return tll.logit_lens(model, tokens, cache=cache, top_k=5)

    def ours_eager():
        with mock.patch.dict(os.environ, {"TL_LATENTSPACES_COMPILE": "0"}):
            return ours()

    with torch.no_grad():
        start = time.perf_counter()
        ours()
        first_call = time.perf_counter() - start
    methods = [
        ("floor", lambda: normed @ W_U),
        ("floor_tiled", lambda: floor_tiled(normed, wt, block_rows(E))),
        ("ours", ours),
        ("ours_512_rows", lambda: tll.logit_lens(model, tokens, cache=cache, top_k=5, chunk_rows=512)),
        ("ours_eager", ours_eager),
        ("floor_tiled_bf16", lambda: floor_tiled_bf16(normed, wt, block_rows(E))),
        ("ours_bf16", lambda: read(torch.bfloat16)),
        ("floor_tiled_bf16_out", lambda: floor_tiled(normed_bf16, wt_bf16, block_rows(E))),
    ]
    if args.transformer_lens_512:

        def transformer_lens():
            top = tl_logit_lens(model, cache=cache, positions=None, top_k=5, return_type="probs")
            full = tl_logit_lens(model, cache=cache, positions=None, return_type="log_probs")
            log_q = full.readout.values
            return top, (log_q[-1:].exp() * (log_q[-1:] - log_q)).sum(-1)

        methods.append(("transformer_lens", transformer_lens))
    with torch.no_grad():
        long = timed(methods, args.repeats)

    # ---------------------------------------------------------------- precision on the 512 tokens
    with torch.no_grad():
        r32, r16 = read(torch.float32).lenses[0], read(torch.bfloat16).lenses[0]
        W64 = W_U.double()
        lp_f = torch.log_softmax(access.final_norm(stack[-1]).double() @ W64, -1)
        kl_err = ent_err = 0.0
        for e in range(E):
            lq = torch.log_softmax(access.final_norm(stack[e]).double() @ W64, -1)
            exact = (lp_f.exp() * (lp_f - lq)).sum(-1)
            kl_err = max(kl_err, (r32.kl_to_final[e].double() - exact).abs().max().item())
            ent = -(lq.exp() * lq).sum(-1)
            ent_err = max(ent_err, (r32.entropy[e].double() - ent).abs().max().item())
        kl_max = r32.kl_to_final.max().item()
        agree = (r16.top_ids[..., 0] == r32.top_ids[..., 0]).double().mean().item()
        d_kl = (r16.kl_to_final - r32.kl_to_final).abs()
        d_h = (r16.entropy - r32.entropy).abs()

    sp = short
    lp = long
    floor_t = min(lp["floor"][0], lp["floor_tiled"][0])
    lines = [
        "# Readout benchmark: the default model, all 31 stack entries, top-5 + entropy + KL to final",
        "",
        f"Machine: {machine()}.",
        f"Load average at the start: {load_start:.1f} (1 min), at the end: {os.getloadavg()[0]:.1f}. The machine is "
        "shared: other jobs inflate every row, not evenly; compare rows of one table (measured side by side, "
        "interleaved) only.",
        f"Command: `python benchmarks/readout.py --repeats {args.repeats} --tokens {args.tokens}`; medians over "
        f"{args.repeats} interleaved rounds after one warm-up call each.",
        "",
        f"## One prompt: {prompt.shape[1]} tokens (BOS included), {E} entries",
        "",
        *table(sp, sp["forward"][0], "forward"),
        "",
        f"- logit lens / plain forward: **{sp['logit'][0] / sp['forward'][0]:.2f}x** (target <= 3x).",
        f"- logit lens / TransformerLens `logit_lens(top_k=5)`: **{sp['logit'][0] / sp['transformer_lens'][0]:.2f}** "
        "(target <= 0.5; ours also computes KL to final, theirs does not).",
        f"- logit + embedding / logit alone: **{sp['logit+embedding'][0] / sp['logit'][0]:.2f}x** (target <= 1.5x).",
        *short_floor_lines(sp),
        "",
        f"## {tokens.shape[1]} tokens of held-out text, {E} entries, from a cache",
        "",
        *table(lp, floor_t, "floor"),
        "",
        f"- ours / fp32 floor: **{lp['ours'][0] / floor_t:.2f}x** (target <= 1.1x); ours_bf16 / fp32 floor: "
        f"**{lp['ours_bf16'][0] / floor_t:.2f}x**; ours_bf16 / bf16 tiled floor: "
        f"{lp['ours_bf16'][0] / lp['floor_tiled_bf16'][0]:.2f}x; bfloat16-mode products / bfloat16 matmuls "
        f"rounding their output: {lp['floor_tiled_bf16'][0] / lp['floor_tiled_bf16_out'][0]:.2f}x.",
        f"- ours / ours_512_rows: **{lp['ours'][0] / lp['ours_512_rows'][0]:.2f}** (blocks of "
        f"{block_rows(E)} rows against 496: each block sweeps all of W_U once).",
        f"- ours / ours_eager: **{lp['ours'][0] / lp['ours_eager'][0]:.2f}** (the compiled reductions). Its first "
        f"call in this process took {first_call:.1f} s, compilation included (with torch's on-disk compile cache "
        "as this machine had it; a cold cache adds seconds once per machine).",
        "",
        f"## Precision on the same {tokens.shape[1]} tokens",
        "",
        f"- float32 readout against float64 (final norm in float32, then float64 products and softmax), every one "
        f"of the {E * tokens.shape[1]:,} cells: max |KL error| = {kl_err:.1e} nats (largest KL {kl_max:.1f} nats), "
        f"max |entropy error| = {ent_err:.1e} nats.",
        f"- bfloat16 readout against float32: top-1 agreement {agree:.2%}; |KL error| max {d_kl.max().item():.3f}, "
        f"mean {d_kl.mean().item():.4f} nats; |entropy error| max {d_h.max().item():.3f}, mean {d_h.mean().item():.4f} nats.",
        "",
        "floor: the one-shot float32 matmul of the already-normalized stack with W_U (its output alone is "
        f"{E * tokens.shape[1] * W_U.shape[1] * 4 / 2**30:.1f} GiB). floor_tiled(_bf16): the same products as "
        f"{block_rows(E)}-row x {TILE_COLS}-column tiles, the matmuls the readout itself does, with nothing else. "
        "`x floor` divides by the faster float32 floor. floor_tiled_bf16 and ours_bf16 multiply float32 operands in "
        "oneDNN's bfloat16 mode (`torch.backends.mkldnn.matmul.fp32_precision = \"bf16\"`): bfloat16 products, float32 "
        "accumulation and output; floor_tiled_bf16_out multiplies bfloat16 tensors, which rounds every output to "
        "bfloat16. Where oneDNN has no bfloat16 path (AVX2-only CPUs) the bfloat16 mode's products stay float32. "
        "The readout's reductions run in float32 with float64 sums either way.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    write_result(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
