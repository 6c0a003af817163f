"""Worker for the multi-process tests: streaming statistics of a tiny model's residuals.

Run alone for the single-process reference, or under torchrun for the sharded run; both write the
reduced statistics to the safetensors file given as the first argument (rank 0 only).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for conftest's builders

from conftest import build_llama_like  # noqa: E402
from tl_latentspaces import ModelAccess  # noqa: E402
from tl_latentspaces.runner import stream_residuals  # noqa: E402
from tl_latentspaces.distributed import (  # noqa: E402
    all_reduce_sum,
    finish_distributed,
    init_distributed,
    reduce_accumulator,
    shard_batches,
)
from tl_latentspaces.stats import Moments, cka_from_hsic, linear_cka_from_moments, unbiased_hsic_matrix  # noqa: E402


def main(out: str) -> None:
    ctx = init_distributed()
    model = build_llama_like()
    access = ModelAccess(model)
    sequences = torch.randint(0, 100, (24, 16), generator=torch.Generator().manual_seed(11))
    batch = 4
    names = dict(access.stack_sites())
    E = len(names)
    every_pair = [(i, j) for i in range(E) for j in range(i, E)]
    moments = Moments(E, every_pair)
    hsic = torch.zeros(E, E, dtype=torch.float64)  # unbiased HSIC summed over batches: a plain sum
    mine = torch.cat([sequences[i * batch : (i + 1) * batch] for i in shard_batches(len(sequences) // batch, ctx)])
    for _, stack in stream_residuals(model, mine, names, batch_size=batch, progress=False):
        rows = stack[:, :, 1:].reshape(E, -1, stack.shape[-1])  # skip BOS-like position 0
        moments.update(rows)
        hsic += unbiased_hsic_matrix(list(rows))
    reduce_accumulator(moments, lambda: Moments(E, every_pair))
    all_reduce_sum(hsic)
    if ctx.is_main:
        tensors = {f"cov{i}": moments.cov(i) for i in range(E)}
        tensors.update({f"mean{i}": moments.means[i] for i in range(E)})
        tensors["cka"] = torch.stack([
            torch.stack([linear_cka_from_moments(moments.comoment(i, j), moments.comoment(i, i), moments.comoment(j, j))
                         for j in range(E)])
            for i in range(E)
        ])
        tensors["cka_debiased"] = cka_from_hsic(hsic / (len(sequences) // batch), "HSIC_u", list(names))
        tensors["world"] = torch.tensor(ctx.world_size)
        save_file({k: v.contiguous() for k, v in tensors.items()}, out)
    finish_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
