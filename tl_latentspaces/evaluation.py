"""Held-out evaluation of lenses per stack entry, streamed over a corpus.

Metrics (nats, means over positions): ``kl_to_final`` KL(final || lens), ``cross_entropy`` against the next
token, ``top1_agreement`` with the final top-1, and per lens ``prediction_depth`` (Belrose et al. 2023).
Position 0 (BOS) and the last position of each sequence are left out; sums accumulate in float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from jaxtyping import Float

from tl_latentspaces.checks import check_int, warn_user
from tl_latentspaces.corpus import default_corpus
from tl_latentspaces.lenses import LogitLens, build_lenses
from tl_latentspaces.model import ModelAccess
from tl_latentspaces.readout import DEFAULT_CHUNK_ROWS, read_stack
from tl_latentspaces.results import label_frame
from tl_latentspaces.runner import CorpusRunner

__all__ = ["LensEvaluation", "LensEvalAccumulator", "evaluate_lenses"]


@dataclass(frozen=True)
class LensEvaluation:
    """Per-entry held-out metrics of several lenses on one model.

    Tensors are ``[lens, entry]`` (``lenses`` x ``labels`` order) unless noted. ``prediction_depth`` is ``[lens]``:
    the mean first entry index from which the top-1 agrees through ``final_post`` (0 = from the embedding on).
    ``depth_histogram`` is the fraction of positions at each depth; ``kl_std`` the standard deviation of the
    per-position KL (standard error ``kl_std / sqrt(n_positions)``).
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
        """A ``pandas.DataFrame`` indexed by label with columns ``"{metric}_{lens}"`` for each metric."""
        metrics = ("kl_to_final", "cross_entropy", "top1_agreement")
        data = {f"{m}_{lens}": getattr(self, m)[i] for m in metrics for i, lens in enumerate(self.lenses)}
        return label_frame(self.labels, data)

    def summary(self) -> Any:
        """One row per lens: mean KL over layers, mean cross-entropy, prediction depth."""
        import pandas as pd

        rows = [{"lens": lens, "mean_kl_to_final": self.mean_kl(lens),
                 "mean_cross_entropy": float(self.cross_entropy[i, :-1].mean()),
                 "mean_top1_agreement": float(self.top1_agreement[i, :-1].mean()),
                 "prediction_depth": float(self.prediction_depth[i])} for i, lens in enumerate(self.lenses)]
        return pd.DataFrame(rows).set_index("lens")


class LensEvalAccumulator:
    """Streaming held-out metrics of lenses: a consumer of the corpus runner; ``result()`` gives them.

    Arguments as for :func:`evaluate_lenses`; with ``readout_dtype=torch.bfloat16`` only the score products
    are bfloat16, accumulated in float32 (reductions stay float32/float64).

    Example:
        >>> acc = CorpusRunner(model, texts, seq_len=128).run({"eval": LensEvalAccumulator(model).empty})["eval"]  # doctest: +SKIP
        >>> acc.result().summary()  # doctest: +SKIP
    """

    def __init__(self, model: Any, lenses: Sequence[Any] = ("logit",), *, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                 readout_dtype: torch.dtype = torch.float32):
        access = ModelAccess.of(model)
        access.require_eval("evaluate_lenses")
        self.chunk_rows = check_int(chunk_rows, "chunk_rows", minimum=1)
        if readout_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(
                f"readout_dtype must be torch.float32 (exact) or torch.bfloat16 (fast), got {readout_dtype!r}."
            )
        self.readout_dtype = readout_dtype
        if isinstance(lenses, (str, bytes)) or not hasattr(lenses, "__iter__"):
            lenses = [lenses]
        self.labels = [label for label, _ in access.stack_sites()]
        self.built = build_lenses(access, list(lenses), 1.0, self.labels)
        if not self.built:
            raise ValueError("lenses is empty; pass e.g. ('logit', tuned_lens).")
        self.access = access
        self.lenses = [lens.name for lens in self.built]
        self.reference = next((lens for lens in self.built if isinstance(lens, LogitLens)), None) or LogitLens(access)
        self._zero()

    _SUMS = ("kl_sum", "kl_sq", "ce_sum", "agree_sum", "depth_hist")

    def _zero(self) -> None:
        shape = (len(self.built), len(self.labels))
        for name in self._SUMS:
            setattr(self, name, torch.zeros(shape, dtype=torch.float64, device=self.access.device))
        self.n_positions = 0
        self.n_sequences = 0

    def empty(self) -> "LensEvalAccumulator":
        """A new, zeroed accumulator sharing this one's lenses: the corpus runner's factory (``{"eval": acc.empty}``)."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new._zero()
        return new

    def update(self, ids: torch.Tensor, stack: Float[torch.Tensor, "entry batch seq d_model"]) -> None:
        """Add one batch: ``ids`` ``[batch, seq]`` and its residual stack at every stack entry."""
        E = len(self.labels)
        if stack.shape[0] != E or ids.shape != stack.shape[1:3]:
            raise ValueError(
                f"expected ids [batch, seq] and a stack [{E}, batch, seq, d_model] of every stack entry, "
                f"got ids {tuple(ids.shape)} and a stack {tuple(stack.shape)}."
            )
        if ids.shape[1] < 3:
            raise ValueError(f"sequences of {ids.shape[1]} tokens have no position to evaluate; use seq_len >= 3.")
        dev = self.access.device
        x = stack[:, :, 1:-1].reshape(E, -1, stack.shape[-1]).to(dev)
        nxt = ids[:, 2:].reshape(-1, 1).to(dev)
        entries = list(range(E))
        with torch.no_grad():
            out = read_stack(
                x, entries, self.built, final=x[-1], final_entry=E - 1, reference=self.reference, top_k=1,
                targets=nxt, chunk_rows=self.chunk_rows, readout_dtype=self.readout_dtype,
            )
            for k, r in enumerate(out.lenses):
                kl = r.kl_to_final.double()
                self.kl_sum[k] += kl.sum(1)
                self.kl_sq[k] += kl.pow(2).sum(1)
                self.ce_sum[k] -= r.target_log_probs[..., 0].double().sum(1)
                agree = r.top_ids[..., 0] == out.final_top1
                self.agree_sum[k] += agree.double().sum(1)
                trailing = agree.flip(0).to(torch.int64).cumprod(0).sum(0)
                depth = (E - trailing).clamp_max(E - 1)
                self.depth_hist[k] += torch.bincount(depth, minlength=E).double()
        self.n_positions += x.shape[1]
        self.n_sequences += ids.shape[0]

    def merge(self, other: "LensEvalAccumulator") -> "LensEvalAccumulator":
        """Add ``other``'s sums (same model, lenses and labels) into this accumulator."""
        if other.lenses != self.lenses or other.labels != self.labels:
            raise ValueError(
                f"cannot merge evaluations of lenses {other.lenses} into {self.lenses} (or of other stack labels)."
            )
        for name in self._SUMS:
            getattr(self, name).add_(getattr(other, name).to(self.kl_sum.device))
        self.n_positions += other.n_positions
        self.n_sequences += other.n_sequences
        return self

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {name: getattr(self, name).cpu() for name in self._SUMS}
        state.update(n_positions=self.n_positions, n_sequences=self.n_sequences, lenses=list(self.lenses),
                     labels=list(self.labels))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state.get("lenses", [])) != self.lenses or list(state.get("labels", [])) != self.labels:
            raise ValueError(
                f"the saved evaluation is of lenses {state.get('lenses')} over other stack labels or lenses "
                f"than this one ({self.lenses}); start a fresh accumulator."
            )
        for name in self._SUMS:
            getattr(self, name).copy_(state[name].to(self.kl_sum.device))
        self.n_positions = int(state["n_positions"])
        self.n_sequences = int(state["n_sequences"])

    def result(self) -> LensEvaluation:
        """The per-entry means; an error if nothing was evaluated."""
        if self.n_positions == 0:
            raise ValueError("no positions were evaluated; feed at least one batch of sequences of >= 3 tokens.")
        n = float(self.n_positions)
        E = len(self.labels)
        kl_mean = self.kl_sum / n
        kl_var = (self.kl_sq / n - kl_mean.pow(2)).clamp_min(0.0)
        positions = torch.arange(E, dtype=torch.float64, device=self.kl_sum.device)
        hist = self.depth_hist / n
        return LensEvaluation(
            lenses=list(self.lenses), labels=list(self.labels), kl_to_final=kl_mean.float().cpu(),
            cross_entropy=(self.ce_sum / n).float().cpu(), top1_agreement=(self.agree_sum / n).float().cpu(),
            prediction_depth=(hist * positions).sum(1).float().cpu(), depth_histogram=hist.float().cpu(),
            kl_std=kl_var.sqrt().float().cpu(), n_positions=self.n_positions, n_sequences=self.n_sequences,
            model_name=self.access.name,
        )


def evaluate_lenses(model: Any, lenses: Sequence[Any] = ("logit",), corpus: Any = None, *, max_tokens: int = 8192,
                    seq_len: Optional[int] = None, batch_size: int = 8, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                    progress: bool = True, readout_dtype: torch.dtype = torch.float32) -> LensEvaluation:
    """Evaluate lenses on held-out text at every stack entry, streaming over the corpus (merged under ``torchrun``).

    Args:
        lenses: ``"logit"``, ``"embedding"`` and/or :class:`~tl_latentspaces.Lens` objects.
        corpus: Texts, file paths or a ``[n, seq_len]`` token tensor; default the held-out split of
            :func:`~tl_latentspaces.corpus.default_corpus` (disjoint from the one ``fit_tuned_lens`` uses).
        max_tokens: Evaluate at most this many tokens (whole sequences).
        seq_len: Tokens per sequence, BOS included (default 128, or the width of a token tensor).
        chunk_rows: Rows per block of the readout.
        readout_dtype: ``torch.float32`` or ``torch.bfloat16`` score products (accumulated in float32).

    Raises:
        ValueError: On an empty or too-short corpus, a bad setting, or a lens made for another model.

    Example:
        >>> ev = evaluate_lenses(model, ("logit", lens), ["held-out text ..."] * 20)  # doctest: +SKIP
        >>> ev.mean_kl("tuned") < ev.mean_kl("logit")  # doctest: +SKIP
        True
    """
    access = ModelAccess.of(model)
    batch_size = check_int(batch_size, "batch_size", minimum=1)
    max_tokens = check_int(max_tokens, "max_tokens", minimum=3)
    if corpus is None:
        corpus = default_corpus("heldout")
    if seq_len is None:
        seq_len = int(corpus.shape[1]) if isinstance(corpus, torch.Tensor) and corpus.ndim == 2 else 128
    seq_len = check_int(seq_len, "seq_len", minimum=3, why=" (BOS, a read position and its next token)")
    if max_tokens < seq_len:
        warn_user(f"max_tokens={max_tokens} is less than one sequence of seq_len={seq_len}; evaluating one whole "
                  f"sequence ({seq_len} tokens). Pass seq_len={max_tokens} to evaluate {max_tokens} tokens.")
    template = LensEvalAccumulator(access, lenses, chunk_rows=chunk_rows, readout_dtype=readout_dtype)
    runner = CorpusRunner(access, corpus, seq_len=seq_len, batch_size=batch_size,
                          max_tokens=max(max_tokens, seq_len), progress=progress, desc="held-out evaluation")
    return runner.run({"evaluation": template.empty})["evaluation"].result()
