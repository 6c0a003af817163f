"""Benchmark and reference numbers for the alignment suite on the default model.

Runs :func:`tl_latentspaces.alignment_suite` on SmolLM2-135M-Instruct over the held-out default
corpus at several token budgets, each in its own subprocess so that every peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is the peak of that run alone; a baseline that
only streams the residuals (no statistics), to separate the model's own memory from the suite's;
and the smallest budget again with ``standardize=True``, to show what rogue dimensions do.

It writes ``benchmarks/results/alignment_suite.md`` (machine, timings, memory, the per-entry
numbers of the largest run with their null baselines) and replaces the generated section of
``docs/alignment.md`` between its ``<!-- alignment-suite:begin -->`` / ``end`` markers.

Usage:
    TL_LATENTSPACES_CACHE=.cache python benchmarks/alignment_suite.py             # 4K and 16K tokens
    python benchmarks/alignment_suite.py --tokens 2048 8192 --no-docs             # other budgets
    python benchmarks/alignment_suite.py --threads 2                              # torch threads

The library leaves torch's thread count alone; the benchmark pins it (``--threads``, default 1)
because on two cores shared with other jobs two OpenMP threads spin-wait on each other in the
suite's many mid-sized float64 products and factorisations (measured: the statistics of two
default-model batches took 40 s on one thread against 205-258 s on two, at load average 4-7).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package
RESULTS = ROOT / "benchmarks" / "results" / "alignment_suite.md"
DOCS = ROOT / "docs" / "alignment.md"
BEGIN, END = "<!-- alignment-suite:begin -->", "<!-- alignment-suite:end -->"


def _peak_mb() -> float:
    # ru_maxrss is in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------- child process
def child(tokens: int, out: Path, mode: str, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    import tl_latentspaces as tll
    from tl_latentspaces.alignment import alignment_suite
    from tl_latentspaces.corpus import default_corpus, tokenize_corpus
    from tl_latentspaces.runner import stream_residuals
    from tl_latentspaces.model import ModelAccess

    record: dict = {"tokens": tokens, "mode": mode, "load_avg_start": os.getloadavg()}
    t0 = time.perf_counter()
    model = tll.load_default_model(progress=False)
    record["time_load_s"] = time.perf_counter() - t0
    record["rss_after_load_mb"] = _peak_mb()
    t0 = time.perf_counter()
    if mode == "stream-only":
        access = ModelAccess(model)
        seqs = tokenize_corpus(model, default_corpus("heldout"), seq_len=128, max_tokens=tokens)
        for _ in stream_residuals(model, seqs, dict(access.stack_sites()), batch_size=8, progress=True):
            pass
        record["n_tokens"] = int(seqs.numel())
    else:
        result = alignment_suite(model, max_tokens=tokens, standardize=mode == "standardized", progress=True)
        record["n_tokens"] = result.n_tokens
        result.to_dataframe().to_csv(out.with_suffix(".csv"))
        if mode == "table":
            result.cka.layer_dataframe().to_csv(out.with_suffix(".cka.csv"))
            record.update(
                k=result.k,
                d_model=result.d_model,
                d_vocab=result.d_vocab,
                n_sequences=result.n_sequences,
                skip_positions=result.skip_positions,
                n_blocks=result.cka.n_blocks,
                block_sequences=result.cka.block_sequences,
                n_rank=result.drift.n_rank,
                rank_every=result.drift.rank_every,
                n_null_samples=result.angles.n_null_samples,
                null_angle_first_deg=math.degrees(float(result.angles.null_mean[0])),
                null_angle_first_std_deg=math.degrees(float(result.angles.null_std[0])),
            )
    record["time_run_s"] = time.perf_counter() - t0
    record["rss_peak_mb"] = _peak_mb()
    record["load_avg_end"] = os.getloadavg()
    out.write_text(json.dumps(record))


# ---------------------------------------------------------------------------- parent
def _run_child(tokens: int, mode: str, tmp: Path, threads: int) -> dict:
    import pandas as pd

    out = tmp / f"run_{mode}_{tokens}.json"
    cmd = [sys.executable, __file__, "--child", str(tokens), "--mode", mode, "--out", str(out), "--threads", str(threads)]
    print(f"[benchmark] {mode} over {tokens} tokens ...", file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)  # stderr passes through: the progress bars show
    record = json.loads(out.read_text())
    if mode != "stream-only":
        record["frame"] = pd.read_csv(out.with_suffix(".csv"), index_col=0)
    if mode == "table":
        record["cka"] = pd.read_csv(out.with_suffix(".cka.csv"), index_col=0)
    return record


def _machine(threads: int) -> str:
    from importlib.metadata import version

    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "RAM unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 2**20:.0f} GiB RAM"
    except (OSError, ValueError):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (the suite ran on the CPU)"
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem}, {gpu}; Python {platform.python_version()}, "
        f"torch {torch.__version__} (pinned to {threads} thread(s) of {torch.get_num_threads()}), "
        f"transformer-lens {version('transformer-lens')}"
    )


def _fmt(x: float, digits: int = 3) -> str:
    return "n/a" if x != x else f"{x:.{digits}f}"


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _header(*cells: str) -> list:
    return [_row(*cells), "|" + "---|" * len(cells)]


def _tables(rec: dict) -> str:
    f = rec["frame"]
    k, d = rec["k"], rec["d_model"]
    null0 = f.iloc[0]
    lines = [
        f"Per-entry numbers over {rec['n_tokens']:,} held-out positions ({rec['n_sequences']} sequences of 128, "
        f"the first {rec['skip_positions']} positions of each skipped), k = {k} of d = {d}. SmolLM2 ties its "
        "embeddings (`W_U = W_E^T`), so every `W_U` column equals its `W_E` column and is shown once.\n",
        "**1 + 4. Subspaces.** Principal angles between the entry's top-k principal subspace (centred) and the "
        "top-k singular subspace of `W_E`; the normalized projection kernel (mean squared cosine, 1 = same "
        "subspace); the fraction of the entry's variance inside that subspace. Null (Haar-random k-dim "
        f"subspaces, {rec['n_null_samples']} samples): mean angle {_fmt(null0.angle_null_mean_deg, 1)}°, smallest angle "
        f"{_fmt(rec['null_angle_first_deg'], 1)}° ± {_fmt(rec['null_angle_first_std_deg'], 1)}°, projection kernel "
        f"{_fmt(null0.pk_null_mean)} ± {_fmt(null0.pk_null_std)}, variance fraction k/d = {_fmt(k / d)} ± the "
        "per-entry spread shown.\n",
    ]
    lines += _header("entry", "mean angle °", "smallest angle °", "projection kernel", "variance in W_E",
                     "random subspace ± std", "z")
    for label, r in f.iterrows():
        lines.append(_row(
            label, _fmt(r.angle_embed_mean_deg, 1), _fmt(r.angle_embed_min_deg, 1), _fmt(r.pk_embed),
            _fmt(r.var_embed), f"{_fmt(r.var_null_mean)} ± {_fmt(r.var_null_std)}", _fmt(r.var_embed_z, 1),
        ))
    lines += [
        "",
        f"**2 + 3. CKA and Procrustes.** Biased CKA exact over the stream; debiased = minibatch CKA over "
        f"{rec['n_blocks']} blocks of {rec['block_sequences']} sequences (null: 0). Procrustes: normalized residual "
        "`||sXR - Y|| / ||Y||` with the optimal rotation and scale (centred); without the scale in the CSV "
        "columns `procrustes_*`.\n",
    ]
    lines += _header("entry", "CKA W_E[tok]", "debiased", "CKA next", "debiased", "CKA final", "debiased",
                     "Procrustes → W_E[tok]", "→ next", "→ final")
    for label, r in f.iterrows():
        lines.append(_row(
            label, _fmt(r.cka_embed), _fmt(r.cka_embed_debiased), _fmt(r.cka_next), _fmt(r.cka_next_debiased),
            _fmt(r.cka_final), _fmt(r.cka_final_debiased), _fmt(r.procrustes_embed_scaled),
            _fmt(r.procrustes_next_scaled), _fmt(r.procrustes_final_scaled),
        ))
    lines += [
        "",
        "**5. Per-token drift.** Cosine between each position's residual and its own token's `W_E` row "
        f"(all {rec['n_tokens']:,} positions); that token's rank among all {rec['d_vocab']:,} `W_E` rows by "
        f"cosine, as the embedding lens reads it (every {rec['rank_every']}th kept position: {rec['n_rank']:,}; "
        "0 = nearest; a random "
        f"direction would give a median rank near {rec['d_vocab'] // 2:,}).\n",
    ]
    lines += _header("entry", "cos mean", "cos q10", "cos median", "cos q90", "rank mean", "rank q10",
                     "rank median", "rank q90", "rank 0")
    for label, r in f.iterrows():
        lines.append(_row(
            label, _fmt(r.cos_mean), _fmt(r.cos_q10), _fmt(r.cos_q50), _fmt(r.cos_q90), f"{r.rank_mean:,.0f}",
            f"{r.rank_q10:,.0f}", f"{r.rank_q50:,.0f}", f"{r.rank_q90:,.0f}", _fmt(r.rank0_frac),
        ))
    cka = rec["cka"]
    pick = [label for i, label in enumerate(cka.index) if i % 5 == 0 or label == "final_post"]
    lines += ["", "**Layer-by-layer debiased CKA** (every 5th entry):\n"]
    lines += _header("", *pick)
    for a in pick:
        lines.append(_row(a, *(_fmt(cka.loc[a, b], 2) for b in pick)))
    return "\n".join(lines)


def _standardized(raw: dict, std: dict) -> str:
    a, b = raw["frame"], std["frame"]
    lines = [
        f"**Rogue dimensions.** The same suite over {raw['n_tokens']:,} positions, raw and with "
        "`standardize=True` (every representation z-scored per dimension with its streamed spread, before CKA "
        "and Procrustes):\n",
    ]
    lines += _header("entry", "CKA W_E[tok] raw", "standardized", "CKA next raw", "standardized", "CKA final raw",
                     "standardized", "Procrustes → next raw", "standardized")
    for label in a.index:
        r, s = a.loc[label], b.loc[label]
        lines.append(_row(
            label, _fmt(r.cka_embed), _fmt(s.cka_embed), _fmt(r.cka_next), _fmt(s.cka_next), _fmt(r.cka_final),
            _fmt(s.cka_final), _fmt(r.procrustes_next_scaled), _fmt(s.procrustes_next_scaled),
        ))
    return "\n".join(lines) + "\n"


def _report(runs: list, baseline: dict, machine: str) -> str:
    names = {
        "stream-only": "stream residuals only (no statistics)",
        "standardized": "alignment_suite(standardize=True)",
    }
    lines = [f"Machine: {machine}.", ""]
    lines += _header("run", "max_tokens", "positions in the statistics", "time (s)", "tokens/s", "peak RSS (MB)",
                     "RSS after model load (MB)", "load average (1 min) at start")
    for r in [baseline] + runs:
        lines.append(_row(
            names.get(r["mode"], "alignment_suite"), f"{r['tokens']:,}",
            "-" if r["mode"] == "stream-only" else f"{r['n_tokens']:,}", f"{r['time_run_s']:.0f}",
            f"{r['tokens'] / r['time_run_s']:.0f}", f"{r['rss_peak_mb']:,.0f}", f"{r['rss_after_load_mb']:,.0f}",
            f"{r['load_avg_start'][0]:.1f}",
        ))
    small, large = runs[0], next(r for r in runs if r["mode"] == "table")
    lines += [
        "",
        f"Peak RSS changes by {large['rss_peak_mb'] - small['rss_peak_mb']:+,.0f} MB from {small['tokens']:,} to "
        f"{large['tokens']:,} requested tokens ({large['tokens'] / small['tokens']:.0f}x): the statistics have a "
        "fixed size. Of the peak, the model and its own forward pass (the stream-only run) take "
        f"{baseline['rss_peak_mb']:,.0f} MB. Each run is a fresh subprocess (its `ru_maxrss` is its own peak). "
        "Times include the first pass of `standardize=True` and the final fits, not the model load. The "
        "machine's two cores were shared with other jobs (load averages above): throughput varies with that "
        "load, and the times are upper bounds.",
        "",
    ]
    return "\n".join(lines)


def parent(tokens: list, write_docs: bool, threads: int) -> None:
    tokens = sorted(tokens)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        baseline = _run_child(tokens[0], "stream-only", tmp_path, threads)
        runs = [_run_child(n, "table" if n == tokens[-1] else "suite", tmp_path, threads) for n in tokens]
        std = _run_child(tokens[0], "standardized", tmp_path, threads)
    body = (
        _report(runs + [std], baseline, _machine(threads)) + "\n" + _tables(runs[-1]) + "\n\n" + _standardized(runs[0], std)
    )
    stamp = time.strftime("%Y-%m-%d")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        "# Alignment suite on SmolLM2-135M-Instruct\n\n"
        f"Generated by `benchmarks/alignment_suite.py` on {stamp}; do not edit by hand.\n\n" + body
    )
    print(f"[benchmark] wrote {RESULTS}", file=sys.stderr)
    if write_docs and DOCS.exists():
        text = DOCS.read_text()
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            _, tail = rest.split(END, 1)
            generated = f"{BEGIN}\n_Generated by `benchmarks/alignment_suite.py` on {stamp}._\n\n{body}\n{END}"
            DOCS.write_text(head + generated + tail)
            print(f"[benchmark] updated {DOCS}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384], help="token budgets to run")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/alignment.md")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in every run (default 1)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="suite", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.out, args.mode, args.threads)
    else:
        parent(args.tokens, write_docs=not args.no_docs, threads=args.threads)


if __name__ == "__main__":
    main()
