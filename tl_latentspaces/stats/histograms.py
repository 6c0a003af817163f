"""Quantiles from histograms: exact for integer data, to the bin width for binned continuous data.

Histograms merge by addition, so streamed quantiles need no sample store.
"""

from typing import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

__all__ = ["binned_quantiles", "integer_quantiles"]

_F64 = torch.float64


def binned_quantiles(
    hist: Int[Tensor, "*b bins"], levels: Sequence[float], lo: float, width: float
) -> Float[Tensor, "*b q"]:
    """Quantiles of binned continuous data: the bin holding ``q N``, interpolated linearly inside it.

    ``hist[..., i]`` counts values in ``[lo + i width, lo + (i + 1) width)``.
    """
    counts = hist.to(_F64)
    cum = counts.cumsum(-1)
    total = cum[..., -1:]
    out = []
    for q in levels:
        # q = 0 reads the first non-empty bin, not the histogram's lower edge.
        target = (q * total).clamp_min(1e-9)
        b = torch.searchsorted(cum.contiguous(), target.contiguous()).clamp_max(hist.shape[-1] - 1)
        before = torch.where(b > 0, cum.gather(-1, (b - 1).clamp_min(0)), torch.zeros_like(target))
        inside = counts.gather(-1, b)
        frac = torch.where(inside > 0, (target - before) / inside.clamp_min(1.0), torch.zeros_like(target))
        out.append((lo + (b.to(_F64) + frac.clamp(0.0, 1.0)) * width).squeeze(-1))
    return torch.stack(out, -1)


def integer_quantiles(hist: Int[Tensor, "*b values"], levels: Sequence[float]) -> Float[Tensor, "*b q"]:
    """Exact quantiles of integer data ``0, 1, ...`` from its histogram (numpy's ``method="inverted_cdf"``)."""
    cum = hist.cumsum(-1).contiguous()
    total = cum[..., -1:].to(_F64)
    out = []
    for q in levels:
        # inverted_cdf: the smallest value whose cumulative count reaches q * N (at least 1).
        target = torch.ceil(q * total).clamp_min(1.0).to(cum.dtype).contiguous()
        out.append(torch.searchsorted(cum, target).squeeze(-1))
    return torch.stack(out, -1).to(_F64)
