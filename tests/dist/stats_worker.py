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
from tl_latentspaces.alignment_math import CKAMatrixAccumulator, CovarianceAccumulator  # noqa: E402
from tl_latentspaces.runner import stream_residuals  # noqa: E402
from tl_latentspaces.distributed import finish_distributed, init_distributed, reduce_accumulator, shard_batches  # noqa: E402


def main(out: str) -> None:
    ctx = init_distributed()
    model = build_llama_like()
    access = ModelAccess(model)
    sequences = torch.randint(0, 100, (24, 16), generator=torch.Generator().manual_seed(11))
    batch = 4
    names = dict(access.stack_sites())
    covs = [CovarianceAccumulator(access.d_model) for _ in names]
    cka = CKAMatrixAccumulator(len(names))
    mine = torch.cat([sequences[i * batch : (i + 1) * batch] for i in shard_batches(len(sequences) // batch, ctx)])
    for _, stack in stream_residuals(model, mine, names, batch_size=batch, progress=False):
        rows = stack[:, :, 1:].reshape(stack.shape[0], -1, stack.shape[-1])  # skip BOS-like position 0
        for acc, x in zip(covs, rows):
            acc.update(x)
        cka.update(list(rows))
    for acc in covs:
        reduce_accumulator(acc, lambda: CovarianceAccumulator(access.d_model))
    reduce_accumulator(cka, lambda: CKAMatrixAccumulator(len(names)))
    if ctx.is_main:
        tensors = {f"cov{i}": acc.cov() for i, acc in enumerate(covs)}
        tensors.update({f"mean{i}": acc.mean for i, acc in enumerate(covs)})
        tensors["cka"] = cka.result(debiased=False)
        tensors["cka_debiased"] = cka.result(debiased=True)
        tensors["world"] = torch.tensor(ctx.world_size)
        save_file({k: v.contiguous() for k, v in tensors.items()}, out)
    finish_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
