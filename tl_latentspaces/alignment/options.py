"""The alignment suite's options, checked once: :class:`Settings` and the row-count checks."""

from dataclasses import dataclass
from typing import Optional

import torch

from tl_latentspaces.checks import check_bool, check_int
from tl_latentspaces.model import ModelAccess

__all__ = ["Settings", "check_seq_len", "check_rows_for_k", "INT_DTYPES", "MIN_DEBIASED_ROWS"]

INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)
# The unbiased HSIC estimator is defined for n >= 4 rows (its normalizer is n (n - 3)).
MIN_DEBIASED_ROWS = 4


@dataclass(frozen=True)
class Settings:
    """Validated options shared by the accumulator and the entry points (its keyword arguments)."""

    k: int
    skip_positions: int
    center: bool
    cka_block_sequences: int
    layer_cka_biased: bool
    rank_every: int

    @classmethod
    def check(
        cls, access: ModelAccess, *, k: Optional[int], skip_positions: int, center: bool, cka_block_sequences: int,
        layer_cka_biased: bool, rank_every: int,
) -> "Settings":
        d, default_k = access.d_model, max(1, access.d_model // 8)
        why = f" (the subspace dimension cannot exceed d_model={d}; fix: pass k <= {d}, e.g. k={default_k})"
        return cls(
            k=check_int(default_k if k is None else k, "k", minimum=1, maximum=d, why=why),
            skip_positions=check_int(skip_positions, "skip_positions", minimum=0),
            center=check_bool(center, "center"),
            cka_block_sequences=check_int(cka_block_sequences, "cka_block_sequences", minimum=1),
            layer_cka_biased=check_bool(layer_cka_biased, "layer_cka_biased"),
            rank_every=check_int(rank_every, "rank_every", minimum=1),
        )


def check_seq_len(seq_len: int, skip: int) -> None:
    kept = seq_len - skip
    if kept < MIN_DEBIASED_ROWS:
        raise ValueError(
            f"sequences of {seq_len} tokens keep {kept} position(s) after skip_positions={skip}, but the debiased CKA "
            f"estimator needs at least {MIN_DEBIASED_ROWS} tokens per block (its unbiased HSIC divides by n (n - 3)). "
            f"Fix: use seq_len >= {skip + MIN_DEBIASED_ROWS} or a smaller skip_positions."
        )


def check_rows_for_k(n_rows: int, k: int, center: bool, where: str,
                     more: str = "pass more tokens (max_tokens)") -> None:
    # A centred covariance of n rows has rank <= n - 1; an uncentred second moment rank <= n.
    limit = n_rows - 1 if center else n_rows
    if k > limit:
        raise ValueError(
            f"k={k} exceeds the {'n - 1' if center else 'n'} = {limit} principal directions that "
            f"{n_rows} token(s) {where} can define ({'centred ' if center else ''}covariance rank). "
            f"Fix: {more} or k <= {max(limit, 0)}."
        )
