"""Worker for the clean-exit test: collectives, then rank 0 lingers while rank 1 leaves.

``finish`` ends with ``finish_distributed()``; ``exit`` relies on the teardown that
``init_distributed`` registers for interpreter exit. Without either, gloo aborts the rank that
leaves first in about half of such runs ("terminate called without an active exception").
"""

from __future__ import annotations

import sys
import time

import torch

from tl_latentspaces.distributed import all_reduce_sum, current_context, finish_distributed, init_distributed


def main(mode: str) -> None:
    ctx = init_distributed()
    assert current_context().world_size == ctx.world_size == 2
    t = torch.ones(1000)
    for _ in range(50):
        all_reduce_sum(t)
    if ctx.is_main:
        time.sleep(0.3)  # rank 0 still writing its files while rank 1 is done
    if mode == "finish":
        finish_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
