"""Worker for the multi-process tuned-lens test: fit a tiny model's tuned lens.

Run alone for the single-process reference, or under torchrun for the data-parallel fit (sharded
collection, reduced normal equations and Gauss-Newton statistics); both write the lens parameters
and the fit report's validation KLs to the safetensors file given as the first argument (rank 0).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for conftest's builders

from conftest import build_llama_like  # noqa: E402
from tl_latentspaces.distributed import finish_distributed, init_distributed  # noqa: E402
from tl_latentspaces.fitting import fit_tuned_lens  # noqa: E402


def main(out: str) -> None:
    ctx = init_distributed()
    model = build_llama_like()
    # 110 sequences of 32 tokens: 3 validation sequences, 107 training batches' worth of rows, and
    # 2,500 refinement rows: three Gauss-Newton chunks, so both ranks compute part of every step.
    tokens = torch.randint(0, 100, (110, 32), generator=torch.Generator().manual_seed(5))
    lens = fit_tuned_lens(model, tokens, batch_size=4, refine_steps=2, refine_tokens=2500, refine_vocab=64,
                          ridge=(1e-2, 1e-1), progress=False)
    if ctx.is_main:
        fit = lens.info["fit"]
        save_file({
            "weight": lens.weight.detach().contiguous(),
            "bias": lens.bias.detach().contiguous(),
            "val_kl": torch.tensor(fit["val_kl_refined"], dtype=torch.float64),
            "n_train": torch.tensor(fit["n_train_positions"]),
            "refined": torch.tensor(fit["refined"]),
            "world": torch.tensor(ctx.world_size),
        }, out)
    finish_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
