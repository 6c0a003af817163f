"""Benchmark: fit the default model's tuned lens and evaluate it on held-out text.

One command writes ``benchmarks/results/tuned_lens_fit.md``::

    python benchmarks/tuned_lens_fit.py

It fits :func:`tl_latentspaces.fit_tuned_lens` on the training split of the offline default corpus
(16K tokens by default, as `fit_tuned_lens` and `default_tuned_lens` use; at most 64K), timing
everything from tokenization on (collection included), then evaluates on the disjoint held-out
split, per layer, the logit lens, the fitted lens and the tuned-lens package's recipe
(zero-initialised translators, SGD with Nesterov momentum, lr 1.0 x (1 - 0.9), weight decay 1e-3,
linear decay, gradient clipping at 1, KL loss, 1024-token steps) trained on the same tokens for
the same wall time.

Options: ``--max-tokens`` (training tokens), ``--eval-tokens`` (held-out tokens), ``--threads``
(torch threads; on a shared machine 1 thread can be faster than 2), ``--no-baseline``,
``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tl_latentspaces as tll  # noqa: E402
from tl_latentspaces.corpus import default_corpus, tokenize_corpus  # noqa: E402
from tl_latentspaces.runner import stream_residuals  # noqa: E402
from tl_latentspaces.evaluation import evaluate_lenses  # noqa: E402
from tl_latentspaces.fitting import fit_tuned_lens  # noqa: E402
from tl_latentspaces.tuned_lens import DEFAULT_FIT  # noqa: E402
from tl_latentspaces.model import ModelAccess, transformer_lens_version  # noqa: E402
from tl_latentspaces.tuned_lens import TunedLens  # noqa: E402


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _load() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


class _SGDLens(torch.nn.Module):
    """The tuned-lens package's translators (``h + Linear(h)``, zero-initialised) for training."""

    def __init__(self, n_layers: int, d: int):
        super().__init__()
        self.translators = torch.nn.ModuleList(torch.nn.Linear(d, d) for _ in range(n_layers))
        for t in self.translators:
            torch.nn.init.zeros_(t.weight)
            torch.nn.init.zeros_(t.bias)

    def to_tuned_lens(self, model) -> TunedLens:
        lens = TunedLens.for_model(model)
        with torch.no_grad():
            for i, t in enumerate(self.translators):
                lens.weight[i].copy_(t.weight)
                lens.bias[i].copy_(t.bias)
        lens.info["fit"] = {"method": "tuned-lens recipe (SGD Nesterov)"}
        return lens


def sgd_recipe(model, seqs: torch.Tensor, wall_seconds: float, tokens_per_step: int = 1024, seed: int = 0):
    """Train like ``tuned-lens train`` (package defaults) for ``wall_seconds``, collection included.

    Returns ``(lens, steps, seconds, last_loss)``. Steps cycle through ``seqs``; the linear LR
    decay is planned from the first step's duration so that it reaches zero at the budget.
    """
    torch.manual_seed(seed)
    access = ModelAccess(model)
    L, d = access.n_layers, access.d_model
    net = _SGDLens(L, d)
    beta = 0.9
    opt = torch.optim.SGD(net.parameters(), lr=1.0 * (1 - beta), momentum=beta, nesterov=True, weight_decay=1e-3)
    W_U = access.W_U.detach().float()
    b_U = access.b_U.detach().float()
    names = dict(access.stack_sites())
    per_batch = max(1, tokens_per_step // seqs.shape[1])
    start = time.perf_counter()
    planned = None
    step, loss_value, cursor = 0, float("nan"), 0
    while True:
        idx = torch.arange(cursor, cursor + per_batch) % seqs.shape[0]
        cursor += per_batch
        (ids, stack), = list(stream_residuals(access, seqs[idx], names, batch_size=per_batch, progress=False))
        with torch.no_grad():
            log_p = torch.log_softmax(access.final_norm(stack[-1]) @ W_U + b_U, -1)
        total = 0.0
        for layer in range(L):
            h = stack[layer].float()
            t = net.translators[layer]
            logits = access.final_norm(h + t(h)) @ W_U + b_U
            kl = torch.sum(log_p.exp() * (log_p - torch.log_softmax(logits, -1)), -1).mean()
            kl.backward()
            total += float(kl.detach())
            del logits, kl
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        if planned is None:
            first = time.perf_counter() - start
            planned = max(1, int(wall_seconds // first))
        for group in opt.param_groups:
            group["lr"] = 1.0 * (1 - beta) * max(0.0, 1 - step / planned)
        opt.step()
        opt.zero_grad(set_to_none=False)
        step += 1
        loss_value = total / L
        print(f"  sgd step {step}/{planned}: mean KL {loss_value:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
        if time.perf_counter() - start >= wall_seconds or step >= planned:
            break
    return net.to_tuned_lens(model), step, time.perf_counter() - start, loss_value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--repeats", type=int, default=1, help="fits to time (the lens is the same each time; median reported)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "tuned_lens_fit.md")
    args = ap.parse_args()
    if args.max_tokens > 65536:
        ap.error("--max-tokens must be at most 65536 (the acceptance budget).")
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = _load()
    model = tll.load_default_model(progress=False)
    access = ModelAccess(model)

    # The default tuned lens's own settings (what the report fits on a fresh cache).
    settings = dict(DEFAULT_FIT, max_tokens=args.max_tokens)
    runs = []
    for r in range(max(1, args.repeats)):
        print(f"fit {r + 1}/{args.repeats} on {args.max_tokens} tokens, settings {settings} ...", flush=True)
        t0 = time.perf_counter()
        lens = fit_tuned_lens(model, default_corpus("train"), progress=True, **settings)
        runs.append((time.perf_counter() - t0, lens.info["fit"]["phase_seconds"]))
        print(f"fit: {runs[-1][0]:.1f} s {runs[-1][1]}", flush=True)
    fit_seconds, phases = sorted(runs, key=lambda run: run[0])[len(runs) // 2]
    report = dict(lens.info["fit"], phase_seconds=phases, all_seconds=[round(run[0], 1) for run in runs])

    sgd = None
    if not args.no_baseline:
        print(f"tuned-lens recipe (SGD) for {fit_seconds:.0f} s on the same tokens ...", flush=True)
        seqs = tokenize_corpus(model, default_corpus("train"), seq_len=128, max_tokens=args.max_tokens)
        sgd_lens, steps, sgd_seconds, sgd_loss = sgd_recipe(model, seqs, fit_seconds)
        sgd = dict(steps=steps, seconds=sgd_seconds, loss=sgd_loss)

    print(f"evaluating on {args.eval_tokens} held-out tokens ...", flush=True)
    t1 = time.perf_counter()
    ev = evaluate_lenses(model, ("logit", lens), default_corpus("heldout"), max_tokens=args.eval_tokens, progress=True)
    ev_sgd = None
    if sgd is not None:
        ev_sgd = evaluate_lenses(model, (sgd_lens,), default_corpus("heldout"), max_tokens=args.eval_tokens,
                                 progress=True)
    eval_seconds = time.perf_counter() - t1
    load_after = _load()
    write_report(args, access, report, fit_seconds, ev, ev_sgd, sgd, eval_seconds, load_before, load_after)
    print(f"wrote {args.out}", flush=True)


def write_report(args, access, report, fit_seconds, ev, ev_sgd, sgd, eval_seconds, load_before, load_after) -> None:
    logit, tuned = ev.kl_to_final[0], ev.kl_to_final[1]
    layers = slice(0, len(ev.labels) - 1)
    mean_logit, mean_tuned = ev.mean_kl("logit"), ev.mean_kl("tuned")
    below = bool((tuned[layers] < logit[layers]).all())
    threads = torch.get_num_threads()
    settings = report["settings"]
    lines = [
        "# Tuned lens fit: SmolLM2-135M-Instruct (the default model)",
        "",
        "Produced by `python benchmarks/tuned_lens_fit.py"
        + (f" --max-tokens {args.max_tokens}" if args.max_tokens != 16384 else "")
        + (f" --eval-tokens {args.eval_tokens}" if args.eval_tokens != 2048 else "")
        + (f" --threads {args.threads}" if args.threads else "")
        + (" --no-baseline" if args.no_baseline else "")
        + (f" --repeats {args.repeats}" if args.repeats != 1 else "")
        + "`.",
        "",
        f"- Machine: {_cpu_name()}, {os.cpu_count()} CPU cores, no GPU; torch {torch.__version__} with "
        f"{threads} thread(s), TransformerLens {'.'.join(map(str, transformer_lens_version()))}, "
        f"Python {platform.python_version()}.",
        f"- The machine is shared: load average (1/5/15 min) {load_before} before, {load_after} after. "
        "Timings move with the load; on this 2-core machine another busy process can slow torch's "
        "2-thread kernels severalfold.",
        f"- Date: {datetime.date.today().isoformat()}.",
        "",
        "## Fit",
        "",
        f"- Training tokens: {settings['max_tokens']} of the default corpus's training split "
        f"(`default_corpus('train')`), sequences of {settings['seq_len']} tokens; "
        f"{report['n_train_positions']} positions in the normal equations, "
        f"{report['n_validation_positions']} validation positions held out "
        "(position 0 and massive-activation positions left out).",
        f"- Settings: the default tuned lens's (`tuned_lens.DEFAULT_FIT`): refinement on "
        f"{settings['refine_tokens']} tokens, {settings['refine_steps']} Gauss-Newton steps per layer.",
        f"- Fit time, tokenization and activation collection included: **{fit_seconds:.1f} s**"
        + (f", the median of {len(report['all_seconds'])} fits ({', '.join(map(str, report['all_seconds']))} s)"
           if len(report["all_seconds"]) > 1 else "")
        + f" (collection {report['phase_seconds'].get('collect', 0):.1f} s, closed form "
        f"{report['phase_seconds'].get('closed_form', 0):.1f} s, Gauss-Newton refinement "
        f"{report['phase_seconds'].get('refine', 0):.1f} s).",
        f"- Ridge chosen per layer: {sorted(set(report['ridge_chosen']))}; refinement kept for "
        f"{sum(report.get('refined', []))} of {len(report['ridge_chosen'])} layers; working vocabulary "
        f"{settings['refine_vocab']} tokens holding {100 * report.get('refine_vocab_mass', float('nan')):.1f}% "
        "of the final probability mass on validation positions.",
        f"- Validation KL (mean over layers, {min(128, report['n_validation_positions'])} positions): closed form "
        f"{_mean(report['val_kl_closed_form']):.3f} nats, after refinement "
        f"{_mean(report.get('val_kl_refined', report['val_kl_closed_form'])):.3f} nats.",
        "",
        f"## Held-out evaluation ({ev.n_positions} positions of `default_corpus('heldout')`, disjoint from training)",
        "",
        f"Evaluation took {eval_seconds:.0f} s. Position 0 (BOS) and each sequence's last position are left out.",
        "",
        "| lens | mean KL to final (nats) | mean cross-entropy (nats) | mean top-1 agreement | prediction depth |",
        "|---|---|---|---|---|",
    ]
    for i, name in enumerate(ev.lenses):
        lines.append(
            f"| {name} | {ev.mean_kl(name):.3f} | {float(ev.cross_entropy[i, :-1].mean()):.3f} | "
            f"{float(ev.top1_agreement[i, :-1].mean()):.3f} | {float(ev.prediction_depth[i]):.2f} |"
        )
    if ev_sgd is not None:
        lines.append(
            f"| tuned-lens recipe (SGD, {sgd['steps']} steps in {sgd['seconds']:.0f} s) | {ev_sgd.mean_kl('tuned'):.3f} | "
            f"{float(ev_sgd.cross_entropy[0, :-1].mean()):.3f} | {float(ev_sgd.top1_agreement[0, :-1].mean()):.3f} | "
            f"{float(ev_sgd.prediction_depth[0]):.2f} |"
        )
    lines += [
        "",
        "Targets: tuned KL below the logit lens's at every layer: "
        f"**{'yes' if below else 'NO'}**; held-out mean KL over layers <= 1.5 nats: **{mean_tuned:.3f}** "
        f"({'yes' if mean_tuned <= 1.5 else 'NO'}); fit within 90 s: **{fit_seconds:.0f} s** "
        f"({'yes' if fit_seconds <= 90 else 'NO'}); at most 64K training tokens: **{settings['max_tokens']}**.",
        "",
        "## Per layer",
        "",
        "KL(final || lens) and cross-entropy against the next token in nats; top-1 = agreement with the "
        "model's final top-1.",
        "",
    ]
    head = "| entry | KL logit | KL tuned |" + (" KL SGD recipe |" if ev_sgd is not None else "")
    head += " CE logit | CE tuned | top-1 logit | top-1 tuned |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for e, label in enumerate(ev.labels):
        row = f"| {label} | {float(logit[e]):.3f} | {float(tuned[e]):.3f} |"
        if ev_sgd is not None:
            row += f" {float(ev_sgd.kl_to_final[0, e]):.3f} |"
        row += (
            f" {float(ev.cross_entropy[0, e]):.3f} | {float(ev.cross_entropy[1, e]):.3f} |"
            f" {float(ev.top1_agreement[0, e]):.3f} | {float(ev.top1_agreement[1, e]):.3f} |"
        )
        lines.append(row)
    lines += [
        "",
        f"Means over the {len(ev.labels) - 1} layer entries (final_post excluded): KL logit {mean_logit:.3f}, "
        f"KL tuned {mean_tuned:.3f}"
        + (f", KL SGD recipe {ev_sgd.mean_kl('tuned'):.3f}" if ev_sgd is not None else "")
        + ".",
        "",
    ]
    if sgd is not None:
        lines += [
            "The tuned-lens recipe ran on the same training tokens with the fit's wall time as its budget "
            f"({fit_seconds:.0f} s, its own forward passes included; its learning-rate schedule was planned "
            f"from the first step): {sgd['steps']} steps of 1024 tokens in {sgd['seconds']:.0f} s (another "
            f"would not have fitted), last training KL {sgd['loss']:.3f} nats. Each step reads 30 layers x "
            "1024 positions through the full 49,152-token unembedding forward and backward, which is what "
            "makes it slow on a CPU.",
            "",
        ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))


def _mean(values) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / max(1, len(values))


if __name__ == "__main__":
    main()
