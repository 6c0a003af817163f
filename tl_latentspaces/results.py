"""What a lens readout returns, and the difference of two readouts.

Shapes: ``entry`` the stack entries (``"0_pre"`` ... ``"final_post"``), ``batch`` and ``pos`` the read
positions, ``k`` top-k, ``T`` targets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from jaxtyping import Bool, Float, Int

from tl_latentspaces.checks import check_int

__all__ = ["LensResult", "LensDiff", "LensInputs", "lens_divergence"]


def label_frame(labels: Any, columns: dict[str, Any]) -> Any:
    """A ``pandas.DataFrame`` with one row per stack label: tensors become numpy columns, scalars repeat."""
    import pandas as pd

    data = {k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v for k, v in columns.items()}
    return pd.DataFrame(data, index=pd.Index(list(labels), name="label"))


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(values.dtype)
    return (values * m).sum((1, 2)) / m.sum().clamp_min(1)


@dataclass(frozen=True)
class LensInputs:
    """What a readout was computed from, so that two readouts compare over the whole vocabulary.

    ``resid`` is ``[entry, batch, pos, d_model]`` on the CPU; scores are
    ``lens.project(x, entries[e]) @ lens.weight + lens.bias``.
    """

    resid: Float[torch.Tensor, "entry batch pos d_model"]
    lens: Any
    entries: list[int]

    def log_probs(self, e: int, rows: torch.Tensor) -> Float[torch.Tensor, "n d_vocab"]:
        """Float64 log-probabilities of the lens at entry ``e`` for the flat ``[batch * pos]`` ``rows``."""
        lens = self.lens
        x = self.resid[e].reshape(-1, self.resid.shape[-1])[rows].to(lens.weight.device)
        z = lens.project(x, self.entries[e]) @ lens.weight
        if lens.bias is not None:
            z = z + lens.bias
        return z.to(torch.float64).log_softmax(-1)


def lens_divergence(base: LensInputs, other: LensInputs,
                    chunk_rows: int = 64) -> Float[torch.Tensor, "entry batch pos"]:
    """``KL(base || other)`` in nats between two lens distributions, cell by cell, over the full vocabulary.

    Cells whose residual vectors are bit-identical in both runs (upstream of a patch) are exactly 0.
    """
    E, B, P, _ = base.resid.shape
    out = torch.zeros(E, B * P, dtype=torch.float64)
    with torch.no_grad():
        for e in range(E):
            a = base.resid[e].reshape(B * P, -1)
            b = other.resid[e].reshape(B * P, -1)
            rows = (a != b).any(-1).nonzero().flatten()
            for start in range(0, rows.numel(), chunk_rows):
                r = rows[start : start + chunk_rows]
                lp, lq = base.log_probs(e, r), other.log_probs(e, r)
                out[e, r] = (lp.exp() * (lp - lq)).sum(-1).clamp_min(0).cpu()
    return out.to(torch.float32).reshape(E, B, P)


@dataclass(frozen=True)
class LensResult:
    """One lens read at every entry of the residual stack, for one input.

    Attributes:
        lens: The lens's name (``"logit"``, ``"embedding"``, ``"tuned"``, ...).
        tokens: Input ids at all positions; ``positions`` are the ones read, indices into ``seq``.
        mask: True where the read position is a real token (not padding).
        top_ids, top_probs, top_scores: Top-k under the lens; scores are logits, or cosines for the
            embedding lens.
        entropy, kl_to_final: Of the lens distribution, in nats; ``KL(final || lens)``.
        final_top1: The model's own top-1 prediction.
        target_ids, target_probs, target_ranks: Requested targets, their probabilities and ranks
            (0 = top) under the lens, or None.
        own_scores, own_ranks: Embedding lens only: cosine between the residual and the input
            embedding of the position's own token, and that token's rank by cosine.
        decode: Token id -> string.
        inputs: What :attr:`LensDiff.divergence` needs; None for results made without it.
    """

    lens: str
    labels: list[str]
    tokens: Int[torch.Tensor, "batch seq"]
    positions: list[int]
    mask: Bool[torch.Tensor, "batch pos"]
    top_ids: Int[torch.Tensor, "entry batch pos k"]
    top_probs: Float[torch.Tensor, "entry batch pos k"]
    top_scores: Float[torch.Tensor, "entry batch pos k"]
    entropy: Float[torch.Tensor, "entry batch pos"]
    kl_to_final: Float[torch.Tensor, "entry batch pos"]
    final_top1: Int[torch.Tensor, "batch pos"]
    target_ids: Optional[Int[torch.Tensor, "batch pos T"]] = None
    target_probs: Optional[Float[torch.Tensor, "entry batch pos T"]] = None
    target_ranks: Optional[Int[torch.Tensor, "entry batch pos T"]] = None
    own_scores: Optional[Float[torch.Tensor, "entry batch pos"]] = None
    own_ranks: Optional[Int[torch.Tensor, "entry batch pos"]] = None
    model_name: str = ""
    decode: Callable[[int], str] = field(default=str, repr=False, compare=False)
    inputs: Optional[LensInputs] = field(default=None, repr=False, compare=False)

    @property
    def agrees_with_final(self) -> Bool[torch.Tensor, "entry batch pos"]:
        """Whether the lens's top-1 equals the model's final top-1."""
        return self.top_ids[..., 0] == self.final_top1.unsqueeze(0)

    @property
    def input_ids(self) -> Int[torch.Tensor, "batch pos"]:
        """The token at each read position."""
        return self.tokens[:, self.positions]

    @property
    def str_tokens(self) -> list[list[str]]:
        """Decoded input tokens at the read positions, ``[batch][pos]``."""
        return [[self.decode(int(i)) for i in row] for row in self.input_ids]

    def top_tokens(self, rank: int = 0) -> list[list[list[str]]]:
        """Decoded top-``rank`` tokens, ``[entry][batch][pos]``."""
        k = self.top_ids.shape[-1]
        rank = check_int(rank, "rank", minimum=0, maximum=k - 1, why=f" (this readout kept the top {k})")
        ids = self.top_ids[..., rank]
        return [[[self.decode(int(i)) for i in row] for row in entry] for entry in ids]

    def index(self, label: str) -> int:
        """Stack index of ``label``; an unknown label is an error listing the valid ones."""
        if label not in self.labels:
            raise ValueError(f"unknown stack label {label!r}; this result has {self.labels}.")
        return self.labels.index(label)

    def summary(self) -> Any:
        """A ``pandas.DataFrame`` of per-entry means over real positions, indexed by label."""
        cols = {
            "entropy": _masked_mean(self.entropy, self.mask),
            "kl_to_final": _masked_mean(self.kl_to_final, self.mask),
            "top1_agreement": _masked_mean(self.agrees_with_final.float(), self.mask),
        }
        if self.own_scores is not None and self.own_ranks is not None:
            cols["own_cosine"] = _masked_mean(self.own_scores, self.mask)
            cols["own_rank"] = _masked_mean(self.own_ranks.float(), self.mask)
        return label_frame(self.labels, cols)

    def to_dataframe(self) -> Any:
        """One row per (entry, batch, pos) real position: tokens, top-1, entropy, KL and the rest."""
        import pandas as pd

        E, B, P = self.entropy.shape
        e_idx, b_idx, p_idx = torch.meshgrid(torch.arange(E), torch.arange(B), torch.arange(P), indexing="ij")
        keep = self.mask.unsqueeze(0).expand(E, B, P).reshape(-1).cpu()
        e_idx, b_idx, p_idx = (t.reshape(-1)[keep] for t in (e_idx, b_idx, p_idx))
        pos = torch.tensor(self.positions)[p_idx]
        flat = lambda t: t.reshape(E * B * P, *t.shape[3:]).cpu()[keep].numpy()  # noqa: E731
        data: dict[str, Any] = {
            "label": [self.labels[i] for i in e_idx.tolist()],
            "entry": e_idx.numpy(),
            "batch": b_idx.numpy(),
            "pos": pos.numpy(),
            "token": [self.decode(int(self.tokens[b, p])) for b, p in zip(b_idx.tolist(), pos.tolist())],
            "top1": [self.decode(int(i)) for i in flat(self.top_ids[..., 0]).tolist()],
            "top1_prob": flat(self.top_probs[..., 0]),
            "entropy": flat(self.entropy),
            "kl_to_final": flat(self.kl_to_final),
            "agrees_with_final": flat(self.agrees_with_final),
        }
        if self.own_scores is not None and self.own_ranks is not None:
            data["own_cosine"] = flat(self.own_scores)
            data["own_rank"] = flat(self.own_ranks)
        if self.target_ids is not None and self.target_probs is not None and self.target_ranks is not None:
            for t in range(self.target_ids.shape[-1]):
                data[f"target{t}_prob"] = flat(self.target_probs[..., t])
                data[f"target{t}_rank"] = flat(self.target_ranks[..., t])
        return pd.DataFrame(data)

    def diff(self, other: "LensResult") -> "LensDiff":
        """``other`` minus ``self`` for the same input and lens (e.g. patched minus clean)."""
        return LensDiff.between(self, other)

    def __sub__(self, other: "LensResult") -> "LensDiff":
        return other.diff(self)


@dataclass(frozen=True)
class LensDiff:
    """The difference between two readouts of the same input: ``other - base``.

    Attributes:
        kl_delta: ``[entry, batch, pos]`` change in each run's KL to *its own* final distribution.
            A patch changes the final distribution too, so this moves at entries the patch
            cannot reach; use :attr:`divergence` to see where the patch acts.
        entropy_delta, top1_changed: ``[entry, batch, pos]``.
        target_prob_delta: ``[entry, batch, pos, T]``, or None.
        divergence: ``[entry, batch, pos]`` ``KL(base || other)`` in nats between the two runs'
            lens distributions at the same cell: exactly 0 wherever the patch cannot reach. None
            when either result was made without its inputs.
    """

    base: LensResult
    other: LensResult
    kl_delta: torch.Tensor
    entropy_delta: torch.Tensor
    top1_changed: torch.Tensor
    target_prob_delta: Optional[torch.Tensor]
    divergence: Optional[torch.Tensor] = None

    @classmethod
    def between(cls, base: LensResult, other: LensResult) -> "LensDiff":
        """``other - base``; raises ValueError if the lens, the entries, the positions or the input tokens differ."""
        if not isinstance(other, LensResult):
            raise TypeError(f"a difference is taken between two LensResults, got {type(other).__name__}. "
                            "Fix: read the patched run with the same call and pass its result.")
        problems = []
        if base.lens != other.lens:
            problems.append(f"lens {base.lens!r} vs {other.lens!r}")
        if base.labels != other.labels:
            problems.append(f"labels {base.labels} vs {other.labels}")
        if base.positions != other.positions:
            problems.append("the read positions differ")
        if base.tokens.shape != other.tokens.shape or not torch.equal(base.tokens, other.tokens):
            problems.append("the input tokens differ")
        if problems:
            raise ValueError(
                "a difference needs two readouts of the same input with the same lens and "
                f"entries; these differ in: {'; '.join(problems)}. Read both runs with the same call."
            )
        tpd = None
        if base.target_probs is not None and other.target_probs is not None:
            same_targets = base.target_ids is not None and other.target_ids is not None
            if same_targets and torch.equal(base.target_ids, other.target_ids):
                tpd = other.target_probs - base.target_probs
        a, b = base.inputs, other.inputs
        same = a is not None and b is not None and a.resid.shape == b.resid.shape and a.entries == b.entries
        divergence = lens_divergence(a, b) if same and a.lens.weight.shape == b.lens.weight.shape else None
        return cls(
            base=base,
            other=other,
            kl_delta=other.kl_to_final - base.kl_to_final,
            entropy_delta=other.entropy - base.entropy,
            top1_changed=other.top_ids[..., 0] != base.top_ids[..., 0],
            target_prob_delta=tpd,
            divergence=divergence,
        )

    @property
    def labels(self) -> list[str]:
        """The stack labels of both readouts."""
        return self.base.labels

    def changed_entries(self) -> list[str]:
        """Labels of the entries where any real position's top-1 token changed."""
        changed = (self.top1_changed & self.base.mask.unsqueeze(0)).flatten(1).any(1)
        return [label for label, c in zip(self.labels, changed.tolist()) if c]

    def to_dataframe(self) -> Any:
        """One row per (entry, batch, pos) real position: both top-1 tokens and the deltas."""
        columns = ["label", "entry", "batch", "pos", "token", "top1"]
        frame = self.base.to_dataframe()[columns].rename(columns={"top1": "top1_base"})
        frame["top1_other"] = self.other.to_dataframe()["top1"].values
        keep = self.base.mask.unsqueeze(0).expand_as(self.kl_delta).reshape(-1).cpu()
        deltas = {"kl_delta": self.kl_delta, "entropy_delta": self.entropy_delta, "top1_changed": self.top1_changed,
                  "divergence": self.divergence}
        for name, values in deltas.items():
            if values is not None:
                frame[name] = values.reshape(-1).cpu()[keep].numpy()
        return frame
