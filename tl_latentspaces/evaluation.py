"""Held-out evaluation of lenses, per layer and side by side, streamed over a corpus.

For every stack entry (``"0_pre"`` ... ``"final_post"``) and every lens, :func:`evaluate_lenses`
reports, averaged over the evaluated positions of a held-out corpus:

* ``kl_to_final``: KL(final || lens) in nats, the model's own next-token distribution against
  the lens's;
* ``cross_entropy``: the lens's cross-entropy against the actual next token (nats);
* ``top1_agreement``: how often the lens's top-1 equals the model's final top-1;
* ``prediction_depth`` (per lens): the first entry from which the lens's top-1 stays equal to
  the final top-1 through ``final_post``, averaged over positions (Belrose et al. 2023).

The corpus is packed into ``seq_len``-token sequences starting with BOS. Position 0 (BOS, whose
residual norm is orders of magnitude above the rest in many models) and the last position of each
sequence (which has no next token inside the sequence) are left out, so every metric averages
over the same positions. Residuals are captured by the plugin's hooks batch by batch; scores are
computed in float32 in chunks of ``chunk_rows`` rows and discarded, sums accumulate in float64.

Example:
    >>> from tl_latentspaces.evaluation import evaluate_lenses
    >>> ev = evaluate_lenses(model, lenses=("logit", lens), max_tokens=4096)  # doctest: +SKIP
    >>> ev.to_dataframe()  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from jaxtyping import Float

from tl_latentspaces.model import ModelAccess

__all__ = ["LensEvaluation", "evaluate_lenses"]


@dataclass(frozen=True)
class LensEvaluation:
    """Per-entry held-out metrics of several lenses on one model.

    Shapes use ``lens`` (the lenses, in ``lenses`` order) and ``entry`` (the stack entries, in
    ``labels`` order).

    Attributes:
        lenses: Lens names, e.g. ``["logit", "tuned"]``.
        labels: Stack labels, ``"0_pre"`` ... ``"final_post"``.
        kl_to_final: ``[lens, entry]`` mean KL(final || lens), nats.
        cross_entropy: ``[lens, entry]`` mean cross-entropy against the next token, nats.
        top1_agreement: ``[lens, entry]`` fraction of positions whose lens top-1 is the final top-1.
        prediction_depth: ``[lens]`` mean first entry index from which the top-1 agrees through
            ``final_post`` (0 = from the embedding on, ``len(labels) - 1`` = only at the end).
        depth_histogram: ``[lens, entry]`` fraction of positions with each prediction depth.
        kl_std: ``[lens, entry]`` standard deviation of the per-position KL (its standard error
            is ``kl_std / sqrt(n_positions)``).
        n_positions: Positions evaluated.
        n_sequences: Sequences evaluated.
        model_name: The model's name.
    """

    lenses: list[str]
    labels: list[str]
    kl_to_final: Float[torch.Tensor, "lens entry"]
    cross_entropy: Float[torch.Tensor, "lens entry"]
    top1_agreement: Float[torch.Tensor, "lens entry"]
    prediction_depth: Float[torch.Tensor, " lens"]
    depth_histogram: Float[torch.Tensor, "lens entry"]
    kl_std: Float[torch.Tensor, "lens entry"]
    n_positions: int
    n_sequences: int
    model_name: str = ""

    def index(self, lens: str) -> int:
        """Row of ``lens``; an unknown name is an error listing the evaluated lenses."""
        if lens not in self.lenses:
            raise ValueError(f"no lens {lens!r} in this evaluation; it has {self.lenses}.")
        return self.lenses.index(lens)

    def mean_kl(self, lens: str, *, include_final: bool = False) -> float:
        """Mean KL to final over the layers (``final_post`` left out unless ``include_final``)."""
        row = self.kl_to_final[self.index(lens)]
        if not include_final and self.labels[-1] == "final_post":
            row = row[:-1]
        return float(row.mean())

    def to_dataframe(self) -> Any:
        """A ``pandas.DataFrame`` indexed by label, one column per (metric, lens), side by side.

        Columns are ``"{metric}_{lens}"`` for ``kl_to_final``, ``cross_entropy`` and
        ``top1_agreement``.
        """
        import pandas as pd

        data = {}
        for metric in ("kl_to_final", "cross_entropy", "top1_agreement"):
            values = getattr(self, metric)
            for i, lens in enumerate(self.lenses):
                data[f"{metric}_{lens}"] = values[i].cpu().numpy()
        frame = pd.DataFrame(data, index=self.labels)
        frame.index.name = "label"
        return frame

    def summary(self) -> Any:
        """One row per lens: mean KL over layers, mean cross-entropy, prediction depth."""
        import pandas as pd

        rows = []
        for i, lens in enumerate(self.lenses):
            rows.append(
                {
                    "lens": lens,
                    "mean_kl_to_final": self.mean_kl(lens),
                    "mean_cross_entropy": float(self.cross_entropy[i, :-1].mean()),
                    "mean_top1_agreement": float(self.top1_agreement[i, :-1].mean()),
                    "prediction_depth": float(self.prediction_depth[i]),
                }
            )
        return pd.DataFrame(rows).set_index("lens")


def evaluate_lenses(
    model: Any,
    lenses: Sequence[Any] = ("logit",),
    corpus: Any = None,
    *,
    max_tokens: int = 8192,
    seq_len: Optional[int] = None,
    batch_size: int = 8,
    chunk_rows: int = 256,
    progress: bool = True,
) -> LensEvaluation:
    """Evaluate lenses on held-out text, every stack entry, streaming over the corpus.

    Args:
        model: A ``HookedTransformer`` or ``TransformerBridge`` in eval mode.
        lenses: ``"logit"``, ``"embedding"`` and/or :class:`~tl_latentspaces.TunedLens` objects.
        corpus: Text, a list of texts, file paths or a ``[n, seq_len]`` token tensor; default
            the held-out split of the offline default corpus (disjoint from the training split
            :func:`~tl_latentspaces.fit_tuned_lens` uses by default).
        max_tokens: Evaluate at most this many tokens (whole sequences).
        seq_len: Tokens per sequence, BOS included (default 128, or the width of a token tensor).
        batch_size: Sequences per forward pass.
        chunk_rows: Rows per ``[rows, d_vocab]`` score matrix.
        progress: Show a progress bar.

    Returns:
        A :class:`LensEvaluation`.

    Raises:
        ValueError: On an empty or too-short corpus, a bad setting, or a lens made for another
            model.

    Example:
        >>> ev = evaluate_lenses(model, ("logit", lens), ["held-out text ..."] * 20)  # doctest: +SKIP
        >>> ev.mean_kl("tuned") < ev.mean_kl("logit")  # doctest: +SKIP
        True
    """
    from tqdm.auto import tqdm

    from tl_latentspaces.corpus import default_corpus, stream_residuals, tokenize_corpus
    from tl_latentspaces.lenses import LogitLens, _build_lenses

    access = model if isinstance(model, ModelAccess) else ModelAccess(model)
    access.require_eval("evaluate_lenses")
    for name, value, low in (("batch_size", batch_size, 1), ("chunk_rows", chunk_rows, 1), ("max_tokens", max_tokens, 3)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}.")
    if corpus is None:
        corpus = default_corpus("heldout")
    if seq_len is None:
        seq_len = int(corpus.shape[1]) if isinstance(corpus, torch.Tensor) and corpus.ndim == 2 else 128
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 3:
        raise ValueError(
            f"seq_len must be an int >= 3 (BOS, a read position and its next token), got {seq_len!r}."
        )
    if isinstance(lenses, (str, bytes)) or not hasattr(lenses, "__iter__"):
        lenses = [lenses]
    built = _build_lenses(access, list(lenses), 1.0)
    if not built:
        raise ValueError("lenses is empty; pass e.g. ('logit', tuned_lens).")
    for lens in built:
        if hasattr(lens, "check_labels"):
            lens.check_labels([label for label, _ in access.stack_sites()])
    seqs = tokenize_corpus(access, corpus, seq_len=seq_len, max_tokens=max(max_tokens, seq_len))
    sites = access.stack_sites()
    labels = [label for label, _ in sites]
    E, K = len(labels), len(built)
    dev = access.device
    reference = next((lens for lens in built if isinstance(lens, LogitLens)), None) or LogitLens(access)

    kl_sum = torch.zeros(K, E, dtype=torch.float64, device=dev)
    kl_sq = torch.zeros(K, E, dtype=torch.float64, device=dev)
    ce_sum = torch.zeros(K, E, dtype=torch.float64, device=dev)
    agree_sum = torch.zeros(K, E, dtype=torch.float64, device=dev)
    depth_hist = torch.zeros(K, E, dtype=torch.float64, device=dev)
    n_pos = 0
    n_rows_total = seqs.shape[0] * (seq_len - 2)
    bar = tqdm(total=n_rows_total, desc="evaluating lenses", unit="pos", disable=not progress)
    try:
        for ids, stack in stream_residuals(access, seqs, dict(sites), batch_size=batch_size, progress=False):
            # Leave out BOS (position 0) and the last position (no next token in the sequence).
            x = stack[:, :, 1:-1].reshape(E, -1, stack.shape[-1])
            nxt = ids[:, 2:].reshape(-1).to(dev)
            N = x.shape[1]
            with torch.no_grad():
                for start in range(0, N, chunk_rows):
                    stop = min(start + chunk_rows, N)
                    rows = x[:, start:stop].to(dev)
                    target = nxt[start:stop]
                    zf = _scores(reference, rows[-1], E - 1)
                    logp_f = torch.log_softmax(zf, -1)
                    p_f = logp_f.exp()
                    neg_h = (p_f * logp_f).sum(-1)
                    top1_f = zf.argmax(-1)
                    del zf
                    for k, lens in enumerate(built):
                        agree = torch.empty(E, stop - start, dtype=torch.bool, device=dev)
                        for e in range(E):
                            z = _scores(lens, rows[e], e)
                            logq = torch.log_softmax(z, -1)
                            kl = (neg_h - (p_f * logq).sum(-1)).clamp_min(0.0).double()
                            kl_sum[k, e] += kl.sum()
                            kl_sq[k, e] += kl.pow(2).sum()
                            ce_sum[k, e] -= logq.gather(1, target[:, None]).double().sum()
                            agree[e] = z.argmax(-1) == top1_f
                            agree_sum[k, e] += agree[e].double().sum()
                        # Prediction depth: index where the final run of agreeing entries starts.
                        trailing = agree.flip(0).to(torch.int64).cumprod(0).sum(0)
                        depth = (E - trailing).clamp_max(E - 1)
                        depth_hist[k] += torch.bincount(depth, minlength=E).double()
                    bar.update(stop - start)
            n_pos += N
    finally:
        bar.close()
    n = float(n_pos)
    kl_mean = kl_sum / n
    kl_var = (kl_sq / n - kl_mean.pow(2)).clamp_min(0.0)
    positions = torch.arange(E, dtype=torch.float64, device=dev)
    hist = depth_hist / n
    return LensEvaluation(
        lenses=[lens.name for lens in built],
        labels=labels,
        kl_to_final=kl_mean.float().cpu(),
        cross_entropy=(ce_sum / n).float().cpu(),
        top1_agreement=(agree_sum / n).float().cpu(),
        prediction_depth=(hist * positions).sum(1).float().cpu(),
        depth_histogram=hist.float().cpu(),
        kl_std=kl_var.sqrt().float().cpu(),
        n_positions=n_pos,
        n_sequences=int(seqs.shape[0]),
        model_name=access.name,
    )


def _scores(lens: Any, x: torch.Tensor, entry: int) -> torch.Tensor:
    y = lens.project(x.to(torch.float32), entry)
    z = y @ lens.weight
    if lens.bias is not None:
        z = z + lens.bias
    return z
